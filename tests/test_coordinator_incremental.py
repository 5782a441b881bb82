"""The incremental reconcile pass and what it stands on, in process: the store's in-memory cache
holds exactly what SQLite holds; a pass that recomputes only what changed reaches the state a
pass computing everything from scratch reaches; the pieces it reuses (replica facts, status
fingerprints, labels, desired sets, placement in a worker process) equal what they replace."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import sqlite3
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.cluster import EventReason, NodeFacts, Taint
from coordinator.collector import CollectorHold
from coordinator.desired_sets import DesiredDataset, DesiredIndex, DesiredStateHub
from coordinator.label_index import LabelIndex
from coordinator.labelers import LocalNodeLabeler
from coordinator.labels import desired_node_labels
from coordinator.model import (
    AgentRecord,
    DatasetSpec,
    ManifestRow,
    ReplicaReport,
    ReplicaState,
    Toleration,
)
from coordinator.node_views import NodeViews
from coordinator.placement import Node, Want, place
from coordinator.placement_worker import PlacementWorker
from coordinator.reconciler import Reconciler
from coordinator.replica_facts import FACT_IGNORES, FactsCache, dataset_facts, fact_inputs
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from coordinator.views import (
    STATUS_IGNORES,
    STATUS_RECORD_IGNORES,
    dataset_view,
    status_fingerprint,
    status_inputs,
    status_record,
)
from datacache.versions import manifest_digest

GIB = 1 << 30
ZONE = "topology.kubernetes.io/zone"
STATES = list(ReplicaState)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "coordinator.db")
    yield opened
    opened.close()


def report(dataset: str, node: str = "", **fields: Any) -> ReplicaReport:
    return ReplicaReport(dataset=dataset, node_name=node, **{"state": ReplicaState.READY, **fields})


# The store's cache --------------------------------------------------------------------------


def cached_state(store: Store) -> dict[str, Any]:
    """Everything the cache answers, with the types of every record field."""
    state: dict[str, Any] = {
        "datasets": store.dataset_map(),
        "agents": store.agent_map(),
        "assignments": store.assignments(),
        "reports": {d: dict(r) for d, r in store.reports_by_dataset().items()},
        "reports_list": store.reports(),
        "versions": store.fixed_versions(),
        "labels": store.local_labels(),
    }
    records: list[Any] = [
        *state["datasets"].values(),
        *state["agents"].values(),
        *state["versions"].values(),
        *state["reports_list"],
    ]
    state["types"] = [
        [type(getattr(record, f.name)) for f in dataclasses.fields(record)] for record in records
    ]
    return state


def test_the_cache_holds_what_sqlite_holds(store: Store, tmp_path: Path) -> None:
    rng = random.Random(7)
    clock = 1000.0
    for step in range(120):
        clock += 1
        op = rng.randrange(11)
        node = f"n{rng.randrange(6)}"
        name = f"ns/d{rng.randrange(5)}"
        record = store.find_dataset(name)
        if op == 0 or record is None:
            if record is None:
                store.create_dataset(
                    name,
                    DatasetSpec(
                        source=f"s3://b/{name}/",
                        replicas=rng.randint(1, 3),
                        node_selector={"pool": "gpu"} if rng.random() < 0.3 else {},
                        tolerations=(Toleration("t", "Exists"),) if rng.random() < 0.3 else (),
                    ),
                )
        elif op == 1 and not record.deleting:
            store.update_replicas(name, rng.randint(1, 4))
        elif op == 2 and not record.deleting:
            store.refresh_dataset(name)
        elif op == 3:
            if record.deleting:
                store.purge_dataset(name)
            else:
                store.mark_deleting(name)
        elif op == 4:
            store.upsert_agent(
                AgentRecord(
                    node,
                    f"cache-{rng.randrange(2)}",
                    clock,
                    capacity_bytes=rng.choice([0, 100 * GIB]),
                    free_bytes=rng.randrange(100) * GIB,
                    node_uid=rng.choice(["", "uid-1", "uid-2"]),
                    node_labels={ZONE: f"z{rng.randrange(2)}"},
                    agent_version="v1",
                )
            )
        elif op == 5:
            reports = [
                report(
                    d,
                    state=rng.choice(STATES),
                    digest=rng.choice(["", "sha256:a"]),
                    bytes_done=rng.randrange(10),
                    update_time=clock,
                    revision=rng.randrange(3),
                    bytes_per_second=rng.choice([0, 1.5, 7]),
                    verification=rng.choice([{}, {"crc64nvme": 3, "etag": 1}]),
                    last_used_time=rng.choice([0, clock]),
                    disk_bytes=rng.randrange(5),
                )
                for d in rng.sample(sorted(store.dataset_map()), k=rng.randint(0, 2))
            ]
            store.record_report(node, clock, 100, rng.randrange(100), rng.randrange(2), reports)
        elif op == 6:
            store.renew_agent(node, clock, rng.randrange(100), rng.randrange(100), 0)
        elif op == 7:
            nodes = [f"n{i}" for i in range(6)]
            store.set_assignments(
                {d: frozenset(rng.sample(nodes, k=rng.randint(0, 3))) for d in store.dataset_map()}
            )
        elif op == 8:
            store.forget_node(node)
        elif op == 9:
            keys = {f"k{i}": "ready" for i in range(rng.randrange(3))}
            store.set_local_labels(node, keys)
        elif op == 10 and not record.deleting:
            entries = [ManifestRow(f"f{i}", i, f"e{i}", f"{i:016x}") for i in range(3)]
            store.fix_version(name, record.revision, manifest_digest(entries), entries)
            store.set_status_hashes({name: f"h{step}"})
        if step % 40 == 39:
            store.extend_all_leases(clock + 5)
        fresh = Store(tmp_path / "coordinator.db")  # reads SQLite from scratch
        try:
            assert cached_state(store) == cached_state(fresh), f"step {step}, op {op}"
        finally:
            fresh.close()


def test_the_cache_sees_writes_of_other_connections(store: Store, tmp_path: Path) -> None:
    store.create_dataset("ns/a", DatasetSpec(source="s3://b/a/", replicas=1))
    assert store.find_dataset("ns/a") is not None  # the cache is loaded
    other = Store(tmp_path / "coordinator.db")
    try:
        other.create_dataset("ns/b", DatasetSpec(source="s3://b/b/", replicas=2))
        other.set_local_labels("n1", {"k": "ready"})
    finally:
        other.close()
    record = store.find_dataset("ns/b")
    assert record is not None and record.replicas == 2
    assert store.local_labels_of("n1") == {"k": "ready"}


def test_cached_maps_are_snapshots(store: Store) -> None:
    store.create_dataset("ns/a", DatasetSpec(source="s3://b/a/", replicas=1))
    store.upsert_agent(AgentRecord("n1", "c", 1.0))
    store.record_report("n1", 2.0, 0, 0, 0, [report("ns/a", digest="x")])
    before = store.reports_by_dataset()
    mine = store.node_reports("n1")
    store.record_report("n1", 3.0, 0, 0, 0, [report("ns/a", digest="y")])
    assert before["ns/a"]["n1"].digest == "x" and mine["ns/a"].digest == "x"
    assert store.reports_by_dataset()["ns/a"]["n1"].digest == "y"
    unchanged = store.reports_by_dataset()["ns/a"]
    store.upsert_agent(AgentRecord("n2", "c", 4.0))
    assert store.reports_by_dataset()["ns/a"] is unchanged


# Pure pieces --------------------------------------------------------------------------------

FIELD_VALUES: dict[str, tuple[Any, Any]] = {
    "dataset": ("ns/a", "ns/b"),
    "node_name": ("n1", "n2"),
    "state": (ReplicaState.READY, ReplicaState.FETCHING),
    "digest": ("sha256:a", "sha256:b"),
    "files_done": (1, 2),
    "bytes_done": (1, 2),
    "files_total": (1, 2),
    "bytes_total": (1, 2),
    "message": ("", "boom"),
    "update_time": (1.0, 2.0),
    "revision": (1, 2),
    "bytes_per_second": (0.0, 9.0),
    "verification": ({}, {"crc64nvme": 1}),
    "last_used_time": (0.0, 5.0),
    "serving_version": ("", "sha256:c"),
    "disk_bytes": (1, 2),
}


def test_every_report_field_is_an_input_or_ignored_on_purpose() -> None:
    fields = {f.name for f in dataclasses.fields(ReplicaReport)}
    assert fields == FIELD_VALUES.keys()
    base = ReplicaReport(**{k: v[0] for k, v in FIELD_VALUES.items()})
    for name, (_, other) in FIELD_VALUES.items():
        changed = dataclasses.replace(base, **{name: other})
        assert (fact_inputs(changed) == fact_inputs(base)) == (name in FACT_IGNORES), name
        if name != "dataset":
            assert (status_inputs(changed) == status_inputs(base)) == (name in STATUS_IGNORES)


def test_status_fingerprints_ignore_exactly_the_ignored_fields() -> None:
    store_record = dataclasses.replace(
        _record("ns/a"), resource_version=3, update_time=4.0, revision=1
    )
    base = ReplicaReport(**{k: v[0] for k, v in FIELD_VALUES.items()})
    fingerprint = status_fingerprint(dataset_view(store_record, frozenset({"n1"}), [base], None))
    for name in STATUS_IGNORES - {"dataset"}:
        changed = dataclasses.replace(base, **{name: FIELD_VALUES[name][1]})
        view = dataset_view(store_record, frozenset({"n1"}), [changed], None)
        assert status_fingerprint(view) == fingerprint, name
    for name in STATUS_RECORD_IGNORES:
        moved = dataclasses.replace(store_record, **{name: 99})
        view = dataset_view(moved, frozenset({"n1"}), [base], None)
        assert status_fingerprint(view) == fingerprint, name
        assert status_record(moved) == status_record(store_record)
    record_fields = {f.name for f in dataclasses.fields(store_record)}
    assert len(status_record(store_record)) == len(record_fields - STATUS_RECORD_IGNORES)


def _record(name: str) -> Any:
    from coordinator.model import DatasetRecord

    return DatasetRecord(name=name, source="s3://b/", replicas=2, create_time=1.0)


def test_facts_are_derived_again_only_when_an_input_changed() -> None:
    cache = FactsCache()
    live = {"n1", "n2"}
    reports = {
        "n1": report("ns/a", "n1", digest="sha256:a", revision=1, bytes_total=5),
        "n2": report("ns/a", "n2", state=ReplicaState.FETCHING, revision=1, bytes_done=2),
        "n3": report("ns/a", "n3", digest="sha256:a", revision=1),
    }
    first = cache.get("ns/a", 1, reports, live)
    assert first == dataset_facts(1, reports, live)
    assert first.ready == {"n1"} and first.holding == {"n1", "n2"} and first.size == 5
    assert cache.get("ns/a", 1, dict(reports), live) is first
    times = dict(reports, n1=dataclasses.replace(reports["n1"], update_time=9.0))
    assert cache.get("ns/a", 1, times, live) is first
    assert cache.derived == 1
    news = dict(reports, n2=dataclasses.replace(reports["n2"], state=ReplicaState.READY))
    second = cache.get("ns/a", 1, news, live)
    assert second.ready == {"n1", "n2"} and cache.derived == 2
    assert second.holding is first.holding  # an equal part is the previous object
    assert cache.get("ns/a", 1, news, live | {"n3"}).holding == {"n1", "n2", "n3"}
    assert cache.get("ns/a", 2, news, live | {"n3"}).ready == frozenset()


def test_label_index_equals_labels_from_scratch() -> None:
    rng = random.Random(3)
    index = LabelIndex()
    datasets = ["ns/a", "ns/b", "other/" + "x" * 80]
    nodes = [f"n{i}" for i in range(5)]
    for _ in range(60):
        labelled = {
            d: frozenset(rng.sample(nodes, k=rng.randint(0, 3)))
            for d in datasets
            if rng.random() < 0.8
        }
        assert index.update(labelled) == desired_node_labels(labelled)


def test_desired_index_publishes_changed_and_new_nodes_only() -> None:
    index = DesiredIndex()
    a1 = DesiredDataset("ns/a", "s3://a/", 1)
    b1 = DesiredDataset("ns/b", "s3://b/", 1)
    index.set_dataset("ns/a", {"n1": a1, "n2": a1})
    index.set_dataset("ns/b", {"n2": b1})
    assert index.updates({"n1", "n2", "n3"}) == {"n1": (a1,), "n2": (a1, b1), "n3": ()}
    index.set_dataset("ns/a", {"n1": DesiredDataset("ns/a", "s3://a/", 1), "n2": a1})
    assert index.updates({"n1", "n2", "n3"}) == {}  # equal entries are no change
    a2 = DesiredDataset("ns/a", "s3://a/", 2)
    index.set_dataset("ns/a", {"n1": a2})
    assert index.updates({"n1", "n2", "n3"}) == {"n1": (a2,), "n2": (b1,)}
    # A node outside the published set (not live, nothing desired) is not published, even
    # when its set changed; it is when it comes back.
    index.keep_only({"ns/a"})
    assert index.updates({"n1", "n3"}) == {}
    assert index.updates({"n1", "n2", "n3"}) == {"n2": ()}


def test_hub_wakes_only_the_nodes_whose_set_changed() -> None:
    async def scenario() -> None:
        hub = DesiredStateHub()
        one = (DesiredDataset("ns/a", "s3://a/"),)
        await hub.publish({"n1": one, "n2": ()})
        waiting = {
            node: asyncio.create_task(hub.wait_newer(node, hub.snapshot(node)[0], 60))
            for node in ("n1", "n2")
        }
        await asyncio.sleep(0)
        await hub.publish({"n1": one, "n2": one})
        assert await waiting["n2"] == (2, one)
        assert not waiting["n1"].done()
        await hub.publish({"n1": ()})
        assert await waiting["n1"] == (2, ())
        assert await hub.wait_newer("n1", 2, 0.01) == (2, ())  # a heartbeat: the same set

    asyncio.run(scenario())


def test_placement_in_the_worker_equals_placement_in_process() -> None:
    async def scenario() -> None:
        rng = random.Random(5)
        worker = PlacementWorker(min_size=0)
        nodes = {
            f"n{i}": Node(
                f"n{i}",
                labels={ZONE: f"z{i % 3}", **({"pool": "gpu"} if i % 7 == 0 else {})},
                taints=(Taint("t", "v", "NoSchedule"),) if i % 11 == 0 else (),
                free_bytes=rng.choice([None, GIB, 100 * GIB]),
            )
            for i in range(60)
        }
        wants = [
            Want(
                f"d{j}",
                rng.randint(1, 4),
                all_nodes=j % 9 == 0,
                node_selector={"pool": "gpu"} if j % 5 == 0 else {},
                tolerations=(Toleration("t", "Exists"),) if j % 3 == 0 else (),
                size_bytes=rng.choice([0, GIB // 2, 10 * GIB]),
            )
            for j in range(25)
        ]
        current: dict[str, frozenset[str]] = {}
        ready: dict[str, frozenset[str]] = {}
        on_disk: dict[str, dict[str, int]] = {}
        await worker.start()
        try:
            for step in range(12):
                flat = {(d, n): b for d, sizes in on_disk.items() for n, b in sizes.items()}
                expected = place(wants, nodes, current, ready, ready, flat, frozenset())
                got = await worker.place(wants, nodes, current, ready, ready, on_disk, set())
                assert got == expected, step
                current = {d: ns for d, ns in got.items() if ns}
                for d, ns in current.items():
                    if (here := frozenset(n for n in ns if rng.random() < 0.5)) and step % 2:
                        ready[d] = here
                        on_disk[d] = dict.fromkeys(here, GIB // 4)
                del nodes[rng.choice(sorted(nodes))]
                wants[rng.randrange(len(wants))] = dataclasses.replace(wants[0], dataset=f"x{step}")
                if step == 6:
                    assert worker.pid is not None
                    import os
                    import signal

                    os.kill(worker.pid, signal.SIGKILL)  # a new worker takes over
            # All but the call that found the worker dead and the one that started the next.
            assert 10 <= worker.calls_in_worker <= 11
        finally:
            await worker.close()

    asyncio.run(scenario())


def test_the_collector_is_held_off_for_a_while_only() -> None:
    clock = Clock()
    hold = CollectorHold(hold_seconds=1.0, clock=clock)
    assert gc.isenabled()
    hold.hold()
    assert not gc.isenabled() and hold.holding
    clock.now += 0.5
    hold.check()
    assert not gc.isenabled()
    clock.now += 0.6
    hold.check()
    assert gc.isenabled() and not hold.holding
    gc.disable()  # someone else's choice is left alone
    try:
        hold.hold()
        hold.release()
        assert not gc.isenabled()
    finally:
        gc.enable()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_survivors_are_frozen_and_thawed_for_a_full_collection() -> None:
    clock = Clock()
    hold = CollectorHold(hold_seconds=1.0, clock=clock, thaw_seconds=600.0)
    try:
        hold.hold()
        during = _Cycle()
        gone_with_the_pass = weakref.ref(during)
        del during
        kept = _Cycle()
        frozen = weakref.ref(kept)
        hold.release()
        # The pass's garbage cycle is collected, not frozen; the survivor is frozen.
        assert gone_with_the_pass() is None
        assert gc.get_freeze_count() > 0
        del kept
        gc.collect()
        assert frozen() is not None, "a frozen cycle waits for the thaw"
        clock.now += 601
        hold.hold()
        hold.release()
        assert frozen() is None
        assert gc.get_freeze_count() > 0 and gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_small_placements_stay_in_process() -> None:
    async def scenario() -> None:
        worker = PlacementWorker()
        nodes = {"n1": Node("n1")}
        placed = await worker.place([Want("d", 1)], nodes, {}, {}, {}, {}, set())
        assert placed == {"d": frozenset({"n1"})}
        assert worker.pid is None and worker.calls_in_worker == 0

    asyncio.run(scenario())


# The pass -----------------------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, str]] = []

    async def replica_event(self, node: str, dataset: str, reason: str, message: str) -> None:
        self.seen.append((node, dataset, reason, message))


class World:
    """A store with agents and datasets that change at random, and the reconciler under
    test, which lives through all the changes."""

    def __init__(self, store: Store, seed: int, pressure: bool = True) -> None:
        self.store = store
        self.pressure = pressure
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.settings = CoordinatorSettings(
            db_path=Path("unused"), lease_seconds=30, eviction_cooldown_seconds=50
        )
        self.labeler = LocalNodeLabeler(store)
        self.hub = DesiredStateHub()
        self.addresses: dict[str, str] = {}
        self.events = Events()
        self.reconciler = self.fresh(self.hub, self.events)
        self.nodes = [f"node-{i}" for i in range(10)]
        self.datasets = [f"team/ds-{i}" for i in range(7)]

    def fresh(self, hub: DesiredStateHub, events: Events, store: Store | None = None) -> Reconciler:
        store = store or self.store
        labeler = LocalNodeLabeler(store)
        reconciler = Reconciler(
            store, labeler, hub, self.settings, self.clock, events=events, lease_clock=self.clock
        )
        for node, address in self.addresses.items():
            reconciler.set_peer_address(node, address)
        return reconciler

    def register(self, node: str, cache: str = "cache") -> None:
        labels = {ZONE: f"z{self.nodes.index(node) % 3}"}
        if self.rng.random() < 0.4:
            labels["pool"] = "gpu"
        self.store.upsert_agent(
            AgentRecord(
                node,
                cache,
                self.clock(),
                capacity_bytes=100 * GIB,
                free_bytes=self.rng.choice([0, GIB // 2, 50 * GIB]),
                node_labels=labels,
            )
        )
        self.reconciler.seen(node)
        # Agents serving peers register their address; a restarted one may change it.
        address = self.rng.choice(["", f"10.0.0.{self.nodes.index(node)}:{self.rng.randrange(3)}"])
        self.reconciler.set_peer_address(node, address)
        if address:
            self.addresses[node] = address
        else:
            self.addresses.pop(node, None)

    def report(self, node: str, news: bool = True) -> None:
        if self.store.get_agent(node) is None:
            return
        _, desired = self.hub.snapshot(node)
        earlier = self.store.node_reports(node)
        if not news:  # the same state again
            agent = self.store.get_agent(node)
            assert agent is not None
            again = [dataclasses.replace(r, update_time=self.clock()) for r in earlier.values()]
            room = (agent.capacity_bytes, agent.free_bytes, agent.pressure_bytes)
            self.store.record_report(node, self.clock(), *room, again)
            self.reconciler.seen(node)
            return
        reports = []
        for d in desired:
            state = self.rng.choice([*STATES[:4], ReplicaState.READY, ReplicaState.READY])
            fixed = d.version or self.rng.choice([f"sha256:{d.name}-{d.revision}", "sha256:x"])
            reports.append(
                report(
                    d.name,
                    state=state,
                    digest=fixed if state is ReplicaState.READY else "",
                    revision=self.rng.choice([d.revision, d.revision, max(1, d.revision - 1), 0]),
                    bytes_done=GIB,
                    bytes_total=GIB,
                    disk_bytes=self.rng.choice([0, GIB]),
                    message="disk on fire" if state is ReplicaState.FAILED else "",
                    serving_version=self.rng.choice(["", "", "sha256:old"]),
                    update_time=self.clock(),
                    last_used_time=self.rng.choice([0.0, self.clock() - 10]),
                )
            )
        for name, before in earlier.items():  # a copy it no longer should hold, sometimes
            if name not in {d.name for d in desired} and self.rng.random() < 0.5:
                reports.append(dataclasses.replace(before, update_time=self.clock()))
        pressure = GIB if self.pressure and self.rng.random() < 0.15 else 0
        if self.rng.random() < 0.15:  # a copy from before (e.g. of a dataset now blocked)
            stray = self.rng.choice(sorted(self.store.dataset_map()) or [""])
            if stray and stray not in {r.dataset for r in reports}:
                reports.append(report(stray, state=ReplicaState.FETCHING, revision=0))
        free = self.rng.choice([0, GIB // 2, 10 * GIB, 10 * GIB])
        self.store.record_report(node, self.clock(), 100 * GIB, free, pressure, reports)
        self.reconciler.seen(node)

    def step(self) -> None:
        rng, store = self.rng, self.store
        self.clock.now += rng.choice([1, 1, 2, 20])
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(13)
            node, name = rng.choice(self.nodes), rng.choice(self.datasets)
            record = store.find_dataset(name)
            if op <= 1:
                self.register(node, cache=rng.choice(["cache", "cache", "wiped"]))
            elif op <= 4:
                self.report(node, news=op != 4)
            elif op == 5 and record is None:
                all_nodes = rng.random() < 0.25
                store.create_dataset(
                    name,
                    DatasetSpec(
                        source=f"s3://bucket/{name}/",
                        replicas=rng.randint(1, 3),
                        all_nodes=all_nodes,
                        node_selector={"pool": "gpu"} if all_nodes or rng.random() < 0.2 else {},
                        pin=rng.random() < 0.3,
                        # No secrets source: copies go only to nodes holding one already.
                        credentials_secret="creds" if rng.random() < 0.2 else "",
                    ),
                )
            elif op == 6 and record is not None and not record.deleting:
                store.update_replicas(name, rng.randint(1, 4))
            elif op == 7 and record is not None and not record.deleting:
                store.refresh_dataset(name)
            elif op in (8, 10, 11) and record is not None and not record.deleting:
                if op == 8 and rng.random() < 0.3:
                    store.mark_deleting(name)
                else:
                    entries = [ManifestRow(f"f{rng.randrange(3)}", 1, "e", "0" * 16)]
                    store.fix_version(name, record.revision, manifest_digest(entries), entries)
            elif op == 9:
                store.forget_node(node)
                self.reconciler.forget(node)
                self.addresses.pop(node, None)
            else:
                for each in rng.sample(self.nodes, k=3):
                    self.report(each, news=rng.random() < 0.5)

    def published(self, hub: DesiredStateHub, nodes: set[str]) -> dict[str, Any]:
        return {node: hub.snapshot(node)[1] for node in nodes}


def outcome(store: Store) -> dict[str, Any]:
    """What a pass writes: assignments, labels, statuses, evictions, purges."""
    return {
        "assignments": store.assignments(),
        "labels": store.local_labels(),
        "statuses": store.status_hashes(),
        "resource_version": store.resource_version(),
        "datasets": sorted(store.dataset_map()),
        "evictions": store.evictions_since(0),
    }


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_an_incremental_pass_does_what_a_pass_from_scratch_does(
    store: Store, tmp_path: Path, seed: int
) -> None:
    """Before every pass of the long-lived reconciler, the state is copied and a new
    reconciler (which computes everything from scratch) runs a pass over the copy: both
    write the same assignments, labels, statuses and evictions and publish the same desired
    sets."""

    async def scenario() -> None:
        world = World(store, seed)
        checked_nodes = 0
        for step in range(60):
            world.step()
            copy = tmp_path / f"copy-{step}.db"
            source, target = sqlite3.connect(tmp_path / "coordinator.db"), sqlite3.connect(copy)
            source.backup(target)
            source.close()
            target.close()
            scratch_store = Store(copy)
            hub = DesiredStateHub()
            scratch = world.fresh(hub, Events(), scratch_store)
            try:
                await world.reconciler.reconcile_once()
                await scratch.reconcile_once()
                assert outcome(store) == outcome(scratch_store), f"step {step}"
                published = {n for n in world.nodes if hub.snapshot(n)[0] > 0}
                assert world.published(world.hub, published) == world.published(hub, published), (
                    f"step {step}"
                )
                assert all(world.hub.snapshot(n)[0] > 0 for n in published)
                checked_nodes += len(published)
            finally:
                await scratch.close()
                scratch_store.close()
        await world.reconciler.close()
        assert checked_nodes > 100  # the scenario did place things

    asyncio.run(scenario())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_state_an_incremental_pass_leaves_needs_no_change_from_scratch(
    store: Store, seed: int
) -> None:
    """Without room pressure (an eviction decided in one pass changes the next pass's
    placement), one pass reaches a fixed point: after every pass of the long-lived
    reconciler, a new reconciler over the same state changes nothing and publishes the same
    desired sets."""

    async def scenario() -> None:
        world = World(store, seed, pressure=False)
        for step in range(60):
            world.step()
            await world.reconciler.reconcile_once()
            before = outcome(store)
            hub = DesiredStateHub()
            scratch = world.fresh(hub, Events())
            try:
                await scratch.reconcile_once()
                assert outcome(store) == before, f"step {step}"
                assert scratch.stats.label_writes == 0
                published = {n for n in world.nodes if hub.snapshot(n)[0] > 0}
                assert world.published(world.hub, published) == world.published(hub, published), (
                    f"step {step}"
                )
                assert all(world.hub.snapshot(n)[0] > 0 for n in published)
            finally:
                await scratch.close()
        await world.reconciler.close()

    asyncio.run(scenario())


def test_a_pass_with_nothing_new_recomputes_nothing(store: Store) -> None:
    async def scenario() -> None:
        world = World(store, 11)
        for node in world.nodes:
            world.register(node)
        for name in world.datasets:
            store.create_dataset(name, DatasetSpec(source=f"s3://b/{name}/", replicas=2))
        await world.reconciler.reconcile_once()
        for node in world.nodes:
            world.report(node)
        await world.reconciler.reconcile_once()
        await world.reconciler.reconcile_once()
        world.clock.now += 1
        for node in world.nodes:
            world.report(node, news=False)  # the same state again: only times move
        await world.reconciler.reconcile_once()
        stats = world.reconciler.stats
        assert stats.facts_derived == 0
        assert not stats.placed
        assert stats.desired_recomputed == stats.nodes_published == 0
        assert stats.statuses_recomputed == stats.label_writes == 0
        # One node's news: only its datasets are looked at again.
        world.clock.now += 1
        node = world.nodes[0]
        before = store.node_reports(node)
        world.report(node)
        await world.reconciler.reconcile_once()
        mine = len(before.keys() | store.node_reports(node).keys())
        assert 0 < world.reconciler.stats.facts_derived <= mine
        assert world.reconciler.stats.statuses_recomputed <= mine

    asyncio.run(scenario())


def test_events_are_sent_once_per_change(store: Store) -> None:
    async def scenario() -> None:
        world = World(store, 5)
        world.register("node-1")
        store.create_dataset("team/a", DatasetSpec(source="s3://b/a/", replicas=1))
        await world.reconciler.reconcile_once()
        fetching = report("team/a", state=ReplicaState.FETCHING, revision=1)
        store.record_report("node-1", world.clock(), 0, 0, 0, [fetching])
        await world.reconciler.reconcile_once()
        assert world.events.seen == []
        ready = report("team/a", digest="sha256:x", revision=1, update_time=1.0)
        store.record_report("node-1", world.clock(), 0, 0, 0, [ready])
        await world.reconciler.reconcile_once()
        again = dataclasses.replace(ready, update_time=2.0)
        store.record_report("node-1", world.clock(), 0, 0, 0, [again])
        await world.reconciler.reconcile_once()
        failed = report("team/a", state=ReplicaState.FAILED, message="no room", revision=1)
        store.record_report("node-1", world.clock(), 0, 0, 0, [failed])
        await world.reconciler.reconcile_once()
        assert [(e[2], e[3]) for e in world.events.seen] == [
            (EventReason.REPLICA_READY, "replica is Ready and verified"),
            (EventReason.REPLICA_FAILED, "no room"),
        ]
        # A Ready copy on a node that is not assigned is no news; it is once it is assigned.
        store.record_report("node-1", world.clock(), 0, 0, 0, [ready])
        await world.reconciler.reconcile_once()
        world.register("node-2")
        stray = report("team/a", digest="sha256:x", revision=1)
        store.record_report("node-2", world.clock(), 0, 0, 0, [stray])
        await world.reconciler.reconcile_once()
        assert len(world.events.seen) == 3
        store.update_replicas("team/a", 2)
        await world.reconciler.reconcile_once()
        assert world.events.seen[3:] == [
            ("node-2", "team/a", EventReason.REPLICA_READY, "replica is Ready and verified")
        ]

    asyncio.run(scenario())


def test_node_views_are_built_again_only_when_their_inputs_change() -> None:
    views = NodeViews()
    agent = AgentRecord("n1", "c", 1.0, capacity_bytes=10, free_bytes=5, node_labels={ZONE: "a"})
    first = views.node(agent, None)
    assert first == Node("n1", labels={ZONE: "a"}, free_bytes=5)
    assert views.node(dataclasses.replace(agent, last_seen=2.0), None) is first
    assert views.node(dataclasses.replace(agent, free_bytes=1), None).free_bytes == 1
    assert views.node(dataclasses.replace(agent, capacity_bytes=0), None).free_bytes is None
    fact = NodeFacts("n1", labels={ZONE: "b"}, taints=(Taint("t", "v", "NoSchedule"),))
    from_cluster = views.node(agent, fact)
    assert from_cluster.labels == {ZONE: "b"} and from_cluster.taints == fact.taints
    assert views.node(agent, dataclasses.replace(fact, unschedulable=True)).unschedulable
    facts = views.demand_facts({"n1": from_cluster}, {})
    assert facts["n1"] == NodeFacts("n1", labels={ZONE: "b"}, taints=fact.taints)
    assert dict(views.demand_facts({"n1": from_cluster}, {"n1": fact})) == {"n1": fact}


def test_the_kept_live_set_equals_the_leases_at_every_moment(store: Store) -> None:
    world = World(store, seed=11)
    reconciler = world.reconciler
    rng = random.Random(5)
    names = [f"node-{i}" for i in range(12)]
    seen: dict[str, float] = {}
    for step in range(2_000):
        action = rng.random()
        node = rng.choice(names)
        if action < 0.45:
            reconciler.seen(node)
            seen[node] = world.clock.now
        elif action < 0.5:
            reconciler.forget(node)
            seen.pop(node, None)
        else:
            # Steps that land exactly on a lease's end happen too (30 s = 6 x 5 s).
            world.clock.now += rng.choice([0.0, 1.0, 5.0, 29.0])
        cutoff = world.clock.now - world.settings.lease_seconds
        expected = {n for n, at in seen.items() if at >= cutoff}
        assert reconciler.live_nodes() == expected, f"step {step}"
        assert all(reconciler.is_live(n) == (n in expected) for n in names)
