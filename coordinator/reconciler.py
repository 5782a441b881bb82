"""The level-triggered control loop.

Each pass reads the whole state, computes what should be (evictions, placement, labels,
desired sets per node, dataset status), and changes only the difference. Passes run on every
change and at least every `reconcile_interval_seconds`, so a missed trigger or a failed write
heals on the next pass.

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
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from coordinator import metrics
from coordinator.cluster import (
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
from coordinator.demand_service import DemandScaler, DemandTracker
from coordinator.errors import LabelerError, NodeMissing
from coordinator.labelers import NodeLabeler
from coordinator.labels import desired_node_labels
from coordinator.model import AgentRecord, DatasetRecord, ReplicaReport, ReplicaState
from coordinator.peers import PeerHolder, choose_peers
from coordinator.placement import Node, Resident, Want, choose_evictions, place
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from coordinator.views import counts_ready, dataset_view, is_current, serves, status_fingerprint
from datacache.v1 import datacache_pb2 as pb

log = logging.getLogger(__name__)

FULL_PASS_SECONDS = 60.0
"""Longest time between two full reconcile passes when nothing triggers one, seconds."""


@dataclass(frozen=True)
class DesiredDataset:
    name: str
    source: str
    revision: int = 0
    version: str = ""
    """The fixed version of `revision`, '' until a copy fixed it."""
    credentials: S3Credentials | None = None
    peers: tuple[tuple[str, str], ...] = ()
    """(node, address) of agents holding a Ready copy of `version` to copy from first."""


class DesiredStateHub:
    """The desired set of every node, and a generation counter streams wait on."""

    def __init__(self) -> None:
        self._sets: dict[str, tuple[DesiredDataset, ...]] = {}
        self._generations: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def publish(self, desired: Mapping[str, tuple[DesiredDataset, ...]]) -> None:
        async with self._changed:
            changed = False
            for node, datasets in desired.items():
                if self._sets.get(node) != datasets or node not in self._generations:
                    self._sets[node] = datasets
                    self._generations[node] = self._generations.get(node, 0) + 1
                    changed = True
            if changed:
                self._changed.notify_all()

    def snapshot(self, node: str) -> tuple[int, tuple[DesiredDataset, ...]]:
        return self._generations.get(node, 0), self._sets.get(node, ())

    async def wait_newer(
        self, node: str, generation: int, wait_seconds: float
    ) -> tuple[int, tuple[DesiredDataset, ...]]:
        """Waits until the node's generation exceeds `generation` or `wait_seconds` pass."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._generations.get(node, 0) > generation),
                    wait_seconds,
                )
        return self.snapshot(node)


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
        self._last_labels: tuple[dict[str, dict[str, str]], dict[str, frozenset[str]]] | None = None
        self._lock = asyncio.Lock()
        # Lease bookkeeping in memory: reports renew it hundreds of times a second at scale.
        self._last_seen = {a.node_name: a.last_seen for a in store.list_agents()}
        self._hashes = store.status_hashes()
        self._problems: dict[str, str] = {}
        self._peer_addresses: dict[str, str] = {}
        """Where each agent serves peers (given at registration; agents re-register after a
        coordinator restart)."""
        self._good_credentials: dict[str, tuple[str, S3Credentials]] = {}
        self._states: dict[tuple[str, str], ReplicaState] | None = None
        self.last_pass_seconds = 0.0
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
        while True:
            try:
                await self.reconcile_once(force=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Reconcile pass failed; retrying on the next pass")
            # Passes take at most about half of the event loop, however often they are
            # triggered: at thousands of nodes a pass costs tens of milliseconds, and agents'
            # calls must not wait behind back-to-back passes. Triggers meanwhile coalesce.
            await asyncio.sleep(min(self.last_pass_seconds, 1.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_wait())
            self._wake.clear()

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

    def seen(self, node: str, when: float) -> None:
        self._last_seen[node] = when

    def forget(self, node: str) -> None:
        self._last_seen.pop(node, None)
        self._peer_addresses.pop(node, None)

    def set_peer_address(self, node: str, address: str) -> None:
        """Where `node`'s agent serves peers; '' when it serves none."""
        if address:
            self._peer_addresses[node] = address
        else:
            self._peer_addresses.pop(node, None)

    def is_live(self, node: str) -> bool:
        return self._last_seen.get(node, 0.0) >= self._clock() - self._settings.lease_seconds

    def live_nodes(self) -> set[str]:
        cutoff = self._clock() - self._settings.lease_seconds
        return {n for n, seen in self._last_seen.items() if seen >= cutoff}

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
        if live is None:
            live = self.live_nodes()
        reports = [r for r in self._store.reports(record.name) if r.node_name in live]
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
        live = self.live_nodes()
        views = []
        for name in sorted(set(names)):
            record = self._store.find_dataset(name)
            if record is not None:
                views.append((record, self.render(record, live=live)))
        self._note_statuses(views)

    def _note_status(self, record: DatasetRecord, view: pb.Dataset) -> None:
        self._note_statuses([(record, view)])

    def _note_statuses(self, views: Iterable[tuple[DatasetRecord, pb.Dataset]]) -> None:
        """Moves the resource version of every dataset whose status changed (one write)."""
        changed = {}
        for record, view in views:
            fingerprint = status_fingerprint(view, self.problem(record.name))
            if self._hashes.get(record.name) != fingerprint:
                self._hashes[record.name] = fingerprint
                changed[record.name] = fingerprint
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
            started = time.perf_counter()
            if not force and self._idle() and self._last_labels is not None:
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
            # The benchmark reads these lines; a slow pass is worth an operator's attention.
            log.log(
                logging.WARNING if self.last_pass_seconds > 1.0 else logging.DEBUG,
                "Reconcile pass took %.3f s",
                self.last_pass_seconds,
            )

    def _nodes(self, agents: Iterable[AgentRecord], live: set[str]) -> dict[str, Node]:
        """Placement's view of the live nodes: cluster facts when a synced NodeDirectory has
        them, otherwise the labels agents registered with."""
        facts = self._directory.snapshot() if self._directory is not None else {}
        synced = self._directory is not None and self._directory.synced
        nodes: dict[str, Node] = {}
        for agent in agents:
            if agent.node_name not in live:
                continue
            fact = facts.get(agent.node_name)
            if synced and fact is None:
                continue  # no Node object: nothing is placed there
            if fact is not None and fact.uid and agent.node_uid and fact.uid != agent.node_uid:
                continue  # the agent of a machine the Node object no longer describes
            nodes[agent.node_name] = Node(
                name=agent.node_name,
                labels=dict(fact.labels) if fact is not None else dict(agent.node_labels),
                taints=fact.taints if fact is not None else (),
                unschedulable=fact.unschedulable if fact is not None else False,
                free_bytes=agent.free_bytes if agent.capacity_bytes > 0 else None,
            )
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
                creds = await self._credentials.get(secret)
            except CredentialsError as exc:
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
        by_node: Mapping[str, dict[str, ReplicaReport]],
        ready_count: dict[str, int],
        cooldown: set[tuple[str, str]],
        now: float,
    ) -> list[tuple[str, str]]:
        """Resolves agents' pressure; returns the (dataset, node) pairs evicted."""
        evicted: list[tuple[str, str]] = []
        for node in sorted(nodes):
            agent = agents.get(node)
            if agent is None or agent.pressure_bytes <= 0:
                continue
            here = by_node.get(node, {})
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

    async def _reconcile(self) -> None:
        store = self._store
        now = self._clock()
        self._dirty = False
        datasets = {d.name: d for d in store.list_datasets()}
        live = self.live_nodes()
        agents = {a.node_name: a for a in store.list_agents()}
        nodes = self._nodes(agents.values(), live)
        current = store.assignments()
        fixed = store.fixed_versions()

        live_reports: dict[str, list[ReplicaReport]] = {}
        by_node: dict[str, dict[str, ReplicaReport]] = {}
        ready: dict[str, set[str]] = {}
        holding: dict[str, set[str]] = {}
        serving: dict[str, set[str]] = {}
        on_disk: dict[tuple[str, str], int] = {}
        sizes: dict[str, int] = {}
        for report in store.reports():
            record = datasets.get(report.dataset)
            if report.node_name not in live or record is None:
                continue
            live_reports.setdefault(report.dataset, []).append(report)
            by_node.setdefault(report.node_name, {})[report.dataset] = report
            holding.setdefault(report.dataset, set()).add(report.node_name)
            on_disk[(report.dataset, report.node_name)] = report.disk_bytes or report.bytes_done
            if counts_ready(report, record):
                ready.setdefault(report.dataset, set()).add(report.node_name)
            if serves(report):
                serving.setdefault(report.dataset, set()).add(report.node_name)
            if is_current(report, record):
                sizes[report.dataset] = max(sizes.get(report.dataset, 0), report.bytes_total)
        for (dataset, revision), version in fixed.items():
            record = datasets.get(dataset)
            if record is not None and record.revision == revision:
                sizes[dataset] = version.total_bytes

        cooldown = set(store.evictions_since(now - self._settings.eviction_cooldown_seconds))
        ready_count = {d: len(n) for d, n in ready.items()}
        evicted = self._evict(datasets, agents, nodes, current, by_node, ready_count, cooldown, now)

        targets, prefer = self._demand_targets(datasets, nodes, current, now)
        wants = [
            Want(
                dataset=d.name,
                replicas=targets.get(d.name, d.replicas),
                all_nodes=d.all_nodes,
                node_selector=d.node_selector,
                tolerations=d.tolerations,
                size_bytes=sizes.get(d.name, 0),
                prefer=prefer.get(d.name, frozenset()),
            )
            for d in datasets.values()
            if not d.deleting
        ]
        # Placement is pure: in a thread, so agents' calls are served while it runs.
        await asyncio.sleep(0)
        placement = await asyncio.to_thread(
            place,
            wants,
            nodes,
            current,
            {d: frozenset(n) for d, n in ready.items()},
            {d: frozenset(n) for d, n in holding.items()},
            on_disk,
            cooldown,
        )

        labelled = {d: frozenset(serving.get(d, set()) & ns) for d, ns in placement.items()}
        desired_labels = desired_node_labels(labelled)
        failed_nodes = await self._apply_labels(desired_labels, current)
        self._last_labels = (desired_labels, dict(current))
        self._last_live = set(live)
        self._last_full = now
        if failed_nodes:
            self._dirty = True

        # Keep (dataset, node) pairs whose label could not be confirmed removed, so the agent
        # does not delete a copy the scheduler may still send pods to.
        final = {d: set(ns) for d, ns in placement.items()}
        for dataset, ns in current.items():
            for node in ns & failed_nodes:
                if dataset in datasets and node not in final.get(dataset, set()):
                    final.setdefault(dataset, set()).add(node)
        final_frozen = {d: frozenset(n) for d, n in final.items() if n}
        if final_frozen != current:
            store.set_assignments(final_frozen)
            moved = sum(
                len(final_frozen.get(d, frozenset()) ^ current.get(d, frozenset()))
                for d in final_frozen.keys() | current.keys()
            )
            log.info("Placement changed: %d assignments added or removed", moved)

        await asyncio.sleep(0)
        credentials = await self._resolve_credentials(datasets)
        zones = {name: n.zone for name, n in nodes.items()}
        per_node: dict[str, list[DesiredDataset]] = {node: [] for node in live}
        for dataset, ns in final_frozen.items():
            record = datasets[dataset]
            fixed_version = fixed.get((dataset, record.revision))
            fixed_digest = fixed_version.version if fixed_version else ""
            holders = [
                PeerHolder(r.node_name, r.digest)
                for r in live_reports.get(dataset, ())
                if r.state is ReplicaState.READY and r.digest
            ]
            creds = credentials.get(dataset)
            for node in ns:
                if (
                    record.credentials_secret
                    and creds is None
                    and dataset not in by_node.get(node, {})
                ):
                    # Not sent without credentials; a node already holding it keeps its copy.
                    continue
                per_node.setdefault(node, []).append(
                    DesiredDataset(
                        name=dataset,
                        source=record.source,
                        revision=record.revision,
                        version=fixed_digest,
                        credentials=creds,
                        peers=choose_peers(
                            node, fixed_digest, holders, self._peer_addresses, zones
                        ),
                    )
                )
        await self._hub.publish(
            {node: tuple(sorted(ds, key=lambda d: d.name)) for node, ds in per_node.items()}
        )

        await self._record_events(datasets, live_reports, final_frozen, evicted)

        views = []
        for count, record in enumerate(datasets.values()):
            if count % 100 == 0:
                await asyncio.sleep(0)  # many datasets: let agents' calls in between
            if record.deleting and record.name not in final_frozen and not holding.get(record.name):
                store.purge_dataset(record.name)
                self._hashes.pop(record.name, None)
                log.info("Dataset deleted from every node", extra={"dataset": record.name})
                continue
            view = dataset_view(
                record,
                final_frozen.get(record.name, frozenset()),
                live_reports.get(record.name, []),
                fixed.get((record.name, record.revision)),
                self.problem(record.name),
                *self._demand_view.get(record.name, (0, 0)),
            )
            views.append((record, view))
        self._note_statuses(views)

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
        cluster = self.node_facts()
        facts = {
            name: cluster.get(name)
            or NodeFacts(
                name, labels=node.labels, taints=node.taints, unschedulable=node.unschedulable
            )
            for name, node in nodes.items()
        }
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
        live_reports: Mapping[str, list[ReplicaReport]],
        assigned: Mapping[str, frozenset[str]],
        evicted: list[tuple[str, str]],
    ) -> None:
        states: dict[tuple[str, str], ReplicaState] = {}
        for dataset, reports in live_reports.items():
            record = datasets[dataset]
            for r in reports:
                if r.node_name in assigned.get(dataset, frozenset()) and is_current(r, record):
                    states[(dataset, r.node_name)] = r.state
        previous, self._states = self._states, states
        for dataset, node in evicted:
            await self._events.replica_event(
                node, dataset, EventReason.REPLICA_EVICTED, "evicted to make room on the node"
            )
        if previous is None:
            return  # the first pass after a start: what is already Ready is no news
        for key, state in sorted(states.items()):
            if previous.get(key) == state:
                continue
            dataset, node = key
            if state is ReplicaState.READY:
                await self._events.replica_event(
                    node, dataset, EventReason.REPLICA_READY, "replica is Ready and verified"
                )
            elif state is ReplicaState.FAILED:
                message = next(
                    (r.message for r in live_reports[dataset] if r.node_name == node), ""
                )
                await self._events.replica_event(
                    node, dataset, EventReason.REPLICA_FAILED, message or "replica failed"
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
        for node in sorted(set(desired) | set(labelled)):
            want = desired.get(node, {})
            if labelled.get(node, {}) == want:
                continue
            # Let agents' calls in between label writes (many nodes change at once when a
            # large dataset becomes Ready).
            await asyncio.sleep(0)
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
