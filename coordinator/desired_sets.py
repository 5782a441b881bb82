"""The desired set of every node: kept per dataset (`DesiredIndex`) and handed to the agents'
streams (`DesiredStateHub`). Bookkeeping only, no I/O.

A reconcile pass hands over the per-node entries of each dataset it recomputed; the index
tells which nodes' sets changed since the last publication, so a pass publishes only those
(and nodes it did not publish last time) instead of rebuilding the sets of every node. The hub
wakes only the streams of nodes whose set changed: with thousands of streams, waking all of
them on every change cost more than the change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Set
from dataclasses import dataclass

from coordinator.cluster import S3Credentials


@dataclass(frozen=True)
class DesiredDataset:
    name: str
    source: str
    revision: int = 0
    version: str = ""
    """The fixed version of `revision`, '' until a copy fixed it."""
    credentials: S3Credentials | None = None
    peers: tuple[tuple[str, str], ...] = ()
    """(node, address) of agents holding a Ready copy of `version` to copy from first."""


class DesiredIndex:
    def __init__(self) -> None:
        self._by_dataset: dict[str, Mapping[str, DesiredDataset]] = {}
        self._by_node: dict[str, dict[str, DesiredDataset]] = {}
        self._changed: set[str] = set()
        self._published: set[str] = set()

    def dataset(self, name: str) -> Mapping[str, DesiredDataset]:
        """What `name` is desired as, by node (empty when nowhere)."""
        return self._by_dataset.get(name, {})

    def set_dataset(self, name: str, per_node: Mapping[str, DesiredDataset]) -> None:
        """Sets where `name` is desired and as what."""
        old = self._by_dataset.get(name, {})
        if per_node is old:
            return
        kept: dict[str, DesiredDataset] = {}
        for node in old.keys() | per_node.keys():
            before, after = old.get(node), per_node.get(node)
            if before is not None and (before is after or before == after):
                kept[node] = before  # the published object stays the one referenced
                continue
            mine = self._by_node.setdefault(node, {})
            if after is None:
                del mine[name]
                if not mine:
                    del self._by_node[node]
            else:
                mine[name] = kept[node] = after
            self._changed.add(node)
        if kept:
            self._by_dataset[name] = kept
        else:
            self._by_dataset.pop(name, None)

    def keep_only(self, names: Set[str]) -> None:
        """Forgets every dataset not in `names`."""
        for name in self._by_dataset.keys() - names:
            self.set_dataset(name, {})

    def updates(self, live: Set[str]) -> dict[str, tuple[DesiredDataset, ...]]:
        """The sets to publish now, by node, sorted by dataset name.

        Sets are published for live nodes and nodes desired to hold something; of those, the
        ones that changed since the last call and the ones the last call did not publish
        (publishing the rest again would change nothing)."""
        publish = set(live) | self._by_node.keys()
        nodes = (self._changed & publish) | (publish - self._published)
        self._changed.clear()
        self._published = publish
        return {
            node: tuple(sorted(self._by_node.get(node, {}).values(), key=lambda d: d.name))
            for node in sorted(nodes)
        }


class DesiredStateHub:
    """The desired set of every node, and a generation counter streams wait on."""

    def __init__(self) -> None:
        self._sets: dict[str, tuple[DesiredDataset, ...]] = {}
        self._generations: dict[str, int] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    async def publish(self, desired: Mapping[str, tuple[DesiredDataset, ...]]) -> None:
        """Sets the desired set of each node in `desired`; a node's generation moves (and its
        streams wake) when its set changed or it had none."""
        for node, datasets in desired.items():
            if self._sets.get(node) != datasets or node not in self._generations:
                self._sets[node] = datasets
                self._generations[node] = self._generations.get(node, 0) + 1
                for waiter in self._waiters.pop(node, ()):
                    _wake(waiter)

    def snapshot(self, node: str) -> tuple[int, tuple[DesiredDataset, ...]]:
        return self._generations.get(node, 0), self._sets.get(node, ())

    async def wait_newer(
        self, node: str, generation: int, wait_seconds: float
    ) -> tuple[int, tuple[DesiredDataset, ...]]:
        """Waits until the node's generation exceeds `generation` or `wait_seconds` pass."""
        if self._generations.get(node, 0) <= generation:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(node, set())
            waiters.add(waiter)
            timer = loop.call_later(wait_seconds, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                waiters.discard(waiter)
                if not waiters and self._waiters.get(node) is waiters:
                    del self._waiters[node]
        return self.snapshot(node)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
