"""Checkpointing the coordinator's SQLite write-ahead log from a thread of its own.

By default SQLite checkpoints inside a commit, once the WAL holds 1,000 pages: the committing
connection copies the WAL into the database file and fsyncs both. The store commits on the
event loop (a report is a commit), so at 500 reports/s that came every second or two and every
agent's call waited for those fsyncs, which take from a few to over a hundred milliseconds on
a shared disk. With the store's connection set to `wal_autocheckpoint=0`, this thread runs a
PASSIVE checkpoint every `interval_seconds` on a second connection instead: writers go on
appending to the WAL meanwhile, and no commit ever waits for the disk unless it asked to
(durable commits still fsync the WAL).

A checkpoint does not change `PRAGMA data_version` for other connections, so the store's
in-memory cache is not reloaded by it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

SLOW_SECONDS = 1.0
"""A checkpoint slower than this is logged."""
STOP_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class CheckpointResult:
    wal_frames: int
    """Frames in the WAL when the checkpoint ran."""
    moved_frames: int
    """Frames copied into the database file (all of them unless a reader still needed some)."""
    seconds: float


class WalCheckpointer:
    def __init__(self, path: str, interval_seconds: float) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be positive, not {interval_seconds}")
        self._path = path
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self.last: CheckpointResult | None = None
        self.checkpoints = 0
        self.failures = 0

    def start(self) -> WalCheckpointer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread (after the checkpoint in progress, if any)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_SECONDS)

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            while not self._stop.wait(self._interval):
                self.checkpoint(db)
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> CheckpointResult | None:
        started = time.monotonic()
        try:
            row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            # The next interval tries again; meanwhile the WAL only grows.
            self.failures += 1
            log.warning("Checkpointing the coordinator database's WAL failed: %s", exc)
            return None
        result = CheckpointResult(int(row[1]), int(row[2]), time.monotonic() - started)
        self.last, self.checkpoints = result, self.checkpoints + 1
        if result.seconds > SLOW_SECONDS:
            log.info(
                "Checkpoint of the coordinator database's WAL took %.1f s (%d of %d frames)",
                result.seconds,
                result.moved_frames,
                result.wal_frames,
            )
        return result
