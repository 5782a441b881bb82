"""The resume journal of a copy in progress.

Each verified file is appended as one JSON line after it was fsynced, so after a crash the
journal names files that are complete on disk. Each completed range of a file read as ranges
is appended too (path, ETag, offset, length and CRC64/NVME of the bytes written), so a copy
interrupted in the middle of a large file keeps the ranges it had; a file whose verification
failed gets a `drop` line that forgets its ranges. The journal itself is fsynced at most once a
second (losing the last second of progress in a crash costs a re-download of those files or
ranges, not correctness), and every file or range it names is verified again (size and CRC64
read back) before it is kept, so a torn or altered file is never trusted. Ranges are not
fsynced one by one for the same reason: one lost to a power cut fails its read-back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from agent.manifest import FileEntry

log = logging.getLogger(__name__)

_SYNC_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True)
class RangeRecord:
    """A range of a file written completely by an interrupted copy."""

    etag: str
    size: int
    """Size of the whole object."""
    offset: int
    length: int
    crc64nvme: str
    """CRC64/NVME of the range, 16 hex digits."""


class Resume(dict[str, FileEntry]):
    """The files of a journal by path (what `load` returns), and the ranges it recorded of the
    files it did not complete, by path."""

    def __init__(self) -> None:
        super().__init__()
        self.ranges: dict[str, list[RangeRecord]] = {}


def load(path: Path) -> Resume:
    """Entries of a journal by path; a torn last line (crash mid-write) is ignored."""
    entries = Resume()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            data = json.loads(line)
            if "range" in data:
                path_of = data.pop("range")
                entries.ranges.setdefault(path_of, []).append(RangeRecord(**data))
            elif "drop" in data:
                entries.ranges.pop(data["drop"], None)
            else:
                entry = FileEntry(**data)
                entries[entry.path] = entry
                entries.ranges.pop(entry.path, None)
        except (ValueError, TypeError, AttributeError):
            continue
    return entries


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()

    def _append(self, data: dict[str, object]) -> None:
        with self._lock:
            self._file.write(json.dumps(data, separators=(",", ":")) + "\n")
            self._file.flush()
            now = time.monotonic()
            if now - self._last_sync >= _SYNC_INTERVAL_SECONDS:
                os.fsync(self._file.fileno())
                self._last_sync = now

    def record(self, entry: FileEntry) -> None:
        self._append(asdict(entry))

    def record_range(self, path: str, record: RangeRecord) -> None:
        """A range written completely (not yet verified: only the whole file can be)."""
        self._append({"range": path, **asdict(record)})

    def drop_ranges(self, path: str) -> None:
        """Forget the ranges of `path`: its bytes failed verification."""
        self._append({"drop": path})

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
