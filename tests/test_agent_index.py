"""The agent's local index: rebuilt from the disk, moved aside when corrupt, used for
verification summaries, last use and capacity accounting."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from awscrt.checksums import crc64nvme

from agent.index import FILENAME, CacheIndex
from agent.manifest import FileEntry, Manifest
from agent.store import CacheStore


def publish(store: CacheStore, name: str, files: dict[str, bytes], revision: int) -> Manifest:
    staged, _ = store.staging_for(name, "s3://bucket/p/")
    entries = []
    for path, content in files.items():
        (staged / path).write_bytes(content)
        method = "md5-etag" if path.endswith(".md5") else "crc64nvme"
        entries.append(FileEntry(path, len(content), '"e"', f"{crc64nvme(content):016x}", method))
    manifest = Manifest.build(name, "s3://bucket/p/", entries, revision).with_revision(
        revision, 1000.0
    )
    store.publish(staged, manifest)
    return manifest


@pytest.fixture
def store(tmp_path: Path) -> CacheStore:
    return CacheStore(tmp_path / "cache")


def rebuilt(store: CacheStore) -> CacheIndex:
    index = CacheIndex.open(store.root)
    index.rebuild(store.recover(), now=2000.0)
    return index


def test_index_is_rebuilt_from_disk_after_deletion(store: CacheStore) -> None:
    one = publish(store, "default/one", {"a": b"aaa", "b.md5": b"bb"}, revision=3)
    publish(store, "team/two", {"x": b"x" * 100}, revision=1)
    index = rebuilt(store)
    got = index.get("default/one")
    assert got is not None
    assert (got.digest, got.revision, got.disk_bytes, got.state) == (one.digest, 3, 5, "ready")
    assert index.verification("default/one") == {"crc64nvme": 1, "md5-etag": 1}
    assert index.used_bytes() == 105
    index.set_last_used("default/one", 5000.0)
    index.close()

    (store.root / FILENAME).unlink()
    for suffix in ("-wal", "-shm"):
        (store.root / f"{FILENAME}{suffix}").unlink(missing_ok=True)
    index = rebuilt(store)
    assert [d.name for d in index.all()] == ["default/one", "team/two"]
    assert index.verification("team/two") == {"crc64nvme": 1}
    got = index.get("default/one")
    assert got is not None and got.last_used == 1000.0  # a fresh index knows only publishing
    assert index.used_bytes() == 105


def test_rebuild_keeps_last_use_of_unchanged_versions_and_drops_vanished(
    store: CacheStore,
) -> None:
    publish(store, "default/one", {"a": b"aaa"}, revision=1)
    publish(store, "default/gone", {"a": b"zz"}, revision=1)
    index = rebuilt(store)
    index.set_last_used("default/one", 7000.0)
    index.set_last_used("default/one", 6000.0)  # never moves back
    index.close()
    store.delete("default/gone")
    index = rebuilt(store)
    got = index.get("default/one")
    assert got is not None and got.last_used == 7000.0
    assert index.get("default/gone") is None
    assert index.used_bytes() == 3


def test_a_new_version_replaces_the_old_one_in_the_index(store: CacheStore) -> None:
    publish(store, "default/one", {"a": b"aaa"}, revision=1)
    index = rebuilt(store)
    newer = publish(store, "default/one", {"a": b"bbbb", "c": b"c"}, revision=2)
    index.published(newer)
    got = index.get("default/one")
    assert got is not None and (got.version, got.revision, got.disk_bytes) == (
        newer.version,
        2,
        5,
    )
    assert index.used_bytes() == 5
    assert index.verification("default/one") == {"crc64nvme": 2}


def test_corrupt_index_is_moved_aside_and_rebuilt(store: CacheStore) -> None:
    publish(store, "default/one", {"a": b"aaa"}, revision=1)
    rebuilt(store).close()
    for suffix in ("-wal", "-shm"):
        (store.root / f"{FILENAME}{suffix}").unlink(missing_ok=True)
    (store.root / FILENAME).write_bytes(b"this is not a database" * 100)
    index = rebuilt(store)
    aside = [p.name for p in store.root.iterdir() if p.name.startswith(f"{FILENAME}.corrupt-")]
    assert len(aside) == 1
    assert [d.name for d in index.all()] == ["default/one"]
    mode = sqlite3.connect(store.root / FILENAME).execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)
