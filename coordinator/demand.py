"""Demand-driven replica counts for sweeps: pure decisions, no I/O.

Demand for a dataset is the number of trials that want to read it now: pods annotated with
`datacache.io/dataset` that are pending or running (from a pod watch), plus explicit demand
from sweep controllers (`DemandService.SetDemand`, leased so forgotten demand expires).

A dataset with `max_replicas > replicas` is scaled to

    target = clamp(min(demand, nodes where the demanding trials can run), replicas, max_replicas)

so every trial can get a node holding the data. The target rises at once and falls only after
demand has stayed below it for the cool-down, never below `replicas`. Placement puts the extra
replicas on nodes where the demanding pods can run (their node selector, required node
affinity, tolerations and extended resources such as GPUs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from coordinator.cluster import NodeFacts, Taint
from coordinator.labels import LABEL_PREFIX
from coordinator.model import Toleration
from coordinator.placement import tolerates
from datacache.validation import InvalidInput, validate_dataset_name


def tolerates_all(tolerations: Iterable[Toleration], taints: Iterable[Taint]) -> bool:
    """Whether a pod with `tolerations` may be scheduled on a node with `taints`
    (PreferNoSchedule taints never forbid it)."""
    tolerations = tuple(tolerations)
    return all(
        tolerates(tolerations, taint)
        for taint in taints
        if taint.effect in ("NoSchedule", "NoExecute")
    )


@dataclass(frozen=True)
class Requirement:
    """A node selector requirement (matchExpressions entry)."""

    key: str
    operator: str
    """In, NotIn, Exists, DoesNotExist, Gt or Lt."""
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        if self.operator == "DoesNotExist":
            return value is None
        if self.operator in ("Gt", "Lt") and value is not None and self.values:
            try:
                left, right = int(value), int(self.values[0])
            except ValueError:
                return False
            return left > right if self.operator == "Gt" else left < right
        return False


@dataclass(frozen=True)
class Trial:
    """What a pod (or an explicit demand) needs of a node."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    required_terms: tuple[tuple[Requirement, ...], ...] = ()
    """ORed terms of ANDed requirements; empty: any node. Requirements on datacache's own
    labels are left out: they say where the data is, not where the trial can run."""
    tolerations: tuple[Toleration, ...] = ()
    extended_resources: Mapping[str, int] = field(default_factory=dict)
    """Requested countable resources such as nvidia.com/gpu, summed over containers."""

    def can_run_on(self, node: NodeFacts) -> bool:
        if node.unschedulable:
            return False
        if any(node.labels.get(k) != v for k, v in self.node_selector.items()):
            return False
        if self.required_terms and not any(
            all(r.matches(node.labels) for r in term) for term in self.required_terms
        ):
            return False
        if not tolerates_all(self.tolerations, node.taints):
            return False
        return all(
            node.extended_resources.get(name, 0) >= amount
            for name, amount in self.extended_resources.items()
            if amount > 0
        )


@dataclass(frozen=True)
class PodDemand:
    """An annotated pod that is pending or running."""

    pod: str
    """<namespace>/<name>."""
    datasets: tuple[str, ...]
    trial: Trial
    node_name: str = ""
    """Where it runs, once scheduled."""


@dataclass(frozen=True)
class ExplicitDemand:
    dataset: str
    client_id: str
    trials: int
    expires_at: float
    """Unix time, seconds."""
    trial: Trial = field(default_factory=Trial)


@dataclass(frozen=True)
class DatasetDemand:
    """Demand for one dataset right now."""

    trials: int
    nodes: frozenset[str]
    """Nodes where at least one demanding trial can run."""


def demand_by_dataset(
    pods: Iterable[PodDemand],
    explicit: Iterable[ExplicitDemand],
    nodes: Mapping[str, NodeFacts],
    now: float,
) -> dict[str, DatasetDemand]:
    trials: dict[str, int] = {}
    where: dict[str, set[str]] = {}
    # Trials hold dicts (not hashable); pods of one sweep usually share few distinct shapes.
    eligible_cache: dict[str, frozenset[str]] = {}

    def eligible(trial: Trial) -> frozenset[str]:
        key = repr(trial)
        if key not in eligible_cache:
            eligible_cache[key] = frozenset(n for n, f in nodes.items() if trial.can_run_on(f))
        return eligible_cache[key]

    for pod in pods:
        run_on = frozenset([pod.node_name]) if pod.node_name else eligible(pod.trial)
        for dataset in pod.datasets:
            trials[dataset] = trials.get(dataset, 0) + 1
            where.setdefault(dataset, set()).update(run_on)
    for demand in explicit:
        if demand.expires_at <= now or demand.trials <= 0:
            continue
        trials[demand.dataset] = trials.get(demand.dataset, 0) + demand.trials
        where.setdefault(demand.dataset, set()).update(eligible(demand.trial))
    return {d: DatasetDemand(trials[d], frozenset(where.get(d, ()))) for d in trials}


@dataclass(frozen=True)
class ScaleState:
    target: int
    confirmed_at: float
    """Last time demand justified `target` (Unix time, seconds)."""


def wanted_replicas(replicas: int, max_replicas: int, demand: DatasetDemand | None) -> int:
    """The replica count demand asks for right now, before the cool-down."""
    if max_replicas <= replicas or demand is None:
        return replicas
    return max(replicas, min(max_replicas, demand.trials, len(demand.nodes)))


def next_scale(
    replicas: int,
    max_replicas: int,
    demand: DatasetDemand | None,
    previous: ScaleState | None,
    now: float,
    cooldown_seconds: float,
) -> ScaleState:
    """Raises the target at once; lowers it only after `cooldown_seconds` without demand for
    it, so a sweep's next wave finds its replicas still there."""
    wanted = wanted_replicas(replicas, max_replicas, demand)
    if previous is None or wanted >= previous.target:
        return ScaleState(wanted, now)
    ceiling = max(replicas, min(previous.target, max_replicas))
    if now - previous.confirmed_at >= cooldown_seconds:
        return ScaleState(wanted, now)
    return ScaleState(ceiling, previous.confirmed_at)


DATASET_ANNOTATION = "datacache.io/dataset"
_DONE_PHASES = ("Succeeded", "Failed")


def _quantity_count(value: object) -> int:
    """Extended resources are whole numbers ("2"); anything else counts as 0."""
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0


def pod_demand(obj: Mapping[str, object]) -> PodDemand | None:
    """The demand of one Pod object (JSON form), or None when it wants no dataset or has
    finished. Annotation values that are not valid names are ignored here: the webhook
    refuses such pods at creation."""
    meta = obj.get("metadata")
    spec = obj.get("spec")
    status = obj.get("status")
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        return None
    if isinstance(status, dict) and status.get("phase") in _DONE_PHASES:
        return None
    if meta.get("deletionTimestamp"):
        return None
    raw = (meta.get("annotations") or {}).get(DATASET_ANNOTATION)
    if not raw:
        return None
    namespace = str(meta.get("namespace") or "default")
    datasets: list[str] = []
    for item in (p.strip() for p in str(raw).split(",")):
        try:
            name = validate_dataset_name(item if "/" in item else f"{namespace}/{item}")
        except InvalidInput:
            continue
        if name not in datasets:
            datasets.append(name)
    if not datasets:
        return None
    return PodDemand(
        pod=f"{namespace}/{meta.get('name', '')}",
        datasets=tuple(datasets),
        trial=_trial(spec),
        node_name=str(spec.get("nodeName") or ""),
    )


def _trial(spec: Mapping[str, object]) -> Trial:
    selector = spec.get("nodeSelector")
    affinity = spec.get("affinity")
    node_affinity = affinity.get("nodeAffinity") if isinstance(affinity, dict) else None
    required = (
        (node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        if isinstance(node_affinity, dict)
        else {}
    )
    terms: list[tuple[Requirement, ...]] = []
    for term in required.get("nodeSelectorTerms") or []:
        requirements = tuple(
            Requirement(
                str(e.get("key", "")),
                str(e.get("operator", "")),
                tuple(str(v) for v in e.get("values") or []),
            )
            for e in term.get("matchExpressions") or []
            if not str(e.get("key", "")).startswith(f"{LABEL_PREFIX}/")
        )
        terms.append(requirements)
    if any(not t for t in terms):
        terms = []  # a term with no (other) requirement matches every node
    tolerations = tuple(
        Toleration(
            key=str(t.get("key") or ""),
            operator=str(t.get("operator") or "Equal"),
            value=str(t.get("value") or ""),
            effect=str(t.get("effect") or ""),
        )
        for t in spec.get("tolerations") or []  # type: ignore[attr-defined]
        if isinstance(t, dict)
    )
    resources: dict[str, int] = {}
    for container in spec.get("containers") or []:  # type: ignore[attr-defined]
        requests = ((container or {}).get("resources") or {}).get("requests") or {}
        limits = ((container or {}).get("resources") or {}).get("limits") or {}
        for name, value in {**limits, **requests}.items():
            if "/" in name and not name.startswith("kubernetes.io/"):
                resources[name] = resources.get(name, 0) + _quantity_count(value)
    return Trial(
        node_selector=(
            {str(k): str(v) for k, v in selector.items()} if isinstance(selector, dict) else {}
        ),
        required_terms=tuple(terms),
        tolerations=tolerations,
        extended_resources=resources,
    )
