"""Node watch: keeps a `NodeDirectory` current from the Kubernetes Node objects.

List, then watch from the list's `resourceVersion`; a watch that ends (server timeout, dropped
connection, API error) resumes from the last version seen, and a 410 Expired (the version fell
out of the API server's history) re-lists and replaces the whole directory, so events missed
meanwhile (a deletion, a re-created node) are not lost. Errors back off with bounded, jittered
delays. Deletions become `NodeDirectory.remove`; a node re-created under the same name with a
new UID is reported by the directory as `replaced`.

The translation from a Node object to `NodeFacts` is pure (`node_facts`); the loop is a thin
adapter around the official client, run in one thread.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from coordinator.cluster import NodeDirectory, NodeFacts, Taint
from coordinator.k8s_backoff import Backoff, BackoffSettings

log = logging.getLogger(__name__)

_GONE = 410
# The apiserver's quantity grammar (resource.Quantity); the client's parser is laxer (it
# accepts "12 Gi"), and a value the apiserver would never serve means a corrupt object.
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")


@dataclass(frozen=True)
class NodeWatchSettings:
    """How the Node watch talks to the API server."""

    watch_timeout_seconds: int = 300
    """Server-side length of one watch request, seconds; it then resumes from the last version.
    Bounds how long a silently dead connection can go unnoticed."""
    request_timeout_seconds: float = 30.0
    """Client-side timeout of a list request, seconds."""
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    """Delays between attempts after errors."""

    def __post_init__(self) -> None:
        if self.watch_timeout_seconds < 1:
            raise ValueError(
                f"watch_timeout_seconds must be at least 1, got {self.watch_timeout_seconds}"
            )


def parse_bytes(quantity: str) -> int | None:
    """A Kubernetes quantity ("100Gi", "5e9", "1500M", "128974848") as whole bytes, rounded up
    like `Quantity.Value()`; None when it is not a valid quantity."""
    if not _QUANTITY.match(quantity):
        return None
    try:
        value: Decimal = parse_quantity(quantity)  # type: ignore[no-untyped-call]
    except (ValueError, InvalidOperation, TypeError):
        return None
    if value < 0:
        return None
    return math.ceil(value)


def node_facts(obj: Mapping[str, Any]) -> NodeFacts:
    """The facts placement needs from one Node object (as the API serves it, in JSON form)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name = str(meta.get("name", ""))
    taints = tuple(
        Taint(
            key=str(t.get("key", "")),
            value=str(t.get("value", "")),
            effect=str(t.get("effect", "NoSchedule")),
        )
        for t in spec.get("taints") or []
        if isinstance(t, dict)
    )
    allocatable = (status.get("allocatable") or {}).get("ephemeral-storage")
    allocatable_bytes = None
    if allocatable is not None:
        allocatable_bytes = parse_bytes(str(allocatable))
        if allocatable_bytes is None:
            log.warning(
                "Node has an unparseable ephemeral-storage allocatable %r; treating it as unknown",
                allocatable,
                extra={"node": name},
            )
    return NodeFacts(
        name=name,
        uid=str(meta.get("uid", "")),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        taints=taints,
        unschedulable=spec.get("unschedulable") is True,
        allocatable_bytes=allocatable_bytes,
    )


class NodeWatch:
    """Lists and watches Nodes into `directory` from a thread: `start`, then `stop`."""

    def __init__(
        self, api: Any, directory: NodeDirectory, settings: NodeWatchSettings | None = None
    ) -> None:
        """`api` is a `kubernetes.client.CoreV1Api`."""
        self._api = api
        self._directory = directory
        self._settings = settings or NodeWatchSettings()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: k8s_watch.Watch | None = None
        self._thread: threading.Thread | None = None
        self.lists = 0
        """How many times the nodes were (re-)listed; for tests and metrics."""

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("NodeWatch already started")
        self._thread = threading.Thread(target=self._run, name="node-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the watch (closing its connection) and joins the thread."""
        self._stopping.set()
        with self._lock:
            if self._watch is not None:
                self._watch.stop()  # type: ignore[no-untyped-call]
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"node watch did not stop within {timeout}s")

    def _run(self) -> None:
        backoff = Backoff(self._settings.backoff)
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                resource_version = self._watch_from(resource_version)
                backoff.reset()
            except ApiException as exc:
                if exc.status == _GONE:
                    # Our version left the API server's history: only a fresh list is complete.
                    log.info("Node watch expired (410); listing nodes again")
                    resource_version = None
                    continue
                delay = backoff.next_delay()
                log.warning(
                    "Node list/watch failed (%s %s); retrying in %.1fs",
                    exc.status,
                    exc.reason,
                    delay,
                )
                self._stopping.wait(delay)
            except Exception as exc:
                # Connection errors and anything unexpected: the loop must outlive them.
                delay = backoff.next_delay()
                log.warning("Node list/watch failed (%r); retrying in %.1fs", exc, delay)
                self._stopping.wait(delay)

    def _relist(self) -> str:
        response = self._api.list_node(
            _preload_content=False, _request_timeout=self._settings.request_timeout_seconds
        )
        body = json.loads(response.data)
        self._directory.replace_all(node_facts(item) for item in body.get("items") or [])
        self.lists += 1
        version = str((body.get("metadata") or {}).get("resourceVersion", ""))
        log.info("Listed %d nodes at version %s", len(body.get("items") or []), version)
        return version

    def _watch_from(self, resource_version: str) -> str:
        """Applies events after `resource_version` until the stream ends; returns the last
        version seen. Raises ApiException (410 included) for error events."""
        watcher = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        with self._lock:
            if self._stopping.is_set():
                return resource_version
            self._watch = watcher
        try:
            for event in watcher.stream(  # type: ignore[no-untyped-call]
                self._api.list_node,
                resource_version=resource_version,
                timeout_seconds=self._settings.watch_timeout_seconds,
                allow_watch_bookmarks=True,
            ):
                # The raw JSON, not the client's model: one translation for list and watch.
                # (deserialize=False is not usable: the client then fails on ERROR events.)
                obj = event.get("raw_object") or {}
                meta = obj.get("metadata") or {}
                resource_version = str(meta.get("resourceVersion") or resource_version)
                kind = event.get("type")
                if kind in ("ADDED", "MODIFIED"):
                    self._directory.upsert(node_facts(obj))
                elif kind == "DELETED":
                    self._directory.remove(str(meta.get("name", "")))
        finally:
            with self._lock:
                self._watch = None
        return resource_version
