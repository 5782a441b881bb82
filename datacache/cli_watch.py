"""`datacache dataset watch`: a resumable stream of dataset changes.

The stream resumes after a drop from the last resource_version seen (bookmarks included) and
starts again from 0 when the coordinator answers OUT_OF_RANGE (that version is too old); the
view is then rebuilt from the fresh ADDED events. A coordinator that stays unreachable longer
than the reconnect timeout ends the command with an error.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import grpc

from datacache.cli_render import progress_lines
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

_RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        # The server cut a watch that fell behind; resuming from the last version catches up.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_MAX_BACKOFF_SECONDS = 5.0
# Weight of the newest sample in the throughput estimate (exponential moving average).
_RATE_SMOOTHING = 0.5


@dataclass
class WatchView:
    """What the stream has said so far: every dataset's latest state and per-node throughput."""

    datasets: dict[str, pb.Dataset] = field(default_factory=dict)
    rates: dict[tuple[str, str], float] = field(default_factory=dict)
    _samples: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)

    def reset(self) -> None:
        self.datasets.clear()
        self.rates.clear()
        self._samples.clear()

    def apply(self, event: pb.WatchDatasetsResponse, now: float) -> bool:
        """Applies one event; False if it changes nothing shown (a bookmark)."""
        kind = event.type
        if kind == pb.WatchDatasetsResponse.EVENT_TYPE_BOOKMARK:
            return False
        name = event.dataset.name
        if kind == pb.WatchDatasetsResponse.EVENT_TYPE_DELETED:
            self.datasets.pop(name, None)
            for key in [k for k in self._samples if k[0] == name]:
                self._samples.pop(key, None)
                self.rates.pop(key, None)
            return True
        self.datasets[name] = event.dataset
        for r in event.dataset.status.replicas:
            key = (name, r.node_name)
            if r.state != pb.REPLICA_STATE_FETCHING:
                self._samples.pop(key, None)
                self.rates.pop(key, None)
                continue
            if r.bytes_per_second > 0:
                self.rates[key] = r.bytes_per_second
            previous = self._samples.get(key)
            if previous is not None and r.bytes_per_second <= 0:
                done, at = previous
                if now > at and r.bytes_done >= done:
                    sample = (r.bytes_done - done) / (now - at)
                    old = self.rates.get(key, sample)
                    self.rates[key] = _RATE_SMOOTHING * sample + (1 - _RATE_SMOOTHING) * old
            self._samples[key] = (r.bytes_done, now)
        return True


def watch_events(
    stub: pb_grpc.DatasetServiceStub,
    name: str,
    on_restart: Callable[[], None],
    reconnect_timeout: float,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[pb.WatchDatasetsResponse]:
    """Every event of the watch, across reconnects, until `deadline` (clock time) if given.
    Raises grpc.RpcError for a non-transient error or after `reconnect_timeout` seconds of
    failing to reconnect."""
    version = 0
    backoff = 0.2
    failing_since: float | None = None
    while deadline is None or clock() < deadline:
        timeout = None if deadline is None else max(0.0, deadline - clock())
        try:
            stream = stub.WatchDatasets(
                pb.WatchDatasetsRequest(name=name, resource_version=version), timeout=timeout
            )
            for event in stream:
                failing_since, backoff = None, 0.2
                if event.resource_version:
                    version = event.resource_version
                yield event
            continue  # The server ended the stream (e.g. shutting down): resume.
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                return
            if code == grpc.StatusCode.OUT_OF_RANGE and version != 0:
                version = 0
                on_restart()
                continue
            if code not in _RECONNECT_CODES:
                raise
            now = clock()
            if failing_since is None:
                failing_since = now
            elif now - failing_since > reconnect_timeout:
                raise
        sleep(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)


class LiveDisplay:
    """Redraws a block of lines in place on a terminal (ANSI cursor movement)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._height = 0

    def draw(self, lines: list[str]) -> None:
        width = max(20, shutil.get_terminal_size((120, 40)).columns - 1)
        # Cut to the terminal width so every line takes exactly one row to move back over.
        text = "\n".join(line[:width] for line in lines)
        up = f"\x1b[{self._height}F" if self._height else ""
        self._out.write(f"{up}\x1b[J{text}\n")
        self._out.flush()
        self._height = len(lines)


def run_live(events: Iterator[pb.WatchDatasetsResponse], view: WatchView, out: IO[str]) -> None:
    display = LiveDisplay(out)
    display.draw(progress_lines(view.datasets, view.rates))
    for event in events:
        if view.apply(event, time.monotonic()):
            display.draw(progress_lines(view.datasets, view.rates))


def run_lines(
    events: Iterator[pb.WatchDatasetsResponse],
    emit: Callable[[pb.WatchDatasetsResponse], Any],
) -> None:
    for event in events:
        if event.type != pb.WatchDatasetsResponse.EVENT_TYPE_BOOKMARK:
            emit(event)
