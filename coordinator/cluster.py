"""What the coordinator learns from, and tells, the cluster around it: narrow interfaces.

- `NodeDirectory`: facts about nodes (labels, zone, taints, cordon, allocatable disk, UID).
  In a cluster a Node watch (`coordinator.k8s_nodes`) keeps it current; in local mode it is
  filled from what agents say when they register. Placement reads it.
- `EventSink`: Kubernetes Events with fixed reasons for replica transitions
  (`coordinator.k8s_events` in a cluster, `LogEventSink` otherwise).
- `CredentialsProvider`: S3 credentials named by a dataset's `credentials_secret`
  (`coordinator.k8s_secrets` in a cluster, `DirectoryCredentialsProvider` otherwise).

This module does no I/O except `DirectoryCredentialsProvider` reading files.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"
    """NoSchedule, PreferNoSchedule or NoExecute."""


@dataclass(frozen=True)
class NodeFacts:
    """One node as the cluster describes it."""

    name: str
    uid: str = ""
    """Kubernetes Node UID; a node re-created under the same name gets a new one."""
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False
    """Cordoned."""
    allocatable_bytes: int | None = None
    """status.allocatable["ephemeral-storage"], bytes; None when unknown."""
    extended_resources: Mapping[str, int] = field(default_factory=dict)
    """Allocatable countable resources with a domain prefix (e.g. nvidia.com/gpu: 8)."""
    owned_labels: Mapping[str, str] = field(default_factory=dict)
    """The labels datacache set on the node (those its owned-labels annotation names)."""

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")


@dataclass(frozen=True)
class NodeChange:
    """A node appeared or changed (`facts` set), or was deleted (`facts` None).
    `replaced` is True when a node of the same name but another UID existed before: it is a
    new machine and starts empty."""

    name: str
    facts: NodeFacts | None
    replaced: bool = False


class NodeDirectory:
    """Thread-safe map of node facts with change notification."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeFacts] = {}
        # UIDs of removed nodes: a node re-created under the same name is a new machine.
        self._tombstones: dict[str, str] = {}
        self._synced = False
        self._subscribers: list[Callable[[NodeChange], None]] = []

    @property
    def synced(self) -> bool:
        """True once a full list has been loaded (`replace_all`)."""
        return self._synced

    def subscribe(self, callback: Callable[[NodeChange], None]) -> None:
        """`callback` is called, outside the lock, for every change after subscribing."""
        with self._lock:
            self._subscribers.append(callback)

    def replace_all(self, nodes: Iterable[NodeFacts]) -> None:
        """Sets the full set of nodes (after a list or a re-list), notifying the differences."""
        fresh = {n.name: n for n in nodes}
        changes: list[NodeChange] = []
        with self._lock:
            for name in self._nodes:
                if name not in fresh:
                    changes.append(NodeChange(name, None))
            for name, new in fresh.items():
                old_facts = self._nodes.get(name)
                if old_facts != new:
                    changes.append(NodeChange(name, new, _replaced(old_facts, new)))
            self._nodes = fresh
            self._synced = True
            subscribers = list(self._subscribers)
        self._notify(subscribers, changes)

    def upsert(self, facts: NodeFacts) -> None:
        with self._lock:
            old = self._nodes.get(facts.name)
            if old == facts:
                return
            if old is None:
                old_uid = self._tombstones.pop(facts.name, "")
                old = NodeFacts(facts.name, uid=old_uid) if old_uid else None
            self._nodes[facts.name] = facts
            subscribers = list(self._subscribers)
        self._notify(subscribers, [NodeChange(facts.name, facts, _replaced(old, facts))])

    def remove(self, name: str) -> None:
        with self._lock:
            old = self._nodes.pop(name, None)
            if old is None:
                return
            if old.uid:
                self._tombstones[name] = old.uid
            subscribers = list(self._subscribers)
        self._notify(subscribers, [NodeChange(name, None)])

    def get(self, name: str) -> NodeFacts | None:
        with self._lock:
            return self._nodes.get(name)

    def snapshot(self) -> dict[str, NodeFacts]:
        with self._lock:
            return dict(self._nodes)

    @staticmethod
    def _notify(subscribers: list[Callable[[NodeChange], None]], changes: list[NodeChange]) -> None:
        for change in changes:
            for callback in subscribers:
                try:
                    callback(change)
                except Exception:
                    log.exception("Node change subscriber failed for %s", change.name)


def _replaced(old: NodeFacts | None, new: NodeFacts) -> bool:
    return old is not None and bool(old.uid) and bool(new.uid) and old.uid != new.uid


class EventReason:
    """Fixed reasons of the Events datacache records on Node objects."""

    REPLICA_READY = "ReplicaReady"
    REPLICA_FAILED = "ReplicaFailed"
    REPLICA_EVICTED = "ReplicaEvicted"


class EventSink(Protocol):
    async def replica_event(self, node: str, dataset: str, reason: str, message: str) -> None:
        """Records that `dataset`'s replica on `node` changed (`reason` from `EventReason`).
        Best effort: never raises."""
        ...


class LogEventSink:
    """Local mode: events go to the log only."""

    async def replica_event(self, node: str, dataset: str, reason: str, message: str) -> None:
        log.info("%s: %s", reason, message, extra={"node": node, "dataset": dataset})


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str = ""

    def __repr__(self) -> str:
        # Never let a secret reach a log line or a traceback.
        return f"S3Credentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


class CredentialsError(Exception):
    """A credentials Secret is missing or malformed; the message says which and what to do."""


class CredentialsDenied(CredentialsError):
    """The Secret does not let the dataset's namespace use it. Unlike a failed read, this is
    an answer: credentials read earlier for the dataset must not stand in for it."""


class CredentialsProvider(Protocol):
    async def get(self, secret_name: str, dataset: str) -> S3Credentials:
        """The credentials in Secret `secret_name`, for dataset `dataset` (canonical
        `<namespace>/<name>`). Raises `CredentialsError`, `CredentialsDenied` when the
        Secret may not be used for that dataset."""
        ...


class DirectoryCredentialsProvider:
    """Local mode: `<root>/<secret_name>/AWS_ACCESS_KEY_ID` etc., the layout of a Secret
    mounted as a volume. Every dataset may use every directory: in local mode whoever holds an
    API token also chose what is in `root`, so there are no tenants to keep apart."""

    def __init__(self, root: Path) -> None:
        self._root = root

    async def get(self, secret_name: str, dataset: str) -> S3Credentials:
        directory = self._root / secret_name
        if "/" in secret_name or secret_name in ("", ".", ".."):
            raise CredentialsError(f"credentials secret name {secret_name!r} is not valid")

        def read(key: str, required: bool) -> str:
            try:
                return (directory / key).read_text().strip()
            except FileNotFoundError:
                if required:
                    raise CredentialsError(
                        f"credentials secret {secret_name!r} has no {key} "
                        f"(looked for {directory / key})"
                    ) from None
                return ""

        return S3Credentials(
            access_key_id=read("AWS_ACCESS_KEY_ID", True),
            secret_access_key=read("AWS_SECRET_ACCESS_KEY", True),
            session_token=read("AWS_SESSION_TOKEN", False),
        )
