"""Pure translation between Dataset custom resources (`datacache.io/v1alpha1`) and the
coordinator's API objects: CR spec -> `pb.Dataset` and the update mask that brings a dataset to
it, `pb.Dataset` -> CR status (with conditions), and when an interval refresh is due.

No I/O: `coordinator.k8s_datasets` is the adapter that reads and writes both sides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from datacache.v1 import datacache_pb2 as pb

GROUP = "datacache.io"
VERSION = "v1alpha1"
PLURAL = "datasets"
FINALIZER = "datacache.io/dataset"
"""Held on every Dataset CR until the coordinator has deleted the dataset (labels first, then
the copies), so `kubectl delete` is ordered and never leaves a dataset behind."""

MIN_REFRESH_SECONDS = 60
_INTERVAL = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_STATES = {
    pb.REPLICA_STATE_PENDING: "Pending",
    pb.REPLICA_STATE_FETCHING: "Fetching",
    pb.REPLICA_STATE_READY: "Ready",
    pb.REPLICA_STATE_FAILED: "Failed",
    pb.REPLICA_STATE_EVICTING: "Evicting",
}
_PHASES = frozenset({"Pending", "Replicating", "Ready", "Degraded", "Failed", "Deleting"})
# Fields of a dataset a CR controls, as UpdateDataset mask paths.
MASK_PATHS = (
    "source",
    "replicas",
    "all_nodes",
    "node_selector",
    "tolerations",
    "pin",
    "credentials_secret",
)


class SpecError(ValueError):
    """A Dataset CR's spec cannot be applied; the message names the field and the fix."""


def dataset_name(namespace: str, name: str) -> str:
    """CR `namespace/name` is dataset `namespace/name`."""
    return f"{namespace}/{name}"


def parse_interval(text: str) -> int:
    """ "6h", "1h30m", "90s" -> seconds; SpecError if malformed or under a minute."""
    match = _INTERVAL.match(text or "")
    if not text or match is None:
        raise SpecError(
            f"spec.refreshPolicy.interval {text!r} is not a duration: use hours, minutes and "
            "seconds such as 30m, 6h or 1h30m"
        )
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < MIN_REFRESH_SECONDS:
        raise SpecError(
            f"spec.refreshPolicy.interval {text!r} is shorter than {MIN_REFRESH_SECONDS}s: "
            "each refresh lists the whole source again"
        )
    return total


def desired_dataset(namespace: str, name: str, spec: Mapping[str, Any]) -> pb.Dataset:
    """The dataset a CR spec asks for. SpecError for what the CRD schema cannot rule out."""
    source = spec.get("source")
    if not isinstance(source, str) or not source:
        raise SpecError("spec.source is required, e.g. s3://bucket/prefix/")
    all_nodes = spec.get("all") is True
    replicas = spec.get("replicas")
    if all_nodes and replicas is not None:
        raise SpecError("give either spec.replicas or spec.all: true, not both")
    if not all_nodes and not isinstance(replicas, int):
        raise SpecError("spec.replicas (1-10000) or spec.all: true is required")
    tolerations = []
    for i, t in enumerate(spec.get("tolerations") or []):
        if not isinstance(t, Mapping):
            raise SpecError(f"spec.tolerations[{i}] must be an object")
        tolerations.append(
            pb.Toleration(
                key=str(t.get("key", "")),
                operator=str(t.get("operator", "")),
                value=str(t.get("value", "")),
                effect=str(t.get("effect", "")),
            )
        )
    secret = spec.get("credentialsSecretRef") or {}
    refresh = spec.get("refreshPolicy") or {}
    if refresh.get("interval") is not None:
        parse_interval(str(refresh["interval"]))
    return pb.Dataset(
        name=dataset_name(namespace, name),
        source=source,
        replicas=0 if all_nodes else int(replicas or 0),
        all_nodes=all_nodes,
        node_selector={str(k): str(v) for k, v in (spec.get("nodeSelector") or {}).items()},
        tolerations=tolerations,
        pin=spec.get("pin") is True,
        credentials_secret=str(secret.get("name", "")),
    )


def update_mask(current: pb.Dataset, desired: pb.Dataset) -> list[str]:
    """The paths whose values differ: what UpdateDataset must change."""
    paths = []
    for path in MASK_PATHS:
        if path == "replicas" and desired.all_nodes:
            continue  # ignored while all_nodes is set; keep the last count
        if path == "tolerations":
            differs = list(current.tolerations) != list(desired.tolerations)
        elif path == "node_selector":
            differs = dict(current.node_selector) != dict(desired.node_selector)
        else:
            differs = getattr(current, path) != getattr(desired, path)
        if differs:
            paths.append(path)
    return paths


def refresh_due_in(
    interval: str | None, last_refresh: str | None, created: str, now: datetime
) -> float | None:
    """Seconds until the next interval refresh (<= 0: due now); None without an interval.
    Counted from the last refresh, or from the CR's creation."""
    if not interval:
        return None
    seconds = parse_interval(interval)
    since = _parse_time(last_refresh) or _parse_time(created) or now
    return seconds - (now - since).total_seconds()


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _progress(done: int, total: int) -> str:
    if total <= 0:
        return ""
    return f"{min(100.0, 100.0 * done / total):.0f}%"


def _phase(dataset: pb.Dataset, wanted: int) -> str:
    if dataset.status.phase in _PHASES:
        return dataset.status.phase
    ready = dataset.status.ready_replicas
    if ready == 0:
        return "Pending"
    return "Ready" if dataset.all_nodes or ready >= wanted else "Replicating"


def _condition(
    previous: Sequence[Mapping[str, Any]],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    # The transition time moves only when the status flips, as the API conventions ask.
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since or rfc3339(now),
    }


def status_of(
    dataset: pb.Dataset | None,
    previous: Mapping[str, Any],
    generation: int,
    now: datetime,
    *,
    sync_error: tuple[str, str] | None = None,
    deleting: bool = False,
    last_refresh: str | None = None,
) -> dict[str, Any]:
    """The CR status for `dataset` (None: not in the coordinator). `sync_error` is (reason,
    message) when the spec could not be applied; `previous` is the current CR status."""
    conditions = previous.get("conditions") or []
    status: dict[str, Any] = {"observedGeneration": generation}
    if last_refresh or previous.get("lastRefreshTime"):
        status["lastRefreshTime"] = last_refresh or previous.get("lastRefreshTime")
    if dataset is None:
        status["phase"] = "Deleting" if deleting else "Pending"
        status["readyReplicas"] = 0
        status["replicas"] = []
    else:
        wanted = dataset.replicas
        status.update(
            phase="Deleting" if deleting else _phase(dataset, wanted),
            version=dataset.status.version,
            revision=dataset.revision,
            readyReplicas=dataset.status.ready_replicas,
            replicasSummary=(
                f"{dataset.status.ready_replicas}/{'all' if dataset.all_nodes else wanted}"
            ),
            sizeBytes=dataset.status.size_bytes,
            replicas=[
                {
                    "node": r.node_name,
                    "state": _STATES.get(r.state, "Unknown"),
                    "revision": r.revision,
                    "digest": r.digest,
                    "servingVersion": r.serving_version,
                    "filesDone": r.files_done,
                    "filesTotal": r.files_total,
                    "bytesDone": r.bytes_done,
                    "bytesTotal": r.bytes_total,
                    "progress": _progress(r.bytes_done, r.bytes_total),
                    "message": r.message,
                }
                for r in dataset.status.replicas
            ],
        )
    phase = status["phase"]
    if sync_error is not None:
        synced = _condition(conditions, "Synced", False, *sync_error, generation, now)
    else:
        synced = _condition(
            conditions,
            "Synced",
            True,
            "Applied",
            "spec applied to the coordinator",
            generation,
            now,
        )
    ready = _condition(
        conditions,
        "Ready",
        phase == "Ready",
        phase or "Pending",
        f"{status['readyReplicas']} ready replica(s)",
        generation,
        now,
    )
    status["conditions"] = [ready, synced]
    return status


def same_status(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal apart from condition transition times (which `status_of` keeps stable anyway)."""

    def strip(status: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(status)
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in status.get("conditions") or []
        ]
        return out

    return strip(a) == strip(b)
