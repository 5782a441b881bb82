"""The mutating admission webhook that sends pods to their data.

A pod annotated

    datacache.io/dataset: <namespace>/<name>[,<namespace>/<name>...]

(a bare <name> means the pod's own namespace) gets, for each dataset, a node affinity to the
nodes labelled as holding a Ready replica and a read-only volume with the dataset mounted at
/datasets/<namespace>/<name> in every container (see `datacache.podspec`). The annotation

    datacache.io/affinity: required | preferred

chooses between requiring such a node (the default: the pod waits until a replica is Ready)
and preferring one. Pods without the annotation are never changed; the
MutatingWebhookConfiguration's matchConditions keep them from reaching the webhook at all, so
a webhook outage never blocks them.

`admit` is the decision (pure); `WebhookServer` is the HTTPS adapter (AdmissionReview v1).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from coordinator.labels import READY_VALUE, label_key
from datacache.podspec import DatasetMount, pod_patch
from datacache.validation import InvalidInput, validate_dataset_name, validate_namespace

log = logging.getLogger(__name__)

DATASET_ANNOTATION = "datacache.io/dataset"
AFFINITY_ANNOTATION = "datacache.io/affinity"
MAX_DATASETS_PER_POD = 16
# The API server sends at most 3 MiB objects; anything larger is not an AdmissionReview.
MAX_BODY_BYTES = 4 * 1024 * 1024
PATH = "/mutate"


# What the webhook needs from the coordinator: does a dataset exist (and is not being deleted)?
Exists = Callable[[str], bool]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    patch: list[dict[str, Any]]
    message: str = ""
    code: int = 200


def requested_datasets(pod: dict[str, Any], pod_namespace: str) -> tuple[list[str], str]:
    """The canonical dataset names a pod asks for, and the affinity kind. Raises
    `InvalidInput` naming the bad value."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(DATASET_ANNOTATION)
    if raw is None:
        return [], "required"
    names: list[str] = []
    for item in (part.strip() for part in str(raw).split(",")):
        if not item:
            continue
        name = validate_dataset_name(item if "/" in item else f"{pod_namespace}/{item}")
        if name not in names:
            names.append(name)
    if not names:
        raise InvalidInput(f"annotation {DATASET_ANNOTATION} is empty: give <namespace>/<name>")
    if len(names) > MAX_DATASETS_PER_POD:
        raise InvalidInput(
            f"annotation {DATASET_ANNOTATION} names {len(names)} datasets; "
            f"at most {MAX_DATASETS_PER_POD} per pod"
        )
    affinity = str(annotations.get(AFFINITY_ANNOTATION, "required")).strip()
    if affinity not in ("required", "preferred"):
        raise InvalidInput(
            f"annotation {AFFINITY_ANNOTATION}={affinity!r}: use 'required' or 'preferred'"
        )
    return names, affinity


_STATUS_REASONS: dict[int, str] = {
    HTTPStatus.BAD_REQUEST: "BadRequest",
    HTTPStatus.FORBIDDEN: "Forbidden",
}


def decide(pod: dict[str, Any], pod_namespace: str, exists: Exists, cache_dir: str) -> Decision:
    try:
        names, affinity = requested_datasets(pod, pod_namespace)
    except InvalidInput as exc:
        return Decision(False, [], f"datacache: {exc}", HTTPStatus.BAD_REQUEST)
    if not names:
        return Decision(True, [])
    missing = [n for n in names if not exists(n)]
    if missing:
        return Decision(
            False,
            [],
            f"datacache: dataset {', '.join(missing)} does not exist: create it "
            f"(datacache dataset create) or remove the {DATASET_ANNOTATION} annotation",
            # The API server answers the pod's create with this code: 404 would read as a
            # missing namespace or pod, so a refusal is Forbidden, as admission refusals are.
            HTTPStatus.FORBIDDEN,
        )
    mounts = [
        DatasetMount(
            dataset=name,
            label_key=label_key(name),
            label_value=READY_VALUE,
            cache_dir=cache_dir,
            affinity="preferred" if affinity == "preferred" else "required",
        )
        for name in names
    ]
    return Decision(True, pod_patch(pod, mounts))


class BadReview(ValueError):
    """The request body is not an AdmissionReview v1 for a Pod."""


def admit(review: Any, exists: Exists, cache_dir: str) -> dict[str, Any]:
    """Answers one AdmissionReview v1 (as parsed JSON) with another."""
    if not isinstance(review, dict) or review.get("apiVersion") != "admission.k8s.io/v1":
        raise BadReview("expected an admission.k8s.io/v1 AdmissionReview")
    if review.get("kind") != "AdmissionReview" or not isinstance(review.get("request"), dict):
        raise BadReview("expected kind AdmissionReview with a request")
    request = review["request"]
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("the AdmissionReview request has no uid")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    pod = request.get("object")
    kind = (request.get("kind") or {}).get("kind")
    if kind == "Pod" and request.get("operation") == "CREATE" and isinstance(pod, dict):
        namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace")
        try:
            namespace = validate_namespace(str(namespace or "default"))
        except InvalidInput as exc:
            raise BadReview(str(exc)) from exc
        decision = decide(pod, namespace, exists, cache_dir)
        response["allowed"] = decision.allowed
        if not decision.allowed:
            # The reason is what kubectl names the refusal by ("Error from server (Forbidden)").
            response["status"] = {
                "code": decision.code,
                "reason": _STATUS_REASONS.get(decision.code, ""),
                "message": decision.message,
            }
        elif decision.patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(decision.patch).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class _CertificateReloader:
    """Serves the newest certificate: cert-manager rotates the files in place."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self._cert_file, self._key_file = cert_file, key_file
        self._lock = threading.Lock()
        self._stamp: tuple[float, float] | None = None
        self._context = self._load()

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert_file, self._key_file)
        self._stamp = (os.stat(self._cert_file).st_mtime, os.stat(self._key_file).st_mtime)
        return context

    def current(self) -> ssl.SSLContext:
        with self._lock:
            try:
                stamp = (os.stat(self._cert_file).st_mtime, os.stat(self._key_file).st_mtime)
                if stamp != self._stamp:
                    self._context = self._load()
                    log.info("Webhook certificate reloaded from %s", self._cert_file)
            except (OSError, ssl.SSLError) as exc:
                log.warning("Keeping the previous webhook certificate: %s", exc)
            return self._context

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert_file, self._key_file)

        def pick(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: Any) -> None:
            sock.context = self.current()

        context.sni_callback = pick
        return context


class WebhookServer:
    """HTTPS server answering AdmissionReviews on POST /mutate, in background threads."""

    def __init__(
        self,
        address: tuple[str, int],
        cert_file: Path,
        key_file: Path,
        exists: Exists,
        cache_dir: str,
    ) -> None:
        reloader = _CertificateReloader(cert_file, key_file)
        handler = _handler(exists, cache_dir)
        self._httpd = ThreadingHTTPServer(address, handler)
        self._httpd.daemon_threads = True
        self._httpd.socket = reloader.server_context().wrap_socket(
            self._httpd.socket, server_side=True
        )
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="webhook")

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("Admission webhook serving on port %d", self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def _handler(exists: Exists, cache_dir: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("webhook: " + format, *args)

        def _send(self, status: int, body: dict[str, Any], *, close: bool = False) -> None:
            """`close`: the request body was not read, so the connection cannot carry another
            request (its unread bytes would be parsed as one)."""
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != PATH:
                self._send(
                    HTTPStatus.NOT_FOUND, {"error": f"only POST {PATH} is served"}, close=True
                )
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(
                    HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length is required"}, close=True
                )
                return
            if not 0 < length <= MAX_BODY_BYTES:
                self._send(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"body must be 1-{MAX_BODY_BYTES} bytes"},
                    close=True,
                )
                return
            try:
                review = json.loads(self.rfile.read(length))
                answer = admit(review, exists, cache_dir)
            except (ValueError, UnicodeDecodeError) as exc:
                # json.JSONDecodeError and BadReview are both ValueErrors.
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            except Exception:
                log.exception("Webhook failed on a review")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
                return
            response = answer["response"]
            if response.get("patch") or not response["allowed"]:
                log.info(
                    "Pod %s: %s",
                    "mutated" if response["allowed"] else "denied",
                    response.get("status", {}).get("message", ""),
                )
            self._send(HTTPStatus.OK, answer)

    return Handler
