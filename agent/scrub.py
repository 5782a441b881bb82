"""Scrubbing: re-reading published files to find bit rot, and repairing them in place.

A scrub reads every file of a Ready version at a bounded rate (so it never competes with the
pods reading the data) and compares its CRC64 with the manifest. A corrupt or missing file is
moved to `quarantine/` (kept for inspection, never served), copied again from the source into
a temporary directory beside the version, verified against the manifest, and renamed into
place. If the source no longer holds that exact object, the repair fails and the dataset is
fetched again as a new version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

from agent import checksums, metrics
from agent.errors import FetchCancelled, SourceChanged, SourceError, VerificationError
from agent.fetch import FetchSettings, PlannedFile, Progress, fetch_into
from agent.manifest import FileEntry, Manifest
from agent.sources import ObjectInfo, Source
from agent.sources.base import ChecksummedSource

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024


class RateLimiter:
    """Blocks callers so that at most `bytes_per_second` pass on average."""

    def __init__(self, bytes_per_second: float) -> None:
        self._rate = bytes_per_second
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int, cancel: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self._rate
            delay = start - now
        if delay > 0 and cancel.wait(delay):
            raise FetchCancelled("cancelled while rate-limited")


def _crc_of(path: Path, size: int, limiter: RateLimiter, cancel: threading.Event) -> int | None:
    """The CRC64 of a file (not following symlinks), or None if it is missing or not a
    regular file of the expected size."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # O_NOATIME: the scrub's reads must not look like pods' (see agent.lastuse).
        fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        try:
            fd = os.open(path, flags)  # O_NOATIME needs the file's owner or CAP_FOWNER
        except OSError:
            return None
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None
        crc, offset = 0, 0
        while offset < size:
            limiter.take(min(_CHUNK, size - offset), cancel)
            block = os.pread(fd, _CHUNK, offset)
            if not block:
                return None
            crc = checksums.crc64(block, crc)
            offset += len(block)
        return crc
    finally:
        os.close(fd)


def find_corrupt(
    version_dir: Path, manifest: Manifest, limiter: RateLimiter, cancel: threading.Event
) -> list[FileEntry]:
    corrupt = []
    for entry in manifest.files:
        crc = _crc_of(version_dir / entry.path, entry.size, limiter, cancel)
        if crc is None or f"{crc:016x}" != entry.crc64nvme:
            corrupt.append(entry)
            metrics.SCRUBBED_FILES.labels("corrupt").inc()
        else:
            metrics.SCRUBBED_FILES.labels("ok").inc()
    return corrupt


def quarantine(root: Path, dataset: str, version_dir: Path, entry: FileEntry) -> Path | None:
    """Moves a corrupt file out of the published version; returns where it went."""
    target = root / "quarantine" / dataset / version_dir.name / f"{entry.path}.{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(version_dir / entry.path, target)
    except FileNotFoundError:
        return None
    return target


def _current(source: Source, key: str) -> ObjectInfo | None:
    """The object's metadata now: one request where the source can stat a single object."""
    if isinstance(source, ChecksummedSource):
        try:
            return source.stat(key)
        except SourceError:
            return None
    return next((obj for obj in source.list() if obj.key == key), None)


def repair(
    source: Source,
    version_dir: Path,
    manifest: Manifest,
    corrupt: list[FileEntry],
    settings: FetchSettings,
    cancel: threading.Event,
) -> None:
    """Copies the corrupt files again and renames them into the version. Raises SourceChanged
    when the source no longer holds the exact objects of this version."""
    planned = []
    for entry in corrupt:
        obj = _current(source, entry.path)
        if obj is None or (obj.size, obj.etag) != (entry.size, entry.etag):
            raise SourceChanged(f"{entry.path!r} changed at the source since this version")
        planned.append(PlannedFile(obj, tuple(entry.path.split("/"))))
    scratch = version_dir.parent / f".repair-{version_dir.name}-{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        expected = {e.path: e for e in manifest.files}
        entries = fetch_into(source, planned, scratch, settings, Progress(), cancel, expected)
        for entry in entries:
            if (entry.size, entry.crc64nvme) != (
                expected[entry.path].size,
                expected[entry.path].crc64nvme,
            ):
                raise VerificationError(f"{entry.path!r}: repaired copy differs from the manifest")
        inside = version_dir.resolve()
        for entry in entries:
            destination = version_dir / entry.path
            destination.parent.mkdir(parents=True, exist_ok=True)
            if not destination.parent.resolve().is_relative_to(inside):
                raise VerificationError(f"{entry.path!r}: a symlink in the cache points outside")
            os.replace(scratch / entry.path, destination)
            with contextlib.suppress(OSError):
                fd = os.open(destination.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
