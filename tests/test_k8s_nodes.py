"""Node watch against a real kube-apiserver, through the official client and a fault proxy,
as the coordinator's ServiceAccount: list, watch, resume, 410 re-list, bounded backoff,
deletion and same-name re-creation."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.cluster import NodeChange, NodeDirectory, NodeFacts, Taint
from coordinator.demand import pod_demand
from coordinator.k8s_backoff import BackoffSettings
from coordinator.k8s_labeler import core_api
from coordinator.k8s_nodes import NodeWatch, NodeWatchSettings, node_facts, parse_bytes
from datacache.localcluster import wait_until
from tests.faultproxy import Fault, Rule
from tests.kubecontrolplane import KubeTest

FAST = NodeWatchSettings(
    watch_timeout_seconds=30,
    backoff=BackoffSettings(initial_seconds=0.01, max_seconds=0.05),
)
COORDINATOR_SA = ("datacache", "datacache-coordinator")
DATASET_LABEL = "dataset.datacache.io/default.a"
OWNED_ANNOTATION = "datacache.io/owned-labels"
WAIT = 30.0
"""Seconds for anything that crosses the API server and the watch thread."""


def coordinator_kubeconfig(kube: KubeTest) -> Path:
    """The coordinator's ServiceAccount token, through the fault proxy."""
    return kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), name="coordinator")


def seed_dataset_label(kube: KubeTest, node: str, key: str, value: str) -> None:
    """Sets a dataset label as the coordinator would: only its ServiceAccount may."""
    kube.plane.request(
        "PATCH",
        f"/api/v1/nodes/{node}",
        {"metadata": {"labels": {key: value}, "annotations": {OWNED_ANNOTATION: key}}},
        content_type="application/merge-patch+json",
        token=kube.token(*COORDINATOR_SA),
    )


def is_watch(path: str) -> bool:
    query = path.partition("?")[2].lower()
    return "watch=true" in query or "watch=1" in query


def open_watches(kube: KubeTest) -> int:
    return sum(1 for r in kube.proxy.active() if is_watch(r.path))


def node_lists(kube: KubeTest, since: int = 0) -> list[int]:
    """Request numbers of the node lists (not watches) the proxy saw after request `since`."""
    return [
        r.number
        for r in kube.proxy.requests[since:]
        if r.method == "GET"
        and r.path.partition("?")[0] == "/api/v1/nodes"
        and not is_watch(r.path)
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100Gi", 100 * 2**30),
        ("128974848", 128974848),
        ("129e6", 129_000_000),
        ("129M", 129_000_000),
        ("1k", 1000),
        ("1500m", 2),  # 1.5 bytes: rounded up, as Quantity.Value() does
        ("0", 0),
        ("12 Gi", None),
        ("lots", None),
        ("-1Gi", None),
    ],
)
def test_parse_bytes(text: str, expected: int | None) -> None:
    assert parse_bytes(text) == expected


def test_node_facts_from_a_node_object(kube: KubeTest) -> None:
    obj = kube.add_node(
        "gpu-1",
        labels={"team": "ml"},
        zone="zone-b",
        allocatable={"ephemeral-storage": "1500Mi", "cpu": "4"},
        capacity={"ephemeral-storage": "2Gi", "cpu": "4"},
        taints=[{"key": "gpu", "value": "true", "effect": "NoSchedule"}],
        unschedulable=True,
    )
    # As the API server serves it, not as it was sent.
    served = kube.get_node("gpu-1")
    assert served["metadata"]["uid"] == obj["metadata"]["uid"]
    facts = node_facts(served)
    assert facts.name == "gpu-1"
    assert facts.uid == obj["metadata"]["uid"] != ""
    assert facts.zone == "zone-b"
    assert facts.labels["team"] == "ml"
    assert facts.labels["kubernetes.io/hostname"] == "gpu-1"
    assert facts.taints == (Taint("gpu", "true", "NoSchedule"),)
    assert facts.unschedulable is True
    assert facts.allocatable_bytes == 1500 * 2**20
    assert facts.owned_labels == {}


def test_node_facts_carry_extended_resources_a_gpu_trial_can_request() -> None:
    facts = node_facts(
        {
            "metadata": {"name": "gpu-1"},
            "status": {
                "allocatable": {
                    "cpu": "8",
                    "nvidia.com/gpu": "8",
                    "example.com/fpga": "bad",
                    "kubernetes.io/batch-cpu": "4",
                }
            },
        }
    )
    assert facts.extended_resources == {"nvidia.com/gpu": 8}
    trial = pod_demand(
        {
            "metadata": {
                "name": "t",
                "namespace": "ml",
                "annotations": {"datacache.io/dataset": "default/sweep"},
            },
            "spec": {
                "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]
            },
        }
    )
    assert trial is not None and trial.trial.can_run_on(facts)
    assert not trial.trial.can_run_on(node_facts({"metadata": {"name": "cpu-1"}}))


def test_node_facts_tolerate_missing_and_bad_fields() -> None:
    facts = node_facts(
        {"metadata": {"name": "n"}, "status": {"allocatable": {"ephemeral-storage": "x"}}}
    )
    assert (facts.uid, facts.taints, facts.unschedulable, facts.allocatable_bytes) == (
        "",
        (),
        False,
        None,
    )


class Recorder:
    def __init__(self, directory: NodeDirectory) -> None:
        self._lock = threading.Lock()
        self._changes: list[NodeChange] = []
        directory.subscribe(self._record)

    def _record(self, change: NodeChange) -> None:
        with self._lock:
            self._changes.append(change)

    @property
    def changes(self) -> list[NodeChange]:
        with self._lock:
            return list(self._changes)

    def of(self, name: str) -> list[NodeChange]:
        return [c for c in self.changes if c.name == name]


@pytest.fixture
def api(kube: KubeTest) -> Any:
    """A CoreV1Api as the coordinator's ServiceAccount (its RBAC: nodes get/list/watch),
    through the fault proxy."""
    return core_api(str(coordinator_kubeconfig(kube)))


@pytest.fixture
def directory() -> NodeDirectory:
    return NodeDirectory()


def watching(api: Any, directory: NodeDirectory, settings: NodeWatchSettings = FAST) -> NodeWatch:
    node_watch = NodeWatch(api, directory, settings)
    node_watch.start()
    return node_watch


@pytest.fixture
def started(api: Any, directory: NodeDirectory) -> Iterator[NodeWatch]:
    node_watch = NodeWatch(api, directory, FAST)
    yield node_watch
    node_watch.stop()


def test_list_then_watch_adds_changes_and_deletes(
    kube: KubeTest, directory: NodeDirectory, started: NodeWatch
) -> None:
    kube.add_node("node-1", zone="zone-a")
    started.start()
    wait_until(lambda: directory.synced, WAIT, "the first list")
    assert set(directory.snapshot()) == {"node-1"}
    wait_until(lambda: open_watches(kube) == 1, WAIT, "an open watch")

    kube.add_node("node-2", allocatable={"ephemeral-storage": "10Gi"})

    def node_2_registered() -> bool:
        # Registration is a create, then a status update: the watch delivers both.
        node = directory.get("node-2")
        return node is not None and node.allocatable_bytes == 10 * 2**30

    wait_until(node_2_registered, WAIT, "node-2 and its status from the watch")

    # Cordoning and tainting is an admin's (or a kubelet's) change, not the coordinator's.
    kube.plane.patch(
        "/api/v1/nodes/node-1",
        {
            "spec": {
                "unschedulable": True,
                "taints": [{"key": "maintenance", "effect": "NoExecute"}],
            }
        },
    )

    def cordoned() -> bool:
        node = directory.get("node-1")
        return node is not None and node.unschedulable and len(node.taints) == 1

    wait_until(cordoned, WAIT, "node-1 cordoned and tainted")
    node_1 = directory.get("node-1")
    assert node_1 is not None and node_1.taints == (Taint("maintenance", "", "NoExecute"),)

    kube.delete_node("node-2")
    wait_until(lambda: directory.get("node-2") is None, WAIT, "node-2 removed")
    assert started.lists == 1
    assert len(node_lists(kube)) == 1


def test_same_name_recreation_seen_live_is_a_new_node(
    kube: KubeTest, directory: NodeDirectory, started: NodeWatch
) -> None:
    """A Node deleted and registered again under its name gets a new UID from the API server;
    the directory reports the deletion first, then the new node as `replaced`, without the
    old node's dataset labels."""
    old = kube.add_node("node-1", labels={"team": "ml"})
    seed_dataset_label(kube, "node-1", DATASET_LABEL, "ready")
    recorder = Recorder(directory)
    started.start()
    wait_until(lambda: directory.synced and open_watches(kube) >= 1, WAIT, "list and watch")
    listed = directory.get("node-1")
    assert listed is not None and listed.owned_labels == {DATASET_LABEL: "ready"}

    kube.delete_node("node-1")
    new = kube.add_node("node-1", labels={"team": "ml"})
    new_uid = new["metadata"]["uid"]
    assert new_uid != old["metadata"]["uid"]
    wait_until(
        lambda: (
            (directory.get("node-1") or NodeFacts("")).uid == new_uid
            and not (directory.get("node-1") or NodeFacts("")).taints
        ),
        WAIT,
        "the re-registered node-1",
    )

    added, removed, readded, *updates = recorder.of("node-1")
    assert added.facts is not None and added.facts.uid == old["metadata"]["uid"]
    assert not added.replaced
    # The deletion reaches consumers before the new node: its replicas and labels are cleaned.
    assert removed == NodeChange("node-1", None)
    assert readded.facts is not None and readded.facts.uid == new_uid
    assert readded.replaced, "the re-created node was not reported as a new node"
    assert DATASET_LABEL not in readded.facts.labels
    assert readded.facts.owned_labels == {}
    # The rest of its registration (status, taints) are updates of the same new node.
    assert updates and all(
        c.facts is not None and c.facts.uid == new_uid and not c.replaced for c in updates
    )


def test_expired_watch_relists_and_reports_the_replaced_node(
    kube: KubeTest, directory: NodeDirectory, api: Any
) -> None:
    """The watcher misses a re-creation and a deletion while its watch is down, and the API
    server restarts meanwhile, forgetting the history the watcher would resume from: the
    resumed watch gets 410 Expired, and a fresh list reports both."""
    old = kube.add_node("node-1")
    kube.add_node("node-2")
    kube.add_node("node-3")
    recorder = Recorder(directory)
    # Short server-side watches, so the watcher opens new ones (which the proxy can blind).
    settings = NodeWatchSettings(
        watch_timeout_seconds=1,
        backoff=BackoffSettings(initial_seconds=0.1, max_seconds=0.5),
    )
    node_watch = watching(api, directory, settings)
    try:
        wait_until(lambda: directory.synced and open_watches(kube) >= 1, WAIT, "list and watch")
        kube.delete_node("node-2")
        wait_until(lambda: directory.get("node-2") is None, WAIT, "node-2 removed")

        # From now on a watch is cut at its first byte: the watcher learns nothing and keeps
        # resuming from the version it has.
        blinded = len(kube.proxy.requests)
        kube.proxy.set_rules([Rule(Fault("reset"), method="GET", when=lambda r: is_watch(r.path))])
        wait_until(
            lambda: any(r.number > blinded and is_watch(r.path) for r in kube.proxy.active()),
            WAIT,
            "a watch opened under the reset rule",
        )
        kube.delete_node("node-1")
        new = kube.add_node("node-1")
        kube.delete_node("node-3")
        kube.plane.restart_apiserver(kill=True)
        assert directory.get("node-1") == recorder.of("node-1")[0].facts
        assert directory.get("node-3") is not None
        kube.proxy.set_rules([])

        wait_until(lambda: node_watch.lists == 2, WAIT, "a re-list after 410 Expired")
        node_1 = directory.get("node-1")
        assert node_1 is not None
        assert node_1.uid == new["metadata"]["uid"] != old["metadata"]["uid"]
        assert directory.get("node-3") is None
        assert NodeChange("node-3", None) in recorder.changes
        replaced = [c for c in recorder.changes if c.replaced]
        assert [c.name for c in replaced] == ["node-1"]
        assert len(node_lists(kube, blinded)) == 1

        # And it watches again from the new list.
        kube.add_node("node-4")
        wait_until(lambda: directory.get("node-4") is not None, WAIT, "node-4 after the re-list")
        assert node_watch.lists == 2
    finally:
        node_watch.stop()


def test_watch_resumes_from_last_version_without_relisting(
    kube: KubeTest, directory: NodeDirectory, api: Any
) -> None:
    kube.add_node("node-1")
    short = NodeWatchSettings(watch_timeout_seconds=1, backoff=FAST.backoff)
    node_watch = watching(api, directory, short)
    try:
        wait_until(lambda: directory.synced, WAIT, "the first list")

        def watch_requests() -> list[str]:
            return [r.path for r in kube.proxy.requests if r.method == "GET" and is_watch(r.path)]

        baseline = len(watch_requests())
        # The API server ends each watch after 1s; the watcher re-opens from its version.
        wait_until(lambda: len(watch_requests()) >= baseline + 2, WAIT, "two watch reconnects")
        assert all("resourceVersion=" in path for path in watch_requests())
        kube.add_node("node-2")
        wait_until(lambda: directory.get("node-2") is not None, WAIT, "node-2 after reconnects")
        assert node_watch.lists == 1
        assert len(node_lists(kube)) == 1
    finally:
        node_watch.stop()


def test_errors_back_off_and_recover(
    kube: KubeTest, directory: NodeDirectory, started: NodeWatch
) -> None:
    kube.add_node("node-1")
    kube.proxy.set_rules(
        [
            Rule(
                Fault("answer", status=503),
                method="GET",
                when=lambda r: r.path.partition("?")[0] == "/api/v1/nodes",
                limit=3,
            )
        ]
    )
    started.start()
    wait_until(lambda: directory.synced, WAIT, "a list after three failures")
    assert set(directory.snapshot()) == {"node-1"}
    lists = node_lists(kube)
    assert len(lists) == 4
    statuses = kube.proxy.statuses()
    assert [statuses[n] for n in lists] == [503, 503, 503, 200]


def test_stop_is_prompt_while_a_watch_is_open(
    kube: KubeTest, directory: NodeDirectory, api: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kube.add_node("node-1")
    node_watch = watching(api, directory)
    wait_until(lambda: open_watches(kube) >= 1, WAIT, "an open watch")
    with caplog.at_level(logging.INFO, logger="coordinator.k8s_listwatch"):
        node_watch.stop(timeout=3)
    # Cutting its own connection is no failure worth a warning.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

    # The proxy learns that a client has gone only when it relays the next event to it, and
    # only a closed connection refuses it.
    pokes = iter(range(1000))

    def closed() -> bool:
        kube.plane.patch(
            "/api/v1/nodes/node-1", {"metadata": {"labels": {"poke": str(next(pokes))}}}
        )
        return open_watches(kube) == 0

    wait_until(closed, 10, "the watch connection to be closed", interval=0.2)
