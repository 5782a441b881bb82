"""One conformance suite for every NodeLabeler: the local store and Kubernetes Node objects
(through the official client, against a real kube-apiserver, as the coordinator's
ServiceAccount, whose writes the manifests' admission policy fences)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.cluster import NodeDirectory, NodeFacts
from coordinator.errors import LabelerError, NodeMissing
from coordinator.k8s_labeler import KubernetesNodeLabeler, core_api
from coordinator.k8s_nodes import NodeWatch
from coordinator.labelers import LocalNodeLabeler, NodeLabeler
from coordinator.labels import OWNED_LABELS_ANNOTATION, label_key
from coordinator.store import Store
from datacache.localcluster import wait_until
from tests.faultproxy import Fault, Request, Rule
from tests.kubecontrolplane import KubeTest

KEY_A, KEY_B = label_key("a"), label_key("b" * 80)
NODES = ("node-1", "node-2")
COORDINATOR_SA = ("datacache", "datacache-coordinator")
AGENT_SA = ("datacache-agent", "datacache-agent")
WAIT = 30.0


def coordinator_kubeconfig(kube: KubeTest) -> Path:
    """The coordinator's ServiceAccount token, through the fault proxy."""
    return kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), name="coordinator")


@pytest.fixture(params=["local", "kubernetes", "kubernetes-watched"])
def labeler(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeLabeler]:
    if request.param == "local":
        store = Store(tmp_path / "store.db")
        yield LocalNodeLabeler(store)
        store.close()
        return
    kube: KubeTest = request.getfixturevalue("kube")
    for node in NODES:
        kube.add_node(node, labels={"team": "ml"})
    kubeconfig = coordinator_kubeconfig(kube)
    if request.param == "kubernetes":
        yield KubernetesNodeLabeler(core_api(str(kubeconfig)))
        return
    with watched(core_api(str(kubeconfig))) as directory:
        yield KubernetesNodeLabeler(core_api(str(kubeconfig)), directory)


@contextlib.contextmanager
def watched(api: Any) -> Iterator[NodeDirectory]:
    """A NodeDirectory kept current by a Node watch, listed once before it is handed out."""
    directory = NodeDirectory()
    node_watch = NodeWatch(api, directory)
    node_watch.start()
    try:
        wait_until(lambda: directory.synced, WAIT, "the first list of nodes")
        yield directory
    finally:
        node_watch.stop()


def test_set_get_and_remove(labeler: NodeLabeler) -> None:
    async def scenario() -> None:
        assert await labeler.labelled_nodes() == {}
        assert await labeler.set_labels("node-1", {KEY_A: "ready", KEY_B: "ready"})
        assert await labeler.get_labels("node-1") == {KEY_A: "ready", KEY_B: "ready"}
        assert await labeler.set_labels("node-1", {KEY_A: "ready", KEY_B: "ready"}) is False
        assert await labeler.set_labels("node-2", {KEY_B: "ready"})
        assert await labeler.labelled_nodes() == {
            "node-1": {KEY_A: "ready", KEY_B: "ready"},
            "node-2": {KEY_B: "ready"},
        }
        assert await labeler.set_labels("node-1", {KEY_B: "ready"})
        assert await labeler.get_labels("node-1") == {KEY_B: "ready"}
        assert await labeler.set_labels("node-1", {})
        assert await labeler.get_labels("node-1") == {}
        assert await labeler.labelled_nodes() == {"node-2": {KEY_B: "ready"}}

    asyncio.run(scenario())


FOREIGN = f"{KEY_A}-user"
"""A label under datacache's prefix that datacache did not write (its annotation does not
name it): the labeler must leave it alone."""


@pytest.fixture
def k8s(kube: KubeTest) -> KubernetesNodeLabeler:
    """node-1 (team=ml, and FOREIGN set by the coordinator's ServiceAccount without claiming
    it: nobody else may set a dataset label), and a labeler as that ServiceAccount through
    the fault proxy."""
    kube.add_node("node-1", labels={"team": "ml"})
    kube.plane.request(
        "PATCH",
        "/api/v1/nodes/node-1",
        {"metadata": {"labels": {FOREIGN: "mine"}}},
        content_type="application/merge-patch+json",
        token=kube.token(*COORDINATOR_SA),
    )
    return KubernetesNodeLabeler(core_api(str(coordinator_kubeconfig(kube))))


def registered_labels(name: str) -> dict[str, str]:
    """The labels a Node registered by `KubeControlPlane.add_node` carries by itself."""
    return {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }


def test_kubernetes_never_touches_foreign_labels(
    kube: KubeTest, k8s: KubernetesNodeLabeler
) -> None:
    mark = len(kube.proxy.requests)
    asyncio.run(k8s.set_labels("node-1", {KEY_A: "ready"}))
    node = kube.get_node("node-1")
    base = {**registered_labels("node-1"), "team": "ml", FOREIGN: "mine"}
    assert node["metadata"]["labels"] == {**base, KEY_A: "ready"}
    assert node["metadata"]["annotations"][OWNED_LABELS_ANNOTATION] == KEY_A
    owners = {m["manager"] for m in node["metadata"]["managedFields"]}
    assert "datacache-coordinator" in owners
    assert asyncio.run(k8s.get_labels("node-1")) == {KEY_A: "ready"}
    asyncio.run(k8s.set_labels("node-1", {}))
    node = kube.get_node("node-1")
    assert node["metadata"]["labels"] == base
    assert OWNED_LABELS_ANNOTATION not in (node["metadata"].get("annotations") or {})
    patches = [r for r in kube.proxy.requests[mark:] if r.method == "PATCH"]
    assert [r.path.partition("?")[0] for r in patches] == ["/api/v1/nodes/node-1"] * 2
    # Each write is a merge patch under the coordinator's field manager.
    assert all(r.content_type == "application/merge-patch+json" for r in patches)
    assert all("fieldManager=datacache-coordinator" in r.path for r in patches)


class CompetingWriter:
    """Someone else (an admin) changes node-1 between the labeler's read and its patch, for
    the first `times` label patches: the API server answers those 409 Conflict, as the
    patch carries the resourceVersion the labeler read. A proxy rule predicate runs it, just
    before the proxy forwards the patch."""

    def __init__(self, kube: KubeTest, times: int) -> None:
        self._kube = kube
        self._times = times
        self._lock = threading.Lock()
        self.writes = 0

    def __call__(self, request: Request) -> bool:
        with self._lock:
            if self.writes >= self._times:
                return False
            self.writes += 1
            value = f"ml-{self.writes}"
        self._kube.plane.patch("/api/v1/nodes/node-1", {"metadata": {"labels": {"team": value}}})
        return False

    def rule(self) -> Rule:
        # Never injects a fault: the predicate's write makes the real server refuse the patch.
        return Rule(Fault("answer", status=500), method="PATCH", when=self)


def test_kubernetes_retries_conflicts(kube: KubeTest, k8s: KubernetesNodeLabeler) -> None:
    writer = CompetingWriter(kube, times=2)
    kube.proxy.set_rules([writer.rule()])
    mark = len(kube.proxy.requests)
    assert asyncio.run(k8s.set_labels("node-1", {KEY_A: "ready"}))
    patches = [r.number for r in kube.proxy.requests[mark:] if r.method == "PATCH"]
    statuses = kube.proxy.statuses()
    assert [statuses[n] for n in patches] == [409, 409, 200]
    assert asyncio.run(k8s.get_labels("node-1")) == {KEY_A: "ready"}
    # Each retry read the node again: the other writer's change stands.
    assert kube.node_labels("node-1")["team"] == "ml-2"


def test_kubernetes_gives_up_after_bounded_conflicts(
    kube: KubeTest, k8s: KubernetesNodeLabeler
) -> None:
    writer = CompetingWriter(kube, times=50)
    kube.proxy.set_rules([writer.rule()])
    mark = len(kube.proxy.requests)
    with pytest.raises(LabelerError, match="failed 5 times") as info:
        asyncio.run(k8s.set_labels("node-1", {KEY_A: "ready"}))
    assert getattr(info.value.__cause__, "status", None) == 409
    patches = [r.number for r in kube.proxy.requests[mark:] if r.method == "PATCH"]
    statuses = kube.proxy.statuses()
    assert [statuses[n] for n in patches] == [409] * 5
    assert KEY_A not in kube.node_labels("node-1")


def test_kubernetes_missing_node(k8s: KubernetesNodeLabeler) -> None:
    with pytest.raises(NodeMissing, match="node-9"):
        asyncio.run(k8s.set_labels("node-9", {KEY_A: "ready"}))
    assert asyncio.run(k8s.get_labels("node-9")) == {}


def test_kubernetes_retries_a_failed_label_patch(
    kube: KubeTest, k8s: KubernetesNodeLabeler
) -> None:
    # The reads go through; the patch itself fails twice with 503.
    kube.proxy.set_rules([Rule(Fault("answer", status=503), method="PATCH", limit=2)])
    mark = len(kube.proxy.requests)
    assert asyncio.run(k8s.set_labels("node-1", {KEY_A: "ready"}))
    assert [r.method for r in kube.proxy.requests[mark:]].count("PATCH") == 3
    assert asyncio.run(k8s.get_labels("node-1")) == {KEY_A: "ready"}
    assert kube.node_labels("node-1")["team"] == "ml"


def test_kubernetes_does_not_retry_a_forbidden_patch(kube: KubeTest) -> None:
    """Only the coordinator's ServiceAccount may set dataset labels: a labeler with anyone
    else's credentials (here cluster-admin's) is refused by the admission policy, 403, and
    does not try again."""
    kube.add_node("node-1", labels={"team": "ml"})
    labeler = KubernetesNodeLabeler(core_api(str(kube.proxied_kubeconfig(name="cluster-admin"))))
    mark = len(kube.proxy.requests)
    with pytest.raises(LabelerError, match="403"):
        asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
    assert [r.method for r in kube.proxy.requests[mark:]] == ["GET", "PATCH"]
    assert KEY_A not in kube.node_labels("node-1")


def test_kubernetes_does_not_retry_a_forbidden_read(kube: KubeTest) -> None:
    """A ServiceAccount without RBAC on Nodes (the agent's) is refused the read, 403, once."""
    kube.add_node("node-1")
    kubeconfig = kube.proxied_kubeconfig(kube.token(*AGENT_SA), name="agent")
    labeler = KubernetesNodeLabeler(core_api(str(kubeconfig)))
    mark = len(kube.proxy.requests)
    with pytest.raises(LabelerError, match="403"):
        asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
    assert [r.method for r in kube.proxy.requests[mark:]] == ["GET"]
    with pytest.raises(LabelerError, match="403"):
        asyncio.run(labeler.get_labels("node-1"))


def test_a_watched_labeler_reads_the_watch_not_a_list_of_every_node(kube: KubeTest) -> None:
    for node in NODES:
        kube.add_node(node)
    api = core_api(str(coordinator_kubeconfig(kube)))
    with watched(api) as directory:
        labeler = KubernetesNodeLabeler(api, directory)
        assert asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
        listed = len(kube.proxy.requests)
        for _ in range(3):
            assert asyncio.run(labeler.labelled_nodes()) == {"node-1": {KEY_A: "ready"}}
        assert len(kube.proxy.requests) == listed, "labelled_nodes asked the API server"

        # A change made by someone else shows once the watch delivers it.
        plain = KubernetesNodeLabeler(api)
        assert asyncio.run(plain.set_labels("node-2", {KEY_B: "ready"}))
        wait_until(
            lambda: asyncio.run(labeler.labelled_nodes()).get("node-2") == {KEY_B: "ready"},
            WAIT,
            "node-2's labels from the watch",
        )
        # ... and so does a removal of labels this labeler wrote, once its own write is
        # seen by the watch (until then its write stands).
        wait_until(
            lambda: (directory.get("node-1") or NodeFacts("")).owned_labels == {KEY_A: "ready"},
            WAIT,
            "node-1's labels from the watch",
        )
        assert asyncio.run(plain.set_labels("node-1", {}))
        wait_until(
            lambda: "node-1" not in asyncio.run(labeler.labelled_nodes()),
            WAIT,
            "node-1's removal from the watch",
        )
        # The watched labeler never listed the nodes: the watch told it everything.
        lists = [
            r
            for r in kube.proxy.requests[listed:]
            if r.method == "GET"
            and r.path.partition("?")[0] == "/api/v1/nodes"
            and "watch=" not in r.path.lower()
        ]
        assert lists == []
