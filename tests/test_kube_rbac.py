"""RBAC is enough and no more: a coordinator configured exactly as manifests/coordinator.yaml
configures it runs with its own ServiceAccount's token against the real API server (through a
proxy that records every request), and does everything the product does with Kubernetes:
leader election, Dataset resources and their status, credentials Secrets, node labels, Events
and the pod watch. Every call succeeds, and every rule the manifests grant is used."""

from __future__ import annotations

import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from datacache.localcluster import DEMO_CREDENTIALS, LocalCluster, wait_until
from tests.conftest import kubectl
from tests.kubecontrolplane import KubeTest
from tests.test_e2e import upload_dataset

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
COORDINATOR_SA = ("datacache", "datacache-coordinator")
AGENT_SA = ("datacache-agent", "datacache-agent")
NODES = ["node-1", "node-2", "node-3"]
LABEL = "dataset.datacache.io/ml.photos"
Use = tuple[str, str, str]
"""(API group, resource[/subresource], verb)"""


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def granted(subject: tuple[str, str]) -> dict[Use, str]:
    """Every (group, resource, verb) the manifests grant the ServiceAccount, with the role
    granting it."""
    namespace, name = subject
    docs = _documents("rbac.yaml")
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    found: dict[Use, str] = {}
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == name and s["namespace"] == namespace
            for s in binding["subjects"]
        ):
            continue
        ref = binding["roleRef"]
        role_namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_namespace, ref["name"])]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        found[(group, resource, verb)] = f"{ref['kind']} {ref['name']}"
    return found


def classify(method: str, target: str) -> Use | None:
    """The RBAC (group, resource, verb) of one API request; None for discovery and the like."""
    split = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(split.query)
    parts = [p for p in split.path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0] if len(rest) < 3 else f"{rest[0]}/{rest[2]}"
    named = len(rest) >= 2
    if method == "GET":
        if query.get("watch", [""])[0] in ("true", "1"):
            verb = "watch"
        else:
            verb = "get" if named else "list"
    else:
        verb = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection",
        }[method]
    return group, resource, verb


def coordinator_flags_of_the_manifest(identity: str) -> tuple[list[str], dict[str, str]]:
    """The Deployment's container arguments and environment, with the downward API filled in
    as the kubelet would; the database path is the test's."""
    deployment = next(d for d in _documents("coordinator.yaml") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = [a for a in container.get("args", []) if not a.startswith("--db-path")]
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        field = item["valueFrom"]["fieldRef"]["fieldPath"]
        env[item["name"]] = {
            "metadata.namespace": deployment["metadata"]["namespace"],
            "metadata.name": identity,
        }[field]
    return args, env


def test_the_coordinator_needs_exactly_the_rules_the_manifests_grant(
    cluster: LocalCluster, kube: KubeTest
) -> None:
    for node in NODES:
        kube.add_node(node, zone="zone-a")
    kube.plane.ensure_namespace("ml")
    upload_dataset(cluster, "rbac-photos", "photos/")
    kube.plane.create(
        "/api/v1/namespaces/datacache/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "photos-s3",
                "annotations": {"datacache.io/dataset-namespaces": "ml"},
            },
            "stringData": {
                "AWS_ACCESS_KEY_ID": DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            },
        },
    )
    kubeconfig = kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), name="coordinator")
    args, env = coordinator_flags_of_the_manifest("datacache-coordinator-0")
    cluster.start_coordinator(
        *args,
        f"--kubeconfig={kubeconfig}",
        "--reconcile-interval-seconds=0.5",
        env=env,
    )
    for node in NODES:
        cluster.start_agent(node)

    dataset = {
        "apiVersion": "datacache.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "photos", "namespace": "ml"},
        "spec": {
            "source": "s3://rbac-photos/photos/",
            "replicas": 2,
            "credentialsSecretRef": {"name": "photos-s3"},
        },
    }
    kubectl(kube.kubeconfig, "apply", "-f", "-", input=yaml.safe_dump(dataset))
    path = "/apis/datacache.io/v1alpha1/namespaces/ml/datasets/photos"

    def ready(count: int) -> bool:
        status = kube.plane.get(path).get("status") or {}
        return status.get("readyReplicas") == count and status.get("phase") == "Ready"

    wait_until(lambda: ready(2), 90, "2 Ready replicas in the Dataset's status")
    wait_until(
        lambda: sum(kube.node_labels(n).get(LABEL) == "ready" for n in NODES) == 2,
        30,
        "labels on the 2 Ready nodes",
    )
    # A trial pod asking for the dataset counts as demand (the pod watch).
    kube.plane.create(
        "/api/v1/namespaces/ml/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "trial", "annotations": {"datacache.io/dataset": "photos"}},
            "spec": {"containers": [{"name": "t", "image": "trainer"}]},
        },
    )
    # A refresh makes every replica Ready again: the same Event on the same node is folded
    # into the existing one (a patch of its count).
    refreshed = subprocess.run(
        [
            "datacache",
            f"--coordinator={cluster.coordinator_address}",
            "dataset",
            "refresh",
            "ml/photos",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refreshed.returncode == 0, refreshed.stderr

    def events_folded() -> bool:
        events = kube.plane.get("/api/v1/namespaces/default/events")["items"]
        return any(e.get("count", 1) >= 2 and e["reason"] == "ReplicaReady" for e in events)

    wait_until(events_folded, 90, "a repeated ReplicaReady Event folded into one")
    # Deleting the Dataset: the coordinator removes labels and copies, then its finalizer.
    kubectl(kube.kubeconfig, "-n", "ml", "delete", "dataset", "photos", "--wait=false")

    def deleted() -> bool:
        try:
            kube.plane.get(path)
        except Exception:
            return True
        return False

    wait_until(deleted, 60, "the Dataset to be deleted once the coordinator let it go")
    wait_until(lambda: all(LABEL not in kube.node_labels(n) for n in NODES), 30, "labels removed")
    # A clean stop releases the Lease.
    cluster.coordinator.stop()

    statuses = kube.proxy.statuses()
    used: dict[Use, int] = {}
    refused = []
    for request in kube.proxy.requests:
        use = classify(request.method, request.path)
        status = statuses.get(request.number)
        if status in (401, 403):
            refused.append((request.method, request.path, status))
        if use is not None and status is not None and status < 400:
            used[use] = used.get(use, 0) + 1
    assert refused == [], f"the coordinator's ServiceAccount was refused: {refused}"
    rules = granted(COORDINATOR_SA)
    unused = sorted(
        f"{verb} {group or 'core'}/{res} ({role})"
        for (group, res, verb), role in rules.items()
        if (group, res, verb) not in used
    )
    assert unused == [], f"rules granted but never used: {unused}"
    # And nothing used that is not granted (it would have been refused above).
    assert set(used) <= set(rules), sorted(set(used) - set(rules))


def test_the_agent_identity_can_do_nothing(kube: KubeTest) -> None:
    """The agent talks only to the coordinator: its ServiceAccount is bound to no role, so a
    compromised node's agent credentials reach nothing in the API."""
    assert granted(AGENT_SA) == {}
    token = kube.token(*AGENT_SA)
    as_agent = kube.token_kubeconfig(token, "agent")
    for verb, resource in (
        ("patch", "nodes"),
        ("get", "secrets"),
        ("list", "pods"),
        ("list", "datasets.datacache.io"),
        ("create", "events"),
    ):
        done = kubectl(as_agent, "auth", "can-i", verb, resource, "-A", check=False)
        assert done.stdout.strip() == "no", (verb, resource, done.stdout)
    agent = next(d for d in _documents("agent.yaml") if d["kind"] == "DaemonSet")
    assert agent["spec"]["template"]["spec"].get("automountServiceAccountToken") is False or (
        next(d for d in _documents("rbac.yaml") if d["metadata"]["name"] == AGENT_SA[1])[
            "automountServiceAccountToken"
        ]
        is False
    )
