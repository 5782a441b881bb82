"""The resume journal of a copy in progress.

Each verified file is appended as one JSON line after it was fsynced, so after a crash the
journal names files that are complete on disk. The journal itself is fsynced at most once a
second (losing the last second of progress in a crash costs a re-download of those files, not
correctness), and every file it names is verified again (size and CRC64 read back) before it is
kept, so a torn or altered file is never trusted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import TracebackType

from agent.manifest import FileEntry

log = logging.getLogger(__name__)

_SYNC_INTERVAL_SECONDS = 1.0


def load(path: Path) -> dict[str, FileEntry]:
    """Entries of a journal by path; a torn last line (crash mid-write) is ignored."""
    entries: dict[str, FileEntry] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            entry = FileEntry(**json.loads(line))
        except (ValueError, TypeError):
            continue
        entries[entry.path] = entry
    return entries


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()

    def record(self, entry: FileEntry) -> None:
        with self._lock:
            self._file.write(json.dumps(asdict(entry), separators=(",", ":")) + "\n")
            self._file.flush()
            now = time.monotonic()
            if now - self._last_sync >= _SYNC_INTERVAL_SECONDS:
                os.fsync(self._file.fileno())
                self._last_sync = now

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
