"""One conformance suite for every NodeLabeler: the local store and Kubernetes Node objects
(through the official client, over HTTP, against the fake API server)."""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.fakekube import FakeKubeAPI

KEY_A, KEY_B = label_key("a"), label_key("b" * 80)
NODES = ("node-1", "node-2")


@pytest.fixture(params=["local", "kubernetes", "kubernetes-watched"])
def labeler(
    request: pytest.FixtureRequest, tmp_path: Path, kube: tuple[FakeKubeAPI, Path]
) -> Iterator[NodeLabeler]:
    if request.param == "local":
        store = Store(tmp_path / "store.db")
        yield LocalNodeLabeler(store)
        store.close()
        return
    fake, kubeconfig = kube
    for node in NODES:
        fake.add_node(node, labels={"team": "ml"})
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
        wait_until(lambda: directory.synced, 10, "the first list of nodes")
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


@pytest.fixture
def k8s(kube: tuple[FakeKubeAPI, Path]) -> tuple[FakeKubeAPI, KubernetesNodeLabeler]:
    fake, kubeconfig = kube
    fake.add_node("node-1", labels={"team": "ml", f"{KEY_A}-user": "mine"})
    return fake, KubernetesNodeLabeler(core_api(str(kubeconfig)))


def test_kubernetes_never_touches_foreign_labels(
    k8s: tuple[FakeKubeAPI, KubernetesNodeLabeler],
) -> None:
    fake, labeler = k8s
    asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
    node = fake.get_node("node-1")
    assert node is not None
    assert node["metadata"]["labels"] == {"team": "ml", f"{KEY_A}-user": "mine", KEY_A: "ready"}
    assert node["metadata"]["annotations"][OWNED_LABELS_ANNOTATION] == KEY_A
    asyncio.run(labeler.set_labels("node-1", {}))
    node = fake.get_node("node-1")
    assert node is not None
    assert node["metadata"]["labels"] == {"team": "ml", f"{KEY_A}-user": "mine"}
    assert OWNED_LABELS_ANNOTATION not in node["metadata"].get("annotations", {})
    patches = [r for r in fake.requests if r.method == "PATCH"]
    assert patches and all(r.content_type == "application/merge-patch+json" for r in patches)


def test_kubernetes_retries_conflicts(k8s: tuple[FakeKubeAPI, KubernetesNodeLabeler]) -> None:
    fake, labeler = k8s
    fake.inject_conflicts("nodes", name="node-1", count=2)
    assert asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
    assert asyncio.run(labeler.get_labels("node-1")) == {KEY_A: "ready"}


def test_kubernetes_gives_up_after_bounded_conflicts(
    k8s: tuple[FakeKubeAPI, KubernetesNodeLabeler],
) -> None:
    fake, labeler = k8s
    fake.inject_conflicts("nodes", name="node-1", count=50)
    with pytest.raises(LabelerError, match="failed 5 times") as info:
        asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
    assert getattr(info.value.__cause__, "status", None) == 409


def test_kubernetes_missing_node(k8s: tuple[FakeKubeAPI, KubernetesNodeLabeler]) -> None:
    _, labeler = k8s
    with pytest.raises(NodeMissing, match="node-9"):
        asyncio.run(labeler.set_labels("node-9", {KEY_A: "ready"}))
    assert asyncio.run(labeler.get_labels("node-9")) == {}


def test_kubernetes_retries_a_failed_label_patch(
    k8s: tuple[FakeKubeAPI, KubernetesNodeLabeler],
) -> None:
    fake, labeler = k8s
    # The reads go through; the patch itself fails twice with 503.
    fake.fail_next(2, 503, method="PATCH")
    assert asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
    assert [r.method for r in fake.requests].count("PATCH") == 3
    assert asyncio.run(labeler.get_labels("node-1")) == {KEY_A: "ready"}
    node = fake.get_node("node-1")
    assert node is not None and node["metadata"]["labels"]["team"] == "ml"


def test_kubernetes_does_not_retry_a_forbidden_patch(
    k8s: tuple[FakeKubeAPI, KubernetesNodeLabeler],
) -> None:
    fake, labeler = k8s
    fake.fail_next(1, 403)
    with pytest.raises(LabelerError, match="403"):
        asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
    assert [r.method for r in fake.requests] == ["GET"]


def test_a_watched_labeler_reads_the_watch_not_a_list_of_every_node(
    kube: tuple[FakeKubeAPI, Path],
) -> None:
    fake, kubeconfig = kube
    for node in NODES:
        fake.add_node(node)
    api = core_api(str(kubeconfig))
    with watched(api) as directory:
        labeler = KubernetesNodeLabeler(api, directory)
        assert asyncio.run(labeler.set_labels("node-1", {KEY_A: "ready"}))
        listed = len(fake.requests)
        for _ in range(3):
            assert asyncio.run(labeler.labelled_nodes()) == {"node-1": {KEY_A: "ready"}}
        assert len(fake.requests) == listed, "labelled_nodes asked the API server"

        # A change made by someone else shows once the watch delivers it.
        plain = KubernetesNodeLabeler(api)
        assert asyncio.run(plain.set_labels("node-2", {KEY_B: "ready"}))
        wait_until(
            lambda: asyncio.run(labeler.labelled_nodes()).get("node-2") == {KEY_B: "ready"},
            10,
            "node-2's labels from the watch",
        )
        # ... and so does a removal of labels this labeler wrote, once its own write is
        # seen by the watch (until then its write stands).
        wait_until(
            lambda: (directory.get("node-1") or NodeFacts("")).owned_labels == {KEY_A: "ready"},
            10,
            "node-1's labels from the watch",
        )
        assert asyncio.run(plain.set_labels("node-1", {}))
        wait_until(
            lambda: "node-1" not in asyncio.run(labeler.labelled_nodes()),
            10,
            "node-1's removal from the watch",
        )
