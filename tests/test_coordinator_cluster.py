"""Cluster mode at the coordinator level: a Node watch against the fake API server feeds
placement (taints, cordons, selectors from Node objects), and deleted or re-created nodes lose
their replicas and labels. Agents are simulated over real gRPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from datacache.localcluster import wait_until
from datacache.v1 import datacache_pb2 as pb
from tests.coordinator_sim import SimAgent, coordinator, datasets_stub, ready
from tests.fakekube import FakeKubeAPI

KEY = "dataset.datacache.io/default.d"


def node_labels(fake: FakeKubeAPI, name: str) -> dict[str, str]:
    obj: dict[str, Any] | None = fake.get_node(name)
    return dict(obj["metadata"].get("labels", {})) if obj else {}


def test_node_facts_drive_placement_and_node_loss_cleans_up(
    tmp_path: Path, kube: tuple[FakeKubeAPI, Path]
) -> None:
    fake, kubeconfig = kube
    fake.add_node("node-1", zone="z1")
    fake.add_node(
        "node-2", zone="z2", taints=[{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]
    )
    fake.add_node("node-3", zone="z3", unschedulable=True)
    api = k8s.CoreV1Api(k8s_config.new_client_from_config(config_file=str(kubeconfig)))  # type: ignore[no-untyped-call]
    flags = ("--labeler=kubernetes", f"--kubeconfig={kubeconfig}")
    with coordinator(tmp_path, *flags) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
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

            # Uncordoning node-3 makes room for a second replica.
            api.patch_node("node-3", {"spec": {"unschedulable": False}})
            agents["node-3"].wait_desired(lambda m: len(m.datasets) == 1, "d on node-3")
            for name in ("node-1", "node-3"):
                agents[name].report(ready("default/d"))
            wait_until(
                lambda: all(node_labels(fake, n).get(KEY) == "ready" for n in ("node-1", "node-3")),
                20,
                "labels on node-1 and node-3",
            )
            listed = {n.name: n for n in cluster.list_nodes()}
            assert listed["node-2"].zone == "z2" and listed["node-1"].uid

            # node-3 is re-created under its name (a new machine): it starts empty, unlabelled.
            fake.recreate_node("node-3")
            wait_until(
                lambda: (
                    "node-3"
                    not in {
                        r.node_name
                        for r in stub.GetDataset(
                            pb.GetDatasetRequest(name="d"), timeout=10
                        ).dataset.status.replicas
                        if r.state == pb.REPLICA_STATE_READY
                    }
                ),
                20,
                "the re-created node's replica to be dropped",
            )
            assert KEY not in node_labels(fake, "node-3")
            # node-1 is deleted: its replica goes too.
            fake.delete_node("node-1")
            wait_until(
                lambda: (
                    stub.GetDataset(
                        pb.GetDatasetRequest(name="d"), timeout=10
                    ).dataset.status.ready_replicas
                    == 0
                ),
                20,
                "the deleted node's replica to be dropped",
            )
