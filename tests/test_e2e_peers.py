"""Peer copying end to end: real coordinator and agent processes on loopback, real SeaweedFS.
New replicas of a fixed version copy from the agents holding it, not from S3; a peer killed
with SIGKILL in the middle of a copy leaves a verified replica read from S3 instead."""

from __future__ import annotations

import urllib.request

from google.protobuf.field_mask_pb2 import FieldMask
from prometheus_client.parser import text_string_to_metric_families

from datacache.localcluster import LocalCluster, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.test_e2e import create, ready_nodes, tree_digests, upload_dataset

RANGES = ("--multipart-threshold-bytes=1048576", "--part-bytes=1048576")


def metric(
    cluster: LocalCluster, node: str, name: str, labels: dict[str, str] | None = None
) -> float:
    port = cluster.agent_metrics_ports[node]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return float(sample.value)
    return 0.0


def set_replicas(cluster: LocalCluster, name: str, replicas: int) -> None:
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).UpdateDataset(
            pb.UpdateDatasetRequest(
                dataset=pb.Dataset(name=name, replicas=replicas),
                update_mask=FieldMask(paths=["replicas"]),
            ),
            timeout=10,
        )


def fixed_version(cluster: LocalCluster, name: str) -> str:
    return cluster.get_dataset(name).status.version


def start_agents(cluster: LocalCluster, nodes: list[str], *flags: str) -> None:
    for node in nodes:
        cluster.start_agent(node, *RANGES, *flags)
    wait_until(
        lambda: set(nodes) <= {n.name for n in cluster.list_nodes() if n.agent_connected},
        30,
        "agents to register",
    )


def test_new_replicas_copy_the_version_from_peers_not_the_source(cluster: LocalCluster) -> None:
    expected = upload_dataset(cluster, "e2e-peers", "set/")
    cluster.start_coordinator("--reconcile-interval-seconds=0.5")
    start_agents(cluster, ["node-1", "node-2", "node-3"])
    create(cluster, "peers", "s3://e2e-peers/set/", replicas=1)
    wait_until(lambda: len(ready_nodes(cluster, "peers")) == 1, 60, "the first replica")
    wait_until(lambda: bool(fixed_version(cluster, "peers")), 20, "the version to be fixed")
    (first,) = ready_nodes(cluster, "peers")

    set_replicas(cluster, "peers", 3)
    wait_until(lambda: len(ready_nodes(cluster, "peers")) == 3, 60, "3 Ready replicas")

    dataset = cluster.get_dataset("peers")
    assert {r.digest for r in dataset.status.replicas} == {dataset.status.version}
    total = dataset.status.size_bytes
    for node in {"node-1", "node-2", "node-3"} - {first}:
        assert tree_digests(cluster.cache_dir(node) / "datasets/default/peers/current") == expected
        assert metric(cluster, node, "datacache_agent_peer_received_bytes_total") == total
        assert metric(cluster, node, "datacache_agent_peer_origin_bytes_total") == 0
    assert metric(cluster, first, "datacache_agent_peer_served_bytes_total") == 2 * total


def test_a_peer_killed_mid_copy_leaves_a_verified_replica_from_the_source(
    cluster: LocalCluster,
) -> None:
    expected = upload_dataset(cluster, "e2e-peer-kill", "set/")
    cluster.start_coordinator("--reconcile-interval-seconds=0.5")
    # node-1 serves slowly (1 MiB/s), so node-2's copy is surely in flight when it dies.
    start_agents(cluster, ["node-1"], "--peer-serve-bytes-per-second=1048576")
    create(cluster, "killed", "s3://e2e-peer-kill/set/", replicas=1)
    wait_until(lambda: ready_nodes(cluster, "killed") == {"node-1"}, 60, "the first replica")
    wait_until(lambda: bool(fixed_version(cluster, "killed")), 20, "the version to be fixed")

    start_agents(cluster, ["node-2"], "--peer-min-bytes-per-second=0")
    set_replicas(cluster, "killed", 2)
    wait_until(
        lambda: metric(cluster, "node-2", "datacache_agent_peer_received_bytes_total") > 0,
        30,
        "node-2 to read from node-1",
    )
    cluster.agents["node-1"].kill()

    wait_until(lambda: "node-2" in ready_nodes(cluster, "killed"), 60, "node-2 Ready")
    dataset = cluster.get_dataset("killed")
    (replica,) = [r for r in dataset.status.replicas if r.node_name == "node-2"]
    assert replica.digest == dataset.status.version
    assert tree_digests(cluster.cache_dir("node-2") / "datasets/default/killed/current") == expected
    left = sum(
        metric(cluster, "node-2", "datacache_agent_peer_fallbacks_total", {"reason": reason})
        for reason in ("gone", "stalled")
    )
    assert left >= 1
    assert metric(cluster, "node-2", "datacache_agent_peer_origin_bytes_total") > 0
