"""The labels each node should carry, kept up to date from the nodes to label for each
dataset: pure bookkeeping, no I/O. The same result as `labels.desired_node_labels`, but a pass
pays only for the datasets whose labelled nodes changed."""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.labels import READY_VALUE, label_key


class LabelIndex:
    def __init__(self) -> None:
        self._nodes: dict[str, frozenset[str]] = {}
        """Labelled nodes by dataset."""
        self._keys: dict[str, str] = {}
        """Label key by dataset."""
        self._by_node: dict[str, dict[str, str]] = {}
        """Label key by dataset, by node."""
        self._labels: dict[str, Mapping[str, str]] = {}
        """Desired labels by node (replaced, never changed in place)."""

    def update(self, labelled: Mapping[str, frozenset[str]]) -> dict[str, Mapping[str, str]]:
        """Desired labels by node (nodes without labels are absent) from the nodes to label
        by dataset."""
        changed: set[str] = set()
        for dataset in self._nodes.keys() | labelled.keys():
            old = self._nodes.get(dataset, frozenset())
            new = labelled.get(dataset, frozenset())
            if old is new or old == new:
                continue
            key = self._keys.get(dataset) or label_key(dataset)
            for node in old - new:
                del self._by_node[node][dataset]
            for node in new - old:
                self._by_node.setdefault(node, {})[dataset] = key
            changed |= old ^ new
            if new:
                self._nodes[dataset] = new
                self._keys[dataset] = key
            else:
                self._nodes.pop(dataset, None)
                self._keys.pop(dataset, None)
        for node in changed:
            keys = self._by_node.get(node)
            if keys:
                self._labels[node] = dict.fromkeys(sorted(keys.values()), READY_VALUE)
            else:
                self._by_node.pop(node, None)
                self._labels.pop(node, None)
        return dict(self._labels)
