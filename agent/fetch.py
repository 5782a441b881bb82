"""The transfer engine: copies every object of a listing into an empty staging directory.

Work is split into units: a small file is one unit (one whole-object GET); a file larger than
`multipart_threshold_bytes` is split into `part_bytes` ranges written in place with `pwrite`.
Units run on `concurrency` threads. Each unit computes the CRC64/NVME of its bytes as they
arrive; a file's CRC is the combination of its units' (no second pass).

Memory: each unit holds at most one `READ_CHUNK_BYTES` (1 MiB) chunk at a time, so the engine's
buffers stay below `concurrency x 1 MiB` (16 MiB by default) whatever the file sizes.

Every file is created beneath the staging directory through directory file descriptors with
O_NOFOLLOW, size-checked, verified (see `verify`), and fsynced; then every directory is
fsynced. Verification, strongest available first:

1. the source's full-object checksum (S3 CRC64NVME, CRC32C or CRC32);
2. the MD5 of a single-part S3 ETag;
3. the dataset version's manifest (the first complete copy's CRC64 per file);
4. otherwise the file is recorded as "unverified" (size only), never silently trusted.

A failed unit is retried a bounded number of times (a small file whose bytes fail
verification is fetched again); an object that changed since it was listed (HTTP 412 on
If-Match) is restarted from fresh metadata a bounded number of times. The first error that
exhausts its retries cancels the rest and is raised with the last transport error as its cause.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from agent import checksums, metrics
from agent.checksums import ObjectChecksum
from agent.errors import (
    AgentError,
    DiskFull,
    FetchCancelled,
    SourceChanged,
    SourceError,
    UnsafeKey,
    VerificationError,
)
from agent.journal import Journal
from agent.keys import find_collisions, is_directory_marker, key_to_parts
from agent.manifest import (
    UNVERIFIED,
    VERIFIED_MANIFEST,
    VERIFIED_MD5_ETAG,
    FileEntry,
)
from agent.sources import ObjectInfo, Source
from agent.sources.base import ChecksummedSource

log = logging.getLogger(__name__)

_MD5_ETAG = re.compile(r'"?([0-9a-fA-F]{32})"?')
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_RESTARTS = 3
_RETRY_REASONS = {"retries": "transport", "checksum_failures": "checksum", "restarts": "changed"}


@dataclass(frozen=True)
class FetchSettings:
    concurrency: int = 16
    """Parallel reads (threads). Memory: concurrency x 1 MiB of read buffers."""
    part_bytes: int = 8 * 1024 * 1024
    """Range size for large files, bytes. Memory does not depend on it (reads stream)."""
    multipart_threshold_bytes: int = 16 * 1024 * 1024
    """Files larger than this are read as parallel ranges, bytes."""
    attempts: int = 3
    """Tries per unit (small file or range) before the fetch fails."""
    fsync: bool = True
    """fsync every file and directory before the copy counts as done. Off only for
    benchmarks and throw-away copies."""


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.files_done += files
            self.bytes_done += nbytes
        if self.labels is not None:
            if nbytes:
                metrics.FETCHED_BYTES.labels(*self.labels).inc(nbytes)
            if files:
                metrics.FETCHED_FILES.labels(*self.labels).inc(files)

    def count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)
        if counter == "checksum_failures":
            metrics.CHECKSUM_FAILURES.inc()
        metrics.FETCH_RETRIES.labels(_RETRY_REASONS[counter]).inc()


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


def _open_dir(root_fd: int, parts: tuple[str, ...], create: bool) -> int:
    """Opens the directory root/parts... without following symlinks, creating it if asked."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


class _FileJob:
    """One file being written. Opened by its first unit (so a listing of 100,000 files does not
    hold 100,000 descriptors), closed once verified by its last unit."""

    def __init__(self, planned: PlannedFile, units: int, root_fd: int) -> None:
        self.planned = planned
        self.obj = planned.obj
        self.remaining = units
        self.ranges: dict[int, tuple[int, int]] = {}
        """offset -> (crc64 of the range, length)."""
        self.stated_ranges: dict[int, tuple[int, int]] = {}
        """offset -> (CRC of the range in the algorithm of `stated`, length)."""
        self.stated: ObjectChecksum | None = None
        self.stated_known = False
        self.lock = threading.Lock()
        self._root_fd = root_fd
        self._fd = -1
        self._closed = False

    def fd(self) -> int:
        with self.lock:
            if self._closed:
                raise FetchCancelled("file already closed")
            if self._fd < 0:
                parts = self.planned.parts
                parent = _open_dir(self._root_fd, parts[:-1], create=False)
                try:
                    # O_TRUNC, not O_EXCL: a resumed copy rewrites files it had not finished.
                    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                    self._fd = os.open(parts[-1], flags, 0o644, dir_fd=parent)
                finally:
                    os.close(parent)
                os.ftruncate(self._fd, self.obj.size)
            return self._fd

    def stated_checksum(self, source: Source) -> ObjectChecksum | None:
        """The source's checksum of the object, asked once (one HEAD for S3) by the first
        range, so every range can compute its part of it while the bytes arrive."""
        with self.lock:
            if not self.stated_known:
                if isinstance(source, ChecksummedSource):
                    self.stated = source.checksum(self.obj)
                self.stated_known = True
            return self.stated

    def range_done(self, offset: int, crc: int, length: int, stated_crc: int | None) -> bool:
        """Records a finished range; True for the last one."""
        with self.lock:
            self.ranges[offset] = (crc, length)
            if stated_crc is not None:
                self.stated_ranges[offset] = (stated_crc, length)
            self.remaining -= 1
            return self.remaining == 0

    def stated_crc(self) -> int | None:
        """The combined CRC of the ranges in the stated algorithm, when every range has one."""
        if self.stated is None or len(self.stated_ranges) != len(self.ranges):
            return None
        ordered = [self.stated_ranges[o] for o in sorted(self.stated_ranges)]
        return checksums.combine(self.stated.algorithm, ordered)

    def crc64(self) -> int:
        return checksums.combine("crc64nvme", [self.ranges[o] for o in sorted(self.ranges)])

    def close(self) -> None:
        with self.lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            self._closed = True


class _Engine:
    def __init__(
        self,
        source: Source,
        root_fd: int,
        settings: FetchSettings,
        progress: Progress,
        cancel: threading.Event,
        expected: Mapping[str, FileEntry],
        journal: Journal | None,
    ) -> None:
        self.source = source
        self.journal = journal
        self.root_fd = root_fd
        self.settings = settings
        self.progress = progress
        self.cancel = cancel
        self.expected = expected
        self.entries: list[FileEntry] = []
        self.entries_lock = threading.Lock()

    def _read(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        for chunk in self.source.read_range(obj, offset, length):
            if self.cancel.is_set():
                raise FetchCancelled("fetch cancelled")
            yield chunk

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

    def _write(
        self, fd: int, obj: ObjectInfo, offset: int, length: int, also: str | None = None
    ) -> tuple[int, int | None]:
        """Copies one range into the file; returns its CRC64 and, if `also` names another
        algorithm, its CRC in that one too."""
        crc, other, pos = 0, 0, offset
        for chunk in self._read(obj, offset, length):
            os.pwrite(fd, chunk, pos)
            pos += len(chunk)
            crc = checksums.crc64(chunk, crc)
            if also is not None:
                other = checksums.crc(also, chunk, other)
        return crc, (other if also is not None else None)

    def whole_file(self, job: _FileJob) -> None:
        for restart in range(_MAX_RESTARTS + 1):
            obj = job.obj

            def attempt(obj: ObjectInfo = obj) -> None:
                fd = job.fd()
                os.ftruncate(fd, obj.size)
                crc, _ = self._write(fd, obj, 0, obj.size)
                job.ranges = {0: (crc, obj.size)}
                self._verify_and_close(job, keep_open_on_error=True)

            try:
                self._with_retries(f"reading {obj.key!r}", attempt)
            except SourceChanged:
                if restart == _MAX_RESTARTS:
                    raise
                self._restart(job)
                continue
            self.progress.add(nbytes=obj.size)
            return

    def _restart(self, job: _FileJob) -> None:
        assert isinstance(self.source, ChecksummedSource)
        self.progress.count("restarts")
        job.obj = self.source.stat(job.obj.key)
        log.info("Object changed while being copied; restarting it", extra={"object": job.obj.key})

    def part(self, job: _FileJob, offset: int, length: int) -> None:
        obj = job.obj
        stated = job.stated_checksum(self.source)
        also = stated.algorithm if stated and stated.algorithm != "crc64nvme" else None
        crcs: list[tuple[int, int | None]] = []

        def attempt() -> None:
            crcs[:] = [self._write(job.fd(), obj, offset, length, also)]

        self._with_retries(f"reading {obj.key!r} bytes {offset}+{length}", attempt)
        self.progress.add(nbytes=length)
        if job.range_done(offset, crcs[0][0], length, crcs[0][1]):
            # Which range was wrong cannot be told from a whole-file checksum: a mismatch fails
            # the copy, and the dataset is fetched again.
            try:
                self._verify_and_close(job, keep_open_on_error=False)
            except VerificationError:
                self.progress.count("checksum_failures")
                raise

    def _verify_and_close(self, job: _FileJob, keep_open_on_error: bool) -> None:
        obj = job.obj
        fd = job.fd()
        try:
            if os.fstat(fd).st_size != obj.size:
                raise VerificationError(f"{obj.key!r}: size on disk differs from the source")
            crc = job.crc64()
            method = self.verify(job, fd, crc)
            if self.settings.fsync:
                os.fsync(fd)
        except VerificationError:
            if not keep_open_on_error:
                job.close()
            raise
        except BaseException:
            job.close()
            raise
        job.close()
        entry = FileEntry(
            path="/".join(job.planned.parts),
            size=obj.size,
            etag=obj.etag,
            crc64nvme=f"{crc:016x}",
            verified=method,
        )
        metrics.VERIFIED_FILES.labels(method).inc()
        with self.entries_lock:
            self.entries.append(entry)
        if self.journal is not None:
            self.journal.record(entry)
        self.progress.add(files=1)

    def verify(self, job: _FileJob, fd: int, crc: int) -> str:
        """Checks the written bytes with the strongest evidence available; returns the method
        used or raises VerificationError."""
        planned, obj = job.planned, job.obj
        if job.stated_known:
            stated = job.stated  # asked by the first range of a ranged file
        else:
            stated = (
                self.source.checksum(obj) if isinstance(self.source, ChecksummedSource) else None
            )
        if stated is not None:
            combined = job.stated_crc()
            if stated.algorithm == "crc64nvme":
                actual = crc
            elif combined is not None:
                actual = combined
            else:
                # A whole-object read learns the algorithm only from the response: read back.
                actual = checksums.file_crc(fd, obj.size, stated.algorithm)
            if actual != stated.value:
                raise VerificationError(
                    f"{obj.key!r}: {stated.algorithm} of the copy ({actual:x}) differs from "
                    f"the source's ({stated.value:x})"
                )
            return stated.algorithm
        match = _MD5_ETAG.fullmatch(obj.etag)
        if match and isinstance(self.source, ChecksummedSource):
            md5 = checksums.file_md5(fd, obj.size)
            if md5 != match.group(1).lower():
                raise VerificationError(
                    f"{obj.key!r}: MD5 of the copy {md5} differs from the ETag {obj.etag}"
                )
            return VERIFIED_MD5_ETAG
        expected = self.expected.get("/".join(planned.parts))
        if expected is not None:
            if (expected.size, expected.crc64nvme) != (obj.size, f"{crc:016x}"):
                raise VerificationError(
                    f"{obj.key!r}: content differs from the dataset version's manifest"
                )
            return VERIFIED_MANIFEST
        return UNVERIFIED


def _keep_intact(
    root_fd: int, files: list[PlannedFile], resume: Mapping[str, FileEntry]
) -> dict[str, FileEntry]:
    """The journalled files that still match the listing and read back intact."""
    kept: dict[str, FileEntry] = {}
    for planned in files:
        path = "/".join(planned.parts)
        entry = resume.get(path)
        if entry is None or (entry.size, entry.etag) != (planned.obj.size, planned.obj.etag):
            continue
        try:
            parent = _open_dir(root_fd, planned.parts[:-1], create=False)
            try:
                fd = os.open(planned.parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=parent)
            finally:
                os.close(parent)
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


def _prune(dest: Path, keep: set[str], dirs: list[tuple[str, ...]]) -> None:
    """Removes from `dest` everything but the kept files and the directories they need, without
    following symlinks."""
    needed = {"/".join(d) for d in dirs}
    for top, dirnames, filenames in os.walk(dest, topdown=False):
        rel_top = os.path.relpath(top, dest)
        for name in filenames + dirnames:
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            full = os.path.join(top, name)
            if os.path.islink(full) or not os.path.isdir(full):
                if rel not in keep:
                    os.unlink(full)
            elif rel not in needed:
                os.rmdir(full)


def _fsync_tree(root_fd: int, dirs: list[tuple[str, ...]]) -> None:
    for parts in sorted(dirs, key=len, reverse=True):
        fd = _open_dir(root_fd, parts, create=False)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.fsync(root_fd)


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
    root_fd = os.open(dest, _DIR_FLAGS)
    jobs: list[_FileJob] = []
    try:
        kept = _keep_intact(root_fd, files, resume or {})
        _prune(dest, {"/".join(p.parts) for p in files if "/".join(p.parts) in kept}, dirs)
        for parts in dirs:
            os.close(_open_dir(root_fd, parts, create=True))
        engine = _Engine(source, root_fd, settings, progress, cancel, expected or {}, journal)
        if kept:
            log.info("Resuming: %d verified files kept from an interrupted copy", len(kept))
            engine.entries.extend(kept.values())
            progress.add(files=len(kept), nbytes=sum(e.size for e in kept.values()))
            files = [p for p in files if "/".join(p.parts) not in kept]
        with ThreadPoolExecutor(settings.concurrency, thread_name_prefix="fetch") as pool:
            futures: list[Future[None]] = []
            # Large files first: their ranges spread over every thread while small files fill in.
            for planned in sorted(files, key=lambda p: -p.obj.size):
                size = planned.obj.size
                if size > settings.multipart_threshold_bytes:
                    offsets = range(0, size, settings.part_bytes)
                    job = _FileJob(planned, len(offsets), root_fd)
                    jobs.append(job)
                    futures += [
                        pool.submit(engine.part, job, off, min(settings.part_bytes, size - off))
                        for off in offsets
                    ]
                else:
                    job = _FileJob(planned, 1, root_fd)
                    jobs.append(job)
                    futures.append(pool.submit(engine.whole_file, job))
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                cancel.set()
                wait(futures)
                error = failed.exception()
                assert error is not None
                raise error
        if cancel.is_set():
            raise FetchCancelled("fetch cancelled")
        if settings.fsync:
            _fsync_tree(root_fd, dirs)
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
        os.close(root_fd)
