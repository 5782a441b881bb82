"""The transfer engine: copies every object of a listing into an empty staging directory.

Work is split into units: a small file is one unit (one whole-object GET); a file larger than
`multipart_threshold_bytes` is split into `part_bytes` ranges written in place with `pwrite`,
or, when its multipart upload's ETag or composite checksum is the only way to verify it, into
the upload's parts. Units run on `concurrency` threads. Each unit computes the CRC64/NVME of
its bytes as they arrive, and whatever else verification needs (the CRC the source states,
or the MD5 of a part); a file's CRCs are the combination of its units' (no second pass).

Sources that implement `StreamingSource` (S3, NFS, peers) are read with `readinto` into one
reused buffer per thread (256 KiB; 1 MiB for NFS), written with one `pwrite` per buffer; others
hand out chunks of at most `READ_CHUNK_BYTES` (1 MiB). Either way the engine's buffers stay below
`concurrency x 1 MiB` (8 MiB by default) whatever the file sizes.

Every file is created beneath the staging directory through directory file descriptors with
O_NOFOLLOW, size-checked, verified (see `verify`), and fsynced on threads apart from the reads
(`agent.flusher`); it counts as copied (and is journalled) only once fsynced. Then every
directory is fsynced. With `drop_behind`, each finished range and file is also written out
and dropped from the page cache as the copy goes (`agent.pagecache`). Verification, strongest
available first (the method is recorded per file):

1. the source's full-object checksum (S3 CRC64NVME, CRC32C or CRC32): `crc64nvme`, ...;
2. the dataset version's manifest, when the version is fixed (the first complete copy's
   CRC64 per file): `manifest`;
3. a multipart upload's composite checksum, over its parts' CRCs: `crc32c-composite`, ...;
4. a multipart upload's ETag, the MD5 of its parts' MD5s: `md5-multipart`;
5. the MD5 of a single-part S3 ETag: `md5-etag`;
6. otherwise the file is recorded as `unverified` (size only), never silently trusted.

A `MultiGetSource` (S3) reads the small files (up to 1 MiB) from one thread over
`small_object_connections` non-blocking connections (`agent.sources.s3loop`): each file is
written, verified and recorded exactly as a file read alone, and whatever it did not deliver
verified is read again one file at a time on the threads.

A `BatchSource` (peers) reads runs of small files in one request each: the engine groups them
(`_Engine.groups`) and writes and verifies each file of a batch exactly as a file read alone;
whatever a batch did not deliver verified is then read one file at a time.

A `RoutedSource` (peers in front of the origin) learns which server sent bytes that failed:
a file read whole is blamed on its sender and read again from the origin; a file read as
ranges is read again range by range from the origin, and the senders of the ranges that differ
are blamed.

A failed unit is retried a bounded number of times (a small file whose bytes fail
verification is fetched again); an object that changed since it was listed (HTTP 412 on
If-Match) is restarted from fresh metadata a bounded number of times. The first error that
exhausts its retries cancels the rest and is raised with the last transport error as its cause.

With a journal, each completed range of a ranged file is recorded too, so a copy killed in the
middle of a large file resumes with the ranges it had (read back and checked first).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import checksums, pagecache
from agent.checksums import CompositeChecksum, ObjectChecksum
from agent.destination import DIR_FLAGS, Dirs, fsync_tree, prune
from agent.errors import (
    AgentError,
    DiskFull,
    FetchCancelled,
    SourceChanged,
    SourceError,
    UnsafeKey,
    VerificationError,
)
from agent.flusher import Flusher
from agent.journal import Journal, RangeRecord
from agent.keys import find_collisions, is_directory_marker, key_to_parts
from agent.manifest import (
    UNVERIFIED,
    VERIFIED_MANIFEST,
    VERIFIED_MD5_ETAG,
    FileEntry,
)
from agent.sources.base import (
    READ_CHUNK_BYTES,
    BatchBody,
    BatchSource,
    BufferedSource,
    ChecksummedSource,
    LentRangeBody,
    MultiGetSource,
    ObjectInfo,
    PartLayout,
    RoutedSource,
    Source,
    StreamingSource,
)

log = logging.getLogger(__name__)

VERIFIED_MD5_MULTIPART = "md5-multipart"
"""The object's ETag is the MD5 of its parts' MD5s (multipart upload) and matched."""
VERIFIED_COMPOSITE_SUFFIX = "-composite"
"""After an algorithm's name: the multipart upload's composite checksum matched."""

_MAX_RESTARTS = 3
_RETRY_REASONS = {"retries": "transport", "checksum_failures": "checksum", "restarts": "changed"}
_COPY_BUFFER_BYTES = 256 * 1024
"""Read buffer per thread on the buffered path. Small enough that the bytes `recv_into` just
wrote are still in the CPU cache when the CRCs and `pwrite` read them, and that each `pwrite`
holds the file's inode lock briefly: on one 1 GiB object 1 MiB buffers cost 2.8-2.95 s of CPU
and 256 KiB ones 1.5-1.6 s (docs/benchmarks.md); 64 and 128 KiB were no better. A source
may ask for larger reads (`read_bytes`, at most `READ_CHUNK_BYTES`)."""
_LOOP_MAX_BYTES = 1024 * 1024
"""Files up to this size go to a `MultiGetSource`'s one-thread reader: for them the cost is
per object; larger ones are read by the threads, whose checksums run in parallel."""
_LOOP_MIN_FILES = 8
"""Fewer small files than this are read by the threads (as fast, without opening more
connections)."""
_MAX_PART_UNIT_BYTES = 256 * 1024 * 1024
"""Multipart parts larger than this are read part by part only when there are at least as
many parts as threads (one thread reads a part, so fewer would leave threads idle)."""


@dataclass(frozen=True)
class FetchSettings:
    concurrency: int = 8
    """Parallel reads (threads): ranges of large files, and small files from sources without
    a one-thread reader (`small_object_connections`). Memory: at most concurrency x 1 MiB of
    read buffers (batched reads of small files from peers stream through the same buffers;
    each thread adds only its batch's request, at most 64 x 4 KiB of paths:
    `PeerSettings.batch_files`). Measured on 2 cores with the server beside the agent
    (docs/benchmarks.md): on one large file 4-8 threads were mostly ahead of 16."""
    part_bytes: int = 16 * 1024 * 1024
    """Range size for large files, bytes. Memory does not depend on it (reads stream)."""
    multipart_threshold_bytes: int = 16 * 1024 * 1024
    """Files larger than this are read as parallel ranges, bytes."""
    attempts: int = 3
    """Tries per unit (small file or range) before the fetch fails."""
    fsync: bool = True
    """fsync every file and directory before the copy counts as done. Off only for
    benchmarks and throw-away copies."""
    fsync_concurrency: int = 64
    """fsyncs in flight at most, on threads of their own (`agent.flusher`), started as
    needed: the reading threads hand each verified file over and go on. Memory: a thread
    stack each (16 KiB resident here), and up to twice as many open files waiting. On 2,000
    small files here 64 took 13% less time than 8, 32 10% less (docs/benchmarks.md, 78bc208)."""
    small_object_connections: int = 64
    """Connections the one-thread reader of small files keeps busy, for sources that have one
    (S3: `agent.sources.s3loop`); 0 reads small files on the threads instead. Memory: one
    256 KiB buffer in all, plus each connection's socket buffers in the kernel. On 2,000
    files of 20-200 KB here (docs/benchmarks.md), 16 to 128 connections took 0.67-0.83 s
    and 16 threads 1.1-1.2 s; more connections help a remote server with real latency."""
    drop_behind: bool = True
    """With fsync on, write each finished range and file to disk as the copy goes and drop it
    from the page cache (`agent.pagecache`): the copy holds at most about concurrency x
    part_bytes of page cache instead of the whole dataset, and leaves the rest of the page
    cache to the node's jobs. Off: fetched files stay cached until the kernel evicts them."""


@dataclass
class Progress:
    """Counters the runner reports while a fetch runs. Never decrease."""

    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    retries: int = 0
    """Units read again after a transport error."""
    checksum_failures: int = 0
    """Files whose bytes did not match the source's checksum (each fetched again or failed)."""
    restarts: int = 0
    """Objects restarted because they changed while being copied."""
    labels: tuple[str, str] | None = None
    """(source type, dataset) for the byte and file metrics; None counts nothing there."""
    metrics: bool = True
    """Record the agent's Prometheus metrics (`agent.metrics`). The one-shot `fetch` command
    serves none: it records nothing and so never imports prometheus_client (40 ms of its
    start-up)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.files_done += files
            self.bytes_done += nbytes
        if self.labels is not None and self.metrics:
            if nbytes:
                _child(_metrics().FETCHED_BYTES, self.labels).inc(nbytes)
            if files:
                _child(_metrics().FETCHED_FILES, self.labels).inc(files)

    def count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)
        if not self.metrics:
            return
        if counter == "checksum_failures":
            _metrics().CHECKSUM_FAILURES.inc()
        _child(_metrics().FETCH_RETRIES, (_RETRY_REASONS[counter],)).inc()

    def verified(self, method: str) -> None:
        if self.metrics:
            _child(_metrics().VERIFIED_FILES, (method,)).inc()


def _metrics() -> Any:
    """`agent.metrics`, imported when first recorded into (see `Progress.metrics`)."""
    from agent import metrics

    return metrics


_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def _child(metric: Any, labels: tuple[str, ...]) -> Any:
    """A labelled metric, looked up once per label set (`labels()` takes a lock and builds
    keys on every call, once per file on the small-file path)."""
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


@dataclass(frozen=True)
class PlannedFile:
    obj: ObjectInfo
    parts: tuple[str, ...]


def plan(objects: list[ObjectInfo]) -> tuple[list[PlannedFile], list[tuple[str, str]]]:
    """Maps a listing to paths. Returns the files to copy and the refused keys with the reason
    (unsafe keys, file/directory collisions); empty directory markers are skipped."""
    planned: list[PlannedFile] = []
    refused: list[tuple[str, str]] = []
    for obj in objects:
        if is_directory_marker(obj.key) and obj.size == 0:
            continue
        try:
            planned.append(PlannedFile(obj, key_to_parts(obj.key)))
        except UnsafeKey as exc:
            refused.append((obj.key, str(exc)))
    collisions = find_collisions(p.parts for p in planned)
    kept: list[PlannedFile] = []
    taken: set[tuple[str, ...]] = set()
    for p in planned:
        reason = collisions.get(p.parts)
        # A repeated key keeps its first occurrence; a file/directory clash keeps neither file.
        if reason is None or (p.parts not in taken and reason.startswith("appears")):
            kept.append(p)
            taken.add(p.parts)
        else:
            refused.append((p.obj.key, f"object key {p.obj.key!r} {reason}"))
    return kept, refused


@dataclass
class _Digests:
    """What one unit computed over its bytes."""

    crc64: int
    length: int
    other: int | None = None
    """CRC in the job's `other` algorithm, when it has one."""
    md5: bytes | None = None


class _FileJob:
    """One file being written. Opened by its first unit (so a listing of 100,000 files does not
    hold 100,000 descriptors), closed once verified by its last unit.

    A file is read whole (one unit) or as ranges: `part_bytes` ranges, or the parts of its
    multipart upload when they are needed to verify it (`layout`)."""

    def __init__(self, planned: PlannedFile, dirs: Dirs) -> None:
        self.planned = planned
        self.path = "/".join(planned.parts)
        self.obj = planned.obj
        self.units: list[tuple[int, int]] = [(0, planned.obj.size)]
        self.remaining = 1
        self.results: dict[int, _Digests] = {}
        """offset -> what the unit at that offset computed."""
        self.stated: ObjectChecksum | None = None
        """The source's full-object checksum."""
        self.stated_known = False
        self.composite: CompositeChecksum | None = None
        self.layout: PartLayout | None = None
        """Set when the units are the parts of the multipart upload."""
        self.other: str | None = None
        """A CRC each unit computes besides CRC64/NVME (the stated or composite algorithm)."""
        self.md5 = False
        """Each unit computes the MD5 of its bytes too."""
        self.kept = False
        """Some ranges were kept from an interrupted copy: the file must not be truncated."""
        self.written = False
        self.lock = threading.Lock()
        self.handed_over = False
        """Verified and handed to the flusher, which closes it: `close` leaves it open."""
        self._dirs = dirs
        self._fd = -1
        self._closed = False

    @property
    def ranged(self) -> bool:
        return len(self.units) > 1

    def fd(self) -> int:
        with self.lock:
            if self._closed:
                raise FetchCancelled("file already closed")
            if self._fd < 0:
                # O_TRUNC, not O_EXCL: a resumed copy rewrites files it had not finished.
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                self._fd = self._dirs.open_file(
                    self.planned.parts, flags if self.kept else flags | os.O_TRUNC
                )
                if self.ranged:
                    # Ranges are written in any order: the file has its size from the start.
                    os.ftruncate(self._fd, self.obj.size)
            return self._fd

    def unit_done(self, offset: int, digests: _Digests) -> bool:
        """Records a finished unit; True for the last one."""
        with self.lock:
            self.results[offset] = digests
            self.remaining -= 1
            return self.remaining == 0

    def ordered(self) -> list[_Digests]:
        return [self.results[o] for o in sorted(self.results)]

    def crc64(self) -> int:
        return checksums.combine("crc64nvme", [(d.crc64, d.length) for d in self.ordered()])

    def close(self) -> None:
        if not self.handed_over:
            self.abandon()

    def abandon(self) -> None:
        """Closes the file, even once handed over."""
        with self.lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            self._closed = True

    def sync_and_close(self, drop_behind: bool) -> None:
        """fsyncs the file (then drops it from the page cache, with `drop_behind`) and closes
        it."""
        with self.lock:
            if self._fd < 0:
                raise FetchCancelled(f"{self.path!r} was closed before it was fsynced")
            os.fsync(self._fd)
            if drop_behind:
                pagecache.drop(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._closed = True


class _Engine:
    def __init__(
        self,
        source: Source,
        dirs: Dirs,
        settings: FetchSettings,
        progress: Progress,
        cancel: threading.Event,
        expected: Mapping[str, FileEntry],
        journal: Journal | None,
    ) -> None:
        self.source = source
        self.buffered = source if isinstance(source, BufferedSource) else None
        self.streaming = source if isinstance(source, StreamingSource) else None
        self.routed = source if isinstance(source, RoutedSource) else None
        self.batch = source if isinstance(source, BatchSource) else None
        self.multi = source if isinstance(source, MultiGetSource) else None
        self.read_bytes = min(getattr(source, "read_bytes", _COPY_BUFFER_BYTES), READ_CHUNK_BYTES)
        """The read buffer per thread: the source's preferred read size, if it has one."""
        self.checksummed = source if isinstance(source, ChecksummedSource) else None
        self.journal = journal
        self.dirs = dirs
        self.settings = settings
        self.progress = progress
        self.cancel = cancel
        self.expected = expected
        self.entries: list[FileEntry] = []
        self.entries_lock = threading.Lock()
        self.flusher = Flusher(settings.fsync_concurrency, cancel)
        self._local = threading.local()

    def _buffer(self) -> memoryview:
        """This thread's read buffer, reused for every unit it copies."""
        view: memoryview | None = getattr(self._local, "buffer", None)
        if view is None:
            view = self._local.buffer = memoryview(bytearray(self.read_bytes))
        return view

    def _with_retries(self, what: str, action: Callable[[], None]) -> None:
        last: SourceError | VerificationError | None = None
        for attempt in range(1, self.settings.attempts + 1):
            if self.cancel.is_set():
                raise FetchCancelled("fetch cancelled")
            try:
                action()
                return
            except SourceChanged:
                raise
            except (SourceError, VerificationError) as exc:
                last = exc
                self.progress.count(
                    "checksum_failures" if isinstance(exc, VerificationError) else "retries"
                )
                log.info("Retrying %s after attempt %d: %s", what, attempt, exc)
        assert last is not None
        raise type(last)(
            f"{what}: giving up after {self.settings.attempts} attempts: {last}"
        ) from last

    def _copy(
        self, job: _FileJob, obj: ObjectInfo, offset: int, length: int
    ) -> tuple[_Digests, ObjectChecksum | None]:
        """Copies one unit into the file, computing its digests as the bytes arrive. Returns
        them and, for a whole-object read from a buffered source, the checksum it stated."""
        fd = job.fd()
        if self.streaming is None:
            return self._copy_chunks(fd, job, obj, offset, length), None
        body = self.streaming.open_range(obj, offset, length)
        try:
            stated = body.checksum
            other, md5 = job.other, job.md5
            if not job.ranged:
                other, md5 = self.whole_read_digests(job, stated)
            crc_other = checksums.crc_function(other) if other is not None else None
            digest = hashlib.md5(usedforsecurity=False) if md5 else None
            crc, crc2 = self._pump(body, fd, obj, offset, length, crc_other, digest)
        finally:
            body.close()
        if not job.ranged:
            job.other = other
        return (
            _Digests(
                crc,
                length,
                crc2 if other is not None else None,
                digest.digest() if digest is not None else None,
            ),
            stated,
        )

    def _pump(
        self,
        body: BatchBody,
        fd: int,
        obj: ObjectInfo,
        offset: int,
        length: int,
        crc_other: checksums.Crc | None = None,
        digest: hashlib._Hash | None = None,
    ) -> tuple[int, int]:
        """Writes the next `length` bytes of `body` into the file at `offset` through this
        thread's buffer; returns their CRC64/NVME and their CRC by `crc_other` (0 without),
        and feeds them to the MD5 `digest` when there is one."""
        if isinstance(body, LentRangeBody):
            return self._pump_lent(body, fd, obj, offset, length, crc_other, digest)
        buf, pos, end = self._buffer(), offset, offset + length
        crc, crc2 = 0, 0
        while pos < end:
            n = body.readinto(buf[: min(len(buf), end - pos)])
            if n == 0:
                raise SourceError(f"reading {obj.key!r}: the body ended {end - pos} early")
            if self.cancel.is_set():
                raise FetchCancelled("fetch cancelled")
            crc, crc2 = _write_digesting(fd, buf[:n], pos, crc, crc2, crc_other, digest)
            pos += n
        return crc, crc2

    def _pump_lent(
        self,
        body: LentRangeBody,
        fd: int,
        obj: ObjectInfo,
        offset: int,
        length: int,
        crc_other: checksums.Crc | None,
        digest: hashlib._Hash | None,
    ) -> tuple[int, int]:
        """`_pump` writing straight from the source's own buffers (no copy into ours)."""
        pos, end = offset, offset + length
        crc, crc2 = 0, 0

        def consume(view: memoryview) -> None:
            nonlocal crc, crc2
            crc, crc2 = _write_digesting(fd, view, pos, crc, crc2, crc_other, digest)

        while pos < end:
            n = body.read_lent(min(self.read_bytes, end - pos), consume)
            if n == 0:
                raise SourceError(f"reading {obj.key!r}: the body ended {end - pos} early")
            if self.cancel.is_set():
                raise FetchCancelled("fetch cancelled")
            pos += n
        return crc, crc2

    def whole_read_digests(
        self, job: _FileJob, stated: ObjectChecksum | None
    ) -> tuple[str | None, bool]:
        """What a whole-object read computes besides CRC64/NVME, learnt from the response
        itself: the CRC algorithm it stated (if not CRC64/NVME), and whether the MD5 is needed
        (no stated checksum, no manifest entry, and a single-part ETag to compare it with)."""
        other = stated.algorithm if stated and stated.algorithm != "crc64nvme" else None
        md5 = (
            stated is None
            and job.path not in self.expected
            and bool(checksums.MD5_ETAG.fullmatch(job.obj.etag))
        )
        return other, md5

    def _copy_chunks(
        self, fd: int, job: _FileJob, obj: ObjectInfo, offset: int, length: int
    ) -> _Digests:
        """The same for sources that hand out chunks (`Source.read_range`)."""
        other = job.other if job.ranged else None
        crc, crc2, pos = 0, 0, offset
        for chunk in self.source.read_range(obj, offset, length):
            if self.cancel.is_set():
                raise FetchCancelled("fetch cancelled")
            os.pwrite(fd, chunk, pos)
            pos += len(chunk)
            crc = checksums.crc64(chunk, crc)
            if other is not None:
                crc2 = checksums.crc(other, chunk, crc2)
        return _Digests(crc, length, crc2 if other is not None else None)

    # Planning ------------------------------------------------------------------------------

    def plan_ranges(self, job: _FileJob, kept: Mapping[int, RangeRecord]) -> None:
        """Decides the units of a file read as ranges (or as the parts of its multipart
        upload), asks the source's checksums, and takes over the ranges an interrupted copy
        completed (`kept`, read back and checked first)."""
        obj, size = job.obj, job.obj.size
        if self.buffered is not None:
            try:
                facts = self.buffered.head(obj.key, obj.etag)
            except SourceChanged:
                if size > self.settings.multipart_threshold_bytes:
                    raise
                return  # a whole-object read restarts it from fresh metadata
            job.stated, job.composite = facts.checksum, facts.composite
        elif self.checksummed is not None:
            job.stated = self.checksummed.checksum(obj)
        job.stated_known = True
        if job.stated is not None:
            job.other = job.stated.algorithm if job.stated.algorithm != "crc64nvme" else None
        elif (
            self.buffered is not None
            and job.path not in self.expected
            and checksums.MULTIPART_ETAG.fullmatch(obj.etag)
        ):
            layout = self.buffered.part_layout(obj)
            usable = layout is not None and (
                layout.count >= self.settings.concurrency
                or layout.part_size <= _MAX_PART_UNIT_BYTES
            )
            if layout is not None and usable:
                job.layout = layout
                job.units = layout.parts(size)
                if job.composite is not None and job.composite.parts == layout.count:
                    job.other = job.composite.algorithm
                else:
                    job.composite = None
                    job.md5 = True
            elif layout is not None:
                log.info(
                    "Multipart parts too large to verify part by part (%d bytes, %d parts)",
                    layout.part_size,
                    layout.count,
                    extra={"object": obj.key},
                )
            else:
                log.info(
                    "The source did not tell the parts of a multipart upload (or they differ "
                    "in size): verified by checksum or manifest only",
                    extra={"object": obj.key},
                )
        if job.layout is None and size > self.settings.multipart_threshold_bytes:
            step = self.settings.part_bytes
            job.units = [(off, min(step, size - off)) for off in range(0, size, step)]
        job.remaining = len(job.units)
        if kept and job.ranged:
            self._take_kept(job, kept)

    def _take_kept(self, job: _FileJob, kept: Mapping[int, RangeRecord]) -> None:
        algorithms = ("crc64nvme",) + ((job.other,) if job.other else ())
        fd = -1
        try:
            fd = self.dirs.open_file(job.planned.parts, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size != job.obj.size:
                return
            for offset, length in job.units:
                record = kept.get(offset)
                if record is None or record.length != length:
                    continue
                crcs, md5 = checksums.read_back(fd, offset, length, algorithms, job.md5)
                if f"{crcs['crc64nvme']:016x}" != record.crc64nvme:
                    continue
                other = crcs[job.other] if job.other else None
                job.results[offset] = _Digests(crcs["crc64nvme"], length, other, md5)
        finally:
            os.close(fd)
        if job.results:
            job.kept = True
            job.remaining -= len(job.results)
            self.progress.add(nbytes=sum(d.length for d in job.results.values()))
            log.info(
                "Resuming: %d of %d ranges kept from an interrupted copy",
                len(job.results),
                len(job.units),
                extra={"object": job.obj.key},
            )

    # Units ---------------------------------------------------------------------------------

    def whole_file(self, job: _FileJob) -> None:
        for restart in range(_MAX_RESTARTS + 1):
            obj = job.obj

            def attempt(obj: ObjectInfo = obj) -> None:
                if job.written:
                    os.ftruncate(job.fd(), obj.size)
                job.written = True
                digests, stated = self._copy(job, obj, 0, obj.size)
                job.results = {0: digests}
                if self.buffered is not None:
                    job.stated, job.stated_known = stated, True
                try:
                    self._verify_and_close(job, keep_open_on_error=True)
                except VerificationError:
                    if self.routed is not None:
                        self.routed.distrust(obj)
                        self.routed.blame(obj, 0)
                    raise

            try:
                self._with_retries(f"reading {obj.key!r}", attempt)
            except SourceChanged:
                if restart == _MAX_RESTARTS:
                    raise
                self._restart(job)
                continue
            self.progress.add(nbytes=obj.size)
            return

    def groups(self, jobs: list[_FileJob]) -> list[list[_FileJob]]:
        """`jobs` in order, with runs of small files that one batch can read grouped (within
        the source's limits, and no more per group than spreads them over every thread);
        every other job alone."""
        if self.batch is None:
            return [[job] for job in jobs]
        max_files, max_bytes = self.batch.batch_limits()
        fits = [
            not job.ranged and 0 < job.obj.size <= max_bytes and job.path in self.expected
            for job in jobs
        ]
        per = min(max_files, -(-sum(fits) // self.settings.concurrency))
        out: list[list[_FileJob]] = []
        group: list[_FileJob] | None = None
        group_bytes = 0
        for job, fit in zip(jobs, fits, strict=True):
            if not fit or per < 2:
                out.append([job])
                group = None
                continue
            if group is None or len(group) == per or group_bytes + job.obj.size > max_bytes:
                group, group_bytes = [], 0
                out.append(group)
            group.append(job)
            group_bytes += job.obj.size
        return out

    def whole_files(self, jobs: list[_FileJob]) -> None:
        """Small files read through one batch (`BatchSource`), each written, verified and
        counted exactly as `whole_file` does. The batch is only a first try: the files it did
        not deliver verified (it failed, was declined, or a file's bytes were wrong) are read
        one by one with `whole_file`, which fails over, retries and restarts."""
        for job in self._copy_batch(jobs):
            self.whole_file(job)

    def _copy_batch(self, jobs: list[_FileJob]) -> list[_FileJob]:
        """Copies what one batch delivers of `jobs`; returns the jobs left to copy."""
        assert self.batch is not None
        if self.cancel.is_set():
            raise FetchCancelled("fetch cancelled")
        body = self.batch.open_batch([job.obj for job in jobs])
        if body is None:
            return jobs
        try:
            for i, job in enumerate(jobs):
                obj = job.obj
                job.written = True
                try:
                    crc, _ = self._pump(body, job.fd(), obj, 0, obj.size)
                except SourceError as exc:
                    log.info(
                        "A batched read failed; reading its %d remaining files one by one: %s",
                        len(jobs) - i,
                        exc,
                        extra={"object": obj.key},
                    )
                    return jobs[i:]
                job.results = {0: _Digests(crc, obj.size)}
                try:
                    self._verify_and_close(job, keep_open_on_error=True)
                except VerificationError as exc:
                    # As a file read alone: its sender is blamed and it is read again (from the
                    # origin, as the source now distrusts it), as are the files after it.
                    self.progress.count("checksum_failures")
                    log.info("Retrying %r read in a batch: %s", obj.key, exc)
                    if self.routed is not None:
                        self.routed.distrust(obj)
                        self.routed.blame(obj, 0)
                    return jobs[i:]
                self.progress.add(nbytes=obj.size)
        finally:
            body.close()
        return []

    def small_files(self, jobs: list[_FileJob]) -> None:
        """Small files read whole by the source's one-thread reader (`MultiGetSource`), then
        the ones it did not deliver verified read one by one with `whole_file`, on the
        threads."""
        assert self.multi is not None
        receiver = _LoopReceiver(self, jobs)
        self.multi.get_many(
            [job.obj for job in jobs], receiver, self.settings.small_object_connections, self.cancel
        )
        if receiver.left:
            log.info(
                "%d of %d small files are read again one by one", len(receiver.left), len(jobs)
            )
        tasks: list[Callable[[], None]] = [
            functools.partial(self.whole_file, job) for job in receiver.left
        ]
        _run_all(tasks, self.settings.concurrency, self.cancel)

    def _restart(self, job: _FileJob) -> None:
        assert self.checksummed is not None
        self.progress.count("restarts")
        job.obj = self.checksummed.stat(job.obj.key)
        log.info("Object changed while being copied; restarting it", extra={"object": job.obj.key})

    def part(self, job: _FileJob, offset: int, length: int) -> None:
        obj = job.obj
        found: list[_Digests] = []

        def attempt() -> None:
            found[:] = [self._copy(job, obj, offset, length)[0]]

        self._with_retries(f"reading {obj.key!r} bytes {offset}+{length}", attempt)
        if self.settings.fsync and self.settings.drop_behind:
            pagecache.write_out_and_drop(job.fd(), offset, length)
        self.progress.add(nbytes=length)
        if self.journal is not None:
            record = RangeRecord(obj.etag, obj.size, offset, length, f"{found[0].crc64:016x}")
            self.journal.record_range(job.path, record)
        if job.unit_done(offset, found[0]):
            self.finish_ranged(job)

    def finish_ranged(self, job: _FileJob) -> None:
        # Which range was wrong cannot be told from a whole-file checksum: a mismatch fails
        # the copy (and forgets the file's journalled ranges), and the dataset is fetched again
        # - unless the ranges came from peers: then they are read again from the origin.
        routed = self.routed
        try:
            self._verify_and_close(job, keep_open_on_error=routed is not None)
        except VerificationError:
            self.progress.count("checksum_failures")
            if self.journal is not None:
                self.journal.drop_ranges(job.path)
            if routed is None:
                raise
            try:
                self._reread_from_origin(job, routed)
            finally:
                job.close()

    def _reread_from_origin(self, job: _FileJob, routed: RoutedSource) -> None:
        """Reads every range of a file that failed verification again (the source sends
        them to the origin now), blames the senders of the ranges that differed, and
        verifies the file again."""
        obj = job.obj
        routed.distrust(obj)
        log.warning(
            "Reading a file from peers failed verification; reading it from the origin",
            extra={"object": obj.key},
        )
        found: dict[int, _Digests] = {}
        for offset, length in job.units:

            def attempt(offset: int = offset, length: int = length) -> None:
                found[offset] = self._copy(job, obj, offset, length)[0]

            self._with_retries(f"reading {obj.key!r} bytes {offset}+{length}", attempt)
            if found[offset].crc64 != job.results[offset].crc64:
                routed.blame(obj, offset)
            job.results[offset] = found[offset]
        self._verify_and_close(job, keep_open_on_error=False)

    def _verify_and_close(self, job: _FileJob, keep_open_on_error: bool) -> None:
        """Verifies the file; then, with fsync, hands it to the flusher, which fsyncs, closes
        and records it; without, closes and records it."""
        obj = job.obj
        fd = job.fd()
        try:
            if os.fstat(fd).st_size != obj.size:
                raise VerificationError(f"{obj.key!r}: size on disk differs from the source")
            crc = job.crc64()
            method = self.verify(job, fd, crc)
        except VerificationError:
            if not keep_open_on_error:
                job.close()
            raise
        except BaseException:
            job.close()
            raise
        entry = FileEntry(
            path=job.path,
            size=obj.size,
            etag=obj.etag,
            crc64nvme=f"{crc:016x}",
            verified=method,
        )
        if not self.settings.fsync:
            job.close()
            self._record(entry)
            return
        job.handed_over = True
        self.flusher.submit(functools.partial(self._make_durable, job, entry), job.abandon)

    def _make_durable(self, job: _FileJob, entry: FileEntry) -> None:
        job.sync_and_close(self.settings.drop_behind)
        self._record(entry)

    def _record(self, entry: FileEntry) -> None:
        """Counts a verified (and, with fsync, durable) file as copied."""
        self.progress.verified(entry.verified)
        with self.entries_lock:
            self.entries.append(entry)
        if self.journal is not None:
            self.journal.record(entry)
        self.progress.add(files=1)

    def verify(self, job: _FileJob, fd: int, crc: int) -> str:
        """Checks the written bytes with the strongest evidence available; returns the method
        used or raises VerificationError."""
        obj = job.obj
        if job.stated_known:
            stated = job.stated
        else:
            stated = self.checksummed.checksum(obj) if self.checksummed is not None else None
        ordered = job.ordered()
        if stated is not None:
            if stated.algorithm == "crc64nvme":
                actual = crc
            elif job.other == stated.algorithm and all(d.other is not None for d in ordered):
                actual = checksums.combine(
                    stated.algorithm, [(d.other or 0, d.length) for d in ordered]
                )
            else:
                # Only sources that hand out chunks leave this to the end: read back.
                actual = checksums.file_crc(fd, obj.size, stated.algorithm)
            if actual != stated.value:
                raise VerificationError(
                    f"{obj.key!r}: {stated.algorithm} of the copy ({actual:x}) differs from "
                    f"the source's ({stated.value:x})"
                )
            return stated.algorithm
        expected = self.expected.get(job.path)
        if expected is not None:
            # The first verified copy's CRC64: as strong as the checks below and free (the
            # CRC64 is computed anyway), so a copy of a fixed version needs no MD5 pass.
            if (expected.size, expected.crc64nvme) != (obj.size, f"{crc:016x}"):
                raise VerificationError(
                    f"{obj.key!r}: content differs from the dataset version's manifest"
                )
            return VERIFIED_MANIFEST
        if job.layout is not None and job.composite is not None:
            if not job.composite.matches([d.other or 0 for d in ordered]):
                raise VerificationError(
                    f"{obj.key!r}: {job.composite.algorithm} of the copy's parts differs from "
                    f"the source's composite checksum"
                )
            return f"{job.composite.algorithm}{VERIFIED_COMPOSITE_SUFFIX}"
        if job.layout is not None and job.md5:
            etag = checksums.md5_multipart_etag([d.md5 or b"" for d in ordered])
            if etag != obj.etag.strip('"').lower():
                raise VerificationError(
                    f"{obj.key!r}: MD5 of the copy's parts {etag} differs from the ETag {obj.etag}"
                )
            return VERIFIED_MD5_MULTIPART
        match = checksums.MD5_ETAG.fullmatch(obj.etag)
        if match and self.checksummed is not None:
            streamed = ordered[0].md5 if len(ordered) == 1 else None
            md5 = streamed.hex() if streamed is not None else checksums.file_md5(fd, obj.size)
            if md5 != match.group(1).lower():
                raise VerificationError(
                    f"{obj.key!r}: MD5 of the copy {md5} differs from the ETag {obj.etag}"
                )
            return VERIFIED_MD5_ETAG
        return UNVERIFIED


def _write_digesting(
    fd: int,
    view: memoryview,
    pos: int,
    crc: int,
    crc2: int,
    crc_other: checksums.Crc | None,
    digest: hashlib._Hash | None,
) -> tuple[int, int]:
    """Writes `view` into the file at `pos`; returns the CRC64/NVME and the `crc_other` CRC
    (`crc2` unchanged without one) continued over it, and feeds it to `digest`, if any."""
    n, written = len(view), os.pwrite(fd, view, pos)
    while written < n:
        written += os.pwrite(fd, view[written:], pos + written)
    crc = checksums.crc64(view, crc)
    if crc_other is not None:
        crc2 = crc_other(view, crc2)
    if digest is not None:
        digest.update(view)
    return crc, crc2


class _Receiving:
    """A file a `MultiGetSource` is delivering."""

    def __init__(
        self, job: _FileJob, fd: int, stated: ObjectChecksum | None, other: str | None, md5: bool
    ) -> None:
        self.job = job
        self.fd = fd
        self.stated = stated
        self.other = other
        self.crc_other = checksums.crc_function(other) if other else None
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.pos = 0
        self.crc = 0
        self.crc2 = 0


class _LoopReceiver:
    """Writes, verifies and records the files a `MultiGetSource` delivers, as `whole_file`
    does for a file read alone; collects in `left` those to read again."""

    def __init__(self, engine: _Engine, jobs: list[_FileJob]) -> None:
        self._engine = engine
        self._jobs = jobs
        self._receiving: dict[int, _Receiving] = {}
        self.left: list[_FileJob] = []

    def begin(self, index: int, checksum: ObjectChecksum | None) -> None:
        job = self._jobs[index]
        other, md5 = self._engine.whole_read_digests(job, checksum)
        fd = job.fd()
        job.written = True
        self._receiving[index] = _Receiving(job, fd, checksum, other, md5)

    def write(self, index: int, data: memoryview) -> None:
        r = self._receiving[index]
        r.crc, r.crc2 = _write_digesting(r.fd, data, r.pos, r.crc, r.crc2, r.crc_other, r.md5)
        r.pos += len(data)

    def end(self, index: int) -> None:
        r = self._receiving.pop(index)
        job, engine = r.job, self._engine
        job.other = r.other
        job.results = {
            0: _Digests(
                r.crc,
                r.pos,
                r.crc2 if r.other is not None else None,
                r.md5.digest() if r.md5 is not None else None,
            )
        }
        job.stated, job.stated_known = r.stated, True
        try:
            engine._verify_and_close(job, keep_open_on_error=True)
        except VerificationError as exc:
            engine.progress.count("checksum_failures")
            log.info("Reading %r again: %s", job.obj.key, exc)
            self.left.append(job)
            return
        engine.progress.add(nbytes=job.obj.size)

    def failed(self, index: int, reason: str, attempted: bool = True) -> None:
        self._receiving.pop(index, None)
        job = self._jobs[index]
        if attempted:
            self._engine.progress.count("retries")
        log.debug("Reading %r again: %s", job.obj.key, reason)
        self.left.append(job)


def _keep_intact(
    dirs: Dirs, files: list[PlannedFile], resume: Mapping[str, FileEntry]
) -> dict[str, FileEntry]:
    """The journalled files that still match the listing and read back intact."""
    kept: dict[str, FileEntry] = {}
    for planned in files:
        path = "/".join(planned.parts)
        entry = resume.get(path)
        if entry is None or (entry.size, entry.etag) != (planned.obj.size, planned.obj.etag):
            continue
        try:
            fd = dirs.open_file(planned.parts, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            intact = os.fstat(fd).st_size == entry.size and (
                f"{checksums.file_crc(fd, entry.size, 'crc64nvme'):016x}" == entry.crc64nvme
            )
        finally:
            os.close(fd)
        if intact:
            kept[path] = entry
    return kept


def _kept_ranges(
    files: list[PlannedFile], resume: Mapping[str, FileEntry], kept_files: Mapping[str, object]
) -> dict[str, dict[int, RangeRecord]]:
    """The journalled ranges of files not complete, still matching the listing, by path and
    offset (read back later, once the file's units are known)."""
    ranges: dict[str, list[RangeRecord]] = getattr(resume, "ranges", {})
    found: dict[str, dict[int, RangeRecord]] = {}
    for planned in files:
        path = "/".join(planned.parts)
        records = ranges.get(path)
        if not records or path in kept_files:
            continue
        matching = {
            r.offset: r for r in records if (r.etag, r.size) == (planned.obj.etag, planned.obj.size)
        }
        if matching:
            found[path] = matching
    return found


def fetch_into(
    source: Source,
    files: list[PlannedFile],
    dest: Path,
    settings: FetchSettings,
    progress: Progress,
    cancel: threading.Event,
    expected: Mapping[str, FileEntry] | None = None,
    resume: Mapping[str, FileEntry] | None = None,
    journal: Journal | None = None,
) -> list[FileEntry]:
    """Copies `files` into the directory `dest`; returns their manifest entries.

    `expected` is the dataset version's manifest by path, when one is fixed already. `resume`
    lists files an interrupted copy into `dest` completed: those still matching the listing and
    intact on disk are kept; everything else in `dest` is removed first. Completed files are
    recorded in `journal`."""
    progress.files_total = len(files)
    progress.bytes_total = sum(f.obj.size for f in files)
    dirs = sorted({p.parts[:i] for p in files for i in range(1, len(p.parts))}, key=len)
    root_fd = os.open(dest, DIR_FLAGS)
    tree = Dirs(root_fd, dirs)
    jobs: list[_FileJob] = []
    try:
        resume = resume if resume is not None else {}
        kept = _keep_intact(tree, files, resume)
        partial = _kept_ranges(files, resume, kept)
        prune(dest, set(kept) | set(partial), dirs)
        tree.create(dirs)
        engine = _Engine(source, tree, settings, progress, cancel, expected or {}, journal)
        if kept:
            log.info("Resuming: %d verified files kept from an interrupted copy", len(kept))
            engine.entries.extend(kept.values())
            progress.add(files=len(kept), nbytes=sum(e.size for e in kept.values()))
            files = [p for p in files if "/".join(p.parts) not in kept]
        jobs = [_FileJob(p, tree) for p in files]
        # Files that may be read as ranges first learn their checksums (and, for multipart
        # uploads, their parts); their units are known only then.
        _run_all(
            [
                functools.partial(
                    engine._with_retries,
                    f"reading metadata of {j.obj.key!r}",
                    functools.partial(engine.plan_ranges, j, partial.get(j.path, {})),
                )
                for j in jobs
                if j.obj.size > settings.multipart_threshold_bytes
                or (
                    engine.buffered is not None
                    and j.obj.size > 0
                    and j.path not in engine.expected
                    and checksums.MULTIPART_ETAG.fullmatch(j.obj.etag)
                )
            ],
            settings.concurrency,
            cancel,
        )
        tasks: list[Callable[[], None]] = []
        rest = jobs
        if engine.multi is not None and settings.small_object_connections > 0:
            small = [j for j in jobs if not j.ranged and j.obj.size <= _LOOP_MAX_BYTES]
            if len(small) >= _LOOP_MIN_FILES:
                # First, so that its thread starts at once; the other threads take the rest.
                tasks.append(functools.partial(engine.small_files, small))
                rest = [j for j in jobs if j.ranged or j.obj.size > _LOOP_MAX_BYTES]
        # Large files first: their ranges spread over every thread while small files fill in.
        for group in engine.groups(sorted(rest, key=lambda j: -j.obj.size)):
            job = group[0]
            if len(group) > 1:
                tasks.append(functools.partial(engine.whole_files, group))
            elif not job.ranged:
                tasks.append(functools.partial(engine.whole_file, job))
            elif job.remaining == 0:
                tasks.append(functools.partial(engine.finish_ranged, job))
            else:
                tasks += [
                    functools.partial(engine.part, job, off, length)
                    for off, length in job.units
                    if off not in job.results
                ]
        try:
            _run_all(tasks, settings.concurrency, cancel)
        except BaseException:
            # A failed fsync cancels the reads: its error, raised here, is the one to report.
            engine.flusher.finish()
            raise
        engine.flusher.finish()
        if cancel.is_set():
            raise FetchCancelled("fetch cancelled")
        if settings.fsync:
            fsync_tree(root_fd, dirs)
        return engine.entries
    except AgentError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"disk full while writing into {dest}") from exc
        raise AgentError(f"writing into {dest}: {exc}") from exc
    finally:
        for job in jobs:
            with contextlib.suppress(OSError):
                job.close()
        tree.close()
        os.close(root_fd)


def _run_all(tasks: list[Callable[[], None]], threads: int, cancel: threading.Event) -> None:
    """Runs `tasks` in order on up to `threads` threads; the first failure cancels the rest
    (through `cancel`) and is raised once every thread has stopped.

    Threads pull tasks from one shared list iterator (its next() is atomic under the GIL):
    no future, lock or condition per task, which on 2,000 small files is measurable."""
    if not tasks:
        return
    pending = iter(tasks)
    errors: list[BaseException] = []

    def work() -> None:
        for task in pending:
            if errors:
                return
            try:
                task()
            except BaseException as exc:
                errors.append(exc)
                cancel.set()
                return

    workers = [
        threading.Thread(target=work, name=f"fetch-{i}", daemon=True)
        for i in range(min(threads, len(tasks)))
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    except BaseException:
        cancel.set()
        for worker in workers:
            worker.join()
        raise
    if errors:
        raise errors[0]
