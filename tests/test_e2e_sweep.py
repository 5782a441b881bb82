"""A hyperparameter sweep end to end: annotated trial pods in the fake Kubernetes API raise a
dataset's replicas up to max_replicas; once the trials finish and the cool-down passes, the
extra replicas, their labels and their files go. S3, coordinator and agents are real
processes. Also the DemandService API (SetDemand) against a real coordinator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.k8s_labeler import core_api
from datacache.localcluster import LocalCluster, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.fakekube import FakeKubeAPI
from tests.test_e2e import ready_nodes, start, upload_dataset
from tests.test_k8s_pods import PODS

LABEL = "dataset.datacache.io/default.sweep"
NODES = ["node-1", "node-2", "node-3", "node-4"]


@pytest.fixture
def kube_pods(tmp_path: Path) -> Iterator[tuple[FakeKubeAPI, Path]]:
    """The fake API server with Pods as well as Nodes."""
    with FakeKubeAPI(resources=[PODS]) as fake:
        yield fake, fake.write_kubeconfig(tmp_path / "kubeconfig")
        assert not fake.server_errors, fake.server_errors


def trial_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "annotations": {"datacache.io/dataset": "default/sweep"},
        },
        "spec": {"containers": [{"name": "trial", "image": "trainer"}]},
        "status": {"phase": "Pending"},
    }


def labelled(fake: FakeKubeAPI) -> set[str]:
    out = set()
    for node in NODES:
        obj = fake.get_node(node)
        assert obj is not None
        if obj["metadata"].get("labels", {}).get(LABEL) == "ready":
            out.add(node)
    return out


def create_sweep_dataset(cluster: LocalCluster, replicas: int, max_replicas: int) -> None:
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).CreateDataset(
            pb.CreateDatasetRequest(
                dataset=pb.Dataset(
                    name="sweep",
                    source="s3://sweep/data/",
                    replicas=replicas,
                    max_replicas=max_replicas,
                )
            ),
            timeout=10,
        )


def test_sweep_scales_replicas_up_and_back_down(
    cluster: LocalCluster, kube_pods: tuple[FakeKubeAPI, Path]
) -> None:
    fake, kubeconfig = kube_pods
    for node in NODES:
        fake.add_node(node)
    upload_dataset(cluster, "sweep", "data/")
    start(
        cluster,
        len(NODES),
        coordinator_flags=(
            "--labeler=kubernetes",
            f"--kubeconfig={kubeconfig}",
            "--watch-pods",
            "--demand-cooldown-seconds=2",
        ),
    )
    create_sweep_dataset(cluster, replicas=1, max_replicas=4)
    wait_until(lambda: len(ready_nodes(cluster, "sweep")) == 1, 60, "1 Ready replica")
    first = ready_nodes(cluster, "sweep")
    wait_until(lambda: labelled(fake) == first, 20, "the label on the first replica's node")

    for i in range(8):
        fake.create_object("pods", trial_pod(f"trial-{i}"), namespace="ml")
    wait_until(lambda: len(ready_nodes(cluster, "sweep")) == 4, 90, "4 Ready replicas")
    wait_until(lambda: labelled(fake) == set(NODES), 20, "labels on all 4 nodes")
    status = cluster.get_dataset("sweep").status
    assert status.demand == 8
    assert status.target_replicas == 4
    assert status.phase == "Ready"

    v1 = core_api(str(kubeconfig))
    for i in range(8):
        v1.patch_namespaced_pod(f"trial-{i}", "ml", {"status": {"phase": "Succeeded"}})

    def shrunk() -> bool:
        dataset = cluster.get_dataset("sweep")
        return (
            dataset.status.target_replicas == 1
            and dataset.status.demand == 0
            and len(dataset.status.replicas) == 1
            and dataset.status.replicas[0].state == pb.REPLICA_STATE_READY
        )

    wait_until(shrunk, 60, "the dataset back at 1 replica after the cool-down")
    holder = ready_nodes(cluster, "sweep")
    assert len(holder) == 1
    wait_until(lambda: labelled(fake) == holder, 20, "labels left on the remaining node only")

    def files_gone() -> bool:
        return all(
            not (cluster.cache_dir(node) / "datasets" / "default" / "sweep").exists()
            for node in NODES
            if node not in holder
        )

    wait_until(files_gone, 30, "copies deleted from the other nodes")
    (node,) = holder
    assert (cluster.cache_dir(node) / "datasets" / "default" / "sweep" / "current").exists()


def set_demand(channel: grpc.Channel, **fields: Any) -> pb.SetDemandResponse:
    request = pb.SetDemandRequest(**fields)
    response: pb.SetDemandResponse = pb_grpc.DemandServiceStub(channel).SetDemand(
        request, timeout=10
    )
    return response


def test_set_demand_validates_raises_and_expires(cluster: LocalCluster) -> None:
    upload_dataset(cluster, "demand", "data/")
    start(cluster, 3, coordinator_flags=("--demand-cooldown-seconds=0",))
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).CreateDataset(
            pb.CreateDatasetRequest(
                dataset=pb.Dataset(
                    name="demand", source="s3://demand/data/", replicas=1, max_replicas=3
                )
            ),
            timeout=10,
        )
        for bad, words in [
            ({"dataset_name": "demand", "client_id": "", "trials": 1, "ttl_seconds": 5}, "client"),
            (
                {"dataset_name": "demand", "client_id": "c", "trials": -1, "ttl_seconds": 5},
                "trials",
            ),
            ({"dataset_name": "demand", "client_id": "c", "trials": 1, "ttl_seconds": 0}, "ttl"),
            ({"dataset_name": "Bad Name!", "client_id": "c", "trials": 1, "ttl_seconds": 5}, ""),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                set_demand(channel, **bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert words in (caught.value.details() or ""), caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            set_demand(channel, dataset_name="missing", client_id="c", trials=1, ttl_seconds=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        response = set_demand(
            channel, dataset_name="demand", client_id="sweep-1", trials=5, ttl_seconds=3
        )
        assert response.expire_time.seconds > 0

        def target() -> int:
            return cluster.get_dataset("demand").status.target_replicas

        wait_until(lambda: target() == 3, 20, "demand to raise the target to max_replicas")
        assert cluster.get_dataset("demand").status.demand == 5
        # The lease runs out without renewal: the target falls back to replicas.
        wait_until(lambda: target() == 1, 20, "expired demand to lower the target")
        assert cluster.get_dataset("demand").status.demand == 0

        # Withdrawing (trials = 0) works the same way, at once.
        set_demand(channel, dataset_name="demand", client_id="sweep-2", trials=2, ttl_seconds=600)
        wait_until(lambda: target() == 2, 20, "renewed demand to raise the target")
        set_demand(channel, dataset_name="demand", client_id="sweep-2", trials=0, ttl_seconds=1)
        wait_until(lambda: target() == 1, 20, "withdrawn demand to lower the target")
