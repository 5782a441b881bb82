"""Kubernetes Events on Node objects for replica transitions (an `EventSink`).

Core v1 Events (what `kubectl describe node` and `kubectl get events` show), in the namespace
where node events live (`default`, as the kubelet's), with `reportingComponent`
`datacache.io/coordinator`. Like client-go's recorder, repeats are folded into one Event whose
`count` and `lastTimestamp` are bumped, and a token bucket per node bounds the write rate, so a
flapping replica cannot flood the API server. Best effort: a failure is logged, never raised.

`EventPlanner` (pure) decides create / bump / drop; `KubernetesEventSink` is the I/O adapter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from coordinator.cluster import EventReason

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "datacache.io/coordinator"
SOURCE_COMPONENT = "datacache-coordinator"
_WARNING_REASONS = frozenset({EventReason.REPLICA_FAILED})
_REASONS = frozenset(
    {EventReason.REPLICA_READY, EventReason.REPLICA_FAILED, EventReason.REPLICA_EVICTED}
)
# The apiserver refuses notes over 1 KiB.
_MAX_MESSAGE = 1024


@dataclass(frozen=True)
class EventSettings:
    """Where Events go and how many may be written."""

    namespace: str = "default"
    """Namespace of the Events about (cluster-scoped) Nodes; `default`, as the kubelet uses."""
    burst: int = 25
    """Events a node may receive at once before rate limiting applies."""
    refill_seconds: float = 300.0
    """One more Event per node per this many seconds once the burst is spent, seconds."""
    dedup_window_seconds: float = 600.0
    """A repeat within this time bumps the existing Event's count, seconds."""
    max_tracked: int = 4096
    """Distinct recent events remembered for folding (bounded memory)."""
    reporting_instance: str = ""
    """This coordinator (its pod name), recorded as `reportingInstance`."""


@dataclass(frozen=True)
class Plan:
    action: str
    """"create", "bump" or "drop"."""
    name: str = ""
    """Event name to bump."""
    count: int = 1
    """The count to write."""


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class EventPlanner:
    """Pure: folds repeats and rate-limits per node. `now` is a monotonic time."""

    settings: EventSettings
    _recent: OrderedDict[tuple[str, str, str, str], tuple[str, int, float]] = field(
        default_factory=OrderedDict
    )
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def plan(self, node: str, dataset: str, reason: str, message: str, now: float) -> Plan:
        key = (node, dataset, reason, message)
        seen = self._recent.get(key)
        if seen is not None and now - seen[2] <= self.settings.dedup_window_seconds:
            # Folding a repeat is one write too, so it spends a token like a new Event.
            if not self._take(node, now):
                return Plan("drop")
            return Plan("bump", seen[0], seen[1] + 1)
        if not self._take(node, now):
            return Plan("drop")
        return Plan("create")

    def written(
        self, node: str, dataset: str, reason: str, message: str, name: str, count: int, now: float
    ) -> None:
        key = (node, dataset, reason, message)
        self._recent[key] = (name, count, now)
        self._recent.move_to_end(key)
        while len(self._recent) > self.settings.max_tracked:
            self._recent.popitem(last=False)

    def forget(self, node: str, dataset: str, reason: str, message: str) -> None:
        self._recent.pop((node, dataset, reason, message), None)

    def _take(self, node: str, now: float) -> bool:
        bucket = self._buckets.get(node)
        if bucket is None:
            bucket = self._buckets[node] = _Bucket(float(self.settings.burst), now)
        refill = (now - bucket.stamp) / self.settings.refill_seconds
        bucket.tokens = min(float(self.settings.burst), bucket.tokens + refill)
        bucket.stamp = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubernetesEventSink:
    """`EventSink` writing core v1 Events about Nodes. `node_uid` looks up a node's UID (from
    the `NodeDirectory`) so the Event points at this Node object, not a same-name successor."""

    def __init__(
        self,
        api: Any,
        settings: EventSettings | None = None,
        node_uid: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`api` is a `kubernetes.client.CoreV1Api`."""
        self._api = api
        self._settings = settings or EventSettings()
        self._planner = EventPlanner(self._settings)
        self._node_uid = node_uid or (lambda _node: "")
        self._clock = clock
        # The planner is shared by concurrent calls (each runs in a worker thread).
        self._lock = threading.Lock()

    async def replica_event(self, node: str, dataset: str, reason: str, message: str) -> None:
        try:
            await asyncio.to_thread(self._record, node, dataset, reason, message)
        except Exception:
            log.exception(
                "Recording event %s failed", reason, extra={"node": node, "dataset": dataset}
            )

    def _record(self, node: str, dataset: str, reason: str, message: str) -> None:
        if reason not in _REASONS:
            log.error("Refusing an event with unknown reason %r", reason, extra={"node": node})
            return
        if dataset not in message:
            message = f"dataset {dataset}: {message}"
        message = message[:_MAX_MESSAGE]
        with self._lock:
            plan = self._planner.plan(node, dataset, reason, message, self._clock())
        if plan.action == "drop":
            log.info(
                "Event %s dropped by rate limit", reason, extra={"node": node, "dataset": dataset}
            )
            return
        try:
            if plan.action == "bump":
                try:
                    self._api.patch_namespaced_event(
                        plan.name,
                        self._settings.namespace,
                        {"count": plan.count, "lastTimestamp": _timestamp()},
                    )
                    name, count = plan.name, plan.count
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    # The Event expired (the apiserver keeps them an hour): start a new one.
                    name, count = self._create(node, dataset, reason, message), 1
            else:
                name, count = self._create(node, dataset, reason, message), 1
        except ApiException as exc:
            with self._lock:
                self._planner.forget(node, dataset, reason, message)
            log.warning(
                "Recording event %s failed: %s %s",
                reason,
                exc.status,
                exc.reason,
                extra={"node": node, "dataset": dataset},
            )
            return
        with self._lock:
            self._planner.written(node, dataset, reason, message, name, count, self._clock())

    def _create(self, node: str, dataset: str, reason: str, message: str) -> str:
        now = _timestamp()
        involved: dict[str, str] = {"kind": "Node", "apiVersion": "v1", "name": node}
        uid = self._node_uid(node)
        if uid:
            involved["uid"] = uid
        body = {
            "metadata": {"generateName": f"{node}.", "namespace": self._settings.namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": "Warning" if reason in _WARNING_REASONS else "Normal",
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": SOURCE_COMPONENT},
            "reportingComponent": REPORTING_CONTROLLER,
            "reportingInstance": self._settings.reporting_instance,
            "action": reason,
        }
        created = self._api.create_namespaced_event(self._settings.namespace, body)
        name: str = created.metadata.name
        log.info("%s: %s", reason, message, extra={"node": node, "dataset": dataset})
        return name
