"""An in-memory copy of the store's hot tables: datasets, agents, assignments, replica reports,
fixed versions (without their manifests) and local labels.

Every report reads its node's agent and earlier reports, and every reconcile pass reads all of
them: from SQLite that meant parsing thousands of rows per pass. The `Store` fills this cache
once, applies each of its own writes after the commit (by reading the written rows back, so
the cache holds exactly what SQLite would return) and reloads it when another connection
changed the database (`PRAGMA data_version`).

Values are immutable (frozen records, frozensets) or handed out as read-only `Mapping`s that
are replaced, never changed in place (the per-dataset and per-node report maps): a caller may
keep what it read across an `await` and see a consistent snapshot, and an unchanged map stays
the same object, so comparing it with an earlier read is cheap. (Plain dicts rather than
read-only proxies: every report replaces a few maps, and each object that lives until the
next report adds to what Python's garbage collector has to scan.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from coordinator.model import AgentRecord, DatasetRecord, ReplicaReport, VersionRecord

_EMPTY: Mapping[str, ReplicaReport] = MappingProxyType({})
"""The map of a dataset or node without reports."""


class StoreCache:
    def __init__(self) -> None:
        self.datasets: dict[str, DatasetRecord] = {}
        self.agents: dict[str, AgentRecord] = {}
        self.assignments: dict[str, frozenset[str]] = {}
        """Nodes by dataset; datasets without nodes are absent."""
        self.by_dataset: dict[str, Mapping[str, ReplicaReport]] = {}
        """Reports by dataset, then node; datasets without reports are absent."""
        self.by_node: dict[str, Mapping[str, ReplicaReport]] = {}
        """Reports by node, then dataset; nodes without reports are absent."""
        self.versions: dict[tuple[str, int], VersionRecord] = {}
        self.labels: dict[str, Mapping[str, str]] = {}
        """Local labels by node (read-only views); nodes without labels are absent."""

    # Datasets and versions --------------------------------------------------------------------

    def put_dataset(self, name: str, record: DatasetRecord | None) -> None:
        if record is None:
            self.datasets.pop(name, None)
        else:
            self.datasets[name] = record

    def put_versions(self, dataset: str, versions: Iterable[VersionRecord]) -> None:
        """Replaces every fixed version of `dataset`."""
        for key in [k for k in self.versions if k[0] == dataset]:
            del self.versions[key]
        for version in versions:
            self.versions[(version.dataset, version.revision)] = version

    def drop_dataset(self, name: str) -> None:
        self.datasets.pop(name, None)
        self.assignments.pop(name, None)
        self.put_versions(name, ())
        for node in list(self.by_dataset.get(name, _EMPTY)):
            here = dict(self.by_node.get(node, _EMPTY))
            here.pop(name, None)
            self._set(self.by_node, node, here)
        self.by_dataset.pop(name, None)

    # Agents and reports -----------------------------------------------------------------------

    def put_agent(self, name: str, record: AgentRecord | None) -> None:
        if record is None:
            self.agents.pop(name, None)
        else:
            self.agents[name] = record

    def put_node_reports(self, node: str, reports: Iterable[ReplicaReport]) -> None:
        """Replaces every report of `node`."""
        old = self.by_node.get(node, _EMPTY)
        new = {r.dataset: r for r in reports}
        for dataset in old.keys() | new.keys():
            here = dict(self.by_dataset.get(dataset, _EMPTY))
            if dataset in new:
                here[node] = new[dataset]
            else:
                here.pop(node, None)
            self._set(self.by_dataset, dataset, here)
        self._set(self.by_node, node, new)

    def drop_node(self, node: str, keep_agent: bool) -> None:
        """Forgets a node's reports and assignments (and its agent unless `keep_agent`)."""
        self.put_node_reports(node, ())
        for dataset in [d for d, nodes in self.assignments.items() if node in nodes]:
            self._set_assigned(dataset, self.assignments[dataset] - {node})
        if not keep_agent:
            self.agents.pop(node, None)

    # Assignments ------------------------------------------------------------------------------

    def set_assignments(self, desired: Mapping[str, frozenset[str]]) -> None:
        """Makes the assignments `desired`, keeping unchanged sets as the same objects."""
        for dataset in self.assignments.keys() | desired.keys():
            nodes = desired.get(dataset, frozenset())
            if self.assignments.get(dataset, frozenset()) != nodes:
                self._set_assigned(dataset, frozenset(nodes))

    def _set_assigned(self, dataset: str, nodes: frozenset[str]) -> None:
        if nodes:
            self.assignments[dataset] = nodes
        else:
            self.assignments.pop(dataset, None)

    # Local labels -----------------------------------------------------------------------------

    def put_labels(self, node: str, labels: Mapping[str, str]) -> None:
        if labels:
            self.labels[node] = MappingProxyType(dict(labels))
        else:
            self.labels.pop(node, None)

    @staticmethod
    def _set(
        index: dict[str, Mapping[str, ReplicaReport]], key: str, value: dict[str, ReplicaReport]
    ) -> None:
        if value:
            index[key] = value
        else:
            index.pop(key, None)
