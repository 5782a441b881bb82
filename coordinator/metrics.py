"""The coordinator's Prometheus metrics (exposed on `--metrics-port`).

Cluster throughput comes from agents' reports: `datacache_coordinator_fetched_bytes_total` grows
by the progress each report shows, so `rate()` of it is cluster-wide (or, by `dataset`,
per-dataset) throughput. Replica and agent gauges are computed from the store at scrape time.
Names are pinned by tests/test_metrics.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.model import ReplicaState
from coordinator.store import Store

REGISTRY = CollectorRegistry(auto_describe=True)

FETCHED_BYTES = Counter(
    "datacache_coordinator_fetched_bytes",
    "Bytes agents report having copied, by dataset (rate() gives cluster throughput).",
    ["dataset"],
    registry=REGISTRY,
)
RECONCILE_PASSES = Counter(
    "datacache_coordinator_reconcile_passes",
    "Reconcile passes (placement, labels, desired sets), by outcome (ok, error; idle: nothing "
    "changed, labels re-checked only).",
    ["outcome"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "datacache_coordinator_reconcile_duration_seconds",
    "Duration of one reconcile pass.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
LABEL_PATCHES = Counter(
    "datacache_coordinator_label_patches",
    "Node label updates, by outcome (applied, failed, node_missing).",
    ["outcome"],
    registry=REGISTRY,
)
GRPC_REQUESTS = Counter(
    "datacache_coordinator_grpc_requests",
    "Unary gRPC requests handled, by method and status code.",
    ["method", "code"],
    registry=REGISTRY,
)
for outcome in ("ok", "error", "idle"):
    RECONCILE_PASSES.labels(outcome)
for outcome in ("applied", "failed", "node_missing"):
    LABEL_PATCHES.labels(outcome)


class StateCollector(Collector):
    """Replica and agent gauges read from the database at scrape time.

    Scrapes run on the metrics server's thread, so each opens its own SQLite connection (WAL
    lets it read while the coordinator writes) instead of sharing the event loop's."""

    def __init__(self, db_path: Path, live_nodes: Callable[[], set[str]]) -> None:
        self._db_path = db_path
        self._live_nodes = live_nodes
        """The reconciler's lease view: the database's wall-clock times would disagree with
        it after a clock step."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = Store(self._db_path)
        try:
            yield from self._collect(store)
        finally:
            store.close()

    def _collect(self, store: Store) -> Iterator[GaugeMetricFamily]:
        desired = GaugeMetricFamily(
            "datacache_coordinator_replicas_desired",
            "Replicas asked for, by dataset.",
            labels=["dataset"],
        )
        states = GaugeMetricFamily(
            "datacache_coordinator_replicas",
            "Replicas on live nodes by dataset and state (Pending, Fetching, Ready, Failed, "
            "Evicting).",
            labels=["dataset", "state"],
        )
        agents_known = store.list_agents()
        live = self._live_nodes()
        assignments = store.assignments()
        for record in store.list_datasets():
            desired.add_metric([record.name], 0 if record.deleting else record.replicas)
            counts = dict.fromkeys(ReplicaState, 0)
            reports = {r.node_name: r for r in store.reports(record.name) if r.node_name in live}
            assigned = assignments.get(record.name, frozenset())
            for node in assigned | reports.keys():
                report = reports.get(node)
                if report is None:
                    counts[ReplicaState.PENDING] += 1
                elif node not in assigned:
                    counts[ReplicaState.EVICTING] += 1
                else:
                    counts[report.state] += 1
            for state, count in counts.items():
                states.add_metric([record.name, state.value], count)
        agents = GaugeMetricFamily(
            "datacache_coordinator_agents",
            "Registered agents, by whether their lease is valid.",
            labels=["connected"],
        )
        known = {a.node_name for a in agents_known}
        agents.add_metric(["true"], len(known & live))
        agents.add_metric(["false"], len(known - live))
        yield desired
        yield states
        yield agents
