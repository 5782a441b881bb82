"""The Grafana dashboard and alert rules against a real Prometheus (Debian `prometheus`)
scraping a running coordinator and agents while a dataset is copied."""

from __future__ import annotations

import contextlib
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
from tests.conftest import mounted_tmpfs
from tests.faultproxy import Fault, FaultProxy, Rule
from tests.test_e2e import create, ready_nodes, upload_dataset
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
        raw = exc.read()
        try:
            body = json.loads(raw)
        except ValueError:
            # Still starting up (e.g. 503 "Service Unavailable" in plain text): not ready yet.
            raise OSError(f"Prometheus answered {exc.code}: {raw[:100]!r}") from exc
    return body


def test_every_query_returns_data_from_a_real_prometheus(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        run_dashboard_check(cluster, tmp_path, stack)


def run_dashboard_check(cluster: LocalCluster, tmp_path: Path, stack: contextlib.ExitStack) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus (Debian package prometheus) is not installed")
    upload_dataset(cluster, "dash-data", "d/")
    # Trouble for every alert to report. node-1 caches on a nearly full disk; node-2 reads S3
    # through a proxy that flips a byte in one response (a checksum failure, then a retry);
    # three replicas on two nodes leave one Pending (fewer Ready replicas than desired).
    cache = stack.enter_context(mounted_tmpfs(cluster.cache_dir("node-1"), "40m"))
    (cache / "filler").write_bytes(b"\0" * (33 << 20))
    proxy = stack.enter_context(FaultProxy(cluster.s3_endpoint))
    proxy.set_rules(
        [
            Rule(
                Fault("flip", offset=10),
                method="GET",
                has_range=False,
                path_contains="/d/",
                limit=1,
            )
        ]
    )
    # Agents write into the tmpfs: stop them before it is unmounted (the stack unwinds LIFO).
    stack.callback(cluster.close)
    cluster.start_coordinator("--reconcile-interval-seconds=0.5")
    cluster.start_agent("node-1")
    cluster.start_agent("node-2", f"--s3-endpoint-url={proxy.url}")

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

    # Scraping starts before the copy, so counters are seen rising (increase() needs that).
    wait_until(lambda: has_data('count(up{job="datacache"} == 1) == 3'), 60, "Prometheus to scrape")
    create(cluster, "watched", "s3://dash-data/d/", replicas=3)
    wait_until(lambda: len(ready_nodes(cluster, "watched")) == 2, 60, "2 Ready replicas")
    assert proxy.counts() == {"flip": 1}
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
    alerts = alert_expressions()
    missing_alerts: list[str] = []

    def all_alerts_fire() -> bool:
        missing_alerts[:] = [a for a in alerts if not has_data(a)]
        return not missing_alerts

    try:
        wait_until(all_alerts_fire, 60, "every alert expression to return data")
    except ClusterError as exc:
        raise AssertionError(f"alert expressions without data: {missing_alerts}") from exc
