"""A hyperparameter sweep end to end on a real control plane: a batch/v1 Job's trial pods,
made by the real Job controller, go through the coordinator's admission webhook (registered
with the real API server, which applies its JSON patch), raise the dataset's replicas up to
max_replicas, and the real kube-scheduler binds them only where a Ready copy is; once the
trials finish and the cool-down passes, the extra replicas, their labels and their files go.
S3, coordinator and agents are real processes; the only stand-in is a kubelet that starts a
bound pod once its hostPath volume exists on the node (nothing else here runs containers).
Also the DemandService API (SetDemand) against a real coordinator."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml

from datacache.localcluster import LocalCluster, free_port, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.kubecontrolplane import REPO, KubeTest
from tests.test_e2e import ready_nodes, start, tree_digests, upload_dataset
from tests.tlscerts import CertificateAuthority

LABEL = "dataset.datacache.io/default.sweep"
NODES = ["node-1", "node-2", "node-3", "node-4"]
NAMESPACE = "ml"
# Where the webhook's hostPath points: the coordinator's --node-cache-dir (its default), which
# stands for each local agent's --cache-dir (`LocalCluster.cache_dir`).
NODE_CACHE_DIR = "/var/lib/datacache"
# The documented mount (README, docs/sweeps.md): the copy of <namespace>/<name> at
# /datasets/<namespace>/<name>, from <cache dir>/datasets/<namespace>/<name>/current.
MOUNT_PATH = "/datasets/default/sweep"
HOST_PATH = f"{NODE_CACHE_DIR}/datasets/default/sweep/current"
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# Each trial requests 2 CPUs and every node has 4 allocatable, so two trials fit on a node:
# the 8 trials (6 of the `sweep` Job, 2 of `sweep-preferred`) need all 4 nodes.
NODE_CPU = "4"
TRIAL_CPU = "2"
REQUIRED_TRIALS = 6
PREFERRED_TRIALS = 2
WAIT = 60.0
"""Seconds for any cross-process effect (scheduler, controllers, coordinator, agents)."""


# --- the coordinator's identity and the webhook's registration ---------------------------------


def coordinator_kubeconfig(kube: KubeTest) -> Path:
    """The coordinator's own ServiceAccount identity: the admission policy lets only it set
    datacache's labels on Nodes."""
    return kube.token_kubeconfig(kube.token("datacache", "datacache-coordinator"), "coordinator")


def register_webhook(kube: KubeTest, port: int, ca_file: Path) -> None:
    """Registers the shipped MutatingWebhookConfiguration (manifests/examples/webhook.yaml:
    its rules, namespaceSelector and matchConditions) pointed at the local coordinator, and
    waits until the API server calls it: configuration changes reach admission a moment after
    they are stored."""
    example = REPO / "manifests" / "examples" / "webhook.yaml"
    (config,) = (
        doc
        for doc in yaml.safe_load_all(example.read_text())
        if doc and doc["kind"] == "MutatingWebhookConfiguration"
    )
    (webhook,) = config["webhooks"]
    webhook["clientConfig"] = {
        "url": f"https://127.0.0.1:{port}/mutate",
        "caBundle": base64.b64encode(ca_file.read_bytes()).decode(),
    }
    kube.plane.create_or_replace(config)
    probe = trial_pod("webhook-probe")

    def mutated() -> bool:
        answer = kube.plane.request("POST", pods_path(NAMESPACE), probe, query={"dryRun": "All"})
        return bool(dataset_volumes(answer))

    wait_until(mutated, WAIT, "the API server to call the registered webhook")


# --- pods as the API server stores them -----------------------------------------------------


def pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods"


def trial_pod(name: str) -> dict[str, Any]:
    """A trial pod as a sweep's template makes it (before admission)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"datacache.io/dataset": "default/sweep"}},
        "spec": trial_spec(),
    }


def trial_spec() -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "trial",
                "image": "trainer",
                "resources": {"requests": {"cpu": TRIAL_CPU}, "limits": {"cpu": TRIAL_CPU}},
            }
        ],
    }


def sweep_job(name: str, trials: int, affinity: str | None = None) -> dict[str, Any]:
    """A sweep as a batch/v1 Job (what a Katib trial template expands to): the annotation on
    the pod template is the demand and asks the webhook for the data."""
    annotations = {"datacache.io/dataset": "default/sweep"}
    if affinity is not None:
        annotations["datacache.io/affinity"] = affinity
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "parallelism": trials,
            "completions": trials,
            "backoffLimit": 0,
            "template": {
                "metadata": {
                    "labels": {"katib.kubeflow.org/experiment": "sweep"},
                    "annotations": annotations,
                },
                "spec": trial_spec(),
            },
        },
    }


def plain_pod(name: str) -> dict[str, Any]:
    """A pod that wants no dataset."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "jupyter"}]},
    }


def list_pods(kube: KubeTest, job: str | None = None) -> dict[str, dict[str, Any]]:
    query = {"labelSelector": f"{JOB_NAME_LABEL}={job}"} if job else None
    items = kube.plane.request("GET", pods_path(NAMESPACE), query=query)["items"]
    return {pod["metadata"]["name"]: pod for pod in items}


def bound_to(pod: dict[str, Any]) -> str | None:
    node = pod["spec"].get("nodeName")
    return str(node) if node else None


def unschedulable(pod: dict[str, Any]) -> str | None:
    """The scheduler's message when it found no node for the pod (PodScheduled False)."""
    for condition in pod["status"].get("conditions") or []:
        if (
            condition["type"] == "PodScheduled"
            and condition["status"] == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            return str(condition.get("message", ""))
    return None


def node_affinity(pod: dict[str, Any]) -> dict[str, Any]:
    affinity: dict[str, Any] = (pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}
    return affinity


def assert_mutated(pod: dict[str, Any], affinity: str) -> None:
    """The webhook's additions as the API server stored them: node affinity of the annotated
    kind on the dataset's label, and the read-only copy at the documented mount path."""
    term = {"matchExpressions": [{"key": LABEL, "operator": "In", "values": ["ready"]}]}
    if affinity == "required":
        assert node_affinity(pod) == {REQUIRED: {"nodeSelectorTerms": [term]}}, pod
    else:
        assert node_affinity(pod) == {PREFERRED: [{"weight": 100, "preference": term}]}, pod
    (volume,) = dataset_volumes(pod)
    assert volume["hostPath"] == {"path": HOST_PATH, "type": "Directory"}
    (container,) = pod["spec"]["containers"]
    mounts = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mounts == [{"name": volume["name"], "mountPath": MOUNT_PATH, "readOnly": True}]


def dataset_volumes(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod's hostPath volumes: the ServiceAccount admission plugin adds a projected token
    volume (and its mount) to every pod before the webhook is called."""
    return [v for v in pod["spec"].get("volumes") or [] if "hostPath" in v]


def labelled(kube: KubeTest, label: str = LABEL) -> set[str]:
    """The Nodes whose labels say they hold a Ready copy."""
    return {
        node["metadata"]["name"]
        for node in kube.plane.get("/api/v1/nodes")["items"]
        if (node["metadata"].get("labels") or {}).get(label) == "ready"
    }


def set_phase(kube: KubeTest, name: str, phase: str) -> None:
    """Writes a pod's phase through the status subresource, as its kubelet would."""
    kube.plane.patch(f"{pods_path(NAMESPACE)}/{name}/status", {"status": {"phase": phase}})


# --- the kubelets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    node: str
    labelled: bool
    """Whether the node carried the dataset's label when the binding was first seen."""
    data_on_node: bool
    """Whether the pod's hostPath volumes existed on the node then."""


class Kubelets:
    """What the nodes' kubelets would do, the one part of a cluster nothing here runs: a pod
    bound to a node starts (phase Running) once every hostPath volume of type Directory exists
    on that node, as kubelet volume set-up waits for it; `node_root` maps the coordinator's
    node cache directory to a local agent's. Each binding is recorded as first seen."""

    def __init__(self, kube: KubeTest, node_root: Callable[[str], Path]) -> None:
        self._kube, self._node_root = kube, node_root
        self.bindings: dict[str, Binding] = {}

    def host_path(self, node: str, path: str) -> Path:
        return self._node_root(node) / PurePosixPath(path).relative_to(NODE_CACHE_DIR)

    def volumes_ready(self, pod: dict[str, Any], node: str) -> bool:
        return all(
            self.host_path(node, v["hostPath"]["path"]).is_dir()
            for v in pod["spec"].get("volumes") or []
            if "hostPath" in v and v["hostPath"].get("type") == "Directory"
        )

    def step(self) -> None:
        pods = list_pods(self._kube)
        holders = labelled(self._kube)
        for name, pod in pods.items():
            node = bound_to(pod)
            if node is None:
                continue
            if name not in self.bindings:
                self.bindings[name] = Binding(node, node in holders, self.volumes_ready(pod, node))
            if pod["status"].get("phase") == "Pending" and self.volumes_ready(pod, node):
                set_phase(self._kube, name, "Running")

    def phases(self, job: str | None = None) -> dict[str, str]:
        return {name: pod["status"]["phase"] for name, pod in list_pods(self._kube, job).items()}


@contextlib.contextmanager
def frozen(cluster: LocalCluster, nodes: list[str]) -> Iterator[None]:
    """Stops the agents of `nodes` (SIGSTOP) for the block: they copy and report nothing."""
    stopped: list[int] = []
    try:
        for node in nodes:
            os.kill(cluster.agents[node].popen.pid, signal.SIGSTOP)
            stopped.append(cluster.agents[node].popen.pid)
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def create_sweep_dataset(
    cluster: LocalCluster, bucket: str, replicas: int, max_replicas: int
) -> None:
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).CreateDataset(
            pb.CreateDatasetRequest(
                dataset=pb.Dataset(
                    name="sweep",
                    source=f"s3://{bucket}/data/",
                    replicas=replicas,
                    max_replicas=max_replicas,
                )
            ),
            timeout=10,
        )


def test_sweep_scales_replicas_up_and_back_down(
    cluster: LocalCluster, kube: KubeTest, bucket: str, tmp_path: Path
) -> None:
    for node in NODES:
        kube.add_node(node, capacity={"cpu": NODE_CPU})
    kube.plane.ensure_namespace(NAMESPACE)
    expected = upload_dataset(cluster, bucket, "data/")
    ca = CertificateAuthority(tmp_path / "webhook-tls")
    tls = ca.issue("datacache-webhook", server=True)
    webhook_port = free_port()
    start(
        cluster,
        len(NODES),
        coordinator_flags=(
            "--labeler=kubernetes",
            f"--kubeconfig={coordinator_kubeconfig(kube)}",
            "--watch-pods",
            "--demand-cooldown-seconds=2",
            # Agents are frozen for a while below; they must not be taken for gone meanwhile.
            "--lease-seconds=120",
            f"--webhook-port={webhook_port}",
            f"--webhook-cert-file={tls.cert_file}",
            f"--webhook-key-file={tls.key_file}",
        ),
    )
    create_sweep_dataset(cluster, bucket, replicas=1, max_replicas=4)
    register_webhook(kube, webhook_port, ca.cert_file)
    wait_until(lambda: len(ready_nodes(cluster, "sweep")) == 1, WAIT, "1 Ready replica")
    first = ready_nodes(cluster, "sweep")
    (holder_node,) = first
    wait_until(lambda: labelled(kube) == first, WAIT, "the label on the first replica's node")

    # A pod without the annotation gets no dataset volume or affinity, and is no demand (the
    # demand of 8 below counts the trials only).
    notebook = kube.plane.create(pods_path(NAMESPACE), plain_pod("notebook"))
    assert not dataset_volumes(notebook) and "affinity" not in notebook["spec"], notebook

    # The agents of the other nodes are frozen until the trials have been admitted and
    # scheduled once, so that no second copy can exist yet and the test sees trials wait.
    others = [node for node in NODES if node not in first]
    kubelets = Kubelets(kube, cluster.cache_dir)
    with frozen(cluster, others):
        # The Job controller makes the trials; the API server sends each through the webhook
        # and stores it patched. No datacache.io/affinity annotation: required affinity.
        kube.plane.create(
            f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", sweep_job("sweep", REQUIRED_TRIALS)
        )

        def first_wave_scheduled() -> bool:
            trials = list_pods(kube, "sweep").values()
            bound = [p for p in trials if bound_to(p)]
            waiting = [p for p in trials if unschedulable(p) is not None]
            return len(trials) == REQUIRED_TRIALS and len(bound) + len(waiting) == len(trials)

        wait_until(first_wave_scheduled, WAIT, "the scheduler to try every required trial")
        trials = list_pods(kube, "sweep")
        for pod in trials.values():
            assert_mutated(pod, "required")
        # Two required trials fit on the first copy's node, which then has no CPU left; the
        # others stay unbound, as no other node carries the label.
        placed = [bound_to(p) for p in trials.values()]
        assert placed.count(holder_node) == 2 and placed.count(None) == 4, placed
        for pod in trials.values():
            if not bound_to(pod):
                message = unschedulable(pod) or ""
                assert "3 node(s) didn't match Pod's node affinity/selector" in message, message
                assert "1 Insufficient cpu" in message, message

        # Trials that only prefer a copy go to other nodes while the holder is full, bound
        # there but not started: their volume waits for a copy.
        kube.plane.create(
            f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs",
            sweep_job("sweep-preferred", PREFERRED_TRIALS, affinity="preferred"),
        )

        def preferred_bound() -> bool:
            trials = list_pods(kube, "sweep-preferred").values()
            return len(trials) == PREFERRED_TRIALS and all(bound_to(p) for p in trials)

        wait_until(preferred_bound, WAIT, "the scheduler to bind the preferring trials")
        for pod in list_pods(kube, "sweep-preferred").values():
            assert_mutated(pod, "preferred")
            assert bound_to(pod) in others, pod["spec"]

        # Demand raises the target at once, before any new copy exists.
        def raised() -> bool:
            status = cluster.get_dataset("sweep").status
            return status.demand == 8 and status.target_replicas == 4

        wait_until(raised, WAIT, "8 trials to raise the target to 4 replicas")
        kubelets.step()
        running = {n for n, phase in kubelets.phases().items() if phase == "Running"}
        assert running & set(trials) == {n for n, p in trials.items() if bound_to(p)}
        assert not running & set(list_pods(kube, "sweep-preferred"))
        assert labelled(kube) == first

    def all_running() -> bool:
        kubelets.step()
        phases = {**kubelets.phases("sweep"), **kubelets.phases("sweep-preferred")}
        return len(phases) == 8 and set(phases.values()) == {"Running"}

    wait_until(all_running, 2 * WAIT, "every trial pod bound and Running")
    wait_until(lambda: len(ready_nodes(cluster, "sweep")) == 4, WAIT, "4 Ready replicas")
    wait_until(lambda: labelled(kube) == set(NODES), WAIT, "labels on all 4 nodes")
    status = cluster.get_dataset("sweep").status
    assert status.demand == 8
    assert status.target_replicas == 4
    assert status.phase == "Ready"

    # Required trials were bound only to labelled nodes, which held the copy; every trial
    # runs where its mount has the dataset, two per node (all four copies in use).
    trials = {**list_pods(kube, "sweep"), **list_pods(kube, "sweep-preferred")}
    for name in list_pods(kube, "sweep"):
        binding = kubelets.bindings[name]
        assert binding.labelled, (name, binding)
        assert binding.data_on_node, (name, binding)
    used = [bound_to(pod) for pod in trials.values()]
    assert sorted(n or "" for n in used) == sorted(NODES * 2), used
    for node in NODES:
        assert tree_digests(kubelets.host_path(node, HOST_PATH)) == expected, node

    # The trials finish: their pods no longer count, and the Job controller counts them done.
    for name in trials:
        set_phase(kube, name, "Succeeded")

    def succeeded(job: str) -> int:
        answer = kube.plane.get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job}")
        return int(answer.get("status", {}).get("succeeded", 0))

    wait_until(
        lambda: (
            (succeeded("sweep"), succeeded("sweep-preferred"))
            == (REQUIRED_TRIALS, PREFERRED_TRIALS)
        ),
        WAIT,
        "the Job controller to count the trials succeeded",
    )

    def shrunk() -> bool:
        dataset = cluster.get_dataset("sweep")
        return (
            dataset.status.target_replicas == 1
            and dataset.status.demand == 0
            and len(dataset.status.replicas) == 1
            and dataset.status.replicas[0].state == pb.REPLICA_STATE_READY
        )

    wait_until(shrunk, WAIT, "the dataset back at 1 replica after the cool-down")
    holder = ready_nodes(cluster, "sweep")
    assert len(holder) == 1
    wait_until(lambda: labelled(kube) == holder, WAIT, "labels left on the remaining node only")

    def files_gone() -> bool:
        return all(
            not (cluster.cache_dir(node) / "datasets" / "default" / "sweep").exists()
            for node in NODES
            if node not in holder
        )

    wait_until(files_gone, WAIT, "copies deleted from the other nodes")
    (node,) = holder
    assert (cluster.cache_dir(node) / "datasets" / "default" / "sweep" / "current").exists()

    # The next wave's trial gets the same affinity, which now selects the remaining copy only;
    # one trial is no reason for another copy.
    kube.plane.create(pods_path(NAMESPACE), trial_pod("next-wave"))

    def next_wave_bound() -> str | None:
        return bound_to(kube.plane.get(f"{pods_path(NAMESPACE)}/next-wave"))

    wait_until(lambda: next_wave_bound() is not None, WAIT, "the next wave's trial bound")
    assert next_wave_bound() == node
    wait_until(
        lambda: cluster.get_dataset("sweep").status.demand == 1, WAIT, "the next wave's demand"
    )
    assert cluster.get_dataset("sweep").status.target_replicas == 1


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
