"""Cluster mode at the coordinator level, against a real kube-apiserver: a Node watch feeds
placement (taints, cordons, selectors from Node objects), and deleted or re-created nodes lose
their replicas and labels. The coordinator runs as its own ServiceAccount; agents are simulated
over real gRPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from datacache.localcluster import wait_until
from datacache.v1 import datacache_pb2 as pb
from tests.coordinator_sim import SimAgent, coordinator, datasets_stub, ready
from tests.kubecontrolplane import KubeTest

KEY = "dataset.datacache.io/default.d"
OWNED = "datacache.io/owned-labels"
COORDINATOR_SA = ("datacache", "datacache-coordinator")
WAIT = 30.0


def coordinator_kubeconfig(kube: KubeTest) -> Path:
    return kube.token_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")


def test_node_facts_drive_placement_and_node_loss_cleans_up(tmp_path: Path, kube: KubeTest) -> None:
    kube.add_node("node-1", zone="z1")
    kube.add_node(
        "node-2", zone="z2", taints=[{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]
    )
    kube.add_node("node-3", zone="z3", unschedulable=True)
    old_uid = kube.get_node("node-3")["metadata"]["uid"]
    flags = ("--labeler=kubernetes", f"--kubeconfig={coordinator_kubeconfig(kube)}")
    with coordinator(tmp_path, *flags) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:

            def ready_on() -> set[str]:
                replicas = stub.GetDataset(
                    pb.GetDatasetRequest(name="d"), timeout=10
                ).dataset.status.replicas
                return {r.node_name for r in replicas if r.state == pb.REPLICA_STATE_READY}

            def labelled() -> set[str]:
                return {n for n in ("node-1", "node-3") if kube.node_labels(n).get(KEY) == "ready"}

            agents = {n: SimAgent(channel, n) for n in ("node-1", "node-2", "node-3")}
            for agent in agents.values():
                agent.register()
            stub.CreateDataset(
                pb.CreateDatasetRequest(
                    dataset=pb.Dataset(name="d", source="s3://bucket/x/", replicas=3)
                ),
                timeout=10,
            )
            # Only node-1 is eligible: node-2's taint is not tolerated, node-3 is cordoned.
            agents["node-1"].wait_desired(lambda m: len(m.datasets) == 1, "d on node-1")
            assert agents["node-2"].desired_names() == set()
            assert agents["node-3"].desired_names() == set()

            # Uncordoning node-3 (an admin's change) makes room for a second replica.
            kube.plane.patch("/api/v1/nodes/node-3", {"spec": {"unschedulable": False}})
            agents["node-3"].wait_desired(lambda m: len(m.datasets) == 1, "d on node-3")
            for name in ("node-1", "node-3"):
                agents[name].report(ready("default/d"))
            wait_until(lambda: labelled() == {"node-1", "node-3"}, WAIT, "labels on 1 and 3")
            listed = {n.name: n for n in cluster.list_nodes()}
            assert listed["node-2"].zone == "z2"
            assert listed["node-3"].uid == old_uid

            # node-3 is deleted and registers again under its name (a new machine, a new UID):
            # the coordinator forgets its replica and its agent at once.
            kube.delete_node("node-3")
            new_uid = kube.add_node("node-3", zone="z3")["metadata"]["uid"]
            assert new_uid != old_uid
            wait_until(lambda: "node-3" not in ready_on(), WAIT, "node-3's replica dropped")
            assert KEY not in kube.node_labels("node-3")

            # The old node's agent is not trusted any more: it has to register again.
            with pytest.raises(grpc.RpcError) as refused:
                agents["node-3"].report(ready("default/d"))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert KEY not in kube.node_labels("node-3")

            # Registered again, it is the new node: empty, then given d, and labelled once it
            # reports the copy Ready.
            agents["node-3"].register()
            wait_until(
                lambda: {n.name: n.uid for n in cluster.list_nodes()}.get("node-3") == new_uid,
                WAIT,
                "node-3 listed with its new UID",
            )
            agents["node-3"].wait_desired(lambda m: len(m.datasets) == 1, "d on the new node-3")
            assert KEY not in kube.node_labels("node-3")
            agents["node-3"].report(ready("default/d"))
            wait_until(lambda: labelled() == {"node-1", "node-3"}, WAIT, "the new node-3 labelled")
            node_3 = kube.get_node("node-3")["metadata"]
            assert node_3["uid"] == new_uid
            assert node_3["annotations"][OWNED] == KEY
            assert ready_on() == {"node-1", "node-3"}

            # node-1 is deleted: its replica goes too.
            kube.delete_node("node-1")
            wait_until(lambda: ready_on() == {"node-3"}, WAIT, "the deleted node's replica dropped")
            assert (
                stub.GetDataset(pb.GetDatasetRequest(name="d"), timeout=10).dataset.status
            ).ready_replicas == 1
