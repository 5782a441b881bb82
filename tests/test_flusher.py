"""The flusher: fsyncs off the reading threads, and what a failed one does to the copy."""

from __future__ import annotations

import errno
import functools
import os
import threading
from pathlib import Path

import pytest

from agent.errors import DiskFull
from agent.fetch import FetchSettings, Progress, fetch_into, plan
from agent.flusher import Flusher
from agent.journal import Journal
from agent.journal import load as load_journal
from agent.sources import SourceOpener
from agent.sources.s3 import S3Settings
from datacache.localcluster import DEMO_CREDENTIALS, LocalCluster
from datacache.localcluster import s3_client as admin_client


def test_runs_every_flush_on_its_threads_and_finish_waits_for_them() -> None:
    flusher = Flusher(3, threading.Event())
    ran: list[tuple[int, str]] = []
    lock = threading.Lock()

    def flush(i: int) -> None:
        with lock:
            ran.append((i, threading.current_thread().name))

    for i in range(50):
        flusher.submit(functools.partial(flush, i), lambda: None)
    flusher.finish()
    assert sorted(i for i, _ in ran) == list(range(50))
    assert {name for _, name in ran} <= {"flush-0", "flush-1", "flush-2"}


def test_threads_start_only_as_flushes_wait_for_them() -> None:
    flusher = Flusher(4, threading.Event())
    names: list[str] = []

    others = set(threading.enumerate())

    def flushers() -> set[str]:
        """Names of the threads this flusher started and are alive."""
        return {t.name for t in set(threading.enumerate()) - others}

    for _ in range(5):  # one at a time: one thread serves them all
        done = threading.Event()

        def note(done: threading.Event = done) -> None:
            names.append(threading.current_thread().name)
            done.set()

        flusher.submit(note, lambda: None)
        assert done.wait(30)
    assert set(names) == {"flush-0"} == flushers()

    release, started = threading.Event(), threading.Semaphore(0)

    def held() -> None:
        names.append(threading.current_thread().name)
        started.release()
        assert release.wait(30)

    for _ in range(6):  # 6 at once: 4 threads, the other 2 wait in the queue
        flusher.submit(held, lambda: None)
    for _ in range(4):
        assert started.acquire(timeout=30)
    assert flushers() == {"flush-0", "flush-1", "flush-2", "flush-3"}
    release.set()
    flusher.finish()
    assert set(names) == {"flush-0", "flush-1", "flush-2", "flush-3"}
    assert len(names) == 5 + 6
    assert flushers() == set()


def test_the_first_failure_cancels_abandons_the_rest_and_is_raised() -> None:
    cancel = threading.Event()
    flusher = Flusher(1, cancel)
    release = threading.Event()
    flushed, abandoned = [], []

    def failing() -> None:
        # Held until the next flushes are queued behind it.
        assert release.wait(30)
        raise OSError(errno.EIO, "fsync failed")

    flusher.submit(failing, lambda: abandoned.append("failing"))
    flusher.submit(lambda: flushed.append("second"), lambda: abandoned.append("second"))
    release.set()
    with pytest.raises(OSError, match="fsync failed"):
        flusher.finish()
    assert cancel.is_set()
    assert (flushed, abandoned) == ([], ["failing", "second"])


def test_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        Flusher(0, threading.Event())


def test_a_failed_fsync_fails_the_copy_with_its_error_and_journals_nothing_after_it(
    s3_server: LocalCluster, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses one file's fsync (ENOSPC, as delayed allocation reports it): the copy
    fails with "disk full", not with the cancellation that stopped the reads, and the journal
    holds only files whose fsync succeeded."""
    for key, value in DEMO_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    client = admin_client(s3_server.s3_endpoint)
    for i in range(40):
        client.put_object(Bucket=bucket, Key=f"ds/f{i:02d}", Body=os.urandom(3000 + i))
    src = SourceOpener(S3Settings(endpoint_url=s3_server.s3_endpoint)).open(f"s3://{bucket}/ds/")
    files, _ = plan(list(src.list()))
    dest, journal_path = tmp_path / "dest", tmp_path / "journal"
    dest.mkdir()
    real_fsync, synced = os.fsync, []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]
        if name == "f17":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
        synced.append(name)

    monkeypatch.setattr(os, "fsync", fsync)
    settings = FetchSettings(concurrency=4, fsync_concurrency=2)
    with Journal(journal_path) as journal, pytest.raises(DiskFull, match="disk full"):
        fetch_into(src, files, dest, settings, Progress(), threading.Event(), journal=journal)
    journalled = load_journal(journal_path)
    assert "f17" not in journalled
    assert set(journalled) <= set(synced)
