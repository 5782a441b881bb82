"""Placement in a worker process, fed with what changed since the previous call.

Placement is pure CPU work: about 0.1 s at 5,000 nodes and 1,000 datasets. In a thread of the
coordinator it holds the GIL, and the event loop, which lets go of the GIL around every gRPC
operation and then waits for it again (up to the 5 ms switch interval each time), served
agents' calls tens to hundreds of milliseconds late while placement ran (the GIL convoy
effect). In its own process placement runs on another core and costs the event loop only
the pickling of what changed.

The worker (`python -c ...serve()`, importing this very copy of the package) reads
length-prefixed pickled calls on stdin and answers on stdout. It keeps the inputs of its
previous call and its result: each call sends, per input, the entries that are not the same
objects as those sent before (the reconciler keeps unchanged entries as the same objects, so
in a steady cluster that is a handful) and the keys that went away, and the worker answers
with the datasets whose placement changed. When the worker is not in step (it was restarted,
or a call failed) the next call sends everything; a worker that died is started again.

Small clusters place in a thread: a process costs more than their placement. So does the
call that starts the worker (the worker imports meanwhile) and one whose worker failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import sys
from collections.abc import Awaitable, Callable, Mapping, Set
from pathlib import Path
from typing import Any, BinaryIO

from coordinator.placement import Node, Want, place

log = logging.getLogger(__name__)

WORKER_MIN_SIZE = 200_000
"""Placements of at least this many (node, dataset) pairs run in the worker process."""

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
"""Where this copy of the package is: the worker imports the same one, whatever its sys.path."""

WORKER_NICENESS = 10
"""How much lower the worker's CPU priority is than the coordinator's."""

_INPUTS = ("wants", "nodes", "current", "ready", "holding", "on_disk")
_HEADER = 8

Delta = dict[str, tuple[dict[str, Any], list[str]]]
"""Per input: the entries to set and the keys to drop."""


class WorkerError(Exception):
    """The worker process failed a call."""


class PlacementWorker:
    def __init__(self, min_size: int = WORKER_MIN_SIZE) -> None:
        self._min_size = min_size
        self._process: asyncio.subprocess.Process | None = None
        self._sent: dict[str, dict[str, Any]] | None = None
        """The inputs the worker holds, by input (None: not in step)."""
        self._result: dict[str, frozenset[str]] = {}
        """The worker's previous result."""
        self._generation = 0
        self._lock = asyncio.Lock()
        self.calls_in_worker = 0
        """Placements that ran in the worker process (for tests and the benchmark)."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def close(self) -> None:
        process, self._process = self._process, None
        self._sent = None
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def place(
        self,
        wants: list[Want],
        nodes: Mapping[str, Node],
        current: Mapping[str, frozenset[str]],
        ready: Mapping[str, frozenset[str]],
        holding: Mapping[str, frozenset[str]],
        on_disk: Mapping[str, Mapping[str, int]],
        cooldown: Set[tuple[str, str]],
        pause: Callable[[], Awaitable[None]] | None = None,
    ) -> dict[str, frozenset[str]]:
        """`placement.place` of these inputs (`on_disk` by dataset, then node). `pause` is
        awaited now and then while the call is prepared (to let other work in).

        In the worker process once it runs; in a thread for small inputs, while the worker
        starts (its first call costs it the import and the whole state), and after it
        failed (a new one is started)."""
        in_thread = (wants, nodes, current, ready, holding, on_disk, cooldown)
        if len(nodes) * len(wants) < self._min_size:
            return await _place_in_thread(*in_thread)
        inputs: dict[str, Mapping[str, Any]] = {
            "wants": {w.dataset: w for w in wants},
            "nodes": nodes,
            "current": current,
            "ready": ready,
            "holding": holding,
            "on_disk": on_disk,
        }
        async with self._lock:
            process = self._process
            if process is None or process.returncode is not None:
                await self._start()
                return await _place_in_thread(*in_thread)
            try:
                return await self._place(process, inputs, frozenset(cooldown), pause)
            except (WorkerError, OSError, EOFError, asyncio.IncompleteReadError) as exc:
                log.warning("Placement worker failed (%s); starting a new one", exc)
                await self._restart()
                return await _place_in_thread(*in_thread)

    async def _place(
        self,
        process: asyncio.subprocess.Process,
        inputs: dict[str, Mapping[str, Any]],
        cooldown: frozenset[tuple[str, str]],
        pause: Callable[[], Awaitable[None]] | None,
    ) -> dict[str, frozenset[str]]:
        in_step = self._sent is not None
        delta = await _delta(inputs, self._sent or {}, pause)
        base = self._generation if in_step else None
        self._sent = None  # until the answer arrives, the worker's state is unknown
        try:
            status, value = await _call(process, (base, self._generation + 1, delta, cooldown))
        except BaseException:
            # Cancelled or broken mid-call: its answer may still come; never read it as the
            # answer to another call.
            self._abandon()
            raise
        if status != "ok":
            raise WorkerError(str(value))
        changed, removed = value
        self._generation += 1
        self._sent = {key: dict(entries) for key, entries in inputs.items()}
        if not in_step:
            self._result = {}
        for dataset in removed:
            self._result.pop(dataset, None)
        self._result.update(changed)
        self.calls_in_worker += 1
        return dict(self._result)

    async def start(self) -> None:
        """Starts the worker process (it imports while the caller goes on)."""
        async with self._lock:
            await self._start()

    async def _start(self) -> None:
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
                "from coordinator.placement_worker import serve; serve()",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self._sent = None

    def _abandon(self) -> None:
        process, self._process = self._process, None
        self._sent = None
        if process is not None and process.returncode is None:
            process.kill()

    async def _restart(self) -> None:
        process, self._process = self._process, None
        self._sent = None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()


async def _place_in_thread(
    wants: list[Want],
    nodes: Mapping[str, Node],
    current: Mapping[str, frozenset[str]],
    ready: Mapping[str, frozenset[str]],
    holding: Mapping[str, frozenset[str]],
    on_disk: Mapping[str, Mapping[str, int]],
    cooldown: Set[tuple[str, str]],
) -> dict[str, frozenset[str]]:
    flat = {(d, n): size for d, sizes in on_disk.items() for n, size in sizes.items()}
    return await asyncio.to_thread(place, wants, nodes, current, ready, holding, flat, cooldown)


async def _call(process: asyncio.subprocess.Process, message: Any) -> Any:
    assert process.stdin is not None and process.stdout is not None
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    process.stdin.write(len(data).to_bytes(_HEADER, "big") + data)
    await process.stdin.drain()
    header = await process.stdout.readexactly(_HEADER)
    payload = await process.stdout.readexactly(int.from_bytes(header, "big"))
    return pickle.loads(payload)  # noqa: S301 - our own child process, over a private pipe


_PAUSE_EVERY = 500
"""Entries compared between two pauses of `_delta` (5,000 take the event loop 2-4 ms)."""


async def _delta(
    inputs: Mapping[str, Mapping[str, Any]],
    sent: Mapping[str, Mapping[str, Any]],
    pause: Callable[[], Awaitable[None]] | None = None,
) -> Delta:
    delta: Delta = {}
    for key in _INPUTS:
        new, old = inputs[key], sent.get(key, {})
        changed = {}
        for i, (k, v) in enumerate(new.items()):
            if pause is not None and i % _PAUSE_EVERY == _PAUSE_EVERY - 1:
                await pause()
            if old.get(k) is not v:
                changed[k] = v
        if key == "wants":
            # Stored selectors are read-only views, which do not pickle.
            changed = {
                k: dataclasses.replace(w, node_selector=dict(w.node_selector))
                for k, w in changed.items()
            }
        delta[key] = (changed, [k for k in old if k not in new])
    return delta


# In the worker process ---------------------------------------------------------------------


class WorkerState:
    """The inputs of the previous call and its result."""

    def __init__(self) -> None:
        self.inputs: dict[str, dict[str, Any]] = {}
        self.generation: int | None = None
        self.result: dict[str, frozenset[str]] = {}

    def call(
        self,
        base: int | None,
        generation: int,
        delta: Delta,
        cooldown: frozenset[tuple[str, str]],
    ) -> tuple[dict[str, frozenset[str]], list[str]]:
        """Applies `delta` to the inputs held since call `base` (None: start from nothing),
        places, and returns the datasets whose placement changed and those that have none
        any more."""
        if base is not None and base != self.generation:
            raise WorkerError(f"worker holds call {self.generation}, delta is for call {base}")
        self.generation = None
        if base is None:
            self.inputs = {}
            self.result = {}
        for key, (changed, removed) in delta.items():
            held = self.inputs.setdefault(key, {})
            for k in removed:
                held.pop(k, None)
            held.update(changed)
        held_disk = self.inputs["on_disk"]
        on_disk = {(d, n): size for d, sizes in held_disk.items() for n, size in sizes.items()}
        result = place(
            list(self.inputs["wants"].values()),
            self.inputs["nodes"],
            self.inputs["current"],
            self.inputs["ready"],
            self.inputs["holding"],
            on_disk,
            cooldown,
        )
        changed_result = {d: ns for d, ns in result.items() if self.result.get(d) != ns}
        removed_result = [d for d in self.result if d not in result]
        self.result = result
        self.generation = generation
        return changed_result, removed_result


def serve(calls: BinaryIO | None = None, answers: BinaryIO | None = None) -> None:
    """The worker's loop: one answer per call until the coordinator closes the pipe."""
    # Placement can wait a little; agents' calls on the coordinator's event loop should not
    # wait for a core while it runs.
    os.nice(WORKER_NICENESS)
    if answers is None:
        # Answers go to the original stdout; anything printed goes to stderr instead.
        answers = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
    calls = calls if calls is not None else sys.stdin.buffer
    state = WorkerState()
    while True:
        header = calls.read(_HEADER)
        if len(header) < _HEADER:
            return  # the coordinator is gone
        payload = calls.read(int.from_bytes(header, "big"))
        message = pickle.loads(payload)  # noqa: S301 - from the coordinator that started us
        try:
            answer: tuple[str, Any] = ("ok", state.call(*message))
        except Exception as exc:  # the coordinator logs it and starts a new worker
            answer = ("error", f"{type(exc).__name__}: {exc}")
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        answers.write(len(data).to_bytes(_HEADER, "big") + data)
        answers.flush()
