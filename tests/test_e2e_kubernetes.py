"""End to end in cluster mode: the coordinator labels Node objects of a real kube-apiserver
through the official client, as its own ServiceAccount (through a proxy that records every
request); S3, coordinator and agents are real processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from datacache.localcluster import LocalCluster, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.kubecontrolplane import ZONE_LABEL, KubeTest
from tests.test_e2e import create, dataset_gone, ready_nodes, start, upload_dataset

LABEL = "dataset.datacache.io/default.photos"
OWNED = "datacache.io/owned-labels"
NODES = ["node-1", "node-2", "node-3"]
COORDINATOR_SA = ("datacache", "datacache-coordinator")


def coordinator_flags(kube: KubeTest) -> tuple[str, str]:
    kubeconfig = kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), name="coordinator")
    return ("--labeler=kubernetes", f"--kubeconfig={kubeconfig}")


def add_nodes(kube: KubeTest, names: list[str]) -> dict[str, dict[str, str]]:
    """Registers the nodes; returns the labels each has before datacache touches it."""
    for node in names:
        kube.add_node(node, labels={"team": "ml"}, zone="zone-a")
    return {node: kube.node_labels(node) for node in names}


def labelled(kube: KubeTest, names: list[str]) -> set[str]:
    return {n for n in names if kube.node_labels(n).get(LABEL) == "ready"}


def log_records(path: Path, start: int = 0) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()[start:]
    return [json.loads(line) for line in lines if line.startswith("{")]


def writes(kube: KubeTest, since: int) -> list[str]:
    """Every request after request `since` that could change something (PATCH, POST, ...)."""
    return [f"{r.method} {r.path}" for r in kube.proxy.requests[since:] if r.method != "GET"]


def test_node_objects_are_labelled_and_cleaned(kube: KubeTest, cluster: LocalCluster) -> None:
    registered = add_nodes(kube, NODES)
    assert all(registered[n][ZONE_LABEL] == "zone-a" for n in NODES)
    upload_dataset(cluster, "k8s-photos", "photos/")
    flags = coordinator_flags(kube)
    start(cluster, 3, coordinator_flags=flags)
    create(cluster, "photos", "s3://k8s-photos/photos/", replicas=2)

    wait_until(lambda: len(ready_nodes(cluster, "photos")) == 2, 60, "2 Ready replicas")
    holders = ready_nodes(cluster, "photos")
    wait_until(lambda: labelled(kube, NODES) == holders, 30, "labels on the Ready nodes")
    for node in holders:
        meta = kube.get_node(node)["metadata"]
        assert meta["annotations"][OWNED] == LABEL
        assert meta["labels"] == {**registered[node], LABEL: "ready"}

    # A coordinator killed and restarted on the same store keeps the labels: it neither strips
    # them at start-up nor re-downloads, and converges without writing anything.
    cluster.coordinator.kill()
    restarted_at = time.time()
    since = len(kube.proxy.requests)
    log_start = len(cluster.coordinator.log_path.read_text().splitlines())
    cluster.start_coordinator(*flags, "--reconcile-interval-seconds=0.5")

    def passes() -> int:
        records = log_records(cluster.coordinator.log_path, log_start)
        return sum("Reconcile pass took" in r.get("msg", "") for r in records)

    def reported_since_restart() -> bool:
        replicas = cluster.get_dataset("photos").status.replicas
        return all(r.update_time.ToNanoseconds() > restarted_at * 1e9 for r in replicas)

    wait_until(
        lambda: reported_since_restart() and passes() >= 2,
        30,
        "agents to report to the new coordinator and several reconcile passes",
    )
    assert ready_nodes(cluster, "photos") == holders
    assert labelled(kube, NODES) == holders
    # The restarted coordinator did reach the API server (it listed and watched the nodes)...
    assert any(r.path.startswith("/api/v1/nodes") for r in kube.proxy.requests[since:])
    # ... and wrote nothing to it: no label patch, no Event.
    assert writes(kube, since) == []

    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).DeleteDataset(
            pb.DeleteDatasetRequest(name="photos"), timeout=10
        )

    wait_until(lambda: dataset_gone(cluster, "photos"), 30, "the dataset to be deleted")
    assert labelled(kube, NODES) == set()
    for node in NODES:
        meta = kube.get_node(node)["metadata"]
        assert meta["labels"] == registered[node]
        assert OWNED not in (meta.get("annotations") or {})
        assert not (cluster.cache_dir(node) / "datasets" / "default" / "photos").exists()


def test_a_node_recreated_under_its_name_is_a_new_node(
    kube: KubeTest, cluster: LocalCluster
) -> None:
    """A Node deleted and registered again under its name (a new UID) is a new node: the
    coordinator forgets what the old one held at once, the agent there must register again,
    and the new Node object is labelled only for what its agent reports after that."""
    nodes = ["node-1", "node-2"]
    registered = add_nodes(kube, nodes)
    upload_dataset(cluster, "k8s-renew", "photos/")
    start(cluster, 2, coordinator_flags=coordinator_flags(kube))
    create(cluster, "photos", "s3://k8s-renew/photos/", replicas=2)
    wait_until(lambda: ready_nodes(cluster, "photos") == set(nodes), 60, "2 Ready replicas")
    wait_until(lambda: labelled(kube, nodes) == set(nodes), 30, "labels on both nodes")

    old_uid = kube.get_node("node-1")["metadata"]["uid"]
    log_start = len(cluster.coordinator.log_path.read_text().splitlines())
    agent_log_start = len(cluster.agents["node-1"].log_path.read_text().splitlines())
    kube.delete_node("node-1")
    kube.add_node("node-1", labels={"team": "ml"}, zone="zone-a")
    new_uid = kube.get_node("node-1")["metadata"]["uid"]
    assert new_uid != old_uid

    def node_1_messages() -> list[str]:
        records = log_records(cluster.coordinator.log_path, log_start)
        return [r["msg"] for r in records if r.get("node") == "node-1"]

    def relabelled() -> bool:
        seen = node_1_messages()
        labels = [i for i, m in enumerate(seen) if m.startswith("Labels of node updated: ['")]
        return any(f"node uid {new_uid}" in m for m in seen) and bool(labels)

    wait_until(relabelled, 60, "node-1's agent to register again and node-1 to be labelled")
    seen = node_1_messages()
    forgot = seen.index("Node deleted: forgetting its replicas")
    registered_again = next(
        i for i, m in enumerate(seen) if m.startswith("Agent registered") and new_uid in m
    )
    first_label = next(i for i, m in enumerate(seen) if m.startswith("Labels of node updated"))
    # Forgotten first; labelled only after the agent registered as the new node's agent.
    assert forgot < registered_again < first_label, seen
    agent_records = log_records(cluster.agents["node-1"].log_path, agent_log_start)
    assert any(
        "FAILED_PRECONDITION" in r.get("msg", "")
        for r in agent_records
        if r.get("msg", "").startswith("Coordinator session ended")
    ), "node-1's agent was not asked to register again"

    # Then everything is as for any node: both copies Ready, both Node objects labelled.
    wait_until(
        lambda: ready_nodes(cluster, "photos") == set(nodes) == labelled(kube, nodes),
        60,
        "both replicas Ready and labelled",
    )
    meta = kube.get_node("node-1")["metadata"]
    assert meta["uid"] == new_uid
    assert meta["labels"] == {**registered["node-1"], LABEL: "ready"}
    assert meta["annotations"][OWNED] == LABEL
    listed = {n.name: n for n in cluster.list_nodes()}
    assert listed["node-1"].uid == new_uid
    assert listed["node-1"].agent_connected
