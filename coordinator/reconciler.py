"""The level-triggered control loop.

Each pass reads the whole state, computes what should be (evictions, placement, labels,
desired sets per node, dataset status), and changes only the difference. Passes run on every
change and at least every `reconcile_interval_seconds`, so a missed trigger or a failed write
heals on the next pass.

A pass is incremental in what it computes, not in what it looks at: it reads a snapshot of the
whole state (from the store's in-memory cache) and compares it with what the last pass used,
and recomputes only what depends on something that changed: the facts of a dataset whose
revision, reports or live reporting nodes changed; placement when any of its inputs changed
(it is a pure function, so equal inputs give the previous result); labels and desired sets of
the datasets and nodes involved; the status of datasets whose status inputs changed.
Everything is compared by value, so nothing depends on being told what changed. Placement of
a large cluster runs in a worker process (`placement_worker`), and the garbage collector waits
for the end of the pass (`collector`). At 5,000 nodes and 1,000 datasets a pass with little
news costs the event loop a few tens of milliseconds instead of most of a second, and it lets
agents' calls in every `BREATHE_SECONDS` of work.

Ordering guarantees:
- A node is labelled for a dataset while its agent reports the copy Ready, or an older Ready
  version it keeps serving while a refresh is fetched (so a refresh never drops the label).
- A replica leaves a node's desired set only after its label is confirmed gone, so a pod is
  never sent to a node whose copy is being deleted (eviction and scale-down alike).
- Labels of a node are removed when its agent's lease expires, never merely because the
  coordinator restarted (restart grants every known agent a fresh lease).
- A node deleted from the cluster, or re-created under its name (new UID), loses its reports,
  assignments and labels: a replaced node starts empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from coordinator import metrics
from coordinator.cluster import (
    CredentialsDenied,
    CredentialsError,
    CredentialsProvider,
    EventReason,
    EventSink,
    LogEventSink,
    NodeChange,
    NodeDirectory,
    NodeFacts,
    S3Credentials,
)
from coordinator.collector import CollectorHold
from coordinator.demand_service import DemandScaler, DemandTracker
from coordinator.desired_sets import DesiredDataset, DesiredIndex, DesiredStateHub
from coordinator.errors import LabelerError, NodeMissing
from coordinator.label_index import LabelIndex
from coordinator.labelers import NodeLabeler
from coordinator.model import (
    AgentRecord,
    DatasetRecord,
    ReplicaReport,
    ReplicaState,
    VersionRecord,
)
from coordinator.node_views import NodeViews
from coordinator.peers import choose_peers
from coordinator.placement import Node, Resident, Want, choose_evictions
from coordinator.placement_worker import PlacementWorker
from coordinator.replica_facts import DatasetFacts, FactsCache
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from coordinator.views import (
    counts_ready,
    dataset_view,
    is_current,
    status_fingerprint,
    status_record,
)
from datacache.v1 import datacache_pb2 as pb

log = logging.getLogger(__name__)

FULL_PASS_SECONDS = 60.0
"""Longest time between two full reconcile passes when nothing triggers one, seconds."""

BREATHE_SECONDS = 0.0005
"""Longest stretch a pass holds the event loop before it lets agents' calls in, seconds.
(Agents' calls take several trips through the loop each; 2 ms stretches made those that
came during a pass wait 30-80 ms at 5,000 agents and 500 reports/s.)"""

PAUSE_SECONDS = 0.0002
"""How long a pass waits for I/O when it lets agents' calls in, seconds (in fact up to a
millisecond, epoll's resolution, or less when a call comes)."""

CALLING_SECONDS = 0.5
"""Agents count as calling for this long after the last registration or report, seconds."""

__all__ = ["DesiredDataset", "DesiredStateHub", "Reconciler"]


class Reconciler:
    def __init__(
        self,
        store: Store,
        labeler: NodeLabeler,
        hub: DesiredStateHub,
        settings: CoordinatorSettings,
        clock: Callable[[], float] = time.time,
        *,
        events: EventSink | None = None,
        credentials: CredentialsProvider | None = None,
        directory: NodeDirectory | None = None,
        demand: tuple[DemandTracker, DemandScaler] | None = None,
        lease_clock: Callable[[], float] = time.monotonic,
        collector: CollectorHold | None = None,
    ) -> None:
        self._store = store
        self._labeler = labeler
        self._hub = hub
        self._settings = settings
        self._clock = clock
        self._events: EventSink = events or LogEventSink()
        self._credentials = credentials
        self._directory = directory
        self._wake = asyncio.Event()
        # Idle passes (nothing triggered, same live nodes) only re-check labels; a full pass
        # still runs at least every FULL_PASS_SECONDS to heal anything a trigger missed.
        self._dirty = True
        self._last_full = 0.0
        self._last_live: set[str] = set()
        self._last_labels: tuple[dict[str, Mapping[str, str]], dict[str, frozenset[str]]] | None = (
            None
        )
        self._lock = asyncio.Lock()
        # Lease bookkeeping in memory: reports renew it hundreds of times a second at scale.
        # Leases run on a monotonic clock: a wall-clock step (NTP) must not expire them all at
        # once. The stored wall-clock times only carry each lease's age across a restart.
        self._lease_clock = lease_clock
        wall, held = clock(), lease_clock()
        self._last_seen = {
            a.node_name: held - max(0.0, wall - a.last_seen) for a in store.list_agents()
        }
        self._live: tuple[frozenset[str], float] | None = None
        """The live nodes and their oldest renewal (see `live_nodes`)."""
        self._live_lock = threading.Lock()
        self._hashes = store.status_hashes()
        self._problems: dict[str, str] = {}
        self._peer_addresses: dict[str, str] = {}
        """Where each agent serves peers (given at registration; agents re-register after a
        coordinator restart)."""
        self._good_credentials: dict[str, tuple[str, S3Credentials]] = {}
        self._states: dict[str, dict[str, ReplicaState]] | None = None
        """Per dataset, the state of each assigned live replica of the current revision (for
        events); None before the first pass."""
        self._events_seen: dict[str, tuple[Any, ...]] = {}
        self.last_pass_seconds = 0.0
        # What the last pass computed, to recompute only what changed (see the module doc).
        self._facts = FactsCache()
        self._node_views = NodeViews()
        self._placement: tuple[tuple[Any, ...], dict[str, frozenset[str]]] | None = None
        self._placer = PlacementWorker()
        self._want_memo: dict[str, Want] = {}
        self._label_index = LabelIndex()
        self._desired = DesiredIndex()
        self._desired_keys: dict[str, tuple[Any, ...]] = {}
        self._peer_env: tuple[dict[str, str], dict[str, str]] = ({}, {})
        """Peer addresses and zones of live nodes, as peers were last chosen with."""
        self._peer_env_nodes: dict[str, Node] = {}
        self._peer_env_generation = 0
        self._fingerprints: dict[str, tuple[tuple[Any, ...], str]] = {}
        self._breath = 0.0
        self._called = 0.0
        self._collector = collector or CollectorHold()
        self.stats = PassStats()
        """What the last pass recomputed (logged with its duration; tests read it)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        if directory is not None:
            directory.subscribe(self._on_node_change_threadsafe)
        self._demand = demand
        self._demand_view: dict[str, tuple[int, int]] = {}
        """Per dataset: (demand, target replicas) of the last pass, for the status."""
        if demand is not None:
            demand[0].on_change = self.trigger_threadsafe

    def trigger_threadsafe(self) -> None:
        """`trigger` from any thread (the pod watch calls back from its own)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            # Not running yet: the first pass reads the demand anyway.
            self._dirty = True
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.trigger()
        else:
            loop.call_soon_threadsafe(self.trigger)

    def trigger(self) -> None:
        self._dirty = True
        self._wake.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await self.reconcile_once(force=False)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("Reconcile pass failed; retrying on the next pass")
                # Passes take at most about half of the event loop, however often they are
                # triggered, and agents' calls must not wait behind back-to-back passes.
                # Triggers meanwhile coalesce.
                await asyncio.sleep(min(self.last_pass_seconds, 1.0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_wait())
                self._wake.clear()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stops the placement worker process, if one runs."""
        await self._placer.close()

    def _next_wait(self) -> float:
        """Seconds until the next pass is due: the interval, or sooner when explicit demand
        expires or a demand cool-down ends (both lower a target without any trigger)."""
        wait = self._settings.reconcile_interval_seconds
        now = self._clock()
        for when in self._demand_due():
            # A little after `when`: a pass at `when` itself may not yet see it passed.
            wait = min(wait, max(0.0, when - now) + 0.05)
        return wait

    def _demand_due(self) -> list[float]:
        if self._demand is None:
            return []
        tracker, scaler = self._demand
        due = (tracker.next_expiry(), scaler.next_cooldown_end())
        return [when for when in due if when is not None]

    # Leases ---------------------------------------------------------------------------------

    def seen(self, node: str) -> None:
        """Renews `node`'s lease."""
        self._last_seen[node] = self._lease_clock()
        self._called = time.perf_counter()
        live = self._live
        if live is None or node not in live[0]:
            # A node joins the live set: the cached one is out of date (the lock waits for a
            # computation in another thread, which may not have seen this renewal).
            with self._live_lock:
                self._live = None

    def forget(self, node: str) -> None:
        self._last_seen.pop(node, None)
        self._peer_addresses.pop(node, None)
        with self._live_lock:
            self._live = None

    def set_peer_address(self, node: str, address: str) -> None:
        """Where `node`'s agent serves peers; '' when it serves none."""
        if address:
            self._peer_addresses[node] = address
        else:
            self._peer_addresses.pop(node, None)

    def is_live(self, node: str) -> bool:
        seen = self._last_seen.get(node)
        return seen is not None and seen >= self._lease_clock() - self._settings.lease_seconds

    def live_nodes(self) -> set[str]:
        """Nodes whose agent holds a lease. Safe to call from another thread (the metrics
        scrape).

        The set is kept until the oldest lease in it could expire: renewals only move
        expiries later, and a node joins the set only through `seen`, which drops it. At
        5,000 agents that saves the event loop a 1-8 ms scan of every lease in each pass."""
        cutoff = self._lease_clock() - self._settings.lease_seconds
        with self._live_lock:
            live = self._live
            if live is None or live[1] < cutoff:
                held = [(n, seen) for n, seen in list(self._last_seen.items()) if seen >= cutoff]
                oldest = min((seen for _, seen in held), default=math.inf)
                live = self._live = (frozenset(n for n, _ in held), oldest)
        return set(live[0])

    def node_facts(self) -> dict[str, NodeFacts]:
        """What the cluster says about its nodes (empty in local mode)."""
        return self._directory.snapshot() if self._directory is not None else {}

    def directory_uid(self, node: str) -> str:
        fact = self._directory.get(node) if self._directory is not None else None
        return fact.uid if fact is not None else ""

    def problem(self, dataset: str) -> str:
        """Why a dataset cannot be fetched at all ('' when nothing blocks it)."""
        return self._problems.get(dataset, "")

    # Cluster node changes -------------------------------------------------------------------

    def _on_node_change_threadsafe(self, change: NodeChange) -> None:
        # NodeDirectory calls back from its watch thread; the store belongs to the loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.node_changed, change)

    def node_changed(self, change: NodeChange) -> None:
        if change.facts is not None and not change.replaced:
            self.trigger()
            return
        why = "deleted" if change.facts is None else "re-created with a new UID"
        if self._store.get_agent(change.name) is not None:
            log.info("Node %s: forgetting its replicas", why, extra={"node": change.name})
            self._store.forget_node(change.name)
            self.forget(change.name)
        self.trigger()

    # Views ----------------------------------------------------------------------------------

    def render(
        self,
        record: DatasetRecord,
        assigned: frozenset[str] | None = None,
        live: set[str] | None = None,
    ) -> pb.Dataset:
        """The API view of a dataset. A list passes `assigned`/`live` read once per page."""
        if assigned is None:
            assigned = self._store.assigned_nodes(record.name)
        reports = [
            r
            for r in self._store.reports(record.name)
            if (r.node_name in live if live is not None else self.is_live(r.node_name))
        ]
        fixed = self._store.fixed_version(record.name, record.revision)
        return dataset_view(
            record,
            assigned,
            reports,
            fixed,
            self.problem(record.name),
            *self._demand_view.get(record.name, (0, 0)),
        )

    def render_name(self, name: str) -> pb.Dataset | None:
        record = self._store.find_dataset(name)
        return None if record is None else self.render(record)

    def refresh_status(self, names: Iterable[str]) -> None:
        """Recomputes the status of `names` (after a report) and moves their resource version
        when it changed."""
        fingerprints = []
        for name in sorted(set(names)):
            record = self._store.find_dataset(name)
            if record is not None:
                view = self.render(record)
                fingerprints.append((name, status_fingerprint(view, self.problem(name))))
        self._note_statuses(fingerprints)

    def _note_statuses(self, fingerprints: Iterable[tuple[str, str]]) -> None:
        """Moves the resource version of every dataset whose status changed (one write)."""
        changed = {}
        for name, fingerprint in fingerprints:
            if self._hashes.get(name) != fingerprint:
                self._hashes[name] = fingerprint
                changed[name] = fingerprint
        if changed:
            self._store.set_status_hashes(changed)

    # The pass -------------------------------------------------------------------------------

    def _idle(self) -> bool:
        return (
            not self._dirty
            and self._last_labels is not None
            and self._clock() - self._last_full < FULL_PASS_SECONDS
            and self.live_nodes() == self._last_live
            and not any(when <= self._clock() for when in self._demand_due())
        )

    async def reconcile_once(self, force: bool = True) -> None:
        """One pass; with `force` False, a pass with nothing to do only re-checks labels."""
        async with self._lock:
            started = self._breath = time.perf_counter()
            self._collector.hold()
            try:
                await self._pass(force, started)
                await self._pause()  # the collection at release holds the loop too
            finally:
                self._collector.release()

    async def _pass(self, force: bool, started: float) -> None:
        if not force and self._idle() and self._last_labels is not None:
            self.stats = PassStats()
            desired, current = self._last_labels
            if await self._apply_labels(desired, current):
                self._dirty = True
            metrics.RECONCILE_PASSES.labels("idle").inc()
            self.last_pass_seconds = time.perf_counter() - started
            return
        try:
            with metrics.RECONCILE_DURATION.time():
                await self._reconcile()
        except Exception:
            metrics.RECONCILE_PASSES.labels("error").inc()
            raise
        metrics.RECONCILE_PASSES.labels("ok").inc()
        self.last_pass_seconds = time.perf_counter() - started
        # The benchmark reads these lines; a slow pass is worth an operator's attention. Full
        # passes run on changes (and at least every FULL_PASS_SECONDS), so one line each
        # saying what changed is not much next to the changes' own lines.
        log.log(
            logging.WARNING if self.last_pass_seconds > 1.0 else logging.INFO,
            "Reconcile pass took %.3f s (%s)",
            self.last_pass_seconds,
            self.stats,
        )

    async def _nodes(self, agents: Iterable[AgentRecord], live: set[str]) -> dict[str, Node]:
        """Placement's view of the live nodes: cluster facts when a synced NodeDirectory has
        them, otherwise the labels agents registered with. A node whose inputs did not change
        is the previous pass's object."""
        facts = self._directory.snapshot() if self._directory is not None else {}
        synced = self._directory is not None and self._directory.synced
        nodes: dict[str, Node] = {}
        for agent in agents:
            if self._tired():
                await self._breathe()
            if agent.node_name not in live:
                continue
            fact = facts.get(agent.node_name)
            if synced and fact is None:
                continue  # no Node object: nothing is placed there
            if fact is not None and fact.uid and agent.node_uid and fact.uid != agent.node_uid:
                continue  # the agent of a machine the Node object no longer describes
            nodes[agent.node_name] = self._node_views.node(agent, fact)
        self._node_views.keep_only(nodes)
        return nodes

    async def _resolve_credentials(
        self, datasets: Mapping[str, DatasetRecord]
    ) -> dict[str, S3Credentials | None]:
        out: dict[str, S3Credentials | None] = {}
        problems: dict[str, str] = {}
        for record in datasets.values():
            secret = record.credentials_secret
            if not secret or record.deleting:
                continue
            if self._credentials is None:
                problems[record.name] = (
                    f"credentials secret {secret!r} cannot be read: the coordinator has no "
                    "secrets source (start it with --secrets-dir, or run it in a cluster)"
                )
                out[record.name] = None
                continue
            try:
                creds = await self._credentials.get(secret, record.name)
            except CredentialsDenied as exc:
                problems[record.name] = f"credentials: {exc}"
                self._good_credentials.pop(record.name, None)
                out[record.name] = None
                continue
            except CredentialsError as exc:
                # A failed read (API server away, Secret briefly malformed) keeps the dataset
                # going on the credentials last read for it from the same Secret.
                problems[record.name] = f"credentials: {exc}"
                cached = self._good_credentials.get(record.name)
                out[record.name] = cached[1] if cached and cached[0] == secret else None
                continue
            self._good_credentials[record.name] = (secret, creds)
            out[record.name] = creds
        for name, message in problems.items():
            if self._problems.get(name) != message:
                log.warning("Dataset blocked: %s", message, extra={"dataset": name})
        self._problems = problems
        return out

    def _evict(
        self,
        datasets: Mapping[str, DatasetRecord],
        agents: Mapping[str, AgentRecord],
        nodes: Iterable[str],
        current: Mapping[str, frozenset[str]],
        by_node: Mapping[str, Mapping[str, ReplicaReport]],
        ready_count: dict[str, int],
        cooldown: set[tuple[str, str]],
        now: float,
    ) -> list[tuple[str, str]]:
        """Resolves agents' pressure; returns the (dataset, node) pairs evicted. `by_node`
        holds the reports of (at least) every node under pressure."""
        evicted: list[tuple[str, str]] = []
        for node in sorted(nodes):
            agent = agents.get(node)
            if agent is None or agent.pressure_bytes <= 0:
                continue
            here = {d: r for d, r in by_node.get(node, {}).items() if d in datasets}
            # One eviction at a time per node: until the agent has deleted what was evicted,
            # its pressure figure still counts it.
            if any((d, node) in cooldown for d in here):
                continue
            assigned = {d for d, ns in current.items() if node in ns and d in datasets}
            needing = {
                d for d in assigned if not (d in here and counts_ready(here[d], datasets[d]))
            }
            residents = [
                Resident(
                    dataset=d,
                    size_bytes=r.disk_bytes or r.bytes_total,
                    pinned=datasets[d].pin,
                    last_used=r.last_used_time,
                    ready_replicas=ready_count.get(d, 0),
                )
                for d, r in here.items()
                if d in assigned and r.state is ReplicaState.READY
            ]
            for dataset in choose_evictions(agent.pressure_bytes, residents, needing):
                self._store.record_eviction(dataset, node, now)
                cooldown.add((dataset, node))
                ready_count[dataset] = ready_count.get(dataset, 0) - 1
                evicted.append((dataset, node))
                log.info(
                    "Evicting for room (%d bytes short)",
                    agent.pressure_bytes,
                    extra={"node": node, "dataset": dataset},
                )
        return evicted

    def _tired(self) -> bool:
        """Whether the pass has held the event loop for `BREATHE_SECONDS` (cheap: loops call
        it for every item and `_breathe` only when it says so)."""
        return time.perf_counter() - self._breath > BREATHE_SECONDS

    async def _pause(self) -> None:
        """Breathes if the pass held the event loop long enough."""
        if self._tired():
            await self._breathe()

    async def _breathe(self) -> None:
        """Lets agents' calls in: while agents are calling, with a short wait for I/O.

        sleep(0) alone is not enough: with callbacks ready the loop does not wait in epoll,
        so it never lets go of the GIL, and gRPC's poller thread, which hands incoming calls
        to the loop, gets the GIL only every 5 ms switch interval, one step at a time. When
        no agent called lately (a pass right after a restart), the pass runs at full speed."""
        self._collector.check()
        if time.perf_counter() - self._called < CALLING_SECONDS:
            await asyncio.sleep(PAUSE_SECONDS)
        else:
            await asyncio.sleep(0)
        self._breath = time.perf_counter()

    async def _reconcile(self) -> None:
        store = self._store
        now = self._clock()
        self._dirty = False
        self._breath = time.perf_counter()
        stats = self.stats = PassStats()
        # A consistent snapshot: the store's cache hands out immutable values, and these
        # copies do not change when agents' calls write while the pass yields.
        datasets = store.dataset_map()
        live = self.live_nodes()
        agents = store.agent_map()
        current = store.assignments()
        fixed = store.fixed_versions()
        reports = store.reports_by_dataset()
        pressured = {
            n: store.node_reports(n)
            for n, a in agents.items()
            if a.pressure_bytes > 0 and n in live
        }
        nodes = await self._nodes(agents.values(), live)

        facts: dict[str, DatasetFacts] = {}
        derived = self._facts.derived
        for name, record in datasets.items():
            facts[name] = self._facts.get(name, record.revision, reports.get(name, {}), live)
            if self._tired():
                await self._breathe()
        self._facts.keep_only(datasets.keys())
        stats.facts_derived = self._facts.derived - derived
        sizes = {d: f.size for d, f in facts.items() if f.size}
        for (dataset, revision), version in fixed.items():
            owner = datasets.get(dataset)
            if owner is not None and owner.revision == revision:
                sizes[dataset] = version.total_bytes

        cooldown = set(store.evictions_since(now - self._settings.eviction_cooldown_seconds))
        ready_count = {d: len(f.ready) for d, f in facts.items() if f.ready}
        evicted = self._evict(
            datasets,
            agents,
            nodes.keys() & pressured.keys(),
            current,
            pressured,
            ready_count,
            cooldown,
            now,
        )

        await self._pause()
        targets, prefer = self._demand_targets(datasets, nodes, current, now)
        await self._pause()
        wants = await self._wants(datasets, targets, sizes, prefer)
        await self._pause()
        placement = await self._place(wants, nodes, current, facts, frozenset(cooldown))
        await self._pause()
        labelled = {
            d: facts[d].serving & ns if d in facts else frozenset() for d, ns in placement.items()
        }
        desired_labels = self._label_index.update(labelled)
        await self._pause()
        failed_nodes = await self._apply_labels(desired_labels, current)
        self._last_labels = (desired_labels, dict(current))
        self._last_live = set(live)
        self._last_full = now
        if failed_nodes:
            self._dirty = True

        # Keep (dataset, node) pairs whose label could not be confirmed removed, so the agent
        # does not delete a copy the scheduler may still send pods to.
        final = {d: ns for d, ns in placement.items() if ns}
        for dataset, ns in current.items():
            kept = ns & failed_nodes
            if dataset in datasets and kept - final.get(dataset, frozenset()):
                final[dataset] = final.get(dataset, frozenset()) | kept
        if final != current:
            store.set_assignments(final)
            moved = sum(
                len(final.get(d, frozenset()) ^ current.get(d, frozenset()))
                for d in final.keys() | current.keys()
            )
            log.info("Placement changed: %d assignments added or removed", moved)

        await self._pause()
        credentials = await self._resolve_credentials(datasets)
        await self._publish_desired(datasets, nodes, live, fixed, facts, final, credentials)

        await self._record_events(datasets, facts, final, evicted)

        fingerprints = []
        for record in datasets.values():
            if self._tired():
                await self._breathe()
            name = record.name
            if record.deleting and name not in final and not facts[name].holding:
                store.purge_dataset(name)
                self._hashes.pop(name, None)
                self._fingerprints.pop(name, None)
                log.info("Dataset deleted from every node", extra={"dataset": name})
                continue
            fingerprints.append((name, self._fingerprint(record, final, facts[name], fixed)))
        for name in self._fingerprints.keys() - datasets.keys():
            del self._fingerprints[name]
        self._note_statuses(fingerprints)

    async def _wants(
        self,
        datasets: Mapping[str, DatasetRecord],
        targets: Mapping[str, int],
        sizes: Mapping[str, int],
        prefer: Mapping[str, frozenset[str]],
    ) -> list[Want]:
        """What placement is asked for; a dataset's want is the previous pass's object when
        nothing in it changed."""
        wants = []
        memo: dict[str, Want] = {}
        for d in datasets.values():
            if self._tired():
                await self._breathe()
            if d.deleting:
                continue
            want = Want(
                dataset=d.name,
                replicas=targets.get(d.name, d.replicas),
                all_nodes=d.all_nodes,
                node_selector=d.node_selector,
                tolerations=d.tolerations,
                size_bytes=sizes.get(d.name, 0),
                prefer=prefer.get(d.name, frozenset()),
            )
            known = self._want_memo.get(d.name)
            if known is not None and known == want:
                want = known
            memo[d.name] = want
            wants.append(want)
        self._want_memo = memo
        return wants

    async def _place(
        self,
        wants: list[Want],
        nodes: dict[str, Node],
        current: dict[str, frozenset[str]],
        facts: Mapping[str, DatasetFacts],
        cooldown: frozenset[tuple[str, str]],
    ) -> dict[str, frozenset[str]]:
        """Placement of `wants`; the previous result when every input is equal to the
        previous pass's (placement is a pure function of them)."""
        ready = {d: f.ready for d, f in facts.items() if f.ready}
        holding = {d: f.holding for d, f in facts.items() if f.holding}
        on_disk_by_dataset = {d: f.on_disk for d, f in facts.items() if f.on_disk}
        inputs = (wants, nodes, current, ready, holding, on_disk_by_dataset, cooldown)
        if self._placement is not None and self._placement[0] == inputs:
            return self._placement[1]
        placement = await self._placer.place(
            wants, nodes, current, ready, holding, on_disk_by_dataset, cooldown, self._pause
        )
        self.stats.placed = True
        self._placement = (inputs, placement)
        return placement

    async def _publish_desired(
        self,
        datasets: Mapping[str, DatasetRecord],
        nodes: Mapping[str, Node],
        live: set[str],
        fixed: Mapping[tuple[str, int], VersionRecord],
        facts: Mapping[str, DatasetFacts],
        final: Mapping[str, frozenset[str]],
        credentials: Mapping[str, S3Credentials | None],
    ) -> None:
        """Publishes the desired set of every node whose set changed."""
        if self._peer_addresses != self._peer_env[0] or nodes != self._peer_env_nodes:
            zones = {name: n.zone for name, n in nodes.items()}
            if (self._peer_addresses, zones) != self._peer_env:
                self._peer_env = (dict(self._peer_addresses), zones)
                self._peer_env_generation += 1
            self._peer_env_nodes = dict(nodes)
        for dataset, ns in final.items():
            if self._tired():
                await self._breathe()
            record = datasets[dataset]
            fixed_version = fixed.get((dataset, record.revision))
            fixed_digest = fixed_version.version if fixed_version else ""
            dataset_facts = facts[dataset]
            creds = credentials.get(dataset)
            key = (
                record.source,
                record.revision,
                record.credentials_secret,
                fixed_digest,
                creds,
                ns,
                dataset_facts.peer_holders,
                dataset_facts.holding,
                self._peer_env_generation,
            )
            if self._desired_keys.get(dataset) == key:
                continue
            self._desired_keys[dataset] = key
            self.stats.desired_recomputed += 1
            per_node: dict[str, DesiredDataset] = {}
            for node in ns:
                if self._tired():
                    await self._breathe()
                if (
                    record.credentials_secret
                    and creds is None
                    and node not in dataset_facts.holding
                ):
                    # Not sent without credentials; a node already holding it keeps its copy.
                    continue
                per_node[node] = DesiredDataset(
                    name=dataset,
                    source=record.source,
                    revision=record.revision,
                    version=fixed_digest,
                    credentials=creds,
                    peers=choose_peers(
                        node,
                        fixed_digest,
                        dataset_facts.peer_holders,
                        self._peer_env[0],
                        self._peer_env[1],
                    ),
                )
            self._desired.set_dataset(dataset, per_node)
        self._desired.keep_only(final.keys())
        for dataset in self._desired_keys.keys() - final.keys():
            del self._desired_keys[dataset]
        updates = self._desired.updates(live)
        self.stats.nodes_published = len(updates)
        await self._hub.publish(updates)

    def _fingerprint(
        self,
        record: DatasetRecord,
        final: Mapping[str, frozenset[str]],
        facts: DatasetFacts,
        fixed: Mapping[tuple[str, int], VersionRecord],
    ) -> str:
        """The status fingerprint of `record`; computed again only when its inputs changed."""
        name = record.name
        assigned = final.get(name, frozenset())
        version = fixed.get((name, record.revision))
        problem = self.problem(name)
        demand = self._demand_view.get(name, (0, 0))
        key = (status_record(record), assigned, facts.status, version, problem, demand)
        known = self._fingerprints.get(name)
        if known is not None and known[0] == key:
            return known[1]
        self.stats.statuses_recomputed += 1
        view = dataset_view(record, assigned, facts.live_reports, version, problem, *demand)
        fingerprint = status_fingerprint(view, problem)
        self._fingerprints[name] = (key, fingerprint)
        return fingerprint

    def _demand_targets(
        self,
        datasets: Mapping[str, DatasetRecord],
        nodes: Mapping[str, Node],
        current: Mapping[str, frozenset[str]],
        now: float,
    ) -> tuple[dict[str, int], dict[str, frozenset[str]]]:
        """Replica targets of datasets that demand may scale, and the nodes where their
        demanding trials can run."""
        if self._demand is None:
            return {}, {}
        # Only nodes placement may use count: a trial's node without an agent gets no copy.
        facts = self._node_views.demand_facts(nodes, self.node_facts())
        tracker, scaler = self._demand
        demand = tracker.demand(facts, now)
        scalable = [
            (d.name, d.replicas, d.max_replicas)
            for d in datasets.values()
            if not d.deleting and not d.all_nodes
        ]
        held = {name: len(holders) for name, holders in current.items()}
        targets = scaler.targets(scalable, demand, now, held)
        self._demand_view = {
            name: (demand[name].trials if name in demand else 0, target)
            for name, target in targets.items()
        }
        prefer = {
            name: d.nodes
            for name, d in demand.items()
            if name in datasets and datasets[name].max_replicas > datasets[name].replicas
        }
        return targets, prefer

    async def _record_events(
        self,
        datasets: Mapping[str, DatasetRecord],
        facts: Mapping[str, DatasetFacts],
        assigned: Mapping[str, frozenset[str]],
        evicted: list[tuple[str, str]],
    ) -> None:
        first = self._states is None
        states = self._states if self._states is not None else {}
        news: list[tuple[tuple[str, str], ReplicaState]] = []
        messages: dict[tuple[str, str], str] = {}
        for dataset, record in datasets.items():
            if self._tired():
                await self._breathe()
            live_reports = facts[dataset].live_reports
            ns = assigned.get(dataset, frozenset())
            key = (live_reports, ns, record.revision)
            if self._events_seen.get(dataset) == key:
                continue
            self._events_seen[dataset] = key
            now_states = {
                r.node_name: r.state
                for r in live_reports
                if r.node_name in ns and is_current(r, record)
            }
            before = states.get(dataset, {})
            for node, state in now_states.items():
                if before.get(node) != state:
                    news.append(((dataset, node), state))
                    if state is ReplicaState.FAILED:
                        messages[(dataset, node)] = next(
                            (r.message for r in live_reports if r.node_name == node), ""
                        )
            if now_states:
                states[dataset] = now_states
            else:
                states.pop(dataset, None)
        for gone in states.keys() - datasets.keys():
            del states[gone]
        for gone in self._events_seen.keys() - datasets.keys():
            del self._events_seen[gone]
        self._states = states
        for dataset, node in evicted:
            await self._events.replica_event(
                node, dataset, EventReason.REPLICA_EVICTED, "evicted to make room on the node"
            )
        if first:
            return  # the first pass after a start: what is already Ready is no news
        for (dataset, node), state in sorted(news):
            if state is ReplicaState.READY:
                await self._events.replica_event(
                    node, dataset, EventReason.REPLICA_READY, "replica is Ready and verified"
                )
            elif state is ReplicaState.FAILED:
                await self._events.replica_event(
                    node,
                    dataset,
                    EventReason.REPLICA_FAILED,
                    messages[(dataset, node)] or "replica failed",
                )

    async def _apply_labels(
        self,
        desired: Mapping[str, Mapping[str, str]],
        current: Mapping[str, frozenset[str]],
    ) -> set[str]:
        """Applies desired labels to every node that has or should have some. Returns the
        nodes whose labels could not be written."""
        try:
            labelled = await self._labeler.labelled_nodes()
        except LabelerError as exc:
            log.warning("Could not list labelled nodes: %s", exc)
            return set(desired).union(*current.values())
        failed: set[str] = set()
        differ = []
        for node in desired.keys() | labelled.keys():
            if self._tired():
                await self._breathe()
            if labelled.get(node, {}) != desired.get(node, {}):
                differ.append(node)
        for node in sorted(differ):
            want = desired.get(node, {})
            # Let agents' calls in between label writes (many nodes change at once when a
            # large dataset becomes Ready).
            await asyncio.sleep(0)
            self.stats.label_writes += 1
            try:
                if await self._labeler.set_labels(node, want):
                    metrics.LABEL_PATCHES.labels("applied").inc()
                    log.info("Labels of node updated: %s", sorted(want), extra={"node": node})
            except NodeMissing:
                metrics.LABEL_PATCHES.labels("node_missing").inc()
                log.warning("Node has no Node object; cannot label it", extra={"node": node})
            except LabelerError as exc:
                metrics.LABEL_PATCHES.labels("failed").inc()
                log.warning("Label update failed: %s", exc, extra={"node": node})
                failed.add(node)
        return failed


class PassStats:
    """What one reconcile pass recomputed rather than reused."""

    def __init__(self) -> None:
        self.facts_derived = 0
        """Datasets whose replica facts were derived again."""
        self.placed = False
        """Whether placement ran (False: its inputs were unchanged)."""
        self.desired_recomputed = 0
        """Datasets whose per-node desired entries were computed again."""
        self.nodes_published = 0
        """Nodes whose desired set was handed to the hub."""
        self.statuses_recomputed = 0
        """Datasets whose status was computed again."""
        self.label_writes = 0
        """Nodes whose labels were written."""

    def __str__(self) -> str:
        return (
            f"facts derived {self.facts_derived}, placement {'ran' if self.placed else 'reused'}"
            f", desired recomputed {self.desired_recomputed}, nodes published "
            f"{self.nodes_published}, statuses recomputed {self.statuses_recomputed}, label "
            f"writes {self.label_writes}"
        )
