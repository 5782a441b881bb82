"""End to end in cluster mode: the coordinator labels Node objects through the official client
talking HTTP to the fake API server; S3, coordinator and agents are real processes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from datacache.localcluster import LocalCluster, wait_until
from tests.fakekube import FakeKubeAPI
from tests.test_e2e import create, dataset_gone, ready_nodes, start, upload_dataset

LABEL = "dataset.datacache.io/default.photos"
OWNED = "datacache.io/owned-labels"
NODES = ["node-1", "node-2", "node-3"]


def labels_of(fake: FakeKubeAPI, node: str) -> dict[str, str]:
    obj: dict[str, Any] | None = fake.get_node(node)
    assert obj is not None
    return dict(obj["metadata"].get("labels", {}))


def labelled(fake: FakeKubeAPI) -> set[str]:
    return {n for n in NODES if labels_of(fake, n).get(LABEL) == "ready"}


def test_node_objects_are_labelled_and_cleaned(
    cluster: LocalCluster, kube: tuple[FakeKubeAPI, Path]
) -> None:
    fake, kubeconfig = kube
    for node in NODES:
        fake.add_node(node, labels={"team": "ml"}, zone="zone-a")
    upload_dataset(cluster, "k8s-photos", "photos/")
    start(cluster, 3, coordinator_flags=("--labeler=kubernetes", f"--kubeconfig={kubeconfig}"))
    create(cluster, "photos", "s3://k8s-photos/photos/", replicas=2)

    wait_until(lambda: len(ready_nodes(cluster, "photos")) == 2, 60, "2 Ready replicas")
    holders = ready_nodes(cluster, "photos")
    wait_until(lambda: labelled(fake) == holders, 20, "labels on the Ready nodes")
    for node in holders:
        obj = fake.get_node(node)
        assert obj is not None
        assert obj["metadata"]["annotations"][OWNED] == LABEL
        assert obj["metadata"]["labels"]["team"] == "ml"

    # A coordinator killed and restarted on the same store keeps the labels: it neither strips
    # them at start-up nor re-downloads, and converges without writing anything.
    cluster.coordinator.kill()
    restarted_at = time.time()
    fake.clear_requests()
    log_start = len(cluster.coordinator.log_path.read_text().splitlines())
    cluster.start_coordinator(
        "--labeler=kubernetes", f"--kubeconfig={kubeconfig}", "--reconcile-interval-seconds=0.5"
    )

    def passes() -> int:
        lines = cluster.coordinator.log_path.read_text().splitlines()[log_start:]
        return sum("Reconcile pass took" in line for line in lines)

    def reported_since_restart() -> bool:
        replicas = cluster.get_dataset("photos").status.replicas
        return all(r.update_time.ToNanoseconds() > restarted_at * 1e9 for r in replicas)

    wait_until(
        lambda: reported_since_restart() and passes() >= 2,
        30,
        "agents to report to the new coordinator and several reconcile passes",
    )
    assert ready_nodes(cluster, "photos") == holders
    assert labelled(fake) == holders
    assert [r for r in fake.requests if r.method == "PATCH"] == []

    with cluster.channel() as channel:
        from datacache.v1 import datacache_pb2 as pb
        from datacache.v1 import datacache_pb2_grpc as pb_grpc

        pb_grpc.DatasetServiceStub(channel).DeleteDataset(
            pb.DeleteDatasetRequest(name="photos"), timeout=10
        )

    wait_until(lambda: dataset_gone(cluster, "photos"), 30, "the dataset to be deleted")
    assert labelled(fake) == set()
    for node in NODES:
        assert labels_of(fake, node) == {"team": "ml", "topology.kubernetes.io/zone": "zone-a"}
        assert not (cluster.cache_dir(node) / "datasets" / "default" / "photos").exists()
