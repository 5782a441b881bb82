"""The coordinator store's WAL is checkpointed by its own thread, never inside a commit."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.checkpoint import WalCheckpointer
from coordinator.model import DatasetSpec
from coordinator.store import Store


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.01)


def spec(n: int) -> DatasetSpec:
    return DatasetSpec(source=f"s3://bucket/d{n}/", replicas=1)


def wal_frames(path: Path) -> int:
    """Frames the WAL file holds (read off its size: any checkpoint call would move them)."""
    size = path.with_name(path.name + "-wal").stat().st_size
    return max(0, size - 32) // (4096 + 24)


def test_commits_leave_the_wal_to_the_checkpointer(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    store = Store(path, checkpoint_seconds=3600)  # the thread never gets to run here
    try:
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for n in range(600):
            store.create_dataset(f"default/d{n}", spec(n))
        # SQLite's own checkpoints would have restarted the WAL at 1,000 frames.
        assert wal_frames(path) > 2000
    finally:
        store.close()
    # Closing the last connection checkpointed everything: nothing was lost.
    reopened = Store(path)
    try:
        assert len(reopened.list_datasets()) == 600
    finally:
        reopened.close()


def test_the_checkpointer_moves_the_wal_into_the_database(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    store = Store(path, checkpoint_seconds=0.02)
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        size_before = path.stat().st_size
        for n in range(50):
            store.create_dataset(f"default/d{n}", spec(n))
        written = checkpointer.checkpoints

        def caught_up() -> bool:
            last = checkpointer.last
            return (
                checkpointer.checkpoints > written
                and last is not None
                and last.wal_frames > 0
                and last.moved_frames == last.wal_frames
            )

        wait_until(caught_up, 10, "a checkpoint of every frame written")
        assert path.stat().st_size > size_before  # the pages reached the database file
        assert checkpointer.failures == 0
        # The store's cache is not reloaded by a checkpoint (data_version does not move).
        version = store._db.execute("PRAGMA data_version").fetchone()[0]
        wait_until(lambda: checkpointer.checkpoints >= 3, 10, "more checkpoints")
        assert store._db.execute("PRAGMA data_version").fetchone()[0] == version
    finally:
        store.close()
    assert not store.checkpointer or not store.checkpointer._thread.is_alive()


def test_a_store_without_the_option_keeps_sqlite_checkpointing(tmp_path: Path) -> None:
    store = Store(tmp_path / "metrics-reader.db")
    try:
        assert store.checkpointer is None
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        store.close()


def test_checkpoint_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval_seconds must be positive"):
        WalCheckpointer(str(tmp_path / "x.db"), 0)
