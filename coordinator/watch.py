"""Fan-out of dataset changes to WatchDatasets streams, bounded per client.

The store reports every committed change (`Change`); the feed hands it to every subscriber
whose filter matches. A subscriber keeps at most one pending change per dataset (the latest:
a watcher needs the current state, not every intermediate one), in resource-version order, and
the dataset is rendered only when the event is sent. When more than `limit` datasets are
pending (the client stopped reading), the subscriber is marked overflowed and its stream ends
with RESOURCE_EXHAUSTED: one slow client never makes the coordinator buffer without limit, and
it can resume from the last resource version it saw.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from coordinator.model import Change
from datacache.v1 import datacache_pb2 as pb

EVENT_TYPES = {
    "ADDED": pb.WatchDatasetsResponse.EVENT_TYPE_ADDED,
    "MODIFIED": pb.WatchDatasetsResponse.EVENT_TYPE_MODIFIED,
    "DELETED": pb.WatchDatasetsResponse.EVENT_TYPE_DELETED,
}


class Overflowed(Exception):
    """A subscriber fell too far behind."""


class Subscription:
    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        """Only this dataset, or '' for all."""
        self._limit = limit
        self._pending: OrderedDict[str, Change] = OrderedDict()
        self._ready = asyncio.Event()
        self.overflowed = False

    def offer(self, change: Change) -> None:
        if self.overflowed:
            return
        earlier = self._pending.pop(change.dataset, None)
        if earlier is not None and earlier.kind == "ADDED" and change.kind == "MODIFIED":
            # The client has not seen the dataset yet: it is still news of its creation.
            change = Change(change.resource_version, change.dataset, "ADDED")
        self._pending[change.dataset] = change
        if len(self._pending) > self._limit:
            self.overflowed = True
            self._pending.clear()
        self._ready.set()

    async def next(self, wait_seconds: float) -> Change | None:
        """The oldest pending change, or None after `wait_seconds` without one. Raises
        `Overflowed` once the client fell too far behind."""
        if not self._pending and not self.overflowed:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), wait_seconds)
            except TimeoutError:
                return None
        if self.overflowed:
            raise Overflowed
        _, change = self._pending.popitem(last=False)
        return change


class ChangeFeed:
    def __init__(
        self, render: Callable[[str], pb.Dataset | None] | None = None, limit: int = 10_000
    ) -> None:
        """`render` builds the current API view of a dataset (None when it is gone); `limit`
        is how many datasets may be pending for one client before it is cut off."""
        self._render = render
        self._limit = limit
        self._subscribers: set[Subscription] = set()

    def subscribe(self, name: str) -> Subscription:
        sub = Subscription(name, self._limit)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, change: Change) -> None:
        for sub in self._subscribers:
            if sub.name in ("", change.dataset):
                sub.offer(change)

    def event(self, change: Change) -> pb.WatchDatasetsResponse | None:
        """The event a change becomes, with the dataset's current state; None when the
        dataset is gone by now (its deletion follows as its own change)."""
        if change.kind == "DELETED":
            dataset = pb.Dataset(name=change.dataset, resource_version=change.resource_version)
        else:
            rendered = self._render(change.dataset) if self._render else None
            if rendered is None:
                return None
            dataset = rendered
        return pb.WatchDatasetsResponse(
            type=EVENT_TYPES[change.kind],
            dataset=dataset,
            resource_version=max(change.resource_version, dataset.resource_version),
        )
