"""SQLite persistence for datasets, agents, assignments, replica reports and local labels.

Dataset definitions exist only here (back the file with a persistent volume); agents,
assignments and replica states are rebuilt from agents' registrations and reports. SQLite in
WAL mode with `synchronous=FULL` keeps it all across restarts. All statements run on the
event-loop thread: they are sub-millisecond, and one connection keeps transactions simple.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from coordinator.errors import AlreadyExists, FailedPrecondition, NotFound
from coordinator.model import AgentRecord, DatasetRecord, ReplicaReport, ReplicaState

_SCHEMA = """
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


class Store:
    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # Datasets -------------------------------------------------------------------------------

    def create_dataset(self, name: str, source: str, replicas: int) -> DatasetRecord:
        with self._transaction() as db:
            row = db.execute("SELECT deleting FROM datasets WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if row[0]:
                    raise FailedPrecondition(
                        f"dataset {name!r} is still being deleted; retry once it is gone"
                    )
                raise AlreadyExists(f"dataset {name!r} already exists")
            record = DatasetRecord(name, source, replicas, time.time())
            db.execute(
                "INSERT INTO datasets (name, source, replicas, create_time) VALUES (?, ?, ?, ?)",
                (record.name, record.source, record.replicas, record.create_time),
            )
        return record

    def get_dataset(self, name: str) -> DatasetRecord:
        row = self._db.execute(
            "SELECT name, source, replicas, create_time, deleting FROM datasets WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            raise NotFound(f"dataset {name!r} not found")
        return DatasetRecord(row[0], row[1], row[2], row[3], bool(row[4]))

    def list_datasets(self, after: str = "", limit: int = -1) -> list[DatasetRecord]:
        rows = self._db.execute(
            "SELECT name, source, replicas, create_time, deleting FROM datasets "
            "WHERE name > ? ORDER BY name LIMIT ?",
            (after, limit),
        ).fetchall()
        return [DatasetRecord(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def update_replicas(self, name: str, replicas: int) -> DatasetRecord:
        with self._transaction() as db:
            row = db.execute("SELECT deleting FROM datasets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"dataset {name!r} not found")
            if row[0]:
                raise FailedPrecondition(f"dataset {name!r} is being deleted")
            db.execute("UPDATE datasets SET replicas = ? WHERE name = ?", (replicas, name))
        return self.get_dataset(name)

    def mark_deleting(self, name: str) -> None:
        with self._transaction() as db:
            cur = db.execute("UPDATE datasets SET deleting = 1 WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"dataset {name!r} not found")

    def purge_dataset(self, name: str) -> None:
        """Forgets a dataset once no node holds it any more."""
        with self._transaction() as db:
            db.execute("DELETE FROM assignments WHERE dataset = ?", (name,))
            db.execute("DELETE FROM replicas WHERE dataset = ?", (name,))
            db.execute("DELETE FROM datasets WHERE name = ?", (name,))

    # Agents ---------------------------------------------------------------------------------

    def upsert_agent(self, agent: AgentRecord) -> bool:
        """Records an agent; returns True when the node's cache id changed (a new machine or a
        wiped disk), in which case everything previously reported for the node is forgotten."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT cache_id FROM agents WHERE node_name = ?", (agent.node_name,)
            ).fetchone()
            replaced = row is not None and row[0] != agent.cache_id
            if replaced:
                db.execute("DELETE FROM replicas WHERE node_name = ?", (agent.node_name,))
            db.execute(
                "INSERT INTO agents (node_name, cache_id, last_seen, capacity_bytes, free_bytes) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (node_name) DO UPDATE SET "
                "cache_id = excluded.cache_id, last_seen = excluded.last_seen, "
                "capacity_bytes = excluded.capacity_bytes, free_bytes = excluded.free_bytes",
                (
                    agent.node_name,
                    agent.cache_id,
                    agent.last_seen,
                    agent.capacity_bytes,
                    agent.free_bytes,
                ),
            )
        return replaced

    def get_agent(self, node_name: str) -> AgentRecord | None:
        row = self._db.execute(
            "SELECT node_name, cache_id, last_seen, capacity_bytes, free_bytes FROM agents "
            "WHERE node_name = ?",
            (node_name,),
        ).fetchone()
        return AgentRecord(*row) if row else None

    def list_agents(self) -> list[AgentRecord]:
        rows = self._db.execute(
            "SELECT node_name, cache_id, last_seen, capacity_bytes, free_bytes FROM agents "
            "ORDER BY node_name"
        ).fetchall()
        return [AgentRecord(*r) for r in rows]

    def extend_all_leases(self, now: float) -> None:
        """Gives every known agent a fresh lease: after a coordinator restart, agents had no
        way to report, so their old timestamps say nothing about whether they are alive."""
        self._db.execute("UPDATE agents SET last_seen = MAX(last_seen, ?)", (now,))

    # Assignments ----------------------------------------------------------------------------

    def assignments(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {}
        for dataset, node in self._db.execute("SELECT dataset, node_name FROM assignments"):
            out.setdefault(dataset, set()).add(node)
        return {d: frozenset(n) for d, n in out.items()}

    def set_assignments(self, desired: Mapping[str, frozenset[str]]) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM assignments")
            db.executemany(
                "INSERT INTO assignments (dataset, node_name) VALUES (?, ?)",
                [(d, n) for d, nodes in desired.items() for n in sorted(nodes)],
            )

    # Replica reports ------------------------------------------------------------------------

    def replace_reports(self, node_name: str, reports: Iterable[ReplicaReport]) -> None:
        """Stores a node's full actual state: datasets absent from `reports` are gone."""
        with self._transaction() as db:
            db.execute("DELETE FROM replicas WHERE node_name = ?", (node_name,))
            db.executemany(
                "INSERT INTO replicas (dataset, node_name, state, digest, files_done, bytes_done,"
                " files_total, bytes_total, message, update_time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.dataset,
                        node_name,
                        r.state.value,
                        r.digest,
                        r.files_done,
                        r.bytes_done,
                        r.files_total,
                        r.bytes_total,
                        r.message,
                        r.update_time,
                    )
                    for r in reports
                ],
            )

    def reports(self, dataset: str | None = None, node: str | None = None) -> list[ReplicaReport]:
        rows = self._db.execute(
            "SELECT dataset, node_name, state, digest, files_done, bytes_done, files_total,"
            " bytes_total, message, update_time FROM replicas"
            " WHERE (?1 IS NULL OR dataset = ?1) AND (?2 IS NULL OR node_name = ?2)"
            " ORDER BY dataset, node_name",
            (dataset, node),
        ).fetchall()
        return [
            ReplicaReport(r[0], r[1], ReplicaState(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9])
            for r in rows
        ]

    # Local labels ---------------------------------------------------------------------------

    def local_labels(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for node, key, value in self._db.execute(
            "SELECT node_name, key, value FROM local_labels ORDER BY node_name, key"
        ):
            out.setdefault(node, {})[key] = value
        return out

    def set_local_labels(self, node_name: str, labels: Mapping[str, str]) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM local_labels WHERE node_name = ?", (node_name,))
            db.executemany(
                "INSERT INTO local_labels (node_name, key, value) VALUES (?, ?, ?)",
                [(node_name, k, v) for k, v in sorted(labels.items())],
            )
