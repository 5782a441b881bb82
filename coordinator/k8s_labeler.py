"""Node labels on Kubernetes Node objects, through the official client.

Writes are JSON merge patches carrying the Node's `resourceVersion` (compare-and-swap), under a
named field manager; a 409 Conflict re-reads the node and retries a bounded number of times,
keeping the last error as the cause. The client is synchronous, so calls run in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from coordinator.cluster import NodeDirectory
from coordinator.errors import LabelerError, NodeMissing
from coordinator.labels import OWNED_LABELS_ANNOTATION, label_patch, owned_labels

FIELD_MANAGER = "datacache-coordinator"
_MAX_ATTEMPTS = 5
_RETRYABLE = {409, 429, 500, 502, 503, 504}
log = logging.getLogger(__name__)


def api_client(kubeconfig: str | None) -> Any:
    """A `kubernetes.client.ApiClient` from a kubeconfig file, or from the in-cluster service
    account. One per process: the API wrappers (CoreV1Api, CoordinationV1Api, ...) share it."""
    if kubeconfig:
        return k8s_config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


def core_api(kubeconfig: str | None) -> Any:
    """A CoreV1Api from a kubeconfig file, or from the in-cluster service account."""
    return k8s.CoreV1Api(api_client(kubeconfig))


@dataclass(frozen=True)
class KubernetesApis:
    """The client objects the coordinator's Kubernetes adapters take, sharing one connection
    pool, so that modules outside `coordinator.k8s_*` never import the client themselves."""

    client: Any
    """`kubernetes.client.ApiClient`, for `LeaderElection`."""
    core: Any
    """`CoreV1Api`, for the labeler, `NodeWatch`, `KubernetesEventSink` and
    `KubernetesCredentialsProvider`."""
    custom: Any
    """`CustomObjectsApi`, for `DatasetController`."""

    @classmethod
    def connect(cls, kubeconfig: str | None) -> KubernetesApis:
        shared = api_client(kubeconfig)
        return cls(shared, k8s.CoreV1Api(shared), k8s.CustomObjectsApi(shared))


def _metadata(node: Any) -> tuple[dict[str, str], dict[str, str], str]:
    meta = node.metadata
    return dict(meta.labels or {}), dict(meta.annotations or {}), meta.resource_version


OWN_WRITE_SECONDS = 60.0
"""How long the labeler trusts a label write of its own over a Node watch that has not shown
it yet, seconds."""


class KubernetesNodeLabeler:
    """Node labels through the API server.

    With a `NodeDirectory` kept current by a Node watch, `labelled_nodes` reads the watch's
    copy instead of listing every Node (at 5,000 nodes a list costs about a second of CPU in
    the client, holding the GIL, every reconcile pass). The watch shows a write of ours a
    little later than the write returns, so until it does (or for `OWN_WRITE_SECONDS`) the
    labels written are reported instead: each pass sees what the previous one wrote."""

    def __init__(self, api: Any, directory: NodeDirectory | None = None) -> None:
        """`api` is a `kubernetes.client.CoreV1Api`."""
        self._api = api
        self._directory = directory
        self._own_writes: dict[str, tuple[dict[str, str], float]] = {}
        """Labels this labeler last wrote (or found already right) by node, and when."""

    async def get_labels(self, node: str) -> dict[str, str]:
        try:
            obj = await asyncio.to_thread(self._api.read_node, node)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise LabelerError(f"reading node {node!r} failed: {exc.status} {exc.reason}") from exc
        labels, annotations, _ = _metadata(obj)
        return owned_labels(labels, annotations)

    async def set_labels(self, node: str, desired: Mapping[str, str]) -> bool:
        wanted = dict(desired)
        changed = await asyncio.to_thread(self._set_labels_sync, node, wanted)
        if self._directory is not None:
            self._own_writes[node] = (wanted, time.monotonic())
        return changed

    def _set_labels_sync(self, node: str, desired: dict[str, str]) -> bool:
        last_error: ApiException | None = None
        for attempt in range(_MAX_ATTEMPTS):
            if attempt:
                # Full jitter: many coordinators' worth of writers should not retry in step.
                time.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))  # noqa: S311
            try:
                obj = self._api.read_node(node)
            except ApiException as exc:
                if exc.status == 404:
                    raise NodeMissing(f"node {node!r} does not exist") from exc
                if exc.status not in _RETRYABLE:
                    raise LabelerError(f"reading node {node!r} failed: {exc.status}") from exc
                last_error = exc
                continue
            labels, annotations, resource_version = _metadata(obj)
            patch = label_patch(labels, annotations, desired)
            if patch is None:
                return False
            patch["metadata"]["resourceVersion"] = resource_version
            try:
                self._api.patch_node(
                    node,
                    patch,
                    field_manager=FIELD_MANAGER,
                    _content_type="application/merge-patch+json",
                )
            except ApiException as exc:
                if exc.status == 404:
                    raise NodeMissing(f"node {node!r} does not exist") from exc
                if exc.status not in _RETRYABLE:
                    raise LabelerError(
                        f"patching labels of node {node!r} failed: {exc.status} {exc.reason}"
                    ) from exc
                log.info("Retrying label patch after %s", exc.status, extra={"object": node})
                last_error = exc
                continue
            return True
        raise LabelerError(
            f"patching labels of node {node!r} failed {_MAX_ATTEMPTS} times; last: "
            f"{last_error.status if last_error else '?'}"
        ) from last_error

    async def labelled_nodes(self) -> dict[str, Mapping[str, str]]:
        if self._directory is not None and self._directory.synced:
            return self._watched_labels(self._directory)
        try:
            nodes = await asyncio.to_thread(self._api.list_node)
        except ApiException as exc:
            raise LabelerError(f"listing nodes failed: {exc.status} {exc.reason}") from exc
        out: dict[str, Mapping[str, str]] = {}
        for obj in nodes.items:
            labels, annotations, _ = _metadata(obj)
            if OWNED_LABELS_ANNOTATION in annotations:
                owned = owned_labels(labels, annotations)
                if owned:
                    out[obj.metadata.name] = owned
        return out

    def _watched_labels(self, directory: NodeDirectory) -> dict[str, Mapping[str, str]]:
        nodes = directory.snapshot()
        out = {name: n.owned_labels for name, n in nodes.items() if n.owned_labels}
        now = time.monotonic()
        for node, (written, at) in list(self._own_writes.items()):
            if node not in nodes or out.get(node, {}) == written or now - at > OWN_WRITE_SECONDS:
                # The watch caught up (or the node is gone, or the write is old news).
                del self._own_writes[node]
            elif written:
                out[node] = written
            else:
                out.pop(node, None)
        return out
