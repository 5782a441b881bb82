"""Capacity, quota and pressure; last use from access times."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import capacity, lastuse
from agent.errors import NeedRoom
from agent.fetch import Progress
from agent.manifest import FileEntry, Manifest
from agent.replica import Phase, Replica, Want, pressure
from agent.runner import Agent
from agent.settings import AgentSettings
from agent.sources import Source
from agent.store import CacheStore

GiB = 1 << 30


def test_room_without_quota_is_the_filesystem() -> None:
    assert capacity.room(100 * GiB, 40 * GiB, 0, 10 * GiB) == capacity.Room(100 * GiB, 40 * GiB)


def test_quota_caps_capacity_and_free_space() -> None:
    assert capacity.room(100 * GiB, 40 * GiB, 30 * GiB, 10 * GiB) == capacity.Room(
        30 * GiB, 20 * GiB
    )
    # The filesystem may be fuller than the quota suggests (other tenants of the disk).
    assert capacity.room(100 * GiB, 5 * GiB, 30 * GiB, 10 * GiB).free_bytes == 5 * GiB
    # Over quota: no room, never negative.
    assert capacity.room(100 * GiB, 40 * GiB, 30 * GiB, 35 * GiB).free_bytes == 0


def test_missing_bytes_counts_what_is_staged_already() -> None:
    assert capacity.missing_bytes(need=100, already_staged=0, free=60) == 40
    assert capacity.missing_bytes(need=100, already_staged=50, free=60) == 0
    assert capacity.missing_bytes(need=100, already_staged=0, free=100) == 0


def test_pressure_is_the_sum_of_pending_replicas() -> None:
    replicas = {
        "default/a": Replica(Want("s3://b/a/"), Phase.PENDING, missing_bytes=300),
        "default/b": Replica(Want("s3://b/b/"), Phase.PENDING, missing_bytes=200),
        "default/c": Replica(Want("s3://b/c/"), Phase.FAILED, missing_bytes=999),
    }
    assert pressure(replicas) == 500
    report = replicas["default/a"].report("default/a", 0.0)
    assert report.message == "" and report.state == 1  # PENDING


def _agent(tmp_path: Path, quota: int) -> tuple[Agent, CacheStore]:
    def no_source(uri: str, credentials: object) -> Source:
        raise AssertionError("no source is opened here")

    store = CacheStore(tmp_path / "cache")
    settings = AgentSettings(node_name="n1", cache_dir=store.root, cache_quota_bytes=quota)
    return Agent(settings, store, no_source), store


def test_copy_that_does_not_fit_the_quota_is_refused_with_the_missing_bytes(
    tmp_path: Path,
) -> None:
    agent, store = _agent(tmp_path, quota=1000)
    staged, _ = store.staging_for("default/big", "s3://b/big/")
    (staged / "part").write_bytes(b"x" * 4096)  # one block on disk, counted as staged
    with pytest.raises(NeedRoom) as raised:
        agent._reserve_room("default/big", 10_000)
    # 10,000 needed, 4,096 on disk already; the quota leaves 1,000 - 4,096 < 0: no room.
    assert raised.value.missing_bytes == 10_000 - 4096
    assert str(raised.value) == f"waiting for {10_000 - 4096} bytes of room"
    agent._reserve_room("default/small", 0)


def test_two_copies_cannot_both_take_the_same_room(tmp_path: Path) -> None:
    agent, _ = _agent(tmp_path, quota=10_000)
    agent._reserve_room("default/a", 6000)
    with pytest.raises(NeedRoom) as raised:
        agent._reserve_room("default/b", 6000)
    assert raised.value.missing_bytes == 2000


def test_report_fields_of_a_refresh_in_progress() -> None:
    held = Manifest.build(
        "default/a", "s3://b/a/", [FileEntry("f", 10, '"e"', "0" * 16, "md5-etag")], 1
    ).with_revision(1, 1000.0)
    replica = Replica(Want("s3://b/a/", 2), Phase.FETCHING, manifest=held, revision=2)
    replica.progress = Progress(files_total=2, bytes_total=100, files_done=1, bytes_done=40)
    replica.started = 10.0
    report = replica.report("default/a", 14.0)
    assert (report.revision, report.serving_version, report.digest) == (2, held.digest, "")
    assert report.bytes_per_second == 10.0
    assert report.disk_bytes == 50
    assert report.last_used_time.seconds == 1000
    replica.phase = Phase.READY
    replica.manifest = held
    ready = replica.report("default/a", 15.0)
    assert (ready.revision, ready.digest, ready.serving_version) == (1, held.digest, "")
    assert dict(ready.verification.files_by_method) == {"md5-etag": 1}


def test_last_use_is_the_newest_atime_never_before_publishing(tmp_path: Path) -> None:
    version = tmp_path / "v"
    version.mkdir()
    for i, when in enumerate((5000.0, 9000.0, 7000.0)):
        path = version / f"f{i}"
        path.write_bytes(b"x")
        os.utime(path, (when, when))
    seen = lastuse.atimes(version, ["f0", "f1", "f2", "missing"])
    assert sorted(seen) == [5000.0, 7000.0, 9000.0]
    assert lastuse.newest(seen, published_at=6000.0) == 9000.0
    assert lastuse.newest([], published_at=6000.0) == 6000.0
    assert lastuse.newest([100.0], published_at=6000.0) == 6000.0


def test_sampling_spreads_over_the_files() -> None:
    paths = [f"f{i:05d}" for i in range(10_000)]
    sample = lastuse.sample(paths, limit=100)
    assert len(sample) == 100 and sample[0] == "f00000" and sample[-1] == "f09900"
    assert lastuse.sample(paths[:5], limit=100) == paths[:5]
