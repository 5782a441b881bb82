"""Placement's and demand's views of the live nodes, remembered per node so that a reconcile
pass builds again only the nodes whose agent or cluster facts changed. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any

from coordinator.cluster import NodeFacts
from coordinator.model import AgentRecord
from coordinator.placement import Node


class NodeViews:
    def __init__(self) -> None:
        self._nodes: dict[str, tuple[tuple[Any, ...], Node]] = {}
        self._facts: dict[str, tuple[tuple[Any, ...], NodeFacts]] = {}

    def node(self, agent: AgentRecord, fact: NodeFacts | None) -> Node:
        """Placement's view of a live node: the cluster's facts when known, otherwise the
        labels its agent registered with; the previous object when neither changed."""
        free = agent.free_bytes if agent.capacity_bytes > 0 else None
        key = (fact, free) if fact is not None else (agent.node_labels, free)
        known = self._nodes.get(agent.node_name)
        if known is not None and known[0] == key:
            return known[1]
        node = Node(
            name=agent.node_name,
            labels=dict(fact.labels) if fact is not None else dict(agent.node_labels),
            taints=fact.taints if fact is not None else (),
            unschedulable=fact.unschedulable if fact is not None else False,
            free_bytes=free,
        )
        self._nodes[agent.node_name] = (key, node)
        return node

    def demand_facts(
        self, nodes: Mapping[str, Node], cluster: Mapping[str, NodeFacts]
    ) -> Mapping[str, NodeFacts]:
        """What demand matching knows of the nodes placement may use: the cluster's facts,
        or facts made of placement's view. Built on first use (demand without any trial never
        looks at nodes)."""
        return LazyMapping(lambda: self._build_facts(nodes, cluster))

    def _build_facts(
        self, nodes: Mapping[str, Node], cluster: Mapping[str, NodeFacts]
    ) -> dict[str, NodeFacts]:
        out: dict[str, NodeFacts] = {}
        for name, node in nodes.items():
            key = (cluster.get(name), node)
            known = self._facts.get(name)
            if known is not None and known[0] == key:
                out[name] = known[1]
                continue
            fact = key[0] or NodeFacts(
                name, labels=node.labels, taints=node.taints, unschedulable=node.unschedulable
            )
            self._facts[name] = (key, fact)
            out[name] = fact
        return out

    def keep_only(self, names: Mapping[str, object]) -> None:
        """Forgets nodes not in `names` once they are many."""
        for memo in (self._nodes, self._facts):
            if len(memo) > 2 * len(names) + 100:
                for name in memo.keys() - names.keys():
                    del memo[name]


class LazyMapping(Mapping[str, Any]):
    """A read-only mapping built by `build` on first access."""

    def __init__(self, build: Callable[[], Mapping[str, Any]]) -> None:
        self._build = build
        self._data: Mapping[str, Any] | None = None

    def _get(self) -> Mapping[str, Any]:
        if self._data is None:
            self._data = self._build()
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, key: object) -> bool:
        return key in self._get()

    def keys(self) -> KeysView[str]:
        return self._get().keys()

    def items(self) -> ItemsView[str, Any]:
        return self._get().items()

    def values(self) -> ValuesView[Any]:
        return self._get().values()
