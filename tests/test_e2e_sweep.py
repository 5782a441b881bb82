"""A hyperparameter sweep end to end: trial pods go through the coordinator's admission webhook
(AdmissionReview v1 over HTTPS) into the fake Kubernetes API, raise the dataset's replicas up
to max_replicas, and are scheduled only where a Ready copy is; once the trials finish and the
cool-down passes, the extra replicas, their labels and their files go. S3, coordinator and
agents are real processes; a small scheduler and kubelet (`Kube`) play the cluster's part.
Also the DemandService API (SetDemand) against a real coordinator."""

from __future__ import annotations

import base64
import contextlib
import copy
import http.client
import json
import os
import signal
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest

from coordinator.k8s_labeler import core_api
from datacache.localcluster import LocalCluster, free_port, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.fakekube import FakeKubeAPI, _apply_json_patch
from tests.test_e2e import ready_nodes, start, tree_digests, upload_dataset
from tests.test_k8s_pods import PODS
from tests.tlscerts import CertificateAuthority

LABEL = "dataset.datacache.io/default.sweep"
NODES = ["node-1", "node-2", "node-3", "node-4"]
# Where the webhook's hostPath points: the coordinator's --node-cache-dir (its default), which
# stands for each local agent's --cache-dir (`LocalCluster.cache_dir`).
NODE_CACHE_DIR = "/var/lib/datacache"
# The documented mount (README, docs/sweeps.md): the copy of <namespace>/<name> at
# /datasets/<namespace>/<name>, from <cache dir>/datasets/<namespace>/<name>/current.
MOUNT_PATH = "/datasets/default/sweep"
HOST_PATH = f"{NODE_CACHE_DIR}/datasets/default/sweep/current"
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"
TRIALS = [f"trial-{i}" for i in range(8)]
# These two ask for `datacache.io/affinity: preferred`; the others get the default, required.
PREFERRING = {"trial-6", "trial-7"}
# Each trial requests 2 CPUs and every fake node has 4 allocatable (fakekube's default), so two
# trials fit on a node: the 8 trials need all 4 nodes.
TRIAL_CPU = "2"


@pytest.fixture
def kube_pods(tmp_path: Path) -> Iterator[tuple[FakeKubeAPI, Path]]:
    """The fake API server with Pods as well as Nodes."""
    with FakeKubeAPI(resources=[PODS]) as fake:
        yield fake, fake.write_kubeconfig(tmp_path / "kubeconfig")
        assert not fake.server_errors, fake.server_errors


def trial_pod(name: str, affinity: str | None = None) -> dict[str, Any]:
    """A trial pod as a Katib trial template makes it (before admission)."""
    annotations = {"datacache.io/dataset": "default/sweep"}
    if affinity is not None:
        annotations["datacache.io/affinity"] = affinity
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "labels": {"katib.kubeflow.org/experiment": "sweep", "katib.kubeflow.org/trial": name},
            "annotations": annotations,
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "trial",
                    "image": "trainer",
                    "resources": {"requests": {"cpu": TRIAL_CPU}, "limits": {"cpu": TRIAL_CPU}},
                }
            ],
        },
        "status": {"phase": "Pending"},
    }


def plain_pod(name: str) -> dict[str, Any]:
    """A pod that wants no dataset."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"containers": [{"name": "main", "image": "jupyter"}]},
        "status": {"phase": "Pending"},
    }


def node_labels(fake: FakeKubeAPI) -> dict[str, dict[str, str]]:
    """Every Node's labels, read in one go."""
    return {
        node["metadata"]["name"]: dict(node["metadata"].get("labels") or {})
        for node in fake.list_objects("nodes")
    }


def labelled(fake: FakeKubeAPI) -> set[str]:
    return {node for node, labels in node_labels(fake).items() if labels.get(LABEL) == "ready"}


# --- node affinity, as the scheduler reads it --------------------------------------------------


def expression_matches(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = expression.get("values") or []
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise AssertionError(f"unexpected operator {operator!r} in {expression}")


def term_matches(term: dict[str, Any], labels: dict[str, str]) -> bool:
    """A nodeSelectorTerm: its requirements ANDed; an empty term matches no node."""
    assert not term.get("matchFields"), term
    expressions = term.get("matchExpressions") or []
    return bool(expressions) and all(expression_matches(e, labels) for e in expressions)


def node_affinity(pod: dict[str, Any]) -> dict[str, Any]:
    affinity: dict[str, Any] = (pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}
    return affinity


def required_allows(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether the pod's required node affinity (ORed terms) lets it onto a node."""
    required = node_affinity(pod).get(REQUIRED)
    if required is None:
        return True
    return any(term_matches(term, labels) for term in required["nodeSelectorTerms"])


def preference_score(pod: dict[str, Any], labels: dict[str, str]) -> int:
    """The weights of the pod's preferred node affinity terms that a node matches."""
    return sum(
        int(p["weight"])
        for p in node_affinity(pod).get(PREFERRED) or []
        if term_matches(p["preference"], labels)
    )


def selected_nodes(pod: dict[str, Any], labels: dict[str, dict[str, str]]) -> set[str]:
    """The nodes the pod's node affinity asks for: those its required terms allow, or (with
    preferred affinity only) those its preferences favour."""
    if REQUIRED in node_affinity(pod):
        return {node for node, node_labels in labels.items() if required_allows(pod, node_labels)}
    return {node for node, node_labels in labels.items() if preference_score(pod, node_labels)}


def assert_mutated(pod: dict[str, Any], affinity: str) -> None:
    """The webhook's additions: node affinity of the annotated kind and the read-only copy at
    the documented mount path."""
    kinds = set(node_affinity(pod))
    if affinity == "required":
        assert kinds == {REQUIRED}, node_affinity(pod)
    else:
        assert kinds == {PREFERRED}, node_affinity(pod)
        (preference,) = node_affinity(pod)[PREFERRED]
        assert preference["weight"] > 0
    (volume,) = pod["spec"]["volumes"]
    assert volume["hostPath"] == {"path": HOST_PATH, "type": "Directory"}
    (container,) = pod["spec"]["containers"]
    assert container["volumeMounts"] == [
        {"name": volume["name"], "mountPath": MOUNT_PATH, "readOnly": True}
    ]


# --- the admission webhook, called as the API server calls it -------------------------------


class Webhook:
    def __init__(self, port: int, ca_file: Path) -> None:
        self.port = port
        self._context = ssl.create_default_context(cafile=str(ca_file))

    def serving(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def review(self, pod: dict[str, Any]) -> dict[str, Any]:
        """POSTs an AdmissionReview v1 for creating `pod`; returns its checked response."""
        uid = str(uuid.uuid4())
        gvk = {"group": "", "version": "v1", "kind": "Pod"}
        gvr = {"group": "", "version": "v1", "resource": "pods"}
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": gvk,
                "resource": gvr,
                "requestKind": gvk,
                "requestResource": gvr,
                "name": pod["metadata"]["name"],
                "namespace": pod["metadata"]["namespace"],
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kubeflow:katib-controller"},
                "object": pod,
                "oldObject": None,
                "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self._context, timeout=10
        )
        try:
            connection.request(
                "POST",
                "/mutate?timeout=5s",
                json.dumps(review).encode(),
                {"Content-Type": "application/json"},
            )
            reply = connection.getresponse()
            answer = json.loads(reply.read())
        finally:
            connection.close()
        assert reply.status == 200, answer
        assert answer["apiVersion"] == "admission.k8s.io/v1", answer
        assert answer["kind"] == "AdmissionReview", answer
        response: dict[str, Any] = answer["response"]
        assert response["uid"] == uid, response
        return response

    def admit(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod as the API server stores it: the review's JSON Patch applied."""
        response = self.review(pod)
        assert response["allowed"] is True, response
        assert response["patchType"] == "JSONPatch", response
        operations = json.loads(base64.b64decode(response["patch"]))
        return dict(_apply_json_patch(copy.deepcopy(pod), operations))


# --- the scheduler and the kubelets ---------------------------------------------------------


def millicpu(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def cpu_request(pod: dict[str, Any]) -> int:
    return sum(
        millicpu(str(((c.get("resources") or {}).get("requests") or {}).get("cpu", "0")))
        for c in pod["spec"]["containers"]
    )


@dataclass(frozen=True)
class Binding:
    node: str
    labels: dict[str, str]
    """The node's labels when the pod was bound to it."""
    data_on_node: bool
    """Whether the pod's hostPath volumes existed on the node then."""


class Kube:
    """A minimal kube-scheduler and kubelets over the fake API server, one pass per `step`.

    The scheduler binds each unbound Pending pod of namespace ml to a node that passes its
    required node affinity and has the CPU it requests left (best preferred-affinity score,
    then name). A kubelet starts a bound pod (phase Running) once every hostPath volume of type
    Directory exists on its node, as kubelet volume set-up waits for it; `node_root` maps the
    coordinator's node cache directory to a local agent's. Binding patches spec.nodeName (the
    fake API server checks no Pod fields; a real scheduler POSTs the pods/binding subresource)."""

    def __init__(self, fake: FakeKubeAPI, v1: Any, node_root: Callable[[str], Path]) -> None:
        self._fake, self._v1, self._node_root = fake, v1, node_root
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
        labels = node_labels(self._fake)
        free = {
            node["metadata"]["name"]: millicpu(node["status"]["allocatable"]["cpu"])
            for node in self._fake.list_objects("nodes")
        }
        pods = self._fake.list_objects("pods", namespace="ml")
        for pod in pods:
            if pod["spec"].get("nodeName") and pod["status"]["phase"] in ("Pending", "Running"):
                free[pod["spec"]["nodeName"]] -= cpu_request(pod)
        for pod in pods:
            name = pod["metadata"]["name"]
            if pod["spec"].get("nodeName") or pod["status"]["phase"] != "Pending":
                continue
            feasible = [
                node
                for node in labels
                if free[node] >= cpu_request(pod) and required_allows(pod, labels[node])
            ]
            if not feasible:
                continue
            node = min(feasible, key=lambda n: (-preference_score(pod, labels[n]), n))
            self._v1.patch_namespaced_pod(name, "ml", {"spec": {"nodeName": node}})
            free[node] -= cpu_request(pod)
            self.bindings[name] = Binding(node, labels[node], self.volumes_ready(pod, node))
        for pod in self._fake.list_objects("pods", namespace="ml"):
            node = pod["spec"].get("nodeName")
            if node and pod["status"]["phase"] == "Pending" and self.volumes_ready(pod, node):
                self._v1.patch_namespaced_pod(
                    pod["metadata"]["name"], "ml", {"status": {"phase": "Running"}}
                )

    def phases(self) -> dict[str, str]:
        return {
            pod["metadata"]["name"]: pod["status"]["phase"]
            for pod in self._fake.list_objects("pods", namespace="ml")
        }


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
    cluster: LocalCluster, kube_pods: tuple[FakeKubeAPI, Path], tmp_path: Path
) -> None:
    fake, kubeconfig = kube_pods
    for node in NODES:
        fake.add_node(node)
    expected = upload_dataset(cluster, "sweep", "data/")
    ca = CertificateAuthority(tmp_path / "webhook-tls")
    tls = ca.issue("datacache-webhook", server=True)
    webhook = Webhook(free_port(), ca.cert_file)
    start(
        cluster,
        len(NODES),
        coordinator_flags=(
            "--labeler=kubernetes",
            f"--kubeconfig={kubeconfig}",
            "--watch-pods",
            "--demand-cooldown-seconds=2",
            f"--webhook-port={webhook.port}",
            f"--webhook-cert-file={tls.cert_file}",
            f"--webhook-key-file={tls.key_file}",
        ),
    )
    wait_until(webhook.serving, 10, "the admission webhook")
    create_sweep_dataset(cluster, replicas=1, max_replicas=4)
    wait_until(lambda: len(ready_nodes(cluster, "sweep")) == 1, 60, "1 Ready replica")
    first = ready_nodes(cluster, "sweep")
    wait_until(lambda: labelled(fake) == first, 20, "the label on the first replica's node")

    # A pod without the annotation is admitted unchanged and is no demand.
    response = webhook.review(plain_pod("notebook"))
    assert response["allowed"] is True
    assert "patch" not in response, response
    fake.create_object("pods", plain_pod("notebook"), namespace="ml")

    # The agents of the other nodes are frozen until the trials have been admitted and
    # scheduled once, so that no second copy can exist yet and the test sees trials wait.
    others = [node for node in NODES if node not in first]
    v1 = core_api(str(kubeconfig))
    kube = Kube(fake, v1, cluster.cache_dir)
    with frozen(cluster, others):
        # The trials go through the webhook, then into the API server as it patched them.
        # Their affinity selects exactly the nodes labelled as holding a Ready copy.
        snapshot = node_labels(fake)
        for name in TRIALS:
            if name in PREFERRING:
                pod = webhook.admit(trial_pod(name, affinity="preferred"))
                assert_mutated(pod, "preferred")
            else:
                pod = webhook.admit(trial_pod(name))  # no datacache.io/affinity: required
                assert_mutated(pod, "required")
            assert selected_nodes(pod, snapshot) == first, (name, node_affinity(pod))
            fake.create_object("pods", pod, namespace="ml")

        # Demand raises the target at once, before any new copy exists.
        def raised() -> bool:
            status = cluster.get_dataset("sweep").status
            return status.demand == 8 and status.target_replicas == 4

        wait_until(raised, 20, "8 trials to raise the target to 4 replicas")
        # The scheduler binds two required trials to the first copy's node, which then has no
        # CPU left; the other required trials stay Pending, unbound, as no other node carries
        # the label. The preferred trials go to another node, where their volume waits for a
        # copy: bound, but not Running.
        kube.step()
        (holder_node,) = first
        spare = min(others)
        placed = {name: b.node for name, b in kube.bindings.items() if name in TRIALS}
        assert placed == {
            "trial-0": holder_node,
            "trial-1": holder_node,
            "trial-6": spare,
            "trial-7": spare,
        }, kube.bindings
        phases = kube.phases()
        assert {name for name in TRIALS if phases[name] == "Running"} == {"trial-0", "trial-1"}

    def all_running() -> bool:
        kube.step()
        return set(kube.phases().values()) == {"Running"}

    wait_until(all_running, 90, "every trial pod bound and Running")
    wait_until(lambda: len(ready_nodes(cluster, "sweep")) == 4, 20, "4 Ready replicas")
    wait_until(lambda: labelled(fake) == set(NODES), 20, "labels on all 4 nodes")
    status = cluster.get_dataset("sweep").status
    assert status.demand == 8
    assert status.target_replicas == 4
    assert status.phase == "Ready"

    # Required trials were bound only to labelled nodes, which already held the copy; every
    # trial runs where its mount has the dataset, two per node (all four copies in use).
    for name in TRIALS:
        binding = kube.bindings[name]
        if name not in PREFERRING:
            assert binding.labels.get(LABEL) == "ready", (name, binding)
            assert binding.data_on_node, (name, binding)
    used = [kube.bindings[name].node for name in TRIALS]
    assert sorted(used) == sorted(NODES * 2), used
    for node in NODES:
        assert tree_digests(kube.host_path(node, HOST_PATH)) == expected, node
    # The stored trials' affinity now selects all four nodes, as all four carry the label.
    stored = [fake.get_object("pods", name, namespace="ml") for name in TRIALS]
    labels_now = node_labels(fake)
    for trial in stored:
        assert trial is not None
        assert selected_nodes(trial, labels_now) == set(NODES), trial["metadata"]["name"]

    for name in TRIALS:
        v1.patch_namespaced_pod(name, "ml", {"status": {"phase": "Succeeded"}})

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
    # The trials' affinity now selects the remaining copy only.
    labels_now = node_labels(fake)
    for trial in stored:
        assert trial is not None
        assert selected_nodes(trial, labels_now) == holder, trial["metadata"]["name"]

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
