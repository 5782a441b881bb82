"""S3 credentials from Kubernetes Secrets in the coordinator's namespace (a
`CredentialsProvider`).

A dataset names a Secret (`credentials_secret`); the coordinator reads it and passes the keys
to the agents that fetch the dataset, so the agents need no Secret access at all. Keys:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN. Results are cached
briefly, so a rotated Secret is picked up within `cache_seconds` without reading the API on
every desired-state push. Secret values never reach a log line or an error message.

The coordinator reads Secrets with its own rights, on behalf of whoever wrote the dataset, so
a Secret says which datasets may use it: those of the coordinator's own namespace, and those
of the namespaces listed in its annotation `datacache.io/dataset-namespaces` (comma-separated,
`*` for every namespace). Without the check, anyone who may create a Dataset in any namespace
could have the agents fetch with any team's keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from coordinator.cluster import CredentialsDenied, CredentialsError, S3Credentials

log = logging.getLogger(__name__)

ACCESS_KEY = "AWS_ACCESS_KEY_ID"
SECRET_KEY = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 - a key name, not a secret
SESSION_TOKEN = "AWS_SESSION_TOKEN"  # noqa: S105 - a key name, not a secret
NAMESPACES_ANNOTATION = "datacache.io/dataset-namespaces"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class SecretSettings:
    """Where credentials Secrets are read and how long they are cached."""

    namespace: str
    """The coordinator's namespace; Secrets are read only there (RBAC: get on secrets)."""
    cache_seconds: float = 30.0
    """How long a Secret read is reused, seconds: the delay before a rotation is seen."""
    request_timeout_seconds: float = 10.0
    """Client-side timeout of one read, seconds."""


def credentials_from_data(
    secret: str, namespace: str, data: Mapping[str, str] | None
) -> S3Credentials:
    """Pure: the credentials in a Secret's base64 `data`; CredentialsError naming the missing
    or malformed key (never its value)."""
    data = data or {}

    def value(key: str, required: bool) -> str:
        raw = data.get(key)
        if raw is None:
            if required:
                raise CredentialsError(
                    f"Secret {namespace}/{secret} has no key {key}; it needs "
                    f"{ACCESS_KEY} and {SECRET_KEY} (and optionally {SESSION_TOKEN}), e.g. "
                    f"kubectl -n {namespace} create secret generic {secret} "
                    f"--from-literal={ACCESS_KEY}=... --from-literal={SECRET_KEY}=..."
                )
            return ""
        try:
            text = base64.b64decode(raw, validate=True).decode("utf-8").strip()
        except (binascii.Error, ValueError):
            raise CredentialsError(
                f"Secret {namespace}/{secret} key {key} is not valid base64 UTF-8 text"
            ) from None
        if required and not text:
            raise CredentialsError(f"Secret {namespace}/{secret} key {key} is empty")
        return text

    return S3Credentials(
        access_key_id=value(ACCESS_KEY, True),
        secret_access_key=value(SECRET_KEY, True),
        session_token=value(SESSION_TOKEN, False),
    )


def allowed_namespaces(annotations: Mapping[str, str] | None) -> frozenset[str]:
    """Pure: the namespaces a Secret's annotation lets use it (`*`: all)."""
    text = (annotations or {}).get(NAMESPACES_ANNOTATION, "")
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def check_use(secret: str, namespace: str, allowed: frozenset[str], dataset: str) -> None:
    """Pure: CredentialsDenied unless dataset `<ns>/<name>` may use Secret `namespace/secret`,
    whose annotation allows `allowed`."""
    dataset_namespace = dataset.partition("/")[0]
    if dataset_namespace == namespace or "*" in allowed or dataset_namespace in allowed:
        return
    raise CredentialsDenied(
        f"Secret {namespace}/{secret} is not for datasets of namespace {dataset_namespace!r}: "
        f"if it should be, add {dataset_namespace} to its annotation {NAMESPACES_ANNOTATION} "
        f"(kubectl -n {namespace} annotate secret {secret} "
        f"{NAMESPACES_ANNOTATION}={','.join(sorted(allowed | {dataset_namespace}))} --overwrite)"
    )


class KubernetesCredentialsProvider:
    def __init__(
        self,
        api: Any,
        settings: SecretSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`api` is a `kubernetes.client.CoreV1Api`."""
        self._api = api
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, S3Credentials, frozenset[str]]] = {}

    async def get(self, secret_name: str, dataset: str) -> S3Credentials:
        namespace = self._settings.namespace
        if len(secret_name) > 253 or not _NAME.match(secret_name):
            raise CredentialsError(
                f"credentials secret name {secret_name!r} is not a valid Secret name "
                "(lowercase letters, digits, '-' and '.', at most 253 characters)"
            )
        now = self._clock()
        with self._lock:
            cached = self._cache.get(secret_name)
        if cached is not None and now - cached[0] < self._settings.cache_seconds:
            check_use(secret_name, namespace, cached[2], dataset)
            return cached[1]
        try:
            secret = await asyncio.to_thread(
                self._api.read_namespaced_secret,
                secret_name,
                namespace,
                _request_timeout=self._settings.request_timeout_seconds,
            )
        except ApiException as exc:
            raise CredentialsError(_explain(exc, secret_name, namespace)) from None
        except Exception as exc:
            raise CredentialsError(
                f"reading Secret {namespace}/{secret_name} failed ({type(exc).__name__}); "
                "the API server may be unreachable, it is retried"
            ) from exc
        allowed = allowed_namespaces(secret.metadata.annotations if secret.metadata else None)
        # Checked before the keys: a dataset that may not use the Secret learns nothing of them.
        check_use(secret_name, namespace, allowed, dataset)
        credentials = credentials_from_data(secret_name, namespace, secret.data)
        with self._lock:
            self._cache[secret_name] = (now, credentials, allowed)
        return credentials


def _explain(exc: ApiException, secret: str, namespace: str) -> str:
    # `from None` above: the exception body holds the API's answer, which for a Secret read
    # is not the Secret, but there is no need to carry it.
    if exc.status == 404:
        return (
            f"Secret {namespace}/{secret} does not exist: create it in the coordinator's "
            f"namespace ({namespace}) with keys {ACCESS_KEY} and {SECRET_KEY}"
        )
    if exc.status in (401, 403):
        return (
            f"the coordinator may not read Secret {namespace}/{secret} ({exc.status}): its Role "
            "needs get on secrets in its own namespace (manifests/rbac.yaml)"
        )
    return f"reading Secret {namespace}/{secret} failed: {exc.status} {exc.reason}; it is retried"
