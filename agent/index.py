"""The agent's local index: what the cache holds, in SQLite beside the data.

It is an index, not the truth. The truth is the disk: each dataset's `current` link and the
manifest of the version it names (see `agent.store`). On every start the index is reconciled
with a scan of the disk, so it may be deleted at any time between runs; a file SQLite cannot
read is moved aside (kept for inspection) and a fresh index is built. The runner reads it for
reports and capacity accounting instead of walking directories.

WAL with `synchronous=FULL`: a row written before a crash is there after it, and readers never
block the writer. One connection, guarded by a lock, serves the event loop and copy threads.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import CacheIndexError
from agent.manifest import Manifest

log = logging.getLogger(__name__)

FILENAME = "index.sqlite"
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    revision INTEGER NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    published_at REAL NOT NULL,
    last_used REAL NOT NULL,
    disk_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    dataset TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    revision INTEGER NOT NULL,
    published_at REAL NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (dataset, version)
);
CREATE TABLE IF NOT EXISTS files (
    dataset TEXT NOT NULL,
    version TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    crc64nvme TEXT NOT NULL,
    verified TEXT NOT NULL,
    PRIMARY KEY (dataset, version, path)
);
"""


@dataclass(frozen=True)
class IndexedDataset:
    name: str
    source: str
    revision: int
    version: str
    """Directory name of the published version."""
    digest: str
    state: str
    """What the runner last recorded: "ready", "fetching", "failed", "pending", ..."""
    message: str
    published_at: float
    """Seconds since the epoch."""
    last_used: float
    """Newest access time seen among its files (or the publish time), seconds since the
    epoch."""
    disk_bytes: int
    """Bytes of its published version on disk."""


class CacheIndex:
    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._lock = threading.Lock()
        self.path = path

    @classmethod
    def open(cls, root: Path) -> CacheIndex:
        """Opens (or creates) the index in the cache root. An unreadable file is moved aside
        and replaced by an empty index, to be filled by `rebuild`."""
        path = root / FILENAME
        try:
            return cls(_connect(path), path)
        except sqlite3.DatabaseError as exc:
            aside = path.with_name(f"{FILENAME}.corrupt-{int(time.time())}")
            log.warning("Index %s is unreadable (%s); moved to %s and rebuilt", path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
            try:
                return cls(_connect(path), path)
            except sqlite3.DatabaseError as again:
                raise CacheIndexError(f"cannot create the index {path}: {again}") from again

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with self._db:
                    yield self._db
            except sqlite3.Error as exc:
                raise CacheIndexError(f"writing the index {self.path}: {exc}") from exc

    # Writes ---------------------------------------------------------------------------------

    def rebuild(self, found: Mapping[str, Manifest], now: float | None = None) -> None:
        """Makes the index say exactly what the disk scan found: one published version per
        dataset. Rows of a version still on disk keep their last use."""
        now = time.time() if now is None else now
        with self._write() as db:
            known = {
                row[0]: (row[1], row[2])
                for row in db.execute("SELECT name, digest, last_used FROM datasets")
            }
            for name in known.keys() - found.keys():
                _delete(db, name)
            for name, manifest in found.items():
                previous = known.get(name)
                published = manifest.published_at or now
                last_used = previous[1] if previous and previous[0] == manifest.digest else 0.0
                _store(db, manifest, "ready", "", max(published, last_used), published)

    def published(self, manifest: Manifest) -> None:
        """Records a newly published version as the dataset's only one."""
        published = manifest.published_at or time.time()
        with self._write() as db:
            _store(db, manifest, "ready", "", published, published)

    def set_state(self, name: str, state: str, message: str = "") -> None:
        with self._write() as db:
            db.execute(
                "UPDATE datasets SET state = ?, message = ? WHERE name = ?", (state, message, name)
            )

    def set_last_used(self, name: str, when: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE datasets SET last_used = max(last_used, ?) WHERE name = ?", (when, name)
            )

    def remove(self, name: str) -> None:
        with self._write() as db:
            _delete(db, name)

    # Reads ----------------------------------------------------------------------------------

    def get(self, name: str) -> IndexedDataset | None:
        rows = self._select("WHERE name = ?", (name,))
        return rows[0] if rows else None

    def all(self) -> list[IndexedDataset]:
        return self._select("ORDER BY name", ())

    def verification(self, name: str) -> dict[str, int]:
        """Files of the published version by verification method."""
        with self._lock:
            rows = self._db.execute(
                "SELECT f.verified, count(*) FROM files f JOIN datasets d "
                "ON f.dataset = d.name AND f.version = d.version WHERE d.name = ? "
                "GROUP BY f.verified",
                (name,),
            ).fetchall()
        return {method: count for method, count in rows}

    def used_bytes(self) -> int:
        """Bytes of every published version in the cache."""
        with self._lock:
            (total,) = self._db.execute("SELECT coalesce(sum(bytes), 0) FROM versions").fetchone()
        return int(total)

    def _select(self, where: str, args: tuple[object, ...]) -> list[IndexedDataset]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, source, revision, version, digest, state, message, published_at, "
                f"last_used, disk_bytes FROM datasets {where}",
                args,
            ).fetchall()
        return [IndexedDataset(*row) for row in rows]


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        (check,) = db.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version not in (0, _SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"unknown index schema version {version}")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        db.isolation_level = "DEFERRED"
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _delete(db: sqlite3.Connection, name: str) -> None:
    for table, column in (("datasets", "name"), ("versions", "dataset"), ("files", "dataset")):
        db.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))


def _store(
    db: sqlite3.Connection,
    manifest: Manifest,
    state: str,
    message: str,
    last_used: float,
    published: float,
) -> None:
    name, version = manifest.dataset, manifest.version
    current = db.execute("SELECT digest FROM datasets WHERE name = ?", (name,)).fetchone()
    if current is None or current[0] != manifest.digest:
        _delete(db, name)
        db.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
            (name, version, manifest.digest, manifest.revision, published, manifest.total_bytes),
        )
        db.executemany(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
            [(name, version, f.path, f.size, f.crc64nvme, f.verified) for f in manifest.files],
        )
    else:
        db.execute("UPDATE versions SET revision = ? WHERE dataset = ?", (manifest.revision, name))
    db.execute(
        "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE "
        "SET source = excluded.source, revision = excluded.revision, version = excluded.version,"
        " digest = excluded.digest, state = excluded.state, message = excluded.message,"
        " published_at = excluded.published_at,"
        " last_used = max(datasets.last_used, excluded.last_used),"
        " disk_bytes = excluded.disk_bytes",
        (
            name,
            manifest.source,
            manifest.revision,
            version,
            manifest.digest,
            state,
            message,
            published,
            last_used,
            manifest.total_bytes,
        ),
    )
