"""The API view of datasets: per-node replica rows, phase, and the status fingerprint that
decides when a dataset's resource version moves. Pure functions of stored records."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from coordinator.model import DatasetRecord, ReplicaReport, ReplicaState, VersionRecord
from datacache.v1 import datacache_pb2 as pb

STATE_TO_PB = {
    ReplicaState.PENDING: pb.REPLICA_STATE_PENDING,
    ReplicaState.FETCHING: pb.REPLICA_STATE_FETCHING,
    ReplicaState.READY: pb.REPLICA_STATE_READY,
    ReplicaState.FAILED: pb.REPLICA_STATE_FAILED,
    ReplicaState.EVICTING: pb.REPLICA_STATE_EVICTING,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}

PHASE_PENDING = "Pending"
PHASE_REPLICATING = "Replicating"
PHASE_READY = "Ready"
PHASE_DEGRADED = "Degraded"
PHASE_FAILED = "Failed"
PHASE_DELETING = "Deleting"


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def is_current(report: ReplicaReport, record: DatasetRecord) -> bool:
    """Whether a report is about the dataset's current revision (agents that do not know
    revisions report 0, which means whatever they were last sent)."""
    return is_current_revision(report, record.revision)


def is_current_revision(report: ReplicaReport, revision: int) -> bool:
    """`is_current` for a dataset whose current revision is `revision`."""
    return report.revision in (0, revision)


def counts_ready(report: ReplicaReport, record: DatasetRecord) -> bool:
    return report.state is ReplicaState.READY and is_current(report, record)


def serves(report: ReplicaReport) -> bool:
    """Whether pods may read the node's copy: a Ready copy (of any revision), or an older
    version served while a newer one is fetched."""
    return report.state is ReplicaState.READY or bool(report.serving_version)


STATUS_IGNORES = frozenset(
    {"dataset", "update_time", "bytes_per_second", "last_used_time", "disk_bytes"}
)
"""Report fields a dataset's status fingerprint does not depend on: the dataset (implied), the
times and throughput `status_fingerprint` clears, and the bytes on disk (not shown)."""


def status_inputs(report: ReplicaReport) -> tuple[Any, ...]:
    """Everything of a report that a dataset's status fingerprint depends on: every field but
    `STATUS_IGNORES` (a reconcile pass recomputes a status only when these changed)."""
    return (
        report.node_name,
        report.state,
        report.digest,
        report.files_done,
        report.bytes_done,
        report.files_total,
        report.bytes_total,
        report.message,
        report.revision,
        report.verification,
        report.serving_version,
    )


STATUS_RECORD_IGNORES = frozenset({"resource_version", "update_time"})
"""Dataset record fields its status does not depend on (a status change moves them)."""


def status_record(record: DatasetRecord) -> tuple[Any, ...]:
    """Every field of a dataset record but `STATUS_RECORD_IGNORES`: what of the record a
    reconcile pass compares to decide whether to compute the status again."""
    return (
        record.name,
        record.source,
        record.replicas,
        record.create_time,
        record.deleting,
        record.all_nodes,
        record.node_selector,
        record.tolerations,
        record.pin,
        record.credentials_secret,
        record.revision,
        record.max_replicas,
    )


def replica_rows(
    record: DatasetRecord, assigned: frozenset[str], reports: Sequence[ReplicaReport]
) -> list[pb.Replica]:
    """Per-node replica rows: assigned nodes without a report are Pending; nodes reporting a
    dataset they are no longer assigned are Evicting. A Ready copy of an older revision is
    shown as Pending for the current one (its `serving_version` says what it serves)."""
    by_node = {r.node_name: r for r in reports}
    rows = []
    for node in sorted(assigned | by_node.keys()):
        report = by_node.get(node)
        if report is None:
            rows.append(
                pb.Replica(node_name=node, state=pb.REPLICA_STATE_PENDING, revision=record.revision)
            )
            continue
        state = report.state
        serving = report.serving_version
        if node not in assigned:
            state = ReplicaState.EVICTING
        elif state is ReplicaState.READY and not is_current(report, record):
            state, serving = ReplicaState.PENDING, serving or report.digest
        rows.append(
            pb.Replica(
                node_name=node,
                state=STATE_TO_PB[state],
                digest=report.digest,
                files_done=report.files_done,
                bytes_done=report.bytes_done,
                files_total=report.files_total,
                bytes_total=report.bytes_total,
                message=report.message,
                update_time=timestamp(report.update_time),
                revision=report.revision or record.revision,
                bytes_per_second=report.bytes_per_second,
                verification=pb.VerificationSummary(files_by_method=dict(report.verification)),
                last_used_time=(
                    timestamp(report.last_used_time) if report.last_used_time else None
                ),
                serving_version=serving,
            )
        )
    return rows


def phase_of(record: DatasetRecord, rows: Sequence[pb.Replica], wanted: int, problem: str) -> str:
    """'Pending', 'Replicating', 'Ready', 'Degraded', 'Failed' or 'Deleting'.

    `wanted` is how many Ready replicas the dataset should have; `problem` a reason the
    dataset cannot be fetched at all (e.g. its credentials are missing)."""
    if record.deleting:
        return PHASE_DELETING
    if problem:
        return PHASE_FAILED
    assigned = [r for r in rows if r.state != pb.REPLICA_STATE_EVICTING]
    ready = sum(1 for r in assigned if r.state == pb.REPLICA_STATE_READY)
    failed = sum(1 for r in assigned if r.state == pb.REPLICA_STATE_FAILED)
    working = sum(
        1 for r in assigned if r.state in (pb.REPLICA_STATE_PENDING, pb.REPLICA_STATE_FETCHING)
    )
    if wanted > 0 and ready >= wanted:
        return PHASE_READY
    if ready == 0:
        if failed and not working:
            return PHASE_FAILED
        if any(r.state == pb.REPLICA_STATE_FETCHING for r in assigned) or failed:
            return PHASE_REPLICATING
        return PHASE_PENDING
    if failed or len(assigned) < wanted:
        return PHASE_DEGRADED
    return PHASE_REPLICATING


def dataset_view(
    record: DatasetRecord,
    assigned: frozenset[str],
    live_reports: Sequence[ReplicaReport],
    fixed: VersionRecord | None,
    problem: str = "",
    demand: int = 0,
    target_replicas: int = 0,
) -> pb.Dataset:
    """The API view of a dataset from its record, assignments, the reports of live nodes, the
    fixed version of its current revision, a problem blocking it (or ''), the trials wanting
    it and the replica count demand raised it to (0: not raised)."""
    rows = replica_rows(record, assigned, live_reports)
    ready_rows = [r for r in rows if r.state == pb.REPLICA_STATE_READY]
    wanted = len(assigned) if record.all_nodes else max(record.replicas, target_replicas)
    if record.all_nodes and not assigned:
        wanted = 0
    version = fixed.version if fixed else next((r.digest for r in ready_rows if r.digest), "")
    size = fixed.total_bytes if fixed else 0
    if not size:
        size = max((r.bytes_total for r in live_reports if is_current(r, record)), default=0)
    if problem:
        # The reason shows on every row that is not Ready yet.
        for row in rows:
            if row.state in (pb.REPLICA_STATE_PENDING, pb.REPLICA_STATE_FAILED):
                row.message = row.message or problem
    return pb.Dataset(
        name=record.name,
        source=record.source,
        replicas=record.replicas,
        create_time=timestamp(record.create_time),
        all_nodes=record.all_nodes,
        node_selector=dict(record.node_selector),
        tolerations=[
            pb.Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            for t in record.tolerations
        ],
        pin=record.pin,
        credentials_secret=record.credentials_secret,
        revision=record.revision,
        resource_version=record.resource_version,
        max_replicas=record.max_replicas,
        update_time=timestamp(record.update_time or record.create_time),
        status=pb.DatasetStatus(
            ready_replicas=len(ready_rows),
            replicas=rows,
            version=version,
            size_bytes=size,
            phase=phase_of(record, rows, wanted, problem),
            demand=demand,
            target_replicas=wanted,
        ),
    )


def status_fingerprint(dataset: pb.Dataset, problem: str = "") -> str:
    """A digest of what a watcher should be told about: the status without report times and
    throughput (which change on every report without news)."""
    status = pb.DatasetStatus()
    status.CopyFrom(dataset.status)
    for row in status.replicas:
        row.ClearField("update_time")
        row.ClearField("bytes_per_second")
        row.ClearField("last_used_time")
    data = status.SerializeToString(deterministic=True) + problem.encode()
    return hashlib.sha256(data).hexdigest()[:32]
