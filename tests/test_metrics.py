"""Metrics are a public API: names are pinned here, and a running cluster's endpoints are
scraped over HTTP and checked (by promtool too, when installed)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics as agent_metrics
from coordinator import metrics as coordinator_metrics
from coordinator.store import Store
from datacache.localcluster import LocalCluster, wait_until
from tests.test_e2e import create, ready_nodes, start, upload_dataset

AGENT_METRICS = {
    "datacache_agent_fetched_bytes": "counter",
    "datacache_agent_fetched_files": "counter",
    "datacache_agent_fetches_in_flight": "gauge",
    "datacache_agent_fetch_retries": "counter",
    "datacache_agent_checksum_failures": "counter",
    "datacache_agent_verified_files": "counter",
    "datacache_agent_fetch_duration_seconds": "histogram",
    "datacache_agent_cache_used_bytes": "gauge",
    "datacache_agent_cache_capacity_bytes": "gauge",
    "datacache_agent_cache_free_bytes": "gauge",
    "datacache_agent_evictions": "counter",
    "datacache_agent_scrubbed_files": "counter",
    "datacache_agent_peer_received_bytes": "counter",
    "datacache_agent_peer_origin_bytes": "counter",
    "datacache_agent_peer_fallbacks": "counter",
    "datacache_agent_peer_served_bytes": "counter",
    "datacache_agent_peer_requests": "counter",
}
COORDINATOR_METRICS = {
    "datacache_coordinator_fetched_bytes": "counter",
    "datacache_coordinator_reconcile_passes": "counter",
    "datacache_coordinator_reconcile_duration_seconds": "histogram",
    "datacache_coordinator_label_patches": "counter",
    "datacache_coordinator_grpc_requests": "counter",
    "datacache_coordinator_replicas_desired": "gauge",
    "datacache_coordinator_replicas": "gauge",
    "datacache_coordinator_agents": "gauge",
}


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_agent_metric_names_are_pinned() -> None:
    assert {m.name: m.type for m in agent_metrics.REGISTRY.collect()} == AGENT_METRICS


def test_coordinator_metric_names_are_pinned(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    collector = coordinator_metrics.StateCollector(tmp_path / "db", set)
    names = {m.name: m.type for m in coordinator_metrics.REGISTRY.collect()}
    names |= {m.name: m.type for m in collector.collect()}
    assert names == COORDINATOR_METRICS


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_live_endpoints_report_the_copy(cluster: LocalCluster) -> None:
    expected = upload_dataset(cluster, "metrics-data", "m/")
    start(cluster, 2)
    create(cluster, "measured", "s3://metrics-data/m/", replicas=2)
    wait_until(lambda: len(ready_nodes(cluster, "measured")) == 2, 60, "2 Ready replicas")
    dataset = cluster.get_dataset("measured")
    total = dataset.status.replicas[0].bytes_total

    def coordinator_counted() -> bool:
        text = scrape(cluster.coordinator_metrics_port)
        return (
            sample(
                text, "datacache_coordinator_replicas", dataset="default/measured", state="Ready"
            )
            == 2
        )

    wait_until(coordinator_counted, 20, "the coordinator's replica gauges")
    coordinator_text = scrape(cluster.coordinator_metrics_port)
    assert families(coordinator_text).items() >= COORDINATOR_METRICS.items()
    assert (
        sample(
            coordinator_text,
            "datacache_coordinator_fetched_bytes_total",
            dataset="default/measured",
        )
        == 2 * total
    )
    assert sample(coordinator_text, "datacache_coordinator_agents", connected="true") == 2
    assert (
        sample(
            coordinator_text,
            "datacache_coordinator_grpc_requests_total",
            method="CreateDataset",
            code="OK",
        )
        == 1
    )
    for node, port in cluster.agent_metrics_ports.items():
        text = scrape(port)
        assert families(text).items() >= AGENT_METRICS.items()
        fetched = sample(
            text, "datacache_agent_fetched_bytes_total", source="s3", dataset="default/measured"
        )
        assert fetched == total, node
        assert sample(text, "datacache_agent_verified_files_total", method="crc32") == len(expected)
        assert sample(text, "datacache_agent_fetch_duration_seconds_count", outcome="ready") == 1

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed; names checked above")
    for text in (coordinator_text, scrape(next(iter(cluster.agent_metrics_ports.values())))):
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
