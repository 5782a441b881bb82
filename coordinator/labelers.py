"""Where node labels go: the narrow `NodeLabeler` interface and its local implementation.

In a cluster, `k8s_labeler.KubernetesNodeLabeler` writes labels on Node objects; in local mode
(no cluster) `LocalNodeLabeler` keeps the same labels in the coordinator's store so the CLI can
show them. One conformance suite (tests/test_labeler_conformance.py) runs against both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from coordinator.store import Store


class NodeLabeler(Protocol):
    async def get_labels(self, node: str) -> dict[str, str]:
        """The labels datacache owns on `node` (empty when none or the node is unknown)."""
        ...

    async def set_labels(self, node: str, desired: Mapping[str, str]) -> bool:
        """Makes datacache's labels on `node` exactly `desired`, leaving every other label
        alone. Returns True when something changed. Raises `LabelerError` (`NodeMissing` when
        the node does not exist)."""
        ...

    async def labelled_nodes(self) -> dict[str, Mapping[str, str]]:
        """Every node carrying datacache labels, with those labels (not to be changed)."""
        ...


class LocalNodeLabeler:
    """Records labels in the coordinator's SQLite store (local mode: no Kubernetes API)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def get_labels(self, node: str) -> dict[str, str]:
        return self._store.local_labels_of(node)

    async def set_labels(self, node: str, desired: Mapping[str, str]) -> bool:
        if self._store.local_labels_of(node) == dict(desired):
            return False
        self._store.set_local_labels(node, desired)
        return True

    async def labelled_nodes(self) -> dict[str, Mapping[str, str]]:
        return self._store.labelled_local_nodes()
