"""The agent's control loop.

The agent dials the coordinator, registers, and holds a stream on which the coordinator sends
the full desired set for this node. On every message the agent converges: it starts copying
desired datasets it does not hold, retries failed ones with backoff, and deletes datasets no
longer desired. It reports its full actual state on every change and at least every
`report_interval_seconds`, which also renews its lease.

Until the first desired set arrives nothing is deleted: a coordinator that is down or
restarting never costs the node its data.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from agent import metrics
from agent.errors import AgentError, DiskFull, FetchCancelled
from agent.fetch import Progress, fetch_into, plan
from agent.journal import Journal
from agent.journal import load as load_journal
from agent.manifest import Manifest
from agent.scrub import RateLimiter, find_corrupt, quarantine, repair
from agent.settings import AgentSettings
from agent.sources import Source
from agent.store import CacheStore
from datacache import __version__
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SourceFactory = Callable[[str], Source]

_RPC_TIMEOUT_SECONDS = 10.0
_MAX_PARALLEL_DATASETS = 2
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "datacache.v1.AgentService", "method": "RegisterAgent"},
                    {"service": "datacache.v1.AgentService", "method": "ReportState"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class Phase(enum.Enum):
    FETCHING = "fetching"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


@dataclass
class Replica:
    """What this node holds, or is working on, for one dataset."""

    source: str
    phase: Phase
    manifest: Manifest | None = None
    progress: Progress = field(default_factory=Progress)
    message: str = ""
    failures: int = 0
    refused: int = 0
    """Object keys of the source that could not be copied (unsafe or colliding)."""
    retry_at: float = 0.0
    task: asyncio.Task[None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def report(self, name: str) -> pb.ReplicaReport:
        if self.phase is Phase.READY and self.manifest is not None:
            files, nbytes = len(self.manifest.files), self.manifest.total_bytes
            return pb.ReplicaReport(
                dataset_name=name,
                state=pb.REPLICA_STATE_READY,
                digest=self.manifest.digest,
                files_done=files,
                bytes_done=nbytes,
                files_total=files,
                bytes_total=nbytes,
                message=f"{self.refused} unsafe object keys refused" if self.refused else "",
            )
        state = {
            Phase.FETCHING: pb.REPLICA_STATE_FETCHING,
            Phase.FAILED: pb.REPLICA_STATE_FAILED,
            Phase.DELETING: pb.REPLICA_STATE_EVICTING,
            Phase.READY: pb.REPLICA_STATE_READY,
        }[self.phase]
        p = self.progress
        return pb.ReplicaReport(
            dataset_name=name,
            state=state,
            files_done=p.files_done,
            bytes_done=p.bytes_done,
            files_total=p.files_total,
            bytes_total=p.bytes_total,
            message=self.message,
        )


class Agent:
    def __init__(
        self, settings: AgentSettings, store: CacheStore, source_for: SourceFactory
    ) -> None:
        self._settings = settings
        self._store = store
        self._source_for = source_for
        self._replicas: dict[str, Replica] = {}
        self._desired: dict[str, str] | None = None
        self._changed = asyncio.Event()
        self._fetch_slots = asyncio.Semaphore(_MAX_PARALLEL_DATASETS)
        self._identity = pb.AgentIdentity(node_name=settings.node_name, cache_id=store.cache_id)
        self._retry_timer: asyncio.TimerHandle | None = None

    # Convergence ----------------------------------------------------------------------------

    def replicas(self) -> dict[str, Replica]:
        return dict(self._replicas)

    async def recover(self) -> None:
        found = await asyncio.to_thread(self._store.recover)
        for name, manifest in found.items():
            self._replicas[name] = Replica(
                source=manifest.source, phase=Phase.READY, manifest=manifest
            )
            log.info("Found published copy", extra={"dataset": name, "version": manifest.version})

    def set_desired(self, desired: dict[str, str]) -> None:
        if self._desired is None:
            # Interrupted copies of datasets that are still wanted resume; the rest go.
            self._store.prune_staging(set(desired))
        self._desired = desired
        self.converge()

    def converge(self) -> None:
        if self._desired is None:
            return
        now = time.monotonic()
        next_retry: float | None = None
        for name, source in self._desired.items():
            replica = self._replicas.get(name)
            if replica is None:
                self._start_fetch(name, source, None)
            elif replica.task is not None:
                continue
            elif replica.phase is Phase.READY and replica.source != source:
                self._start_fetch(name, source, replica)
            elif replica.phase is Phase.FAILED:
                if replica.source != source or now >= replica.retry_at:
                    self._start_fetch(name, source, replica)
                else:
                    next_retry = min(next_retry or replica.retry_at, replica.retry_at)
        for name, replica in self._replicas.items():
            if name not in self._desired and replica.phase is not Phase.DELETING:
                replica.phase = Phase.DELETING
                replica.cancel.set()
                replica.task = asyncio.create_task(self._delete(name, replica.task))
        self._changed.set()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if next_retry is not None:
            self._retry_timer = asyncio.get_running_loop().call_later(
                max(0.0, next_retry - now), self.converge
            )

    def _start_fetch(self, name: str, source: str, previous: Replica | None) -> None:
        replica = Replica(source=source, phase=Phase.FETCHING)
        replica.progress.labels = (source.split(":", 1)[0], name)
        if previous is not None:
            replica.failures = previous.failures
            if previous.phase is Phase.READY:
                # Keep serving the old version while the new one is copied.
                replica.manifest = previous.manifest
        self._replicas[name] = replica
        replica.task = asyncio.create_task(self._fetch(name, replica))

    async def _fetch(self, name: str, replica: Replica) -> None:
        try:
            async with self._fetch_slots:
                log.info("Fetching from %s", replica.source, extra={"dataset": name})
                started = time.monotonic()
                metrics.FETCHES_IN_FLIGHT.inc()
                try:
                    manifest = await asyncio.to_thread(self._fetch_sync, name, replica)
                except Exception:
                    metrics.FETCH_DURATION.labels("failed").observe(time.monotonic() - started)
                    raise
                finally:
                    metrics.FETCHES_IN_FLIGHT.dec()
                metrics.FETCH_DURATION.labels("ready").observe(time.monotonic() - started)
            replica.manifest, replica.phase = manifest, Phase.READY
            replica.failures, replica.message = 0, ""
            log.info(
                "Ready: %d files, %d bytes in %.1fs",
                len(manifest.files),
                manifest.total_bytes,
                time.monotonic() - started,
                extra={"dataset": name, "version": manifest.version},
            )
        except FetchCancelled:
            log.info("Fetch cancelled", extra={"dataset": name})
        except Exception as exc:
            replica.failures += 1
            delay = min(
                self._settings.retry_max_seconds,
                self._settings.retry_base_seconds * 2 ** (replica.failures - 1),
            )
            replica.phase, replica.message = Phase.FAILED, str(exc)
            replica.retry_at = time.monotonic() + delay
            if isinstance(exc, AgentError):
                log.warning(
                    "Fetch failed (retry in %.0fs): %s", delay, exc, extra={"dataset": name}
                )
            else:
                log.exception("Fetch failed unexpectedly", extra={"dataset": name})
        finally:
            if replica.task is asyncio.current_task():
                replica.task = None
            if self._replicas.get(name) is replica and replica.phase is not Phase.DELETING:
                self.converge()

    def _fetch_sync(self, name: str, replica: Replica) -> Manifest:
        source = self._source_for(replica.source)
        files, refused = plan(list(source.list()))
        for key, reason in refused:
            log.warning("Refused object: %s", reason, extra={"dataset": name, "object": key})
        staged, journal_path = self._store.staging_for(name, replica.source)
        try:
            with Journal(journal_path) as journal:
                entries = fetch_into(
                    source,
                    files,
                    staged,
                    self._settings.fetch,
                    replica.progress,
                    replica.cancel,
                    resume=load_journal(journal_path),
                    journal=journal,
                )
            manifest = Manifest.build(name, replica.source, entries)
            replica.refused = len(refused)
            if replica.cancel.is_set():
                raise FetchCancelled("fetch cancelled")
            self._store.publish(staged, manifest)
        except (FetchCancelled, DiskFull):
            # Nothing to resume: the dataset is no longer wanted, or its space is needed.
            self._store.discard_staging(name)
            raise
        self._store.discard_staging(name)
        return manifest

    async def _delete(self, name: str, running: asyncio.Task[None] | None) -> None:
        if running is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await running
        delay = 1.0
        while True:
            try:
                await asyncio.to_thread(self._store.delete, name)
                break
            except Exception:
                # The copy is already unpublished; keep trying to reclaim the space.
                log.exception("Delete failed; retrying in %.0fs", delay, extra={"dataset": name})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        log.info("Deleted", extra={"dataset": name})
        metrics.EVICTIONS.inc()
        del self._replicas[name]
        self.converge()
        self._changed.set()

    # Talking to the coordinator ----------------------------------------------------------------

    def state_request(self) -> pb.ReportStateRequest:
        usage = self._store.usage()
        metrics.CACHE_CAPACITY.set(usage.capacity_bytes)
        metrics.CACHE_FREE.set(usage.free_bytes)
        metrics.CACHE_USED.set(
            sum(r.manifest.total_bytes for r in self._replicas.values() if r.manifest is not None)
        )
        return pb.ReportStateRequest(
            agent=self._identity,
            replicas=[r.report(name) for name, r in sorted(self._replicas.items())],
            cache_capacity_bytes=usage.capacity_bytes,
            cache_free_bytes=usage.free_bytes,
        )

    async def _scrub_loop(self, stop: asyncio.Event) -> None:
        interval = self._settings.scrub_interval_seconds
        limiter = RateLimiter(self._settings.scrub_bytes_per_second)
        while interval > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            for name, replica in list(self._replicas.items()):
                if replica.phase is Phase.READY and replica.task is None and not stop.is_set():
                    try:
                        await self._scrub(name, replica, limiter)
                    except FetchCancelled:
                        pass  # deleted or shutting down while being scrubbed
                    except Exception:
                        log.exception("Scrub failed", extra={"dataset": name})

    async def _scrub(self, name: str, replica: Replica, limiter: RateLimiter) -> None:
        manifest = replica.manifest
        assert manifest is not None
        version_dir = self._store.dataset_dir(name) / manifest.version
        corrupt = await asyncio.to_thread(
            find_corrupt, version_dir, manifest, limiter, replica.cancel
        )
        if not corrupt:
            log.info("Scrub clean", extra={"dataset": name, "version": manifest.version})
            return
        # Not Ready while files are missing: the coordinator takes the label off first.
        replica.phase = Phase.FETCHING
        replica.message = f"repairing {len(corrupt)} corrupt files found by the scrub"
        self._changed.set()
        for entry in corrupt:
            moved = await asyncio.to_thread(quarantine, self._store.root, name, version_dir, entry)
            log.warning(
                "Scrub found a corrupt file; quarantined at %s",
                moved,
                extra={"dataset": name, "version": manifest.version, "object": entry.path},
            )
        try:
            source = self._source_for(replica.source)
            await asyncio.to_thread(
                repair, source, version_dir, manifest, corrupt, self._settings.fetch, replica.cancel
            )
        except Exception as exc:
            log.warning("Repair failed, fetching again: %s", exc, extra={"dataset": name})
            replica.phase, replica.message, replica.retry_at = Phase.FAILED, str(exc), 0.0
            self.converge()
            return
        replica.phase, replica.message = Phase.READY, ""
        log.info("Repaired %d files", len(corrupt), extra={"dataset": name})
        self._changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        await self.recover()
        scrubber = asyncio.create_task(self._scrub_loop(stop))
        backoff = 0.5
        while not stop.is_set():
            try:
                await self._session(stop)
                backoff = 0.5
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "timed out"
                log.warning("Coordinator session ended: %s; reconnecting in %.1fs", detail, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 30.0)
        for replica in self._replicas.values():
            replica.cancel.set()
        tasks = [r.task for r in self._replicas.values() if r.task is not None]
        await asyncio.gather(scrubber, *tasks, return_exceptions=True)

    async def _session(self, stop: asyncio.Event) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        async with grpc.aio.insecure_channel(
            self._settings.coordinator, options=options
        ) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            usage = self._store.usage()
            response = await stub.RegisterAgent(
                pb.RegisterAgentRequest(
                    agent=self._identity,
                    cache_capacity_bytes=usage.capacity_bytes,
                    cache_free_bytes=usage.free_bytes,
                    agent_version=__version__,
                ),
                timeout=_RPC_TIMEOUT_SECONDS,
                wait_for_ready=True,
            )
            lease = max(3, response.lease_seconds)
            log.info("Registered with the coordinator (lease %ds)", lease)
            tasks = [
                asyncio.create_task(self._watch(stub, lease)),
                asyncio.create_task(self._report_loop(stub, lease)),
                asyncio.create_task(stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]

    async def _watch(self, stub: pb_grpc.AgentServiceAsyncStub, lease: float) -> None:
        call = stub.WatchDesiredState(pb.WatchDesiredStateRequest(agent=self._identity))
        stream = call.__aiter__()
        while True:
            # The coordinator refreshes the stream every lease/3; silence for a whole lease
            # means the connection is dead even if TCP has not noticed.
            message = await asyncio.wait_for(anext(stream), lease)
            self.set_desired({d.name: d.source for d in message.datasets})

    async def _report_loop(self, stub: pb_grpc.AgentServiceAsyncStub, lease: float) -> None:
        interval = min(self._settings.report_interval_seconds, lease / 3)
        while True:
            self._changed.clear()
            await stub.ReportState(self.state_request(), timeout=_RPC_TIMEOUT_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), interval)
