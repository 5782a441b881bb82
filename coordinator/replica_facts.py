"""What a reconcile pass needs to know about one dataset's replicas, derived from the reports
of live nodes: pure functions, no I/O.

A pass derives these facts again only for datasets whose revision, live reporting nodes or
reports changed (see `FactsCache`; a report that changed only in `FACT_IGNORES`, as every
report without news does, changes nothing), and a recomputed part equal to the previous one is
kept as the previous object, so later steps (placement, labels, status) can tell what changed
by comparing objects that are mostly identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

from coordinator.model import ReplicaReport, ReplicaState
from coordinator.peers import PeerHolder
from coordinator.views import is_current_revision, serves, status_inputs

FACT_IGNORES = frozenset({"update_time", "bytes_per_second", "last_used_time"})
"""Report fields no fact depends on: they change with every report, news or not. A report
that changed only in these does not make the facts derived again, so these fields of
`DatasetFacts.live_reports` may be older than the store's: read them from the store."""


def fact_inputs(report: ReplicaReport) -> tuple[Any, ...]:
    """Every field of a report but `FACT_IGNORES`."""
    return (
        report.dataset,
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
        report.disk_bytes,
    )


@dataclass(frozen=True)
class DatasetFacts:
    live_reports: tuple[ReplicaReport, ...]
    """Reports of live nodes, by node name (their `FACT_IGNORES` fields may be stale)."""
    holding: frozenset[str]
    """Live nodes holding any copy (any state, any revision)."""
    ready: frozenset[str]
    """Live nodes with a Ready copy of the current revision."""
    serving: frozenset[str]
    """Live nodes whose copy pods may read (see `views.serves`)."""
    on_disk: Mapping[str, int]
    """Bytes of the dataset on each live node holding some."""
    size: int
    """Largest size reported for the current revision, 0 when none is."""
    peer_holders: tuple[PeerHolder, ...]
    """Live nodes holding a Ready copy with a known digest, for peer copying."""
    status: tuple[tuple[Any, ...], ...]
    """What of the reports the dataset's status shows (`views.status_inputs`)."""


def dataset_facts(
    revision: int, reports: Mapping[str, ReplicaReport], live: Set[str]
) -> DatasetFacts:
    """The facts of a dataset whose current revision is `revision`, from its reports by node
    and the live nodes."""
    live_reports = tuple(reports[n] for n in sorted(reports) if n in live)
    current = [r for r in live_reports if is_current_revision(r, revision)]
    return DatasetFacts(
        live_reports=live_reports,
        holding=frozenset(r.node_name for r in live_reports),
        ready=frozenset(r.node_name for r in current if r.state is ReplicaState.READY),
        serving=frozenset(r.node_name for r in live_reports if serves(r)),
        on_disk={r.node_name: r.disk_bytes or r.bytes_done for r in live_reports},
        size=max((r.bytes_total for r in current), default=0),
        peer_holders=tuple(
            PeerHolder(r.node_name, r.digest)
            for r in live_reports
            if r.state is ReplicaState.READY and r.digest
        ),
        status=tuple(status_inputs(r) for r in live_reports),
    )


def reuse_equal(new: DatasetFacts, old: DatasetFacts | None) -> DatasetFacts:
    """`new`, with every part equal to `old`'s replaced by `old`'s object."""
    if old is None:
        return new
    if new == old:
        return old
    return DatasetFacts(
        live_reports=old.live_reports if new.live_reports == old.live_reports else new.live_reports,
        holding=old.holding if new.holding == old.holding else new.holding,
        ready=old.ready if new.ready == old.ready else new.ready,
        serving=old.serving if new.serving == old.serving else new.serving,
        on_disk=old.on_disk if new.on_disk == old.on_disk else new.on_disk,
        size=new.size,
        peer_holders=old.peer_holders if new.peer_holders == old.peer_holders else new.peer_holders,
        status=old.status if new.status == old.status else new.status,
    )


class _Entry:
    __slots__ = ("facts", "inputs", "live", "reports", "revision")

    def __init__(
        self,
        revision: int,
        reports: Mapping[str, ReplicaReport],
        live: list[str],
        inputs: tuple[tuple[Any, ...], ...],
        facts: DatasetFacts,
    ) -> None:
        self.revision = revision
        self.reports = reports
        self.live = live
        self.inputs = inputs
        self.facts = facts


class FactsCache:
    """The facts of every dataset, derived again only when their inputs changed."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.derived = 0
        """How many times facts were derived (not reused), for tests and tuning."""

    def get(
        self, name: str, revision: int, reports: Mapping[str, ReplicaReport], live: Set[str]
    ) -> DatasetFacts:
        """The facts of dataset `name` (see `dataset_facts`)."""
        entry = self._entries.get(name)
        live_names = [n for n in reports if n in live]
        same_nodes = entry is not None and entry.revision == revision and entry.live == live_names
        if entry is not None and same_nodes and entry.reports is reports:
            return entry.facts
        inputs = tuple(fact_inputs(reports[n]) for n in live_names)
        if entry is not None and same_nodes and entry.inputs == inputs:
            entry.reports = reports  # the same facts; next time this is the fast path
            return entry.facts
        facts = reuse_equal(
            dataset_facts(revision, reports, live), entry.facts if entry is not None else None
        )
        self.derived += 1
        self._entries[name] = _Entry(revision, reports, live_names, inputs, facts)
        return facts

    def keep_only(self, names: Set[str]) -> None:
        for name in self._entries.keys() - names:
            del self._entries[name]
