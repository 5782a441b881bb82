"""The agent's control loop.

The agent dials the coordinator, registers, and holds a stream on which the coordinator sends
the full desired set for this node. On every message the agent converges: it starts copying
desired datasets it does not hold (or holds at an older revision, or at another version than
the one fixed for the revision), retries failed ones with backoff, and deletes datasets no
longer desired. It reports its full actual state on every change and at least every
`report_interval_seconds`, which also renews its lease.

A newer revision is copied into staging while the older version keeps serving: its `current`
link is untouched and reported as `serving_version` until the new copy is verified and
published; a copy that fails leaves it serving. The first complete copy of a revision is
offered to the coordinator (PublishVersion) to fix the revision's version; copies after that
read the fixed manifest (GetVersionManifest) and must match it byte for byte.

A copy starts only when it fits (free space and quota); otherwise the replica waits as
PENDING and the node reports the missing room as `pressure_bytes`, for the coordinator to
evict something.

Until the first desired set arrives nothing is deleted: a coordinator that is down or
restarting never costs the node its data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import grpc

from agent import capacity, lastuse, metrics, versioning
from agent.channel import open_channel
from agent.credentials import DatasetCredentials
from agent.errors import (
    AgentError,
    CacheIndexError,
    DiskFull,
    FetchCancelled,
    NeedRoom,
    VersionUnavailable,
)
from agent.fetch import PlannedFile, fetch_into, plan
from agent.health import HealthServer
from agent.index import CacheIndex
from agent.journal import Journal
from agent.journal import load as load_journal
from agent.manifest import FileEntry, Manifest
from agent.peering import PeerKeys
from agent.peerserver import ServedVersion
from agent.replica import Phase, Replica, Want, needs_copy, pressure
from agent.scrub import RateLimiter, find_corrupt, quarantine, repair
from agent.settings import AgentSettings
from agent.sources import ObjectInfo, Source
from agent.sources.peer import PeerHealth, PeerSource
from agent.store import CacheStore
from datacache import __version__
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SourceFactory = Callable[[str, DatasetCredentials | None], Source]

_RPC_TIMEOUT_SECONDS = 10.0
_MAX_PARALLEL_DATASETS = 2
_PENDING_RECHECK_SECONDS = 30.0


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        store: CacheStore,
        source_for: SourceFactory,
        index: CacheIndex | None = None,
        health: HealthServer | None = None,
        peer_keys: PeerKeys | None = None,
        *,
        peer_address: str = "",
    ) -> None:
        self._settings = settings
        self._store = store
        self._source_for = source_for
        self._index = index if index is not None else CacheIndex.open(store.root)
        self._health = health
        self._peer_keys = peer_keys
        """The cluster's peer keys; None: no peer copying."""
        self._peer_address = peer_address
        """Where this agent serves peers ('' when it does not)."""
        self._peer_health = PeerHealth()
        self._served: dict[str, tuple[Manifest, ServedVersion]] = {}
        self._replicas: dict[str, Replica] = {}
        self._desired: dict[str, Want] | None = None
        self._changed = asyncio.Event()
        self._offer_wanted = asyncio.Event()
        """Set when a copy became Ready: offer its version now, not at the next tick."""
        self._fetch_slots = asyncio.Semaphore(_MAX_PARALLEL_DATASETS)
        self._identity = pb.AgentIdentity(
            node_name=settings.node_name, cache_id=store.cache_id, node_uid=settings.node_uid
        )
        self._retry_timer: asyncio.TimerHandle | None = None
        self._stub: pb_grpc.AgentServiceAsyncStub | None = None
        self._room_lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        """Bytes promised to copies in progress, by dataset: what they may still write."""

    # Convergence ----------------------------------------------------------------------------

    def replicas(self) -> dict[str, Replica]:
        return dict(self._replicas)

    async def recover(self) -> None:
        found = await asyncio.to_thread(self._store.recover)
        await asyncio.to_thread(self._index.rebuild, found)
        for name, manifest in found.items():
            indexed = self._index.get(name)
            self._replicas[name] = Replica(
                want=Want(manifest.source, manifest.revision),
                phase=Phase.READY,
                manifest=manifest,
                revision=manifest.revision,
                last_used=indexed.last_used if indexed is not None else 0.0,
            )
            log.info("Found published copy", extra={"dataset": name, "version": manifest.version})

    def set_desired(self, desired: dict[str, Want]) -> None:
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
        for name, want in self._desired.items():
            replica = self._replicas.get(name)
            if replica is None:
                self._start_fetch(name, want, None)
            elif replica.task is not None:
                continue
            elif replica.phase is Phase.READY:
                if needs_copy(replica.manifest, want):
                    self._start_fetch(name, want, replica)
                elif replica.manifest is not None and replica.manifest.revision < want.revision:
                    # The fixed version of the new revision is what this node holds already.
                    replica.task = asyncio.create_task(self._adopt(name, replica, want))
                else:
                    replica.want = want
            elif replica.phase in (Phase.FAILED, Phase.PENDING):
                if replica.manifest is not None and not needs_copy(replica.manifest, want):
                    replica.phase, replica.message, replica.want = Phase.READY, "", want
                    replica.revision, replica.missing_bytes = replica.manifest.revision, 0
                elif replica.want != want or now >= replica.retry_at:
                    self._start_fetch(name, want, replica)
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

    def _start_fetch(self, name: str, want: Want, previous: Replica | None) -> None:
        replica = Replica(want=want, phase=Phase.FETCHING, revision=want.revision)
        replica.progress.labels = (want.source.split(":", 1)[0], name)
        if previous is not None:
            replica.failures = previous.failures
            if previous.phase is Phase.PENDING:
                # Still waiting until the room check passes: no flapping through FETCHING.
                replica.phase, replica.message = Phase.PENDING, previous.message
                replica.missing_bytes = previous.missing_bytes
            # Keep serving the published copy while the new one is copied.
            replica.manifest = previous.manifest
            replica.last_used = previous.last_used
        self._replicas[name] = replica
        replica.task = asyncio.create_task(self._fetch(name, replica))

    async def _adopt(self, name: str, replica: Replica, want: Want) -> None:
        assert replica.manifest is not None
        manifest = replica.manifest.with_revision(want.revision, replica.manifest.published_at)
        try:
            await asyncio.to_thread(self._store.rewrite_manifest, manifest)
            await asyncio.to_thread(self._index.published, manifest)
            replica.manifest, replica.revision, replica.want = manifest, want.revision, want
            log.info(
                "Revision %d has the version held already",
                want.revision,
                extra={"dataset": name, "version": manifest.version},
            )
        except AgentError as exc:
            log.warning(
                "Could not record revision %d: %s", want.revision, exc, extra={"dataset": name}
            )
        finally:
            replica.task = None
            if self._replicas.get(name) is replica and replica.phase is not Phase.DELETING:
                self.converge()

    async def _fetch(self, name: str, replica: Replica) -> None:
        want = replica.want
        try:
            async with self._fetch_slots:
                log.info(
                    "Fetching revision %d from %s",
                    want.revision,
                    want.source,
                    extra={"dataset": name},
                )
                started = time.monotonic()
                replica.started = started
                metrics.FETCHES_IN_FLIGHT.inc()
                try:
                    expected = await self._fixed_manifest(name, want.version)
                    manifest = await asyncio.to_thread(self._fetch_sync, name, replica, expected)
                except NeedRoom:
                    raise
                except Exception:
                    metrics.FETCH_DURATION.labels("failed").observe(time.monotonic() - started)
                    raise
                finally:
                    metrics.FETCHES_IN_FLIGHT.dec()
                metrics.FETCH_DURATION.labels("ready").observe(time.monotonic() - started)
            replica.manifest, replica.phase = manifest, Phase.READY
            replica.failures, replica.message, replica.missing_bytes = 0, "", 0
            # A copy of a fixed version needs no offer; others are offered once connected.
            replica.offered = bool(want.version)
            self._offer_wanted.set()
            log.info(
                "Ready: %d files, %d bytes in %.1fs",
                len(manifest.files),
                manifest.total_bytes,
                time.monotonic() - started,
                extra={"dataset": name, "version": manifest.version},
            )
        except FetchCancelled:
            log.info("Fetch cancelled", extra={"dataset": name})
        except NeedRoom as exc:
            replica.phase, replica.message = Phase.PENDING, str(exc)
            replica.missing_bytes = exc.missing_bytes
            # Room also comes back through the desired set (evictions) and deletions, which
            # retry at once; this only catches space freed outside the cache.
            retry = max(self._settings.retry_base_seconds, _PENDING_RECHECK_SECONDS)
            replica.retry_at = time.monotonic() + min(self._settings.retry_max_seconds, retry)
            log.warning("Not started: %s", exc, extra={"dataset": name})
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
            with self._room_lock:
                self._reserved.pop(name, None)
            if replica.task is asyncio.current_task():
                replica.task = None
            if self._replicas.get(name) is replica and replica.phase is not Phase.DELETING:
                with contextlib.suppress(CacheIndexError):
                    if replica.phase is not Phase.READY and replica.manifest is not None:
                        self._index.set_state(name, replica.phase.value, replica.message)
                self.converge()

    def _reserve_room(self, name: str, need: int) -> None:
        """Raises NeedRoom unless `need` more bytes fit beside the cache's contents and the
        other copies in progress; otherwise promises them to this copy."""
        usage = self._store.usage()
        staged = self._store.staged_bytes(name)
        quota = self._settings.cache_quota_bytes
        # Without a quota only the filesystem's free space counts: no need to walk staging.
        used = self._index.used_bytes() + self._store.staged_bytes() if quota else 0
        with self._room_lock:
            others = sum(v for k, v in self._reserved.items() if k != name)
            room = capacity.room(
                usage.capacity_bytes, usage.free_bytes - others, quota, used + others
            )
            missing = capacity.missing_bytes(need, staged, room.free_bytes)
            if missing > 0:
                raise NeedRoom(missing)
            self._reserved[name] = max(0, need - staged)

    def _fetch_sync(
        self, name: str, replica: Replica, expected: dict[str, FileEntry] | None
    ) -> Manifest:
        want = replica.want
        source = self._source_for(want.source, want.credentials)
        if expected is not None and want.peers and self._peer_keys is not None:
            # The fixed version is copied as its manifest lists it, from the peers holding it:
            # the source is not even listed, and is read only where no peer can serve.
            files, source = self._from_peers(name, want, expected, source, self._peer_keys)
        else:
            files, refused = plan(list(source.list()))
            if expected is not None:
                files = versioning.select(files, expected, want.version, want.source)
            else:
                for key, reason in refused:
                    log.warning(
                        "Refused object: %s", reason, extra={"dataset": name, "object": key}
                    )
        self._reserve_room(name, sum(f.obj.size for f in files))
        replica.phase, replica.message, replica.missing_bytes = Phase.FETCHING, "", 0
        staged, journal_path = self._store.staging_for(name, want.source)
        try:
            try:
                with Journal(journal_path) as journal:
                    entries = fetch_into(
                        source,
                        files,
                        staged,
                        self._settings.fetch,
                        replica.progress,
                        replica.cancel,
                        expected=expected,
                        resume=load_journal(journal_path),
                        journal=journal,
                    )
            finally:
                if isinstance(source, PeerSource):
                    source.close()
            if replica.cancel.is_set():
                raise FetchCancelled("fetch cancelled")
            if expected is not None:
                versioning.check_copy(entries, expected, want.version, want.source)
            manifest = Manifest.build(name, want.source, entries, want.revision)
            manifest = manifest.with_revision(want.revision, time.time())
            replica.refused = 0 if expected is not None else len(refused)
            self._store.publish(staged, manifest)
        except (FetchCancelled, DiskFull):
            # Nothing to resume: the dataset is no longer wanted, or its space is needed.
            self._store.discard_staging(name)
            raise
        except AgentError:
            if expected is not None:
                # A copy that does not match the fixed version is worth nothing to resume.
                self._store.discard_staging(name)
            raise
        self._store.discard_staging(name)
        try:
            self._index.published(manifest)
        except CacheIndexError as exc:
            # The copy is published on disk, which is the truth; the index catches up on the
            # next start.
            log.warning("Index not updated: %s", exc, extra={"dataset": name})
        return manifest

    def _from_peers(
        self,
        name: str,
        want: Want,
        expected: Mapping[str, FileEntry],
        origin: Source,
        keys: PeerKeys,
    ) -> tuple[list[PlannedFile], PeerSource]:
        objects = [ObjectInfo(path, e.size, e.etag) for path, e in sorted(expected.items())]
        files, refused = plan(objects)
        if refused:
            raise VersionUnavailable(
                f"the manifest of version {want.version} lists unsafe paths ({refused[0][1]})"
            )
        log.info(
            "Copying version %s from peers %s",
            want.version,
            ", ".join(p.node for p in want.peers),
            extra={"dataset": name},
        )
        source = PeerSource(
            want.peers,
            origin,
            objects,
            name,
            want.version,
            self._settings.node_name,
            keys,
            self._settings.peer,
            self._peer_health,
        )
        return files, source

    def served_version(self, name: str, version: str) -> ServedVersion | None:
        """The version to serve a peer: only a Ready copy of exactly `version` that is not
        being replaced, repaired or deleted (called from the peer server's threads)."""
        replica = self._replicas.get(name)
        if replica is None or replica.phase is not Phase.READY or replica.task is not None:
            return None
        held = replica.manifest
        if held is None or held.digest != version:
            return None
        cached = self._served.get(name)
        if cached is None or cached[0] is not held:
            files = {f.path: f for f in held.files}
            cached = self._served[name] = (
                held,
                ServedVersion(self._store.version_dir(held), files),
            )
        return cached[1]

    async def _fixed_manifest(self, name: str, version: str) -> dict[str, FileEntry] | None:
        """The fixed version's manifest from the coordinator; None when none is fixed."""
        if not version:
            return None
        stub = self._stub
        if stub is None:
            raise VersionUnavailable(
                f"version {version} is fixed but the coordinator is not connected to read it"
            )
        entries: list[pb.ManifestEntry] = []
        token = ""
        try:
            while True:
                response = await stub.GetVersionManifest(
                    pb.GetVersionManifestRequest(
                        dataset_name=name, version=version, page_token=token
                    ),
                    timeout=_RPC_TIMEOUT_SECONDS,
                )
                entries.extend(response.entries)
                token = response.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as exc:
            raise VersionUnavailable(
                f"reading the manifest of version {version} from the coordinator: "
                f"{exc.code().name}: {exc.details()}"
            ) from exc
        return versioning.expected_entries(entries, version)

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
        with contextlib.suppress(CacheIndexError):
            await asyncio.to_thread(self._index.remove, name)
        log.info("Deleted", extra={"dataset": name})
        metrics.EVICTIONS.inc()
        del self._replicas[name]
        # Room was freed: copies waiting for it try again now.
        for replica in self._replicas.values():
            if replica.phase is Phase.PENDING:
                replica.retry_at = 0.0
        self.converge()
        self._changed.set()

    # Versions -------------------------------------------------------------------------------

    async def _offer_versions(self, stub: pb_grpc.AgentServiceAsyncStub) -> None:
        """Offers every Ready copy whose revision has no fixed version yet, and adopts the
        answer: a copy that differs from the fixed version is replaced by a copy of it."""
        for name, replica in list(self._replicas.items()):
            held = replica.manifest
            if replica.phase is not Phase.READY or replica.offered or held is None:
                continue
            if self._desired is None or name not in self._desired:
                continue  # offered once the coordinator says the dataset is still wanted
            if replica.task is not None or replica.want.version or held.revision <= 0:
                replica.offered = True
                continue
            try:
                response = await stub.PublishVersion(
                    versioning.offer(held, self._identity), timeout=_RPC_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise  # the session reconnects; offered again then
                # FAILED_PRECONDITION: the revision is no longer current (a newer desired set
                # follows). Anything else is logged and not retried for this copy.
                replica.offered = True
                log.warning(
                    "Version not offered: %s: %s",
                    code.name,
                    exc.details(),
                    extra={"dataset": name, "version": held.version},
                )
                continue
            replica.offered = True
            if self._replicas.get(name) is not replica:
                continue
            fixed = response.version
            if fixed and fixed != held.digest:
                log.warning(
                    "Another copy fixed version %s of revision %d; replacing this copy",
                    fixed,
                    held.revision,
                    extra={"dataset": name, "version": held.version},
                )
                adopted = replace(replica.want, version=fixed)
                if self._desired is not None and name in self._desired:
                    current = self._desired[name]
                    if (current.source, current.revision) == (adopted.source, adopted.revision):
                        self._desired[name] = replace(current, version=fixed)
                self.converge()
            elif fixed:
                log.info("Version fixed", extra={"dataset": name, "version": held.version})

    async def _version_loop(self, stub: pb_grpc.AgentServiceAsyncStub, interval: float) -> None:
        while True:
            self._offer_wanted.clear()
            await self._offer_versions(stub)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._offer_wanted.wait(), interval)

    # Talking to the coordinator ----------------------------------------------------------------

    def room(self) -> capacity.Room:
        usage = self._store.usage()
        used = sum(r.disk_bytes() for r in self._replicas.values())
        return capacity.room(
            usage.capacity_bytes, usage.free_bytes, self._settings.cache_quota_bytes, used
        )

    def state_request(self) -> pb.ReportStateRequest:
        room = self.room()
        metrics.CACHE_CAPACITY.set(room.capacity_bytes)
        metrics.CACHE_FREE.set(room.free_bytes)
        metrics.CACHE_USED.set(
            sum(r.manifest.total_bytes for r in self._replicas.values() if r.manifest is not None)
        )
        now = time.monotonic()
        return pb.ReportStateRequest(
            agent=self._identity,
            replicas=[r.report(name, now) for name, r in sorted(self._replicas.items())],
            cache_capacity_bytes=room.capacity_bytes,
            cache_free_bytes=room.free_bytes,
            pressure_bytes=pressure(self._replicas),
        )

    # Background passes --------------------------------------------------------------------------

    async def _last_use_loop(self, stop: asyncio.Event) -> None:
        interval = self._settings.last_use_interval_seconds
        while interval > 0 and not stop.is_set():
            for name, replica in list(self._replicas.items()):
                held = replica.manifest
                if held is None or replica.phase is Phase.DELETING:
                    continue
                paths = lastuse.sample([f.path for f in held.files])
                directory = self._store.version_dir(held)
                seen = await asyncio.to_thread(lastuse.atimes, directory, paths)
                used = lastuse.newest(seen, held.published_at)
                if used > replica.last_used:
                    replica.last_used = used
                    with contextlib.suppress(CacheIndexError):
                        await asyncio.to_thread(self._index.set_last_used, name, used)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

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
        version_dir = self._store.version_dir(manifest)
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
            source = self._source_for(replica.want.source, replica.want.credentials)
            await asyncio.to_thread(
                repair, source, version_dir, manifest, corrupt, self._settings.fetch, replica.cancel
            )
        except Exception as exc:
            log.warning("Repair failed, fetching again: %s", exc, extra={"dataset": name})
            # The damaged copy must not be served: drop it so the retry copies afresh.
            replica.manifest = None
            replica.phase, replica.message, replica.retry_at = Phase.FAILED, str(exc), 0.0
            self.converge()
            return
        replica.phase, replica.message = Phase.READY, ""
        log.info("Repaired %d files", len(corrupt), extra={"dataset": name})
        self._changed.set()

    # Running ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.recover()
        if self._health is not None:
            await self._health.recovered()
        scrubber = asyncio.create_task(self._scrub_loop(stop))
        sampler = asyncio.create_task(self._last_use_loop(stop))
        backoff = 0.5
        while not stop.is_set():
            try:
                await self._session(stop)
                backoff = 0.5
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                detail = (
                    f"{exc.code().name}: {exc.details()}"
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else "timed out"
                )
                log.warning("Coordinator session ended: %s; reconnecting in %.1fs", detail, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 30.0)
        for replica in self._replicas.values():
            replica.cancel.set()
        tasks = [r.task for r in self._replicas.values() if r.task is not None]
        await asyncio.gather(scrubber, sampler, *tasks, return_exceptions=True)
        self._index.close()

    async def _session(self, stop: asyncio.Event) -> None:
        async with open_channel(self._settings.coordinator, self._settings.tls) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            room = self.room()
            response = await stub.RegisterAgent(
                pb.RegisterAgentRequest(
                    agent=self._identity,
                    cache_capacity_bytes=room.capacity_bytes,
                    cache_free_bytes=room.free_bytes,
                    agent_version=__version__,
                    node_labels=dict(self._settings.node_labels),
                    peer_address=self._peer_address,
                ),
                timeout=_RPC_TIMEOUT_SECONDS,
                wait_for_ready=True,
            )
            lease = max(3, response.lease_seconds)
            log.info("Registered with the coordinator (lease %ds)", lease)
            if self._health is not None:
                await self._health.serving()
            self._stub = stub
            interval = min(self._settings.report_interval_seconds, lease / 3)
            tasks = [
                asyncio.create_task(self._watch(stub, lease)),
                asyncio.create_task(self._report_loop(stub, interval)),
                asyncio.create_task(self._version_loop(stub, interval)),
                asyncio.create_task(stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._stub = None
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
            self.set_desired({d.name: Want.from_pb(d) for d in message.datasets})

    async def _report_loop(self, stub: pb_grpc.AgentServiceAsyncStub, interval: float) -> None:
        while True:
            self._changed.clear()
            await stub.ReportState(self.state_request(), timeout=_RPC_TIMEOUT_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), interval)
