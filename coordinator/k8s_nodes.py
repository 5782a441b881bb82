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

import logging
import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes.utils import parse_quantity

from coordinator.cluster import NodeDirectory, NodeFacts, Taint
from coordinator.k8s_listwatch import ListWatch, ListWatchSettings, Obj
from coordinator.labels import owned_labels

log = logging.getLogger(__name__)

# The apiserver's quantity grammar (resource.Quantity); the client's parser is laxer (it
# accepts "12 Gi"), and a value the apiserver would never serve means a corrupt object.
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")


# How the Node watch talks to the API server.
NodeWatchSettings = ListWatchSettings


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
    # Extended resources (nvidia.com/gpu, ...): what sweep trials request and demand matches.
    extended: dict[str, int] = {}
    for resource, quantity in (status.get("allocatable") or {}).items():
        if "/" in str(resource) and not str(resource).startswith("kubernetes.io/"):
            count = parse_bytes(str(quantity))
            if count is not None:
                extended[str(resource)] = count
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    return NodeFacts(
        name=name,
        uid=str(meta.get("uid", "")),
        labels=labels,
        owned_labels=owned_labels(labels, annotations) if annotations else {},
        taints=taints,
        unschedulable=spec.get("unschedulable") is True,
        allocatable_bytes=allocatable_bytes,
        extended_resources=extended,
    )


class NodeWatch:
    """Lists and watches Nodes into `directory` from a thread: `start`, then `stop`."""

    def __init__(
        self, api: Any, directory: NodeDirectory, settings: NodeWatchSettings | None = None
    ) -> None:
        """`api` is a `kubernetes.client.CoreV1Api`."""

        def on_list(items: list[Obj]) -> None:
            directory.replace_all(node_facts(item) for item in items)
            log.info("Listed %d nodes", len(items))

        def on_event(kind: str, obj: Obj) -> None:
            if kind == "DELETED":
                directory.remove(str((obj.get("metadata") or {}).get("name", "")))
            else:
                directory.upsert(node_facts(obj))

        self._loop = ListWatch("node", api.list_node, on_list, on_event, settings=settings)

    @property
    def lists(self) -> int:
        """How many times the nodes were (re-)listed; for tests and metrics."""
        return self._loop.lists

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the watch (closing its connection) and joins the thread."""
        self._loop.stop(timeout)
