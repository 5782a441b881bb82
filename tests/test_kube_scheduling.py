"""Datacache's node labels steer the real kube-scheduler: a pod carrying the node affinity of
`datacache dataset affinity` is bound only to nodes labelled as holding a Ready copy, waits
(unschedulable) while none has room, and is bound as soon as a new copy is Ready and labelled.
The coordinator (with its ServiceAccount's token) and agents are real processes, as is S3.
And the known limit of the hostPath mount: Pod Security "baseline" refuses such a pod."""

from __future__ import annotations

import json
import subprocess
from pathlib import PurePosixPath
from typing import Any

import pytest

from coordinator.labels import READY_VALUE, label_key
from datacache.localcluster import LocalCluster, wait_until
from datacache.podspec import DatasetMount
from tests.kubecontrolplane import KubeAPIError, KubeTest
from tests.test_e2e import ready_nodes, upload_dataset
from tests.test_e2e_sweep import (
    NODE_CACHE_DIR,
    WAIT,
    bound_to,
    coordinator_kubeconfig,
    labelled,
    pods_path,
    unschedulable,
)

DATASET = "default/steer"
LABEL = label_key(DATASET)
NODES = ["node-1", "node-2", "node-3"]
NAMESPACE = "ml"
# Two pods of 1 CPU fit on a node of 2.
NODE_CPU = "2"
POD_CPU = "1"
NO_MATCH = "didn't match Pod's node affinity/selector"


def cli(cluster: LocalCluster, *args: str) -> str:
    done = subprocess.run(
        ["datacache", f"--coordinator={cluster.coordinator_address}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def consumer_pod(name: str, snippets: dict[str, Any]) -> dict[str, Any]:
    """A pod built from the snippets as their documentation says: affinity and volumes into
    the pod spec, volumeMounts into the container."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "affinity": snippets["affinity"],
            "volumes": snippets["volumes"],
            "containers": [
                {
                    "name": "main",
                    "image": "trainer",
                    "resources": {"requests": {"cpu": POD_CPU}, "limits": {"cpu": POD_CPU}},
                    "volumeMounts": snippets["volumeMounts"],
                }
            ],
        },
    }


def get_pod(kube: KubeTest, name: str) -> dict[str, Any]:
    return dict(kube.plane.get(f"{pods_path(NAMESPACE)}/{name}"))


def wait_bound(kube: KubeTest, name: str, what: str) -> str:
    wait_until(lambda: bound_to(get_pod(kube, name)) is not None, WAIT, what)
    node = bound_to(get_pod(kube, name))
    assert node is not None
    return node


def wait_unschedulable(kube: KubeTest, name: str) -> str:
    """Waits for the scheduler's verdict that no node fits the pod; returns its message."""
    wait_until(
        lambda: unschedulable(get_pod(kube, name)) is not None,
        WAIT,
        f"the scheduler to find no node for {name}",
    )
    assert bound_to(get_pod(kube, name)) is None
    return unschedulable(get_pod(kube, name)) or ""


def test_affinity_binds_pods_only_where_a_ready_copy_is(
    cluster: LocalCluster, kube: KubeTest, bucket: str
) -> None:
    for node in NODES:
        kube.add_node(node, capacity={"cpu": NODE_CPU})
    kube.plane.ensure_namespace(NAMESPACE)
    upload_dataset(cluster, bucket, "data/")
    cluster.start_coordinator(
        "--reconcile-interval-seconds=0.5",
        "--labeler=kubernetes",
        f"--kubeconfig={coordinator_kubeconfig(kube)}",
    )
    cli(
        cluster, "dataset", "create", DATASET, "--source", f"s3://{bucket}/data/", "--replicas", "1"
    )
    required = json.loads(cli(cluster, "dataset", "affinity", DATASET, "-o", "json"))
    preferred = json.loads(
        cli(cluster, "dataset", "affinity", DATASET, "--preferred", "-o", "json")
    )
    assert required["readyNodes"] == []

    # No agent runs yet, so no node holds a copy: the pod waits, unbound.
    kube.plane.create(pods_path(NAMESPACE), consumer_pod("early", required))
    message = wait_unschedulable(kube, "early")
    assert f"3 node(s) {NO_MATCH}" in message, message

    for node in NODES:
        cluster.start_agent(node)
    wait_until(lambda: len(ready_nodes(cluster, "steer")) == 1, WAIT, "1 Ready replica")
    (holder,) = ready_nodes(cluster, "steer")
    wait_until(lambda: labelled(kube, LABEL) == {holder}, WAIT, "the label on the holder")
    assert wait_bound(kube, "early", "the waiting pod bound once a copy is labelled") == holder

    # A second pod fits beside it; a third finds the only holder full and waits, although
    # two nodes have room: they hold no copy.
    kube.plane.create(pods_path(NAMESPACE), consumer_pod("second", required))
    assert wait_bound(kube, "second", "the second pod bound") == holder
    kube.plane.create(pods_path(NAMESPACE), consumer_pod("third", required))
    message = wait_unschedulable(kube, "third")
    assert "1 Insufficient cpu" in message and f"2 node(s) {NO_MATCH}" in message, message

    # A new copy: once it is Ready and its node labelled, the waiting pod is bound there.
    cli(cluster, "dataset", "update", DATASET, "--replicas", "2")
    wait_until(lambda: len(ready_nodes(cluster, "steer")) == 2, WAIT, "2 Ready replicas")
    (added,) = ready_nodes(cluster, "steer") - {holder}
    wait_until(lambda: labelled(kube, LABEL) == {holder, added}, WAIT, "the new copy's label")
    assert wait_bound(kube, "third", "the waiting pod bound to the new copy") == added

    # Preferring a copy: of the two nodes with room, the one holding a copy wins.
    kube.plane.create(pods_path(NAMESPACE), consumer_pod("flexible", preferred))
    assert wait_bound(kube, "flexible", "the preferring pod bound") == added

    # Every pod's node has the copy its hostPath volume names; the node without one has none.
    (spare,) = set(NODES) - {holder, added}
    placed = {
        name: bound_to(get_pod(kube, name)) for name in ("early", "second", "third", "flexible")
    }
    assert spare not in placed.values(), placed
    host_path = PurePosixPath(required["volumes"][0]["hostPath"]["path"])
    for where in placed.values():
        assert where is not None
        assert (cluster.cache_dir(where) / host_path.relative_to(NODE_CACHE_DIR)).is_dir(), where
    final = json.loads(cli(cluster, "dataset", "affinity", DATASET, "-o", "json"))
    assert sorted(final["readyNodes"]) == sorted([holder, added])


def test_pod_security_baseline_refuses_a_hostpath_consumer(kube: KubeTest) -> None:
    """The copy is mounted with a hostPath volume, which Pod Security's "baseline" level
    forbids: a namespace must enforce "privileged" (unlabelled namespaces do) to run trials."""
    mount = DatasetMount(DATASET, LABEL, READY_VALUE, NODE_CACHE_DIR)
    snippets = mount.snippets()
    pod = consumer_pod("reader", snippets)
    kube.plane.ensure_namespace("open")
    kube.plane.request("POST", pods_path("open"), pod, query={"dryRun": "All"})
    kube.plane.ensure_namespace(
        "guarded", labels={"pod-security.kubernetes.io/enforce": "baseline"}
    )
    with pytest.raises(KubeAPIError) as refused:
        kube.plane.create(pods_path("guarded"), pod)
    assert refused.value.status == 403
    volume = snippets["volumes"][0]["name"]
    assert refused.value.body["message"] == (
        'pods "reader" is forbidden: violates PodSecurity "baseline:latest": '
        f'hostPath volumes (volume "{volume}")'
    )
