"""Demand state and the DemandService gRPC API.

`DemandTracker` holds the current demand (annotated pods from the pod watch, explicit leases
from `SetDemand`) and `DemandScaler` turns it into replica targets with a cool-down; both are
in memory: after a coordinator restart the pod watch re-lists pods and controllers renew their
leases, and until then targets stay at what placement already holds (scale-down needs the
cool-down to pass again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from coordinator.cluster import NodeFacts
from coordinator.demand import (
    DatasetDemand,
    ExplicitDemand,
    PodDemand,
    ScaleState,
    Trial,
    demand_by_dataset,
    next_scale,
)
from coordinator.model import Toleration
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from datacache.validation import InvalidInput, validate_dataset_name

MAX_TRIALS = 10_000
MAX_TTL_SECONDS = 86_400
MAX_CLIENT_ID_CHARS = 253
MAX_CLIENTS_PER_DATASET = 1_000
_TOLERATION_OPERATORS = ("Equal", "Exists")
_TAINT_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


class DemandTracker:
    """Thread-safe current demand; `on_change` runs after every change (e.g. a reconcile
    trigger)."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, PodDemand] = {}
        self._explicit: dict[tuple[str, str], ExplicitDemand] = {}
        self.on_change = on_change

    def set_explicit(self, demand: ExplicitDemand) -> None:
        """Adds, renews or (trials == 0) withdraws one client's demand. Raises `TooMany` when
        a dataset already has `MAX_CLIENTS_PER_DATASET` clients."""
        key = (demand.dataset, demand.client_id)
        with self._lock:
            if demand.trials <= 0:
                if self._explicit.pop(key, None) is None:
                    return
            else:
                if key not in self._explicit:
                    count = sum(1 for d, _ in self._explicit if d == demand.dataset)
                    if count >= MAX_CLIENTS_PER_DATASET:
                        raise TooMany(
                            f"dataset {demand.dataset} already has {count} demand clients; "
                            "reuse a client_id or let old demand expire"
                        )
                self._explicit[key] = demand
        self.on_change()

    def replace_pods(self, pods: Iterable[PodDemand]) -> None:
        fresh = {p.pod: p for p in pods}
        with self._lock:
            if fresh == self._pods:
                return
            self._pods = fresh
        self.on_change()

    def set_pod(self, key: str, demand: PodDemand | None) -> None:
        with self._lock:
            if demand is None:
                if self._pods.pop(key, None) is None:
                    return
            elif self._pods.get(key) == demand:
                return
            else:
                self._pods[key] = demand
        self.on_change()

    def demand(self, nodes: Mapping[str, NodeFacts], now: float) -> dict[str, DatasetDemand]:
        with self._lock:
            expired = [k for k, d in self._explicit.items() if d.expires_at <= now]
            for key in expired:
                del self._explicit[key]
            pods, explicit = list(self._pods.values()), list(self._explicit.values())
        return demand_by_dataset(pods, explicit, nodes, now)

    def next_expiry(self) -> float | None:
        """When the earliest explicit demand expires (Unix time), to re-evaluate then."""
        with self._lock:
            return min((d.expires_at for d in self._explicit.values()), default=None)


class TooMany(Exception):
    pass


class DemandScaler:
    """Replica targets per dataset, with the cool-down state between passes."""

    def __init__(self, cooldown_seconds: float) -> None:
        self.cooldown_seconds = cooldown_seconds
        self._states: dict[str, ScaleState] = {}
        self._floors: dict[str, int] = {}
        self._lock = threading.Lock()

    def targets(
        self,
        specs: Iterable[tuple[str, int, int]],
        demand: Mapping[str, DatasetDemand],
        now: float,
        held: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """`specs` are (dataset, replicas, max_replicas); returns each dataset's target.
        `held` is how many replicas placement already holds per dataset: a dataset seen for
        the first time (e.g. after a restart) keeps those for a cool-down rather than
        dropping them before the pod watch has listed the pods that want them."""
        out: dict[str, int] = {}
        held = held or {}
        with self._lock:
            seen = set()
            for name, replicas, max_replicas in specs:
                previous = self._states.get(name)
                if previous is None and held.get(name, 0) > replicas:
                    previous = ScaleState(min(held[name], max(replicas, max_replicas)), now)
                state = next_scale(
                    replicas,
                    max_replicas,
                    demand.get(name),
                    previous,
                    now,
                    self.cooldown_seconds,
                )
                self._states[name] = state
                self._floors[name] = replicas
                out[name] = state.target
                seen.add(name)
            for gone in self._states.keys() - seen:
                del self._states[gone]
                self._floors.pop(gone, None)
        return out

    def next_cooldown_end(self) -> float | None:
        """When the earliest raised target may fall (Unix time), to re-evaluate then."""
        with self._lock:
            return min(
                (
                    s.confirmed_at + self.cooldown_seconds
                    for name, s in self._states.items()
                    if s.target > self._floors.get(name, 0)
                ),
                default=None,
            )

    def target(self, name: str) -> int | None:
        with self._lock:
            state = self._states.get(name)
            return state.target if state else None


def trial_from_pb(node_selector: Mapping[str, str], tolerations: Iterable[pb.Toleration]) -> Trial:
    parsed = []
    for t in tolerations:
        operator = t.operator or "Equal"
        if operator not in _TOLERATION_OPERATORS:
            raise InvalidInput(f"toleration operator {t.operator!r}: use Equal or Exists")
        if t.effect not in _TAINT_EFFECTS:
            raise InvalidInput(
                f"toleration effect {t.effect!r}: use NoSchedule, PreferNoSchedule, NoExecute "
                "or leave it empty for all"
            )
        if operator == "Exists" and t.value:
            raise InvalidInput(f"toleration for {t.key!r}: operator Exists takes no value")
        parsed.append(Toleration(t.key, operator, t.value, t.effect))
    return Trial(node_selector=dict(node_selector), tolerations=tuple(parsed))


class DemandService(pb_grpc.DemandServiceServicer):
    def __init__(
        self,
        tracker: DemandTracker,
        dataset_exists: Callable[[str], bool],
        target_of: Callable[[str], int | None],
    ) -> None:
        self._tracker = tracker
        self._exists = dataset_exists
        self._target_of = target_of

    async def SetDemand(
        self, request: pb.SetDemandRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetDemandResponse:
        try:
            name = validate_dataset_name(request.dataset_name)
            client = request.client_id
            if not 0 < len(client) <= MAX_CLIENT_ID_CHARS or not client.isprintable():
                raise InvalidInput(
                    f"client_id must be 1-{MAX_CLIENT_ID_CHARS} printable characters, "
                    f"got {client[:40]!r}"
                )
            if not 0 <= request.trials <= MAX_TRIALS:
                raise InvalidInput(f"trials must be 0-{MAX_TRIALS}, got {request.trials}")
            if not 0 < request.ttl_seconds <= MAX_TTL_SECONDS:
                raise InvalidInput(
                    f"ttl_seconds must be 1-{MAX_TTL_SECONDS}, got {request.ttl_seconds}"
                )
            trial = trial_from_pb(request.node_selector, request.tolerations)
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("abort raises") from exc
        if not self._exists(name):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"dataset {name} does not exist: create it before declaring demand",
            )
        expires_at = time.time() + request.ttl_seconds
        try:
            self._tracker.set_explicit(
                ExplicitDemand(name, client, request.trials, expires_at, trial)
            )
        except TooMany as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        expire_time = Timestamp()
        expire_time.FromNanoseconds(int(expires_at * 1e9))
        return pb.SetDemandResponse(
            target_replicas=self._target_of(name) or 0, expire_time=expire_time
        )
