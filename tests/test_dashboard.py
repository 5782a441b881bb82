"""The Grafana dashboard and alert rules against a real Prometheus (Debian `prometheus`)
scraping a running coordinator and agents while a dataset is copied."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from datacache.localcluster import ClusterError, LocalCluster, free_port, wait_until
from tests.test_e2e import create, ready_nodes, start, upload_dataset
from tests.test_metrics import AGENT_METRICS, COORDINATOR_METRICS

GRAFANA = Path(__file__).resolve().parents[1] / "manifests" / "grafana"
DASHBOARD = json.loads((GRAFANA / "datacache-dashboard.json").read_text())
RULES = yaml.safe_load((GRAFANA / "alerts.yaml").read_text())
KNOWN = set(AGENT_METRICS) | set(COORDINATOR_METRICS)


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def alert_expressions() -> list[str]:
    return [r["expr"] for g in RULES["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\bdatacache_[a-z_]+", expr))
    return {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in names}


def test_dashboard_is_provisioning_ready() -> None:
    assert DASHBOARD["id"] is None and DASHBOARD["uid"]
    (variable,) = DASHBOARD["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    assert "DS_PROMETHEUS" not in json.dumps(DASHBOARD)
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["description"]
        assert panel["fieldConfig"]["defaults"]["unit"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            for fn in re.findall(r"\b(rate|irate|increase)\(", target["expr"]):
                assert "[$__rate_interval]" in target["expr"], (fn, target["expr"])


def test_queries_use_only_exported_metrics() -> None:
    for expr in dashboard_queries() + alert_expressions():
        names = metric_names(expr)
        assert names and names <= KNOWN, expr


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    return found


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(GRAFANA / "alerts.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    return body


def test_every_query_returns_data_from_a_real_prometheus(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus (Debian package prometheus) is not installed")
    upload_dataset(cluster, "dash-data", "d/")
    start(cluster, 2)
    # Three replicas on two nodes: one stays Pending, so "below desired" has something to say.
    create(cluster, "watched", "s3://dash-data/d/", replicas=3)
    wait_until(lambda: len(ready_nodes(cluster, "watched")) == 2, 60, "2 Ready replicas")

    targets = [f"127.0.0.1:{cluster.coordinator_metrics_port}"] + [
        f"127.0.0.1:{p}" for p in cluster.agent_metrics_ports.values()
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "datacache", "static_configs": [{"targets": targets}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cluster.spawn(
        "prometheus",
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
    )

    def has_data(expr: str) -> bool:
        try:
            body = query(port, expr)
        except OSError:
            return False
        assert body["status"] == "success", (expr, body)
        return bool(body["data"]["result"])

    wait_until(lambda: has_data('up{job="datacache"} == 1'), 60, "Prometheus to scrape")
    # rate() needs two samples inside the window: 30s with 1s scrapes is plenty.
    queries = [q.replace("$__rate_interval", "30s") for q in dashboard_queries()]
    # Some trouble for the error panels to show: a request for a dataset that does not exist.
    with pytest.raises(grpc.RpcError):
        cluster.get_dataset("no-such-dataset")
    missing: list[str] = []

    def all_have_data() -> bool:
        missing[:] = [q for q in queries if not has_data(q)]
        return not missing

    try:
        wait_until(all_have_data, 60, "every dashboard query")
    except ClusterError as exc:
        raise AssertionError(f"queries without data: {missing}") from exc
    for expr in alert_expressions():
        assert query(port, expr)["status"] == "success", expr
        for name in metric_names(expr):
            suffix = "_total" if name in ("datacache_agent_checksum_failures",) else ""
            assert has_data(name + suffix), (expr, name)
    # The one alert this cluster should raise: 2 of 3 replicas Ready.
    below = alert_expressions()[0]
    assert has_data(below)
