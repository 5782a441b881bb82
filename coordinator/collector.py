"""Holding off Python's cyclic garbage collector while a reconcile pass runs.

A pass allocates tens of thousands of short-lived objects and yields to agents' calls while
they are alive. A collection in the middle of it moves the ones alive at that moment to the
oldest generation, and every ~90,000 objects moved there bring on a full collection: with
5,000 agents' streams (some 365,000 objects, mostly gRPC's) that one pauses the whole
process for 0.2-0.3 s on these machines, every agent's call with it. Held off until the pass
ends, the collector finds the temporaries already freed (reference counting frees them; only
reference cycles need the collector). The hold ends after `HOLD_SECONDS` however long the
pass runs (it may wait on the Kubernetes API), so cycles cannot pile up for long.

The coordinator process also freezes what survives each pass (`gc.freeze`): its long-lived
objects (agents' streams, the store's cache) then sit where no full collection scans them,
and a full collection sees only what was allocated since the last pass. Cycles that become
garbage among frozen objects (a closed stream's) wait for the next thaw, every `THAW_SECONDS`:
one full collection at a known time instead of one whenever ~90,000 objects have aged.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

HOLD_SECONDS = 1.0
"""Longest time the collector is held off, seconds."""

THAW_SECONDS = 600.0
"""How often frozen objects are thawed and collected in full, seconds: the longest time cyclic
garbage among them is kept."""


class CollectorHold:
    def __init__(
        self,
        hold_seconds: float = HOLD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        thaw_seconds: float | None = None,
    ) -> None:
        """With `thaw_seconds`, survivors are frozen at each release and thawed for a full
        collection every `thaw_seconds`: for a process of its own (freezing is process-wide)."""
        self._hold_seconds = hold_seconds
        self._clock = clock
        self._since: float | None = None
        self._thaw_seconds = thaw_seconds
        self._thawed = clock()

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
        if self._since is None:
            return
        self._since = None
        gc.enable()
        if self._thaw_seconds is None:
            return
        now = self._clock()
        if now - self._thawed >= self._thaw_seconds:
            self._thawed = now
            gc.unfreeze()
            started = time.perf_counter()
            found = gc.collect()
            log.info(
                "Full garbage collection: %d unreachable objects in %.0f ms",
                found,
                (time.perf_counter() - started) * 1000,
            )
        else:
            # The young generations only: this pass's cycles go now, not into the freeze.
            gc.collect(1)
        gc.freeze()
