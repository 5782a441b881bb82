"""SQLite persistence for datasets, their versions and change history, agents, assignments,
replica reports, evictions and local labels.

Dataset definitions, fixed versions and the change history exist only here (back the file with
a persistent volume); agents, assignments and replica states are rebuilt from agents'
registrations and reports. SQLite in WAL mode keeps it all across restarts (see
`_transaction` for which commits wait for the disk). All statements run on the event-loop
thread: they are sub-millisecond, and one connection keeps transactions simple; the
coordinator's store checkpoints its WAL from another thread (`coordinator.checkpoint`).

The rows read on every report and every reconcile pass (datasets, agents, assignments, replica
reports, fixed versions, local labels) are also kept in memory (`StoreCache`): reads come from
there, and each write is applied to it after its commit, either as the values SQLite stored
(column affinities applied) or by reading the written rows back. A write by another
connection (`PRAGMA data_version` moves) makes the next read load the cache again.

The schema is versioned with `PRAGMA user_version`; opening an older database migrates it in
place (datasets are kept), opening a newer one is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

from coordinator.checkpoint import WalCheckpointer
from coordinator.errors import AlreadyExists, CoordinatorError, FailedPrecondition, NotFound
from coordinator.model import (
    AgentRecord,
    Change,
    DatasetRecord,
    DatasetSpec,
    ManifestRow,
    ReplicaReport,
    ReplicaState,
    Toleration,
    VersionRecord,
)
from coordinator.store_cache import StoreCache

SCHEMA_VERSION = 3

# Version 1: the schema of the first release (no user_version was set then).
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS datasets (
    name        TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    replicas    INTEGER NOT NULL,
    create_time REAL NOT NULL,
    deleting    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS agents (
    node_name      TEXT PRIMARY KEY,
    cache_id       TEXT NOT NULL,
    last_seen      REAL NOT NULL,
    capacity_bytes INTEGER NOT NULL DEFAULT 0,
    free_bytes     INTEGER NOT NULL DEFAULT 0
);
-- Desired placement: which node should hold which dataset.
CREATE TABLE IF NOT EXISTS assignments (
    dataset   TEXT NOT NULL,
    node_name TEXT NOT NULL,
    PRIMARY KEY (dataset, node_name)
);
-- Observed state, as last reported by each agent.
CREATE TABLE IF NOT EXISTS replicas (
    dataset     TEXT NOT NULL,
    node_name   TEXT NOT NULL,
    state       TEXT NOT NULL,
    digest      TEXT NOT NULL DEFAULT '',
    files_done  INTEGER NOT NULL DEFAULT 0,
    bytes_done  INTEGER NOT NULL DEFAULT 0,
    files_total INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    message     TEXT NOT NULL DEFAULT '',
    update_time REAL NOT NULL,
    PRIMARY KEY (dataset, node_name)
);
-- Node labels in local mode (no cluster): what the Kubernetes API would hold.
CREATE TABLE IF NOT EXISTS local_labels (
    node_name TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (node_name, key)
);
"""

# Version 2: placement constraints, revisions, fixed versions, change history, richer reports,
# node identity and eviction history.
_MIGRATE_V2 = """
ALTER TABLE datasets ADD COLUMN all_nodes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE datasets ADD COLUMN node_selector TEXT NOT NULL DEFAULT '{}';
ALTER TABLE datasets ADD COLUMN tolerations TEXT NOT NULL DEFAULT '[]';
ALTER TABLE datasets ADD COLUMN pin INTEGER NOT NULL DEFAULT 0;
ALTER TABLE datasets ADD COLUMN credentials_secret TEXT NOT NULL DEFAULT '';
ALTER TABLE datasets ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
ALTER TABLE datasets ADD COLUMN resource_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE datasets ADD COLUMN update_time REAL NOT NULL DEFAULT 0;
ALTER TABLE datasets ADD COLUMN status_hash TEXT NOT NULL DEFAULT '';
UPDATE datasets SET update_time = create_time;
ALTER TABLE agents ADD COLUMN node_uid TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN node_labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE agents ADD COLUMN pressure_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN agent_version TEXT NOT NULL DEFAULT '';
ALTER TABLE replicas ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replicas ADD COLUMN bytes_per_second REAL NOT NULL DEFAULT 0;
ALTER TABLE replicas ADD COLUMN verification TEXT NOT NULL DEFAULT '{}';
ALTER TABLE replicas ADD COLUMN last_used_time REAL NOT NULL DEFAULT 0;
ALTER TABLE replicas ADD COLUMN serving_version TEXT NOT NULL DEFAULT '';
ALTER TABLE replicas ADD COLUMN disk_bytes INTEGER NOT NULL DEFAULT 0;
CREATE INDEX replicas_by_node ON replicas (node_name);
CREATE INDEX assignments_by_node ON assignments (node_name);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Every dataset spec or status change, for WatchDatasets to resume from (bounded).
CREATE TABLE changes (
    resource_version INTEGER PRIMARY KEY,
    dataset          TEXT NOT NULL,
    kind             TEXT NOT NULL,
    time             REAL NOT NULL
);
-- The version fixed for each (dataset, revision) and its manifest.
CREATE TABLE versions (
    dataset     TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    version     TEXT NOT NULL,
    files       INTEGER NOT NULL,
    total_bytes INTEGER NOT NULL,
    create_time REAL NOT NULL,
    PRIMARY KEY (dataset, revision)
);
CREATE INDEX versions_by_digest ON versions (dataset, version);
CREATE TABLE version_entries (
    dataset   TEXT NOT NULL,
    version   TEXT NOT NULL,
    idx       INTEGER NOT NULL,
    path      TEXT NOT NULL,
    size      INTEGER NOT NULL,
    etag      TEXT NOT NULL,
    crc64nvme TEXT NOT NULL,
    PRIMARY KEY (dataset, version, idx)
) WITHOUT ROWID;
-- Datasets evicted from a node for room, so placement does not put them straight back.
CREATE TABLE evictions (
    dataset   TEXT NOT NULL,
    node_name TEXT NOT NULL,
    time      REAL NOT NULL,
    PRIMARY KEY (dataset, node_name)
);
"""

# Version 3: demand may raise a dataset's replicas up to max_replicas (0: fixed replicas).
_MIGRATE_V3 = """
ALTER TABLE datasets ADD COLUMN max_replicas INTEGER NOT NULL DEFAULT 0;
"""

_MIGRATIONS: dict[int, str] = {2: _MIGRATE_V2, 3: _MIGRATE_V3}

_DATASET_COLUMNS = (
    "name, source, replicas, create_time, deleting, all_nodes, node_selector, tolerations, pin,"
    " credentials_secret, revision, resource_version, update_time, max_replicas"
)
_AGENT_COLUMNS = (
    "node_name, cache_id, last_seen, capacity_bytes, free_bytes, node_uid, node_labels,"
    " pressure_bytes, agent_version"
)
_REPLICA_COLUMNS = (
    "dataset, node_name, state, digest, files_done, bytes_done, files_total, bytes_total,"
    " message, update_time, revision, bytes_per_second, verification, last_used_time,"
    " serving_version, disk_bytes"
)
_VERSION_COLUMNS = "dataset, revision, version, files, total_bytes, create_time"
_PRUNE_EVERY = 64


@functools.lru_cache(maxsize=4096)
def _json_map(text: str) -> Mapping[str, Any]:
    """A read-only mapping from stored JSON; most rows share a few texts ('{}', a zone's
    labels), so parsing them once matters when thousands of rows are read per pass."""
    return MappingProxyType(json.loads(text))


class StoreError(CoordinatorError):
    """The database cannot be used (e.g. written by a newer coordinator)."""


def _dataset(row: Sequence[Any]) -> DatasetRecord:
    return DatasetRecord(
        name=row[0],
        source=row[1],
        replicas=row[2],
        create_time=row[3],
        deleting=bool(row[4]),
        all_nodes=bool(row[5]),
        node_selector=_json_map(row[6]),
        tolerations=tuple(Toleration(**t) for t in json.loads(row[7])),
        pin=bool(row[8]),
        credentials_secret=row[9],
        revision=row[10],
        resource_version=row[11],
        update_time=row[12],
        max_replicas=row[13],
    )


def _agent(row: Sequence[Any]) -> AgentRecord:
    return AgentRecord(
        node_name=row[0],
        cache_id=row[1],
        last_seen=row[2],
        capacity_bytes=row[3],
        free_bytes=row[4],
        node_uid=row[5],
        node_labels=_json_map(row[6]),
        pressure_bytes=row[7],
        agent_version=row[8],
    )


def _replica(row: Sequence[Any]) -> ReplicaReport:
    return ReplicaReport(
        dataset=row[0],
        node_name=row[1],
        state=ReplicaState(row[2]),
        digest=row[3],
        files_done=row[4],
        bytes_done=row[5],
        files_total=row[6],
        bytes_total=row[7],
        message=row[8],
        update_time=row[9],
        revision=row[10],
        bytes_per_second=row[11],
        verification=_json_map(row[12]),
        last_used_time=row[13],
        serving_version=row[14],
        disk_bytes=row[15],
    )


def _integer(value: Any) -> Any:
    """`value` as a column of INTEGER affinity returns it (an integral float becomes int)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value) if isinstance(value, int) else value


def _real(value: Any) -> Any:
    """`value` as a column of REAL affinity returns it (an int becomes float)."""
    return float(value) if isinstance(value, int) else value


def _spec_values(spec: DatasetSpec) -> tuple[Any, ...]:
    return (
        spec.source,
        spec.replicas,
        int(spec.all_nodes),
        json.dumps(dict(sorted(spec.node_selector.items()))),
        json.dumps([t.__dict__ for t in spec.tolerations]),
        int(spec.pin),
        spec.credentials_secret,
        spec.max_replicas,
    )


class Store:
    def __init__(
        self,
        path: Path | str,
        history_size: int = 10_000,
        history_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
        checkpoint_seconds: float | None = None,
    ) -> None:
        """`history_size` and `history_seconds` bound the change history WatchDatasets resumes
        from: at most that many changes, none older than that many seconds. With
        `checkpoint_seconds`, the WAL is checkpointed that often by a thread of its own
        (`coordinator.checkpoint`), never inside a commit: for the coordinator's own store,
        whose commits run on the event loop."""
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._checkpointer: WalCheckpointer | None = None
        self._history_size = history_size
        self._history_seconds = history_seconds
        self._clock = clock
        self._pending: list[Change] = []
        self._cache: StoreCache | None = None
        self._cache_version = -1
        self._touched = _Touched()
        self.listeners: list[Callable[[Change], None]] = []
        """Called with every change once it is committed (WatchDatasets fans them out)."""
        self._db.execute("PRAGMA journal_mode=WAL")
        # Most writes are reports, leases and labels (see `_transaction`): NORMAL is the
        # connection's default, and durable writes raise it to FULL for their commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        if checkpoint_seconds is not None and str(path) != ":memory:":
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = WalCheckpointer(str(path), checkpoint_seconds).start()

    def _migrate(self) -> None:
        if self.schema_version() == SCHEMA_VERSION:
            return  # the usual case (and every metrics scrape): no write at all
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database schema version {version} is newer than this coordinator's "
                    f"({SCHEMA_VERSION}); run a newer coordinator or restore a backup"
                )
            if version == 0:
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        db.execute(statement)
                version = 1
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target].split(";\n"):
                    if statement.strip():
                        db.execute(statement)
            # PRAGMA takes no bound parameters; the value is our own integer constant.
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
        return version

    @property
    def checkpointer(self) -> WalCheckpointer | None:
        return self._checkpointer

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        # The last connection to close checkpoints what is left and removes the WAL.
        self._db.close()

    @contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction. `durable=False` is for what agents report again anyway
        (reports, leases, labels, status): its commit skips the fsync (WAL, synchronous=NORMAL)
        and becomes durable with the next durable commit; a power loss can lose it, a crash
        of the process cannot. Dataset specs and versions are always written durably."""
        if durable:
            self._db.execute("PRAGMA synchronous=FULL")
        self._touched = _Touched()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                self._pending.clear()
                self._touched = _Touched()
                raise
            self._db.execute("COMMIT")
        finally:
            if durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
        touched, self._touched = self._touched, _Touched()
        if self._cache is not None:
            self._apply(self._cache, touched)
        changes, self._pending = self._pending, []
        for change in changes:
            for listener in self.listeners:
                listener(change)

    # The in-memory cache ----------------------------------------------------------------------

    def _cached(self) -> StoreCache:
        """The cache, (re)loaded when missing or when another connection wrote."""
        if self._db.in_transaction:
            raise RuntimeError("the store's cache is read outside transactions only")
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if self._cache is None or version != self._cache_version:
            self._cache = self._load_cache()
            self._cache_version = version
        return self._cache

    def _load_cache(self) -> StoreCache:
        cache = StoreCache()
        for row in self._db.execute(f"SELECT {_DATASET_COLUMNS} FROM datasets").fetchall():
            cache.datasets[row[0]] = _dataset(row)
        for row in self._db.execute(f"SELECT {_AGENT_COLUMNS} FROM agents").fetchall():
            cache.agents[row[0]] = _agent(row)
        assigned: dict[str, set[str]] = {}
        for dataset, node in self._db.execute("SELECT dataset, node_name FROM assignments"):
            assigned.setdefault(dataset, set()).add(node)
        cache.set_assignments({d: frozenset(n) for d, n in assigned.items()})
        by_node: dict[str, list[ReplicaReport]] = {}
        for row in self._db.execute(
            f"SELECT {_REPLICA_COLUMNS} FROM replicas ORDER BY node_name, dataset"
        ).fetchall():
            by_node.setdefault(row[1], []).append(_replica(row))
        for node, reports in by_node.items():
            cache.put_node_reports(node, reports)
        for row in self._db.execute(f"SELECT {_VERSION_COLUMNS} FROM versions").fetchall():
            cache.versions[(row[0], row[1])] = VersionRecord(*row)
        labels: dict[str, dict[str, str]] = {}
        for node, key, value in self._db.execute(
            "SELECT node_name, key, value FROM local_labels ORDER BY node_name, key"
        ):
            labels.setdefault(node, {})[key] = value
        for node, node_labels in labels.items():
            cache.put_labels(node, node_labels)
        return cache

    def _apply(self, cache: StoreCache, touched: _Touched) -> None:
        """Brings the cache up to a committed write: the changes it recorded first, then the
        rows it touched, read back from the database."""
        for change in touched.changes:
            change(cache)
        for name, (rv, when) in touched.bumps.items():
            record = cache.datasets.get(name)
            if record is not None and name not in touched.datasets:
                cache.put_dataset(
                    name, dataclasses.replace(record, resource_version=rv, update_time=when)
                )
        reread = touched.datasets | {n for n in touched.bumps if n not in cache.datasets}
        for name in reread:
            row = self._db.execute(
                f"SELECT {_DATASET_COLUMNS} FROM datasets WHERE name = ?", (name,)
            ).fetchone()
            cache.put_dataset(name, _dataset(row) if row else None)
        for name in touched.versions:
            rows = self._db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE dataset = ?", (name,)
            ).fetchall()
            cache.put_versions(name, [VersionRecord(*r) for r in rows])
        for node in touched.agents:
            row = self._db.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE node_name = ?", (node,)
            ).fetchone()
            cache.put_agent(node, _agent(row) if row else None)

    # Change history -------------------------------------------------------------------------

    def _meta(self, db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, db: sqlite3.Connection, key: str, value: int) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _bump(self, db: sqlite3.Connection, dataset: str, kind: str) -> int:
        """Records a change of `dataset`; returns its resource version."""
        now = self._clock()
        rv = self._meta(db, "resource_version") + 1
        self._set_meta(db, "resource_version", rv)
        db.execute(
            "INSERT INTO changes (resource_version, dataset, kind, time) VALUES (?, ?, ?, ?)",
            (rv, dataset, kind, now),
        )
        self._pending.append(Change(rv, dataset, kind))
        self._touched.bumps[dataset] = (rv, _real(now))
        db.execute(
            "UPDATE datasets SET resource_version = ?, update_time = ? WHERE name = ?",
            (rv, now, dataset),
        )
        if rv % _PRUNE_EVERY == 0:
            self._prune(db, rv, now)
        return rv

    def _prune(self, db: sqlite3.Connection, rv: int, now: float) -> None:
        row = db.execute(
            "SELECT MAX(resource_version) FROM changes WHERE resource_version <= ? OR time < ?",
            (rv - self._history_size, now - self._history_seconds),
        ).fetchone()
        if row[0] is None:
            return
        floor = max(self._meta(db, "history_floor"), int(row[0]))
        db.execute("DELETE FROM changes WHERE resource_version <= ?", (floor,))
        self._set_meta(db, "history_floor", floor)

    def prune_history(self) -> None:
        """Applies the history bounds now (they are otherwise applied every few changes)."""
        with self._transaction() as db:
            self._prune(db, self._meta(db, "resource_version"), self._clock())

    def resource_version(self) -> int:
        """The resource version of the latest change."""
        return self._meta(self._db, "resource_version")

    def history_floor(self) -> int:
        """Changes up to this resource version are forgotten; a watch can resume only from
        this version or a later one."""
        return self._meta(self._db, "history_floor")

    def changes_since(self, resource_version: int) -> list[Change]:
        rows = self._db.execute(
            "SELECT resource_version, dataset, kind FROM changes WHERE resource_version > ?"
            " ORDER BY resource_version",
            (resource_version,),
        ).fetchall()
        return [Change(*r) for r in rows]

    # Datasets -------------------------------------------------------------------------------

    def create_dataset(self, name: str, spec: DatasetSpec) -> DatasetRecord:
        with self._transaction() as db:
            row = db.execute("SELECT deleting FROM datasets WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if row[0]:
                    raise FailedPrecondition(
                        f"dataset {name!r} is still being deleted; retry once it is gone"
                    )
                raise AlreadyExists(
                    f"dataset {name!r} already exists; update it or choose another name"
                )
            now = self._clock()
            db.execute(
                "INSERT INTO datasets (name, source, replicas, all_nodes, node_selector,"
                " tolerations, pin, credentials_secret, max_replicas, create_time, update_time,"
                " revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (name, *_spec_values(spec), now, now),
            )
            self._touched.datasets.add(name)
            self._bump(db, name, "ADDED")
        return self.get_dataset(name)

    def find_dataset(self, name: str) -> DatasetRecord | None:
        return self._cached().datasets.get(name)

    def get_dataset(self, name: str) -> DatasetRecord:
        record = self.find_dataset(name)
        if record is None:
            raise NotFound(f"dataset {name!r} not found; list datasets to see the names")
        return record

    def list_datasets(self, after: str = "", limit: int = -1) -> list[DatasetRecord]:
        rows = self._db.execute(
            f"SELECT {_DATASET_COLUMNS} FROM datasets WHERE name > ? ORDER BY name LIMIT ?",
            (after, limit),
        ).fetchall()
        return [_dataset(r) for r in rows]

    def dataset_map(self) -> dict[str, DatasetRecord]:
        """Every dataset by name (a snapshot: later writes do not change it)."""
        return dict(self._cached().datasets)

    def _live_row(self, db: sqlite3.Connection, name: str) -> None:
        row = db.execute("SELECT deleting FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"dataset {name!r} not found; list datasets to see the names")
        if row[0]:
            raise FailedPrecondition(f"dataset {name!r} is being deleted; it cannot change")

    def update_dataset(self, name: str, spec: DatasetSpec, new_revision: bool) -> DatasetRecord:
        """Writes a dataset's spec; `new_revision` starts a new revision (a fresh listing)."""
        with self._transaction() as db:
            self._live_row(db, name)
            db.execute(
                "UPDATE datasets SET source = ?, replicas = ?, all_nodes = ?, node_selector = ?,"
                " tolerations = ?, pin = ?, credentials_secret = ?, max_replicas = ?,"
                " revision = revision + ? WHERE name = ?",
                (*_spec_values(spec), int(new_revision), name),
            )
            self._touched.datasets.add(name)
            self._bump(db, name, "MODIFIED")
        return self.get_dataset(name)

    def update_replicas(self, name: str, replicas: int) -> DatasetRecord:
        record = self.get_dataset(name)
        return self.update_dataset(name, _spec_of(record, replicas=replicas), False)

    def refresh_dataset(self, name: str) -> DatasetRecord:
        with self._transaction() as db:
            self._live_row(db, name)
            db.execute("UPDATE datasets SET revision = revision + 1 WHERE name = ?", (name,))
            self._touched.datasets.add(name)
            self._bump(db, name, "MODIFIED")
        return self.get_dataset(name)

    def mark_deleting(self, name: str) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT deleting FROM datasets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"dataset {name!r} not found; list datasets to see the names")
            if not row[0]:
                db.execute("UPDATE datasets SET deleting = 1 WHERE name = ?", (name,))
                self._touched.datasets.add(name)
                self._bump(db, name, "MODIFIED")

    def purge_dataset(self, name: str) -> None:
        """Forgets a dataset once no node holds it any more, leaving a tombstone in the
        change history."""
        with self._transaction() as db:
            db.execute("DELETE FROM assignments WHERE dataset = ?", (name,))
            db.execute("DELETE FROM replicas WHERE dataset = ?", (name,))
            db.execute("DELETE FROM versions WHERE dataset = ?", (name,))
            db.execute("DELETE FROM version_entries WHERE dataset = ?", (name,))
            db.execute("DELETE FROM evictions WHERE dataset = ?", (name,))
            cur = db.execute("DELETE FROM datasets WHERE name = ?", (name,))
            self._touched.changes.append(lambda cache: cache.drop_dataset(name))
            self._touched.datasets.add(name)
            if cur.rowcount:
                self._bump(db, name, "DELETED")

    def status_hashes(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, status_hash FROM datasets").fetchall())

    def set_status_hashes(self, hashes: Mapping[str, str]) -> None:
        """Records datasets' new status fingerprints, bumping the resource version of each
        that changed, in one transaction."""
        with self._transaction(durable=False) as db:
            for name, status_hash in sorted(hashes.items()):
                row = db.execute(
                    "SELECT status_hash FROM datasets WHERE name = ?", (name,)
                ).fetchone()
                if row is None or row[0] == status_hash:
                    continue
                db.execute(
                    "UPDATE datasets SET status_hash = ? WHERE name = ?", (status_hash, name)
                )
                self._bump(db, name, "MODIFIED")

    # Versions -------------------------------------------------------------------------------

    def fixed_version(self, dataset: str, revision: int) -> VersionRecord | None:
        return self._cached().versions.get((dataset, revision))

    def _select_fixed_version(
        self, db: sqlite3.Connection, dataset: str, revision: int
    ) -> VersionRecord | None:
        row = db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE dataset = ? AND revision = ?",
            (dataset, revision),
        ).fetchone()
        return VersionRecord(*row) if row else None

    def fixed_versions(self) -> dict[tuple[str, int], VersionRecord]:
        return dict(self._cached().versions)

    def find_version(self, dataset: str, version: str) -> VersionRecord | None:
        row = self._db.execute(
            "SELECT dataset, revision, version, files, total_bytes, create_time FROM versions"
            " WHERE dataset = ? AND version = ? ORDER BY revision DESC LIMIT 1",
            (dataset, version),
        ).fetchone()
        return VersionRecord(*row) if row else None

    def fix_version(
        self, dataset: str, revision: int, version: str, entries: Sequence[ManifestRow]
    ) -> tuple[VersionRecord, bool]:
        """Fixes `version` for (dataset, revision) unless one is fixed already. Returns the
        fixed version and whether this call fixed it. FAILED_PRECONDITION when the revision is
        not the dataset's current one."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT revision, deleting FROM datasets WHERE name = ?", (dataset,)
            ).fetchone()
            if row is None:
                raise NotFound(f"dataset {dataset!r} not found")
            if row[1] or row[0] != revision:
                raise FailedPrecondition(
                    f"revision {revision} of dataset {dataset!r} is not current (current: "
                    f"{row[0]}{', being deleted' if row[1] else ''}); fetch the current revision"
                )
            existing = self._select_fixed_version(db, dataset, revision)
            if existing is not None:
                return existing, False
            self._touched.versions.add(dataset)
            known = db.execute(
                "SELECT 1 FROM version_entries WHERE dataset = ? AND version = ? LIMIT 1",
                (dataset, version),
            ).fetchone()
            if known is None:
                db.executemany(
                    "INSERT INTO version_entries (dataset, version, idx, path, size, etag,"
                    " crc64nvme) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (dataset, version, i, e.path, e.size, e.etag, e.crc64nvme)
                        for i, e in enumerate(entries)
                    ],
                )
            record = VersionRecord(
                dataset,
                revision,
                version,
                len(entries),
                sum(e.size for e in entries),
                self._clock(),
            )
            db.execute(
                "INSERT INTO versions (dataset, revision, version, files, total_bytes,"
                " create_time) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.dataset,
                    record.revision,
                    record.version,
                    record.files,
                    record.total_bytes,
                    record.create_time,
                ),
            )
            # Keep the current and the previous revision's manifests; older ones are served by
            # no node any more.
            old = db.execute(
                "SELECT version FROM versions WHERE dataset = ? AND revision < ?",
                (dataset, revision - 1),
            ).fetchall()
            db.execute(
                "DELETE FROM versions WHERE dataset = ? AND revision < ?", (dataset, revision - 1)
            )
            for (old_version,) in old:
                if old_version != version and self.find_version(dataset, old_version) is None:
                    db.execute(
                        "DELETE FROM version_entries WHERE dataset = ? AND version = ?",
                        (dataset, old_version),
                    )
            return record, True

    def manifest_page(
        self, dataset: str, version: str, start: int, limit: int
    ) -> list[tuple[int, ManifestRow]]:
        rows = self._db.execute(
            "SELECT idx, path, size, etag, crc64nvme FROM version_entries"
            " WHERE dataset = ? AND version = ? AND idx >= ? ORDER BY idx LIMIT ?",
            (dataset, version, start, limit),
        ).fetchall()
        return [(r[0], ManifestRow(r[1], r[2], r[3], r[4])) for r in rows]

    # Agents ---------------------------------------------------------------------------------

    def upsert_agent(self, agent: AgentRecord) -> bool:
        """Records an agent; returns True when the node's identity changed (another cache id:
        a wiped disk; another node UID: a new machine under the same name). Then everything
        reported for and assigned to the old node is forgotten: it is a new, empty node."""
        with self._transaction(durable=False) as db:
            row = db.execute(
                "SELECT cache_id, node_uid FROM agents WHERE node_name = ?", (agent.node_name,)
            ).fetchone()
            replaced = row is not None and (
                row[0] != agent.cache_id
                or (bool(row[1]) and bool(agent.node_uid) and row[1] != agent.node_uid)
            )
            if replaced:
                self._forget_node(db, agent.node_name, keep_agent=True)
            self._touched.agents.add(agent.node_name)
            db.execute(
                f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (node_name) DO UPDATE SET cache_id = excluded.cache_id,"
                " last_seen = excluded.last_seen, capacity_bytes = excluded.capacity_bytes,"
                " free_bytes = excluded.free_bytes,"
                " node_uid = CASE WHEN excluded.node_uid != '' THEN excluded.node_uid"
                " ELSE node_uid END, node_labels = excluded.node_labels,"
                " pressure_bytes = excluded.pressure_bytes,"
                " agent_version = excluded.agent_version",
                (
                    agent.node_name,
                    agent.cache_id,
                    agent.last_seen,
                    agent.capacity_bytes,
                    agent.free_bytes,
                    agent.node_uid,
                    json.dumps(dict(sorted(agent.node_labels.items()))),
                    agent.pressure_bytes,
                    agent.agent_version,
                ),
            )
        return replaced

    def renew_agent(
        self,
        node_name: str,
        last_seen: float,
        capacity_bytes: int,
        free_bytes: int,
        pressure_bytes: int,
    ) -> None:
        """A report's lease renewal: only the fields a report carries."""
        with self._transaction(durable=False) as db:
            self._renew(db, node_name, last_seen, capacity_bytes, free_bytes, pressure_bytes)

    def _renew(
        self,
        db: sqlite3.Connection,
        node_name: str,
        last_seen: float,
        capacity_bytes: int,
        free_bytes: int,
        pressure_bytes: int,
    ) -> None:
        values = (
            _real(last_seen),
            _integer(capacity_bytes),
            _integer(free_bytes),
            _integer(pressure_bytes),
        )
        db.execute(
            "UPDATE agents SET last_seen = ?, capacity_bytes = ?, free_bytes = ?,"
            " pressure_bytes = ? WHERE node_name = ?",
            (*values, node_name),
        )

        def renewed(cache: StoreCache) -> None:
            agent = cache.agents.get(node_name)
            if agent is not None:
                cache.put_agent(
                    node_name,
                    dataclasses.replace(
                        agent,
                        last_seen=values[0],
                        capacity_bytes=values[1],
                        free_bytes=values[2],
                        pressure_bytes=values[3],
                    ),
                )

        self._touched.changes.append(renewed)

    def record_report(
        self,
        node_name: str,
        last_seen: float,
        capacity_bytes: int,
        free_bytes: int,
        pressure_bytes: int,
        reports: Iterable[ReplicaReport],
    ) -> None:
        """A report in one (non-durable) transaction: the lease renewal and the node's full
        actual state (datasets absent from `reports` are gone)."""
        with self._transaction(durable=False) as db:
            self._renew(db, node_name, last_seen, capacity_bytes, free_bytes, pressure_bytes)
            self._write_reports(db, node_name, reports)

    def get_agent(self, node_name: str) -> AgentRecord | None:
        return self._cached().agents.get(node_name)

    def agent_map(self) -> dict[str, AgentRecord]:
        """Every agent by node name (a snapshot: later writes do not change it)."""
        return dict(self._cached().agents)

    def list_agents(self) -> list[AgentRecord]:
        rows = self._db.execute(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY node_name")
        return [_agent(r) for r in rows.fetchall()]

    def extend_all_leases(self, now: float) -> None:
        """Gives every known agent a fresh lease: after a coordinator restart, agents had no
        way to report, so their old timestamps say nothing about whether they are alive."""
        with self._transaction() as db:
            db.execute("UPDATE agents SET last_seen = MAX(last_seen, ?)", (now,))
        if self._cache is not None:
            for row in self._db.execute(f"SELECT {_AGENT_COLUMNS} FROM agents").fetchall():
                self._cache.put_agent(row[0], _agent(row))

    def _forget_node(self, db: sqlite3.Connection, node: str, keep_agent: bool) -> None:
        db.execute("DELETE FROM replicas WHERE node_name = ?", (node,))
        db.execute("DELETE FROM assignments WHERE node_name = ?", (node,))
        db.execute("DELETE FROM evictions WHERE node_name = ?", (node,))
        if not keep_agent:
            db.execute("DELETE FROM agents WHERE node_name = ?", (node,))
        self._touched.changes.append(lambda cache: cache.drop_node(node, keep_agent))

    def forget_node(self, node: str) -> None:
        """Drops a deleted or replaced node: its agent, reports, assignments and evictions."""
        with self._transaction() as db:
            self._forget_node(db, node, keep_agent=False)

    # Assignments ----------------------------------------------------------------------------

    def assignments(self) -> dict[str, frozenset[str]]:
        """Nodes by dataset (a snapshot); datasets without nodes are absent."""
        return dict(self._cached().assignments)

    def assigned_nodes(self, dataset: str) -> frozenset[str]:
        return self._cached().assignments.get(dataset, frozenset())

    def set_assignments(self, desired: Mapping[str, frozenset[str]]) -> None:
        """Makes the assignments equal `desired`, writing only the difference."""
        current = self.assignments()
        wanted = {(d, n) for d, nodes in desired.items() for n in nodes}
        present = {(d, n) for d, nodes in current.items() for n in nodes}
        with self._transaction(durable=False) as db:
            db.executemany(
                "DELETE FROM assignments WHERE dataset = ? AND node_name = ?",
                sorted(present - wanted),
            )
            db.executemany(
                "INSERT INTO assignments (dataset, node_name) VALUES (?, ?)",
                sorted(wanted - present),
            )
            snapshot = dict(desired)
            self._touched.changes.append(lambda cache: cache.set_assignments(snapshot))

    # Replica reports ------------------------------------------------------------------------

    def replace_reports(self, node_name: str, reports: Iterable[ReplicaReport]) -> None:
        """Stores a node's full actual state: datasets absent from `reports` are gone."""
        with self._transaction(durable=False) as db:
            self._write_reports(db, node_name, reports)

    def _write_reports(
        self, db: sqlite3.Connection, node_name: str, reports: Iterable[ReplicaReport]
    ) -> None:
        # The rows as SQLite stores them (column affinity applied), so the cache gets exactly
        # what reading them back would give.
        rows = [
            (
                r.dataset,
                node_name,
                r.state.value,
                r.digest,
                _integer(r.files_done),
                _integer(r.bytes_done),
                _integer(r.files_total),
                _integer(r.bytes_total),
                r.message,
                _real(r.update_time),
                _integer(r.revision),
                _real(r.bytes_per_second),
                json.dumps(dict(sorted(r.verification.items()))),
                _real(r.last_used_time),
                r.serving_version,
                _integer(r.disk_bytes),
            )
            for r in reports
        ]
        db.execute("DELETE FROM replicas WHERE node_name = ?", (node_name,))
        db.executemany(
            f"INSERT INTO replicas ({_REPLICA_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        stored = [_replica(row) for row in rows]
        self._touched.changes.append(lambda cache: cache.put_node_reports(node_name, stored))

    def reports(self, dataset: str | None = None, node: str | None = None) -> list[ReplicaReport]:
        """Reports, ordered by dataset and node; of one dataset, one node, or both."""
        cache = self._cached()
        if dataset is not None:
            here = cache.by_dataset.get(dataset, {})
            return [here[n] for n in sorted(here) if node is None or n == node]
        if node is not None:
            mine = cache.by_node.get(node, {})
            return [mine[d] for d in sorted(mine)]
        return [
            by_node[n] for d, by_node in sorted(cache.by_dataset.items()) for n in sorted(by_node)
        ]

    def reports_by_dataset(self) -> dict[str, Mapping[str, ReplicaReport]]:
        """Reports by dataset, then node (a snapshot). A dataset's inner mapping is replaced,
        never changed, when its reports change: an unchanged one is the same object."""
        return dict(self._cached().by_dataset)

    def node_reports(self, node: str) -> Mapping[str, ReplicaReport]:
        """A node's reports by dataset (read-only; a snapshot)."""
        return self._cached().by_node.get(node, MappingProxyType({}))

    # Evictions ------------------------------------------------------------------------------

    def record_eviction(self, dataset: str, node: str, when: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO evictions (dataset, node_name, time) VALUES (?, ?, ?)"
                " ON CONFLICT (dataset, node_name) DO UPDATE SET time = excluded.time",
                (dataset, node, when),
            )

    def evictions_since(self, since: float) -> frozenset[tuple[str, str]]:
        """(dataset, node) pairs evicted at or after `since`; older entries are dropped."""
        with self._transaction() as db:
            db.execute("DELETE FROM evictions WHERE time < ?", (since,))
        rows = self._db.execute("SELECT dataset, node_name FROM evictions").fetchall()
        return frozenset((r[0], r[1]) for r in rows)

    # Local labels ---------------------------------------------------------------------------

    def local_labels(self) -> dict[str, dict[str, str]]:
        return {n: dict(labels) for n, labels in sorted(self._cached().labels.items())}

    def labelled_local_nodes(self) -> dict[str, Mapping[str, str]]:
        """Every node with local labels, with read-only views of them (a snapshot; no copy of
        each node's labels, which at 5,000 nodes would cost a pass 3-4 ms)."""
        return dict(self._cached().labels)

    def local_labels_of(self, node_name: str) -> dict[str, str]:
        labels = self._cached().labels.get(node_name)
        return dict(labels) if labels is not None else {}

    def set_local_labels(self, node_name: str, labels: Mapping[str, str]) -> None:
        with self._transaction(durable=False) as db:
            db.execute("DELETE FROM local_labels WHERE node_name = ?", (node_name,))
            rows = [(node_name, k, v) for k, v in sorted(labels.items())]
            db.executemany(
                "INSERT INTO local_labels (node_name, key, value) VALUES (?, ?, ?)", rows
            )
            stored = {k: v for _, k, v in rows}
            self._touched.changes.append(lambda cache: cache.put_labels(node_name, stored))


def _spec_of(record: DatasetRecord, **changes: Any) -> DatasetSpec:
    values: dict[str, Any] = {
        "source": record.source,
        "replicas": record.replicas,
        "all_nodes": record.all_nodes,
        "node_selector": record.node_selector,
        "tolerations": record.tolerations,
        "pin": record.pin,
        "credentials_secret": record.credentials_secret,
        "max_replicas": record.max_replicas,
    }
    values.update(changes)
    return DatasetSpec(**values)


def spec_of(record: DatasetRecord) -> DatasetSpec:
    """The changeable fields of a stored dataset."""
    return _spec_of(record)


class _Touched:
    """What a transaction wrote, for the cache: rows to read back and bulk changes."""

    def __init__(self) -> None:
        self.datasets: set[str] = set()
        """Datasets whose rows to read back."""
        self.bumps: dict[str, tuple[int, float]] = {}
        """Datasets whose resource version and update time (only) changed."""
        self.versions: set[str] = set()
        self.agents: set[str] = set()
        self.changes: list[Callable[[StoreCache], None]] = []
