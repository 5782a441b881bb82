"""The manifests on a real control plane: `kubectl apply -k manifests/` with server-side
validation, the Dataset CRD's validation of good and bad specs, and the admission policies that
fence datacache's labels on Nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import kubectl
from tests.kubecontrolplane import KubeAPIError, KubeTest

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
COORDINATOR = ("datacache", "datacache-coordinator")
LABEL = "dataset.datacache.io/ml.images"
OWNED = "datacache.io/owned-labels"


def test_manifests_apply_with_strict_server_side_validation(kube: KubeTest) -> None:
    # The session applied them to a bare cluster; applying again changes nothing and every
    # object the kustomization renders is on the server.
    applied = kubectl(
        kube.kubeconfig,
        "apply",
        "--server-side",
        "--field-manager=datacache-tests",
        "--validate=strict",
        "-k",
        str(MANIFESTS),
    )
    assert "serverside-applied" in applied.stdout
    rendered = kubectl(kube.kubeconfig, "kustomize", str(MANIFESTS)).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    kinds = {o["kind"] for o in objects}
    assert {
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
        "ClusterRole",
        "DaemonSet",
        "Deployment",
    } <= kinds
    names = kubectl(kube.kubeconfig, "get", "-f", "-", "-o", "name", input=rendered).stdout
    assert len(names.split()) == len(objects)
    # Nothing would change: the server's objects are what the manifests say.
    diff = kubectl(
        kube.kubeconfig,
        "diff",
        "--server-side",
        "--field-manager=datacache-tests",
        "-k",
        str(MANIFESTS),
        check=False,
    )
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_the_examples_pass_server_side_validation(kube: KubeTest) -> None:
    kube.plane.ensure_namespace("ml-team")
    for example in sorted((MANIFESTS / "examples").glob("*.yaml")):
        done = kubectl(
            kube.kubeconfig,
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            str(example),
        )
        assert "(server dry run)" in done.stdout, example.name


def _dataset(spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "datacache.io/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "images", "namespace": "ml"},
            "spec": spec,
        }
    )


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"source": "s3://b/p/", "replicas": 0}, "spec.replicas: Invalid value: 0"),
        ({"source": "s3://b/p/", "replicas": 2, "all": True}, "give either replicas or all"),
        ({"source": "s3://b/p/"}, "give replicas (1-10000) or all true"),
        ({"source": "http://b/p/", "replicas": 1}, "spec.source: Invalid value"),
        ({"source": "s3://b/p/", "replica": 1, "replicas": 1}, 'unknown field "spec.replica"'),
        (
            {"source": "s3://b/p/", "replicas": 1, "tolerations": [{"operator": "Sometimes"}]},
            'Unsupported value: "Sometimes"',
        ),
        (
            {"source": "s3://b/p/", "replicas": 1, "refreshPolicy": {"interval": "soon"}},
            "spec.refreshPolicy.interval",
        ),
        (
            {"source": "s3://b/p/", "replicas": 1, "credentialsSecretRef": {"name": "Bad_Name"}},
            "spec.credentialsSecretRef.name",
        ),
    ],
)
def test_the_crd_rejects_bad_specs_with_readable_messages(
    kube: KubeTest, spec: dict[str, Any], words: str
) -> None:
    kube.plane.ensure_namespace("ml")
    refused = kubectl(
        kube.kubeconfig, "apply", "--validate=strict", "-f", "-", input=_dataset(spec), check=False
    )
    assert refused.returncode != 0
    assert words in refused.stderr, refused.stderr
    assert kubectl(kube.kubeconfig, "-n", "ml", "get", "datasets", "-o", "name").stdout == ""


def test_the_crd_accepts_a_good_spec_and_defaults_nothing_it_should_not(kube: KubeTest) -> None:
    kube.plane.ensure_namespace("ml")
    kubectl(
        kube.kubeconfig,
        "apply",
        "--validate=strict",
        "-f",
        "-",
        input=_dataset({"source": "s3://b/p/", "all": True, "pin": True}),
    )
    stored = kube.plane.get("/apis/datacache.io/v1alpha1/namespaces/ml/datasets/images")
    assert stored["spec"] == {"source": "s3://b/p/", "all": True, "pin": True}


# ------------------------------------------------------------------ the node-label fence


def _patch_node(
    kube: KubeTest, kubeconfig: Path, node: str, patch: dict[str, Any]
) -> tuple[int, str]:
    done = kubectl(
        kubeconfig, "patch", "node", node, "--type=merge", "-p", yaml.safe_dump(patch), check=False
    )
    return done.returncode, done.stderr


def test_only_the_coordinator_may_set_datacache_labels_on_nodes(kube: KubeTest) -> None:
    kube.add_node("n1")
    admin = kube.kubeconfig
    kubelet = kube.plane.write_user_kubeconfig(
        kube.tmp_path / "kubelet.kubeconfig", "system:node:n1", ("system:nodes",)
    )
    coordinator = kube.token_kubeconfig(kube.token(*COORDINATOR), "coordinator")

    # The cluster admin and the node's own kubelet are refused, with who tried and what.
    for who in (admin, kubelet):
        code, message = _patch_node(kube, who, "n1", {"metadata": {"labels": {LABEL: "ready"}}})
        assert code != 0
        assert "only the datacache coordinator may set dataset.datacache.io/* labels" in message
        code, message = _patch_node(kube, who, "n1", {"metadata": {"annotations": {OWNED: LABEL}}})
        assert code != 0
        assert "owned-labels annotation" in message
    assert LABEL not in kube.node_labels("n1")

    # A node cannot be registered already claiming a copy either.
    with pytest.raises(KubeAPIError) as created:
        kube.add_node("n2", labels={LABEL: "ready"})
    assert created.value.status == 403
    assert "only the datacache coordinator" in str(created.value)

    # Other labels stay theirs to change.
    assert _patch_node(kube, admin, "n1", {"metadata": {"labels": {"team": "ml"}}})[0] == 0

    # The coordinator may set and remove its labels and annotation, and nothing else.
    ours = {"metadata": {"labels": {LABEL: "ready"}, "annotations": {OWNED: LABEL}}}
    assert _patch_node(kube, coordinator, "n1", ours) == (0, "")
    assert kube.node_labels("n1")[LABEL] == "ready"
    code, message = _patch_node(kube, coordinator, "n1", {"metadata": {"labels": {"team": "x"}}})
    assert code != 0 and "only dataset.datacache.io/* labels" in message
    code, message = _patch_node(kube, coordinator, "n1", {"spec": {"unschedulable": True}})
    assert code != 0 and "may not change a Node's spec" in message
    # ...which the admin cannot undo behind its back.
    code, message = _patch_node(kube, admin, "n1", {"metadata": {"labels": {LABEL: None}}})
    assert code != 0
    gone = {"metadata": {"labels": {LABEL: None}, "annotations": {OWNED: None}}}
    assert _patch_node(kube, coordinator, "n1", gone) == (0, "")
    assert LABEL not in kube.node_labels("n1")
    assert kube.node_labels("n1")["team"] == "ml"
