"""Node watch against the fake API server, through the official client over HTTP: list, watch,
resume, 410 re-list, bounded backoff, deletion and same-name re-creation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.cluster import NodeChange, NodeDirectory, Taint
from coordinator.demand import pod_demand
from coordinator.k8s_backoff import BackoffSettings
from coordinator.k8s_labeler import core_api
from coordinator.k8s_nodes import NodeWatch, NodeWatchSettings, node_facts, parse_bytes
from datacache.localcluster import wait_until
from tests.fakekube import FakeKubeAPI

FAST = NodeWatchSettings(
    watch_timeout_seconds=30,
    backoff=BackoffSettings(initial_seconds=0.01, max_seconds=0.05),
)


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


def test_node_facts_from_a_node_object(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    obj = fake.add_node(
        "gpu-1",
        labels={"team": "ml"},
        zone="zone-b",
        allocatable={"ephemeral-storage": "1500Mi", "cpu": "4"},
        capacity={"ephemeral-storage": "2Gi", "cpu": "4"},
        taints=[{"key": "gpu", "value": "true", "effect": "NoSchedule"}],
        unschedulable=True,
    )
    facts = node_facts(obj)
    assert facts.name == "gpu-1"
    assert facts.uid == obj["metadata"]["uid"]
    assert facts.zone == "zone-b"
    assert facts.labels["team"] == "ml"
    assert facts.taints == (Taint("gpu", "true", "NoSchedule"),)
    assert facts.unschedulable is True
    assert facts.allocatable_bytes == 1500 * 2**20


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


@pytest.fixture
def api(kube: tuple[FakeKubeAPI, Path]) -> Any:
    return core_api(str(kube[1]))


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
    kube: tuple[FakeKubeAPI, Path], directory: NodeDirectory, started: NodeWatch, api: Any
) -> None:
    fake, _ = kube
    fake.add_node("node-1", zone="zone-a")
    started.start()
    wait_until(lambda: directory.synced, 10, "the first list")
    assert set(directory.snapshot()) == {"node-1"}
    assert fake.wait_for_watchers(1)

    fake.add_node("node-2", allocatable={"ephemeral-storage": "10Gi"})
    wait_until(lambda: directory.get("node-2") is not None, 10, "node-2 from the watch")
    node_2 = directory.get("node-2")
    assert node_2 is not None and node_2.allocatable_bytes == 10 * 2**30

    api.patch_node(
        "node-1",
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

    wait_until(cordoned, 10, "node-1 cordoned and tainted")

    fake.delete_node("node-2")
    wait_until(lambda: directory.get("node-2") is None, 10, "node-2 removed")
    assert started.lists == 1


def test_same_name_recreation_seen_live_starts_empty(
    kube: tuple[FakeKubeAPI, Path], directory: NodeDirectory, started: NodeWatch
) -> None:
    fake, _ = kube
    old = fake.add_node("node-1", labels={"dataset.datacache.io/default.a": "ready"})
    recorder = Recorder(directory)
    started.start()
    wait_until(lambda: directory.synced and fake.active_watchers >= 1, 10, "list and watch")
    new = fake.recreate_node("node-1")
    wait_until(lambda: len(recorder.changes) >= 3, 10, "removal and re-addition")
    added, removed, readded = recorder.changes[:3]
    assert added.facts is not None and added.facts.uid == old["metadata"]["uid"]
    # The deletion reaches consumers before the new node: its replicas and labels are cleaned.
    assert removed == NodeChange("node-1", None)
    assert readded.facts is not None and readded.facts.uid == new["metadata"]["uid"]
    assert readded.facts.labels.get("dataset.datacache.io/default.a") is None


def test_expired_watch_relists_and_reports_the_replaced_node(
    kube: tuple[FakeKubeAPI, Path], directory: NodeDirectory, started: NodeWatch
) -> None:
    fake, _ = kube
    old = fake.add_node("node-1")
    fake.add_node("node-2")
    recorder = Recorder(directory)
    started.start()
    wait_until(lambda: directory.synced and fake.active_watchers >= 1, 10, "list and watch")
    fake.delete_node("node-2")
    wait_until(lambda: directory.get("node-2") is None, 10, "node-2 removed")

    # The watcher misses the re-creation (history compacted): 410, then a fresh list.
    new = fake.recreate_node("node-1", compact=True)
    wait_until(lambda: started.lists == 2, 10, "a re-list after 410 Expired")
    node_1 = directory.get("node-1")
    assert node_1 is not None and node_1.uid == new["metadata"]["uid"] != old["metadata"]["uid"]
    replaced = [c for c in recorder.changes if c.replaced]
    assert [c.name for c in replaced] == ["node-1"]

    # And it watches again from the new list.
    fake.add_node("node-3")
    wait_until(lambda: directory.get("node-3") is not None, 10, "node-3 after the re-list")


def test_watch_resumes_from_last_version_without_relisting(
    kube: tuple[FakeKubeAPI, Path], directory: NodeDirectory, api: Any
) -> None:
    fake, _ = kube
    fake.add_node("node-1")
    short = NodeWatchSettings(watch_timeout_seconds=1, backoff=FAST.backoff)
    node_watch = watching(api, directory, short)
    try:
        wait_until(lambda: directory.synced, 10, "the first list")

        def watch_requests() -> list[str]:
            return [r.path for r in fake.requests if r.method == "GET" and "nodes" in r.path]

        baseline = len(watch_requests())
        # Server-side timeouts end each watch after 1s; the watcher re-opens from its version.
        wait_until(lambda: len(watch_requests()) >= baseline + 2, 10, "two watch reconnects")
        fake.add_node("node-2")
        wait_until(lambda: directory.get("node-2") is not None, 10, "node-2 after reconnects")
        assert node_watch.lists == 1
    finally:
        node_watch.stop()


def test_errors_back_off_and_recover(
    kube: tuple[FakeKubeAPI, Path], directory: NodeDirectory, started: NodeWatch
) -> None:
    fake, _ = kube
    fake.add_node("node-1")
    fake.fail_next(3, 503)
    started.start()
    wait_until(lambda: directory.synced, 10, "a list after three failures")
    assert set(directory.snapshot()) == {"node-1"}
    lists = [r for r in fake.requests if r.method == "GET" and r.path == "/api/v1/nodes"]
    assert len(lists) >= 4


def test_stop_is_prompt_while_a_watch_is_open(
    kube: tuple[FakeKubeAPI, Path], directory: NodeDirectory, api: Any
) -> None:
    fake, _ = kube
    node_watch = watching(api, directory)
    wait_until(lambda: fake.active_watchers >= 1, 10, "an open watch")
    node_watch.stop(timeout=3)
    wait_until(lambda: fake.active_watchers == 0, 5, "the watch to close")
