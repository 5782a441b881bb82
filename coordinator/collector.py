"""Holding off Python's cyclic garbage collector while a reconcile pass runs.

A pass allocates tens of thousands of short-lived objects and yields to agents' calls while
they are alive. A collection in the middle of it moves the ones alive at that moment to the
oldest generation, and every ~90,000 objects moved there bring on a full collection: with
5,000 agents' streams (some 365,000 objects, mostly gRPC's) that one pauses the whole
process for 0.2-0.3 s on these machines, every agent's call with it. Held off until the pass
ends, the collector finds the temporaries already freed (reference counting frees them; only
reference cycles need the collector). The hold ends after `HOLD_SECONDS` however long the
pass runs (it may wait on the Kubernetes API), so cycles cannot pile up for long.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

HOLD_SECONDS = 1.0
"""Longest time the collector is held off, seconds."""


class CollectorHold:
    def __init__(
        self, hold_seconds: float = HOLD_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._hold_seconds = hold_seconds
        self._clock = clock
        self._since: float | None = None

    @property
    def holding(self) -> bool:
        return self._since is not None

    def hold(self) -> None:
        """Holds the collector off (unless someone else turned it off: then leaves it)."""
        if self._since is None and gc.isenabled():
            gc.disable()
            self._since = self._clock()

    def check(self) -> None:
        """Lets the collector run again once it was held off for `hold_seconds`."""
        if self._since is not None and self._clock() - self._since > self._hold_seconds:
            self.release()

    def release(self) -> None:
        if self._since is not None:
            self._since = None
            gc.enable()
