"""The level-triggered control loop.

Each pass reads the whole state, computes what should be (placement, labels, desired sets per
node), and changes only the difference. Passes run on every change and at least every
`reconcile_interval_seconds`, so a missed trigger or a failed write heals on the next pass.

Ordering guarantees:
- A label is set only when the node's agent reports the replica Ready.
- A replica leaves a node's desired set only after its label is confirmed gone, so a pod is
  never sent to a node whose copy is being deleted.
- Labels of a node are removed when its agent's lease expires, never merely because the
  coordinator restarted (restart grants every known agent a fresh lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from coordinator import metrics
from coordinator.errors import LabelerError, NodeMissing
from coordinator.labelers import NodeLabeler
from coordinator.labels import desired_node_labels
from coordinator.model import ReplicaState
from coordinator.placement import Want, place
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DesiredDataset:
    name: str
    source: str


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
    ) -> None:
        self._store = store
        self._labeler = labeler
        self._hub = hub
        self._settings = settings
        self._clock = clock
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def trigger(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Reconcile pass failed; retrying on the next pass")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.reconcile_interval_seconds)
            self._wake.clear()

    def live_nodes(self) -> set[str]:
        cutoff = self._clock() - self._settings.lease_seconds
        return {a.node_name for a in self._store.list_agents() if a.last_seen >= cutoff}

    async def reconcile_once(self) -> None:
        async with self._lock:
            try:
                with metrics.RECONCILE_DURATION.time():
                    await self._reconcile()
            except Exception:
                metrics.RECONCILE_PASSES.labels("error").inc()
                raise
            metrics.RECONCILE_PASSES.labels("ok").inc()

    async def _reconcile(self) -> None:
        store = self._store
        datasets = {d.name: d for d in store.list_datasets()}
        live = self.live_nodes()
        current = store.assignments()

        ready: dict[str, set[str]] = {}
        holders: dict[str, set[str]] = {}
        for report in store.reports():
            if report.node_name not in live or report.dataset not in datasets:
                continue
            holders.setdefault(report.dataset, set()).add(report.node_name)
            if report.state is ReplicaState.READY:
                ready.setdefault(report.dataset, set()).add(report.node_name)
        frozen_ready = {d: frozenset(n) for d, n in ready.items()}

        wants = [Want(d.name, d.replicas) for d in datasets.values() if not d.deleting]
        placement = place(wants, live, current, frozen_ready)

        labelled = {d: frozen_ready.get(d, frozenset()) & nodes for d, nodes in placement.items()}
        failed_nodes = await self._apply_labels(desired_node_labels(labelled), current)

        # Keep (dataset, node) pairs whose label could not be confirmed removed, so the agent
        # does not delete a copy the scheduler may still send pods to.
        final = {d: set(nodes) for d, nodes in placement.items()}
        for dataset, nodes in current.items():
            for node in nodes & failed_nodes:
                if dataset in datasets and node not in final.get(dataset, set()):
                    final.setdefault(dataset, set()).add(node)
        final_frozen = {d: frozenset(n) for d, n in final.items() if n}
        if final_frozen != current:
            store.set_assignments(final_frozen)
            log.info("Placement changed: %s", {d: sorted(n) for d, n in final_frozen.items()})

        per_node: dict[str, list[DesiredDataset]] = {node: [] for node in live}
        for dataset, nodes in final_frozen.items():
            for node in nodes:
                per_node.setdefault(node, []).append(
                    DesiredDataset(dataset, datasets[dataset].source)
                )
        await self._hub.publish(
            {node: tuple(sorted(ds, key=lambda d: d.name)) for node, ds in per_node.items()}
        )

        for record in datasets.values():
            if record.deleting and record.name not in final_frozen and not holders.get(record.name):
                store.purge_dataset(record.name)
                log.info("Dataset deleted from every node", extra={"dataset": record.name})

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
            try:
                if await self._labeler.set_labels(node, want):
                    metrics.LABEL_PATCHES.labels("applied").inc()
                    log.info("Labels of node updated: %s", sorted(want), extra={"object": node})
            except NodeMissing:
                metrics.LABEL_PATCHES.labels("node_missing").inc()
                log.warning("Node has no Node object; cannot label it", extra={"object": node})
            except LabelerError as exc:
                metrics.LABEL_PATCHES.labels("failed").inc()
                log.warning("Label update failed: %s", exc, extra={"object": node})
                failed.add(node)
        return failed
