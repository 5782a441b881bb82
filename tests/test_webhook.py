"""The admission webhook: the mutation it decides, and AdmissionReview v1 over real HTTPS."""

from __future__ import annotations

import base64
import copy
import datetime
import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.labels import label_key
from coordinator.webhook import WebhookServer, admit
from datacache.podspec import volume_name
from tests.fakekube import _apply_json_patch

CACHE = "/var/lib/datacache"
KNOWN = {"ml/imagenet", "ml/coco", "default/mnist"}


def exists(name: str) -> bool:
    return name in KNOWN


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "containers": [{"name": "trial", "image": "trainer"}],
        **spec,
    }
    return {"metadata": {"name": "p", "annotations": annotations or {}}, "spec": body}


def review(obj: dict[str, Any], namespace: str = "ml", operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "1234",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": operation,
            "namespace": namespace,
            "object": obj,
        },
    }


def mutated(obj: dict[str, Any], namespace: str = "ml") -> dict[str, Any]:
    response = admit(review(obj, namespace), exists, CACHE)["response"]
    assert response["allowed"], response
    assert response["uid"] == "1234"
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return dict(_apply_json_patch(copy.deepcopy(obj), ops))


def required_terms(obj: dict[str, Any]) -> list[dict[str, Any]]:
    node_affinity = obj["spec"]["affinity"]["nodeAffinity"]
    terms: list[dict[str, Any]] = node_affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return terms


def wants(name: str) -> dict[str, Any]:
    return {"key": label_key(name), "operator": "In", "values": ["ready"]}


def test_pods_without_the_annotation_are_untouched() -> None:
    plain = pod({"other": "x"})
    response = admit(review(plain), exists, CACHE)["response"]
    assert response == {"uid": "1234", "allowed": True}


def test_annotated_pod_gets_required_affinity_volume_and_mounts() -> None:
    obj = pod(
        {"datacache.io/dataset": "imagenet"},
        initContainers=[{"name": "init", "image": "i"}],
    )
    out = mutated(obj)
    assert required_terms(out) == [{"matchExpressions": [wants("ml/imagenet")]}]
    volume = out["spec"]["volumes"][0]
    assert volume == {
        "name": volume_name("ml/imagenet"),
        "hostPath": {"path": f"{CACHE}/datasets/ml/imagenet/current", "type": "Directory"},
    }
    for kind in ("containers", "initContainers"):
        assert out["spec"][kind][0]["volumeMounts"] == [
            {"name": volume["name"], "mountPath": "/datasets/ml/imagenet", "readOnly": True}
        ]


def test_required_affinity_is_anded_into_every_existing_term() -> None:
    existing = [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
    ]
    obj = pod(
        {"datacache.io/dataset": "ml/imagenet,default/mnist"},
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": existing}
            },
            "podAntiAffinity": {"x": 1},
        },
    )
    out = mutated(obj)
    terms = required_terms(out)
    assert len(terms) == 2
    assert terms[0]["matchExpressions"] == [
        existing[0]["matchExpressions"][0],
        wants("ml/imagenet"),
        wants("default/mnist"),
    ]
    assert terms[1]["matchFields"] == existing[1]["matchFields"]
    assert terms[1]["matchExpressions"] == [wants("ml/imagenet"), wants("default/mnist")]
    assert out["spec"]["affinity"]["podAntiAffinity"] == {"x": 1}
    assert len(out["spec"]["volumes"]) == 2


def test_preferred_affinity_adds_a_weighted_preference() -> None:
    out = mutated(pod({"datacache.io/dataset": "coco", "datacache.io/affinity": "preferred"}))
    node_affinity = out["spec"]["affinity"]["nodeAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in node_affinity
    assert node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 100, "preference": {"matchExpressions": [wants("ml/coco")]}}
    ]


def test_reinvocation_changes_nothing() -> None:
    once = mutated(pod({"datacache.io/dataset": "imagenet"}))
    response = admit(review(once), exists, CACHE)["response"]
    assert response["allowed"] and "patch" not in response


@pytest.mark.parametrize(
    ("annotations", "code", "fragment"),
    [
        ({"datacache.io/dataset": "missing"}, 404, "ml/missing does not exist"),
        ({"datacache.io/dataset": "Bad_Name"}, 400, "not a DNS-1123"),
        ({"datacache.io/dataset": " , "}, 400, "is empty"),
        ({"datacache.io/dataset": "a/b/c"}, 400, "more than one '/'"),
        ({"datacache.io/dataset": "imagenet", "datacache.io/affinity": "always"}, 400, "'always'"),
    ],
)
def test_bad_annotations_are_denied_with_the_reason(
    annotations: dict[str, str], code: int, fragment: str
) -> None:
    response = admit(review(pod(annotations)), exists, CACHE)["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == code
    assert fragment in response["status"]["message"]


def test_only_pod_creation_is_mutated() -> None:
    response = admit(
        review(pod({"datacache.io/dataset": "imagenet"}), operation="UPDATE"), exists, CACHE
    )["response"]
    assert response == {"uid": "1234", "allowed": True}


@pytest.mark.parametrize(
    "body",
    [
        {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}},
        {"apiVersion": "admission.k8s.io/v1", "kind": "Pod"},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}},
        [],
    ],
)
def test_malformed_reviews_are_refused(body: Any) -> None:
    with pytest.raises(ValueError, match=r"AdmissionReview|uid"):
        admit(body, exists, CACHE)


# --- HTTPS ---------------------------------------------------------------------------------


def _write_cert(directory: Path, common_name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[tuple[WebhookServer, Path]]:
    cert_file, key_file = _write_cert(tmp_path, "webhook-one")
    server = WebhookServer(("127.0.0.1", 0), cert_file, key_file, exists, CACHE)
    server.start()
    try:
        yield server, cert_file
    finally:
        server.stop()


def _post(
    port: int, ca_file: Path, body: bytes, path: str = "/mutate"
) -> tuple[int, Any, x509.Certificate]:
    context = ssl.create_default_context(cafile=str(ca_file))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read())
        assert connection.sock is not None
        der = connection.sock.getpeercert(binary_form=True)
        assert der is not None
        return response.status, payload, x509.load_der_x509_certificate(der)
    finally:
        connection.close()


def test_admission_review_over_https(webhook: tuple[WebhookServer, Path]) -> None:
    server, ca = webhook
    body = json.dumps(review(pod({"datacache.io/dataset": "imagenet"}))).encode()
    status, answer, _ = _post(server.port, ca, body)
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["response"]["allowed"] is True
    ops = json.loads(base64.b64decode(answer["response"]["patch"]))
    assert {"op": "add", "path": "/spec/affinity", "value": {}} in ops


def test_https_errors(webhook: tuple[WebhookServer, Path]) -> None:
    server, ca = webhook
    status, answer, _ = _post(server.port, ca, b"{not json")
    assert status == 400 and "error" in answer
    status, answer, _ = _post(server.port, ca, b"{}", path="/other")
    assert status == 404


def test_rotated_certificate_is_served_to_new_connections(
    webhook: tuple[WebhookServer, Path], tmp_path: Path
) -> None:
    server, ca = webhook
    body = json.dumps(review(pod())).encode()
    _, _, before = _post(server.port, ca, body)
    assert before.subject.rfc4514_string() == "CN=webhook-one"
    rotated = tmp_path / "rotated"
    rotated.mkdir()
    new_cert, new_key = _write_cert(rotated, "webhook-two")
    # Replace the files the server reads, as a Secret volume update does.
    new_cert.replace(ca)
    new_key.replace(ca.with_name("tls.key"))
    status, _, after = _post(server.port, ca, body)
    assert status == 200
    assert after.subject.rfc4514_string() == "CN=webhook-two"


def test_example_configuration_matches_the_server() -> None:
    import yaml

    from coordinator.webhook import DATASET_ANNOTATION, PATH

    docs = list(
        yaml.safe_load_all(
            (Path(__file__).parents[1] / "manifests/examples/webhook.yaml").read_text()
        )
    )
    service, config = docs
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["service"]["name"] == service["metadata"]["name"]
    assert hook["clientConfig"]["service"]["path"] == PATH
    assert f"'{DATASET_ANNOTATION}'" in hook["matchConditions"][0]["expression"]
    assert hook["rules"][0]["operations"] == ["CREATE"]
