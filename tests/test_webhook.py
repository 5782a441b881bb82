"""The admission webhook: the mutation it decides, applied to pods by a real API server that
calls the webhook as manifests/examples/webhook.yaml registers it, and AdmissionReview v1 over
real HTTPS."""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.labels import label_key
from coordinator.webhook import PATH, WebhookServer, admit
from datacache.localcluster import ClusterError, wait_until
from datacache.podspec import volume_name
from tests.kubecontrolplane import KubeAPIError, KubeTest
from tests.tlscerts import CertificateAuthority

CACHE = "/var/lib/datacache"
KNOWN = {"default/imagenet", "default/coco", "ml/mnist"}
NAMESPACE = "default"
"""Where pods are created: a bare dataset name means this namespace."""
EXAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "webhook.yaml"
# The API server picks up a new webhook configuration a moment after it is stored.
REGISTRATION_TIMEOUT = 60.0


def exists(name: str) -> bool:
    return name in KNOWN


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "containers": [{"name": "trial", "image": "trainer"}],
        **spec,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": annotations or {}},
        "spec": body,
    }


def review(
    obj: dict[str, Any], namespace: str = NAMESPACE, operation: str = "CREATE"
) -> dict[str, Any]:
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


# --- registration with the API server --------------------------------------------------------


def example_configuration(url: str, ca_file: Path) -> dict[str, Any]:
    """The MutatingWebhookConfiguration of manifests/examples/webhook.yaml (rules,
    namespaceSelector, matchConditions, failurePolicy, timeout, side effects, all as shipped)
    with only its clientConfig changed: `url` instead of the Service (a Service cannot route
    to loopback), and `ca_file` as the caBundle cert-manager would inject."""
    (config,) = (
        doc
        for doc in yaml.safe_load_all(EXAMPLE.read_text())
        if doc and doc["kind"] == "MutatingWebhookConfiguration"
    )
    (hook,) = config["webhooks"]
    hook["clientConfig"] = {
        "url": url,
        "caBundle": base64.b64encode(ca_file.read_bytes()).decode(),
    }
    return dict(config)


def pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods"


def dataset_volumes(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in obj["spec"].get("volumes") or [] if str(v["name"]).startswith("datacache-")]


def register_webhook(
    kube: KubeTest, url: str, ca_file: Path, probe: dict[str, Any], namespace: str
) -> None:
    """Registers the example configuration pointed at `url` and waits until the API server
    mutates `probe` (an annotated pod asking for an existing dataset, created with
    dryRun=All in `namespace`) through it."""
    kube.plane.create_or_replace(example_configuration(url, ca_file))
    errors: list[str] = []

    def mutating() -> bool:
        try:
            answer = kube.plane.request(
                "POST", pods_path(namespace), probe, query={"dryRun": "All"}
            )
        except KubeAPIError as exc:
            # A configuration deleted after an earlier test may still be in effect for a
            # moment, pointing at a webhook that is gone.
            errors.append(str(exc))
            return False
        return bool(dataset_volumes(answer))

    try:
        wait_until(mutating, REGISTRATION_TIMEOUT, "the API server to call the webhook")
    except ClusterError as exc:
        raise AssertionError(f"{exc}; last errors: {errors[-3:]}") from exc


Admit = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture
def api_server(kube: KubeTest, tmp_path: Path) -> Iterator[Admit]:
    """This module's webhook (its `exists` and cache directory) served over HTTPS and
    registered with the real API server; yields a function that creates a pod in NAMESPACE
    with dryRun=All and returns it as admission left it (the API server applies the
    webhook's JSONPatch, then validates the result)."""
    kube.plane.ensure_namespace(NAMESPACE)
    ca = CertificateAuthority(tmp_path / "webhook-ca")
    tls = ca.issue("webhook", server=True)
    server = WebhookServer(("127.0.0.1", 0), tls.cert_file, tls.key_file, exists, CACHE)
    server.start()
    try:
        register_webhook(
            kube,
            f"https://127.0.0.1:{server.port}{PATH}",
            ca.cert_file,
            pod({"datacache.io/dataset": "imagenet"}),
            NAMESPACE,
        )

        def create(obj: dict[str, Any]) -> dict[str, Any]:
            answer = kube.plane.request("POST", pods_path(NAMESPACE), obj, query={"dryRun": "All"})
            return dict(answer)

        yield create
    finally:
        server.stop()


def mutated(api_server: Admit, obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` as the API server admits it, after checking the webhook's own answer."""
    response = admit(review(obj), exists, CACHE)["response"]
    assert response["allowed"], response
    assert response["uid"] == "1234"
    assert response["patchType"] == "JSONPatch"
    out = api_server(obj)
    assert out["metadata"]["name"] == obj["metadata"]["name"]
    return out


def container_mounts(obj: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """A container's mounts other than the ServiceAccount token the API server adds."""
    mounts: list[dict[str, Any]] = obj["spec"][kind][0]["volumeMounts"]
    return [m for m in mounts if m["name"].startswith("datacache-")]


def required_terms(obj: dict[str, Any]) -> list[dict[str, Any]]:
    node_affinity = obj["spec"]["affinity"]["nodeAffinity"]
    terms: list[dict[str, Any]] = node_affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return terms


def wants(name: str) -> dict[str, Any]:
    return {"key": label_key(name), "operator": "In", "values": ["ready"]}


ANTI_AFFINITY = {
    "preferredDuringSchedulingIgnoredDuringExecution": [
        {
            "weight": 1,
            "podAffinityTerm": {
                "labelSelector": {"matchLabels": {"app": "trial"}},
                "topologyKey": "kubernetes.io/hostname",
            },
        }
    ]
}


def test_pods_without_the_annotation_are_untouched() -> None:
    plain = pod({"other": "x"})
    response = admit(review(plain), exists, CACHE)["response"]
    assert response == {"uid": "1234", "allowed": True}


def test_annotated_pod_gets_required_affinity_volume_and_mounts(api_server: Admit) -> None:
    obj = pod(
        {"datacache.io/dataset": "imagenet"},
        initContainers=[{"name": "init", "image": "i"}],
    )
    out = mutated(api_server, obj)
    assert required_terms(out) == [{"matchExpressions": [wants("default/imagenet")]}]
    # Beside the ServiceAccount token volume the API server added before calling the webhook.
    assert len(out["spec"]["volumes"]) == 2
    (volume,) = dataset_volumes(out)
    assert volume == {
        "name": volume_name("default/imagenet"),
        "hostPath": {"path": f"{CACHE}/datasets/default/imagenet/current", "type": "Directory"},
    }
    for kind in ("containers", "initContainers"):
        assert container_mounts(out, kind) == [
            {"name": volume["name"], "mountPath": "/datasets/default/imagenet", "readOnly": True}
        ]


def test_required_affinity_is_anded_into_every_existing_term(api_server: Admit) -> None:
    existing = [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
    ]
    obj = pod(
        {"datacache.io/dataset": "default/imagenet,ml/mnist"},
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": existing}
            },
            "podAntiAffinity": ANTI_AFFINITY,
        },
    )
    out = mutated(api_server, obj)
    terms = required_terms(out)
    assert len(terms) == 2
    assert terms[0]["matchExpressions"] == [
        existing[0]["matchExpressions"][0],
        wants("default/imagenet"),
        wants("ml/mnist"),
    ]
    assert terms[1]["matchFields"] == existing[1]["matchFields"]
    assert terms[1]["matchExpressions"] == [wants("default/imagenet"), wants("ml/mnist")]
    assert out["spec"]["affinity"]["podAntiAffinity"] == ANTI_AFFINITY
    assert [v["name"] for v in dataset_volumes(out)] == [
        volume_name("default/imagenet"),
        volume_name("ml/mnist"),
    ]


def test_preferred_affinity_adds_a_weighted_preference(api_server: Admit) -> None:
    out = mutated(
        api_server, pod({"datacache.io/dataset": "coco", "datacache.io/affinity": "preferred"})
    )
    node_affinity = out["spec"]["affinity"]["nodeAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in node_affinity
    assert node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 100, "preference": {"matchExpressions": [wants("default/coco")]}}
    ]


def test_reinvocation_changes_nothing(api_server: Admit) -> None:
    # The pod as the API server stored it: defaults and the token volume included.
    once = mutated(api_server, pod({"datacache.io/dataset": "imagenet"}))
    response = admit(review(once), exists, CACHE)["response"]
    assert response["allowed"] and "patch" not in response


@pytest.mark.parametrize(
    ("annotations", "code", "fragment"),
    [
        ({"datacache.io/dataset": "missing"}, 403, "default/missing does not exist"),
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


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    certificate: x509.Certificate
    connection: str | None
    """The `Connection` header: "close" when the server will not read another request."""


def _post(port: int, ca_file: Path, body: bytes, path: str = "/mutate") -> Answer:
    context = ssl.create_default_context(cafile=str(ca_file))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        # Before the answer: http.client drops the socket of an answer that closes it.
        assert connection.sock is not None
        der = connection.sock.getpeercert(binary_form=True)
        assert der is not None
        response = connection.getresponse()
        payload = json.loads(response.read())
        return Answer(
            response.status,
            payload,
            x509.load_der_x509_certificate(der),
            response.getheader("Connection"),
        )
    finally:
        connection.close()


def test_admission_review_over_https(webhook: tuple[WebhookServer, Path]) -> None:
    server, ca = webhook
    body = json.dumps(review(pod({"datacache.io/dataset": "imagenet"}))).encode()
    answer = _post(server.port, ca, body)
    assert answer.status == 200
    assert answer.connection is None  # kept open for the API server's next review
    assert answer.body["apiVersion"] == "admission.k8s.io/v1"
    assert answer.body["response"]["allowed"] is True
    ops = json.loads(base64.b64decode(answer.body["response"]["patch"]))
    assert {"op": "add", "path": "/spec/affinity", "value": {}} in ops


def test_https_errors(webhook: tuple[WebhookServer, Path]) -> None:
    server, ca = webhook
    bad = _post(server.port, ca, b"{not json")
    assert bad.status == 400 and "error" in bad.body
    # The body of a request to another path is not read: the server closes the connection
    # rather than parse that body as the next request.
    elsewhere = _post(server.port, ca, b"{}", path="/other")
    assert elsewhere.status == 404
    assert elsewhere.connection == "close"


def test_rotated_certificate_is_served_to_new_connections(
    webhook: tuple[WebhookServer, Path], tmp_path: Path
) -> None:
    server, ca = webhook
    body = json.dumps(review(pod())).encode()
    before = _post(server.port, ca, body).certificate
    assert before.subject.rfc4514_string() == "CN=webhook-one"
    rotated = tmp_path / "rotated"
    rotated.mkdir()
    new_cert, new_key = _write_cert(rotated, "webhook-two")
    # Replace the files the server reads, as a Secret volume update does.
    new_cert.replace(ca)
    new_key.replace(ca.with_name("tls.key"))
    after = _post(server.port, ca, body)
    assert after.status == 200
    assert after.certificate.subject.rfc4514_string() == "CN=webhook-two"


def test_example_configuration_matches_the_server() -> None:
    from coordinator.webhook import DATASET_ANNOTATION

    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    service, config = docs
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["service"]["name"] == service["metadata"]["name"]
    assert hook["clientConfig"]["service"]["path"] == PATH
    assert f"'{DATASET_ANNOTATION}'" in hook["matchConditions"][0]["expression"]
    assert hook["rules"][0]["operations"] == ["CREATE"]
