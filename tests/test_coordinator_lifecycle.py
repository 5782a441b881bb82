"""Replica lifecycle at the coordinator level, with simulated agents over real gRPC: labels
through a refresh, node identity, eviction for room, lease expiry, selectors and all_nodes."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from datacache.localcluster import LocalCluster, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.coordinator_sim import GIB, SimAgent, coordinator, datasets_stub, ready

KEY = "dataset.datacache.io/default.d"
OLD = "sha256:" + "1" * 64
NEW = "sha256:" + "2" * 64


def labels(cluster: LocalCluster) -> dict[str, dict[str, str]]:
    with cluster.channel() as channel:
        nodes = pb_grpc.NodeServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=10)
    return {n.name: dict(n.labels) for n in nodes.nodes}


def labelled(cluster: LocalCluster, key: str = KEY) -> set[str]:
    return {n for n, ls in labels(cluster).items() if ls.get(key) == "ready"}


def create(stub: pb_grpc.DatasetServiceStub, name: str = "d", **fields: object) -> None:
    values: dict[str, object] = {"name": name, "source": "s3://bucket/x/", "replicas": 1}
    values.update(fields)
    stub.CreateDataset(pb.CreateDatasetRequest(dataset=pb.Dataset(**values)), timeout=10)  # type: ignore[arg-type]


def test_refresh_keeps_the_label_while_the_old_version_serves(tmp_path: Path) -> None:
    with coordinator(tmp_path) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            create(stub)
            agent = SimAgent(channel, "node-1")
            agent.register()
            agent.wait_desired(lambda m: [d.revision for d in m.datasets] == [1], "revision 1")
            agent.report(ready("default/d", OLD, revision=1))
            wait_until(lambda: labelled(cluster) == {"node-1"}, 10, "the label")

            stub.RefreshDataset(pb.RefreshDatasetRequest(name="d"), timeout=10)
            agent.wait_desired(lambda m: [d.revision for d in m.datasets] == [2], "revision 2")
            fetching = pb.ReplicaReport(
                dataset_name="default/d",
                state=pb.REPLICA_STATE_FETCHING,
                revision=2,
                serving_version=OLD,
                bytes_done=10,
                bytes_total=100,
            )
            agent.report(fetching)

            def row() -> pb.Replica:
                dataset = stub.GetDataset(pb.GetDatasetRequest(name="d"), timeout=10).dataset
                replica: pb.Replica = dataset.status.replicas[0]
                return replica

            wait_until(lambda: row().state == pb.REPLICA_STATE_FETCHING, 10, "Fetching rev 2")
            assert row().serving_version == OLD
            assert labelled(cluster) == {"node-1"}
            # A Ready copy of the old revision still counts as serving, not as Ready for rev 2.
            agent.report(ready("default/d", OLD, revision=1))
            wait_until(lambda: row().state == pb.REPLICA_STATE_PENDING, 10, "Pending for rev 2")
            assert labelled(cluster) == {"node-1"}
            agent.report(ready("default/d", NEW, revision=2))
            wait_until(lambda: row().state == pb.REPLICA_STATE_READY, 10, "Ready rev 2")
            assert labelled(cluster) == {"node-1"}
            # Fetching with nothing to serve: no label.
            agent.report(
                pb.ReplicaReport(
                    dataset_name="default/d", state=pb.REPLICA_STATE_FETCHING, revision=2
                )
            )
            wait_until(lambda: labelled(cluster) == set(), 10, "the label to go")


def test_a_new_identity_under_a_known_name_starts_empty(tmp_path: Path) -> None:
    with coordinator(tmp_path) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            create(stub)
            agent = SimAgent(channel, "node-1", cache_id="cache-a", uid="uid-1")
            agent.register()
            agent.wait_desired(lambda m: len(m.datasets) == 1, "the dataset")
            agent.report(ready("default/d", OLD))
            wait_until(lambda: labelled(cluster) == {"node-1"}, 10, "the label")

            # The same identity again (an agent restart): nothing is lost.
            agent.register()
            dataset = stub.GetDataset(pb.GetDatasetRequest(name="d"), timeout=10).dataset
            assert dataset.status.ready_replicas == 1
            assert labelled(cluster) == {"node-1"}

            for replacement in (
                SimAgent(channel, "node-1", cache_id="cache-b", uid="uid-1"),
                SimAgent(channel, "node-1", cache_id="cache-b", uid="uid-2"),
            ):
                # The old agent of that name is refused from now on.
                previous = agent
                replacement.register()
                try:
                    previous.report(ready("default/d", OLD))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                else:
                    raise AssertionError("the replaced agent could still report")
                wait_until(lambda: labelled(cluster) == set(), 10, "the label to go")
                dataset = stub.GetDataset(pb.GetDatasetRequest(name="d"), timeout=10).dataset
                assert [(r.node_name, r.state) for r in dataset.status.replicas] in (
                    [("node-1", pb.REPLICA_STATE_PENDING)],
                    [],
                )
                replacement.report(ready("default/d", OLD))
                wait_until(lambda: labelled(cluster) == {"node-1"}, 10, "the label again")
                agent = replacement


def test_pressure_evicts_unpinned_least_recently_used(tmp_path: Path) -> None:
    with coordinator(tmp_path, "--eviction-cooldown-seconds=600") as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            for name in ("old", "recent", "pinned", "wanted"):
                create(stub, name, pin=name == "pinned")
            node = SimAgent(channel, "node-1", capacity=10 * GIB, free=10 * GIB)
            node.register()
            node.wait_desired(lambda m: len(m.datasets) == 4, "four datasets")
            used = {"old": 100, "recent": 900, "pinned": 1}
            node.report(
                *[
                    ready(f"default/{n}", disk_bytes=GIB, last_used_time={"seconds": t})
                    for n, t in used.items()
                ],
                pb.ReplicaReport(dataset_name="default/wanted", state=pb.REPLICA_STATE_FETCHING),
            )
            wait_until(
                lambda: (
                    {"old", "recent", "pinned"}
                    <= {k.rsplit(".", 1)[1] for k in labels(cluster).get("node-1", {})}
                ),
                10,
                "labels of the Ready datasets",
            )
            node.report(
                *[
                    ready(f"default/{n}", disk_bytes=GIB, last_used_time={"seconds": t})
                    for n, t in used.items()
                ],
                pb.ReplicaReport(dataset_name="default/wanted", state=pb.REPLICA_STATE_FETCHING),
                pressure=GIB // 2,
            )
            node.wait_desired(
                lambda m: (
                    {d.name for d in m.datasets}
                    == {"default/recent", "default/pinned", "default/wanted"}
                ),
                "the least recently used dataset to be evicted",
            )
            assert "dataset.datacache.io/default.old" not in labels(cluster).get("node-1", {})
            # A second node joins: the evicted dataset goes there, never back to node-1.
            other = SimAgent(channel, "node-2")
            other.register()
            other.wait_desired(lambda m: "default/old" in {d.name for d in m.datasets}, "re-placed")
            node.report(
                *[ready(f"default/{n}", disk_bytes=GIB) for n in ("recent", "pinned")],
                pb.ReplicaReport(dataset_name="default/wanted", state=pb.REPLICA_STATE_FETCHING),
            )
            assert "default/old" not in node.desired_names()


def test_lease_expiry_moves_replicas_and_a_return_keeps_the_rest(tmp_path: Path) -> None:
    with coordinator(tmp_path, "--lease-seconds=3") as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            create(stub, "d", replicas=1)
            first = SimAgent(channel, "node-1")
            second = SimAgent(channel, "node-2")
            first.register()
            first.wait_desired(lambda m: len(m.datasets) == 1, "the dataset on node-1")
            first.report(ready("default/d"))
            second.register()
            wait_until(lambda: labelled(cluster) == {"node-1"}, 10, "the label on node-1")

            # node-1 goes silent; node-2 keeps reporting and gets the replica.
            def node_2_took_over() -> bool:
                second.report()
                return second.desired_names() == {"default/d"}

            wait_until(node_2_took_over, 20, "re-placement after lease expiry")
            wait_until(lambda: labelled(cluster) == set(), 10, "the label of the dead node to go")
            second.report(ready("default/d"))
            wait_until(lambda: labelled(cluster) == {"node-2"}, 10, "the label on node-2")


def test_selector_and_all_nodes(tmp_path: Path) -> None:
    with coordinator(tmp_path) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            gpu = {"gpu": "yes", "topology.kubernetes.io/zone": "z1"}
            agents = [
                SimAgent(channel, "cpu-1", labels={"topology.kubernetes.io/zone": "z1"}),
                SimAgent(channel, "gpu-1", labels=gpu),
            ]
            for agent in agents:
                agent.register()
            create(stub, "warm", replicas=0, all_nodes=True, node_selector={"gpu": "yes"})
            agents[1].wait_desired(lambda m: len(m.datasets) == 1, "warm on gpu-1")
            assert agents[0].desired_names() == set()
            late = SimAgent(channel, "gpu-2", labels=gpu)
            late.register()
            late.wait_desired(lambda m: len(m.datasets) == 1, "warm on the late gpu node")
            # Changing the selector moves the dataset.
            stub.UpdateDataset(
                pb.UpdateDatasetRequest(
                    dataset=pb.Dataset(name="warm", node_selector={}),
                    update_mask=FieldMask(paths=["node_selector"]),
                ),
                timeout=10,
            )
            agents[0].wait_desired(lambda m: len(m.datasets) == 1, "warm on every node")
