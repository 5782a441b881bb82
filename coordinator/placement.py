"""Which nodes should hold which dataset, and what to evict for room: pure functions of the
state, no I/O.

Placement rules, in order:
1. Only eligible nodes hold replicas: live (agent lease valid), carrying every label of the
   dataset's node selector, and with every NoSchedule/NoExecute taint tolerated. A node
   holding an assignment that stops being eligible loses it.
2. Existing assignments are kept while they are still wanted (least data moved); when a dataset
   scales down, copies that are not Ready go first. A node that comes back with a Ready copy
   the dataset lacks gets its assignment back (instead of a copy still being fetched).
3. New replicas go only to schedulable (not cordoned) nodes with room for the dataset (its size
   against the node's free bytes, less what this placement already put there), not to a node
   the dataset was recently evicted from. Among those: nodes already holding a copy (this or an
   older version) first, then the zone with the fewest replicas of the dataset, then the least
   loaded node; ties go to the first node after the dataset's position on a hash ring
   (consistent hashing), so the choice is stable when unrelated nodes come and go. A want's
   `prefer` nodes (where its demanding pods can run) come right after nodes holding a copy.
4. `all_nodes` datasets go to every eligible node, including nodes that join later.

Eviction (`choose_evictions`): a node short of room gives up unpinned datasets, least recently
used first, then pinned ones that have another Ready replica; never a dataset it needs the room
for, never the last Ready replica of a pinned dataset.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field

from coordinator.cluster import ZONE_LABEL, Taint
from coordinator.model import Toleration

_HARD_EFFECTS = ("NoSchedule", "NoExecute")
__all__ = ["ZONE_LABEL", "Node", "Resident", "Taint", "Want", "choose_evictions", "place"]


@dataclass(frozen=True)
class Want:
    """A dataset and where it should be."""

    dataset: str
    replicas: int
    all_nodes: bool = False
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    size_bytes: int = 0
    """Bytes of the current revision; 0 when not known yet."""
    prefer: frozenset[str] = frozenset()
    """Nodes where the pods wanting the dataset can run: new replicas go there first."""


@dataclass(frozen=True)
class Node:
    """A live node as placement sees it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False
    free_bytes: int | None = None
    """Free cache bytes; None when unknown (no capacity check)."""

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")


def tolerates(tolerations: Iterable[Toleration], taint: Taint) -> bool:
    """Whether one of `tolerations` tolerates `taint`, as the Kubernetes scheduler decides."""
    for t in tolerations:
        if t.effect and t.effect != taint.effect:
            continue
        if t.operator == "Exists":
            if not t.key or t.key == taint.key:
                return True
        elif t.key == taint.key and t.value == taint.value:
            return True
    return False


def eligible(want: Want, node: Node) -> bool:
    """Whether `node` may hold `want` at all (selector and taints; not capacity or cordon)."""
    if any(node.labels.get(k) != v for k, v in want.node_selector.items()):
        return False
    return all(
        tolerates(want.tolerations, taint) for taint in node.taints if taint.effect in _HARD_EFFECTS
    )


def _position(key: str) -> int:
    """A stable position on the hash ring (not Python's per-process salted hash())."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


_Signature = tuple[frozenset[tuple[str, str]], tuple[Toleration, ...]]


class _Ring:
    """The schedulable nodes of one zone that satisfy one selector and toleration set, in
    hash-ring order. A dataset scans it from its own position, so its choice among equally
    good nodes depends only on nearby ring positions: nodes joining or leaving elsewhere on
    the ring do not change it (consistent hashing)."""

    def __init__(self, members: list[tuple[int, str]]) -> None:
        members.sort()
        self.positions = [p for p, _ in members]
        self.names = [n for _, n in members]
        self.min_load = 0
        """A lower bound of the least load in the ring (raised lazily by scans)."""

    def pick(
        self, start: int, load: Counter[str], usable: Callable[[str], bool]
    ) -> tuple[str | None, int]:
        """The first usable node with the least load, scanning from `start`; and its load."""
        count = len(self.names)
        if not count:
            return None, 0
        first = bisect.bisect_left(self.positions, start) % count
        best: str | None = None
        best_load = 0
        for step in range(count):
            name = self.names[(first + step) % count]
            if not usable(name):
                continue
            node_load = load[name]
            if node_load <= self.min_load:
                return name, node_load
            if best is None or node_load < best_load:
                best, best_load = name, node_load
        if best is not None:
            self.min_load = best_load
        return best, best_load


def place(
    wants: Sequence[Want],
    nodes: Mapping[str, Node],
    current: Mapping[str, frozenset[str]],
    ready: Mapping[str, frozenset[str]],
    holding: Mapping[str, frozenset[str]] | None = None,
    on_disk: Mapping[tuple[str, str], int] | None = None,
    cooldown: Set[tuple[str, str]] = frozenset(),
) -> dict[str, frozenset[str]]:
    """Returns the desired nodes of every wanted dataset.

    `nodes` are the live nodes. `current` is the previous placement, `ready` the nodes holding
    a Ready copy of the current revision and `holding` the nodes holding any copy (this or an
    older version), all by dataset. `on_disk` is the bytes a node already has of a dataset
    (they need no new room). `cooldown` holds (dataset, node) pairs recently evicted. Datasets
    not in `wants` get no nodes.

    Cost: one pass over the nodes per distinct (selector, tolerations), then about one ring
    step per new replica while nodes are evenly loaded.
    """
    holding = holding or {}
    on_disk = on_disk or {}
    ordered_wants = sorted(wants, key=lambda w: w.dataset)
    positions = {n: _position(n) for n in nodes}

    # Room left on each node, after what current assignments still have to fetch.
    room: dict[str, int | None] = {n: node.free_bytes for n, node in nodes.items()}
    sizes = {w.dataset: w.size_bytes for w in wants}

    def need(node: str, dataset: str) -> int:
        return max(0, sizes.get(dataset, 0) - on_disk.get((dataset, node), 0))

    def take(node: str, dataset: str) -> None:
        left = room.get(node)
        if left is not None:
            room[node] = left - need(node, dataset)

    def fits(node: str, dataset: str) -> bool:
        left = room.get(node)
        return left is None or need(node, dataset) <= left

    kept: dict[str, list[str]] = {}
    for want in ordered_wants:

        def keepable(n: str, want: Want = want) -> bool:
            return n in nodes and eligible(want, nodes[n]) and (want.dataset, n) not in cooldown

        holders = [n for n in current.get(want.dataset, frozenset()) if keepable(n)]
        ready_here = ready.get(want.dataset, frozenset())
        short = want.replicas - sum(1 for n in holders if n in ready_here)
        if short > 0 and not want.all_nodes:
            # A node that comes back with a Ready copy (after its lease expired and the
            # replica was placed elsewhere) is worth more than a copy still being fetched.
            returning = sorted(
                (n for n in ready_here if n not in holders and keepable(n)),
                key=lambda n: (positions[n], n),
            )
            holders += returning[:short]
        holders.sort(key=lambda n: (n not in ready_here, positions[n], n))
        kept[want.dataset] = holders if want.all_nodes else holders[: want.replicas]
        for node in kept[want.dataset]:
            take(node, want.dataset)

    load = Counter(node for chosen in kept.values() for node in chosen)
    rings: dict[_Signature, dict[str, _Ring]] = {}

    def rings_for(want: Want) -> dict[str, _Ring]:
        signature = (frozenset(want.node_selector.items()), want.tolerations)
        found = rings.get(signature)
        if found is None:
            members: dict[str, list[tuple[int, str]]] = {}
            for name, node in nodes.items():
                if not node.unschedulable and eligible(want, node):
                    members.setdefault(node.zone, []).append((positions[name], name))
            found = rings[signature] = {z: _Ring(m) for z, m in sorted(members.items())}
            for ring in found.values():
                ring.min_load = min((load[n] for n in ring.names), default=0)
        return found

    result: dict[str, frozenset[str]] = {}
    for want in ordered_wants:
        dataset = want.dataset
        chosen = kept[dataset]
        taken = set(chosen)

        def usable(name: str, dataset: str = dataset, taken: set[str] = taken) -> bool:
            return name not in taken and (dataset, name) not in cooldown and fits(name, dataset)

        def choose(
            name: str, chosen: list[str] = chosen, taken: set[str] = taken, dataset: str = dataset
        ) -> None:
            chosen.append(name)
            taken.add(name)
            load[name] += 1
            take(name, dataset)

        zone_rings = rings_for(want)
        if want.all_nodes:
            for ring in zone_rings.values():
                for name in ring.names:
                    if usable(name):
                        choose(name)
            result[dataset] = frozenset(chosen)
            continue
        missing = max(0, want.replicas - len(chosen))
        zones = Counter(nodes[n].zone for n in chosen)
        # Nodes that already hold a copy (this or an older version) first: least data moved.
        held = sorted(
            (
                n
                for n in holding.get(dataset, frozenset())
                if n in nodes
                and not nodes[n].unschedulable
                and eligible(want, nodes[n])
                and usable(n)
            ),
            key=lambda n: (positions[n], n),
        )
        preferred = sorted(
            (
                n
                for n in want.prefer
                if n in nodes and not nodes[n].unschedulable and eligible(want, nodes[n])
            ),
            key=lambda n: (positions[n], n),
        )
        for candidates in (held, preferred):
            candidates = [n for n in candidates if usable(n)]
            while missing > 0 and candidates:
                best = min(
                    candidates, key=lambda n: (zones[nodes[n].zone], load[n], positions[n], n)
                )
                candidates.remove(best)
                choose(best)
                zones[nodes[best].zone] += 1
                missing -= 1
        start = _position(dataset)
        while missing > 0:
            # The zone with the fewest replicas of this dataset, then the least loaded node.
            pick: tuple[int, int, str, str] | None = None
            for zone, ring in zone_rings.items():
                if pick is not None and zones[zone] > pick[0]:
                    continue
                found, node_load = ring.pick(start, load, usable)
                if found is not None:
                    candidate = (zones[zone], node_load, zone, found)
                    if pick is None or candidate < pick:
                        pick = candidate
            if pick is None:
                break
            choose(pick[3])
            zones[pick[2]] += 1
            missing -= 1
        result[dataset] = frozenset(chosen)
    return result


@dataclass(frozen=True)
class Resident:
    """A dataset held on a node, as eviction sees it."""

    dataset: str
    size_bytes: int
    """Bytes it frees when evicted."""
    pinned: bool
    last_used: float
    """Unix time pods last read it; 0 when never or unknown."""
    ready_replicas: int
    """Ready replicas cluster-wide, this one included."""


def choose_evictions(
    pressure_bytes: int, residents: Sequence[Resident], needing: Set[str]
) -> list[str]:
    """Datasets to evict from a node that lacks `pressure_bytes` of room.

    Unpinned datasets go first, least recently used first; then pinned datasets that have
    another Ready replica elsewhere. Datasets in `needing` (those the room is for) are never
    chosen. Stops as soon as the victims free enough.
    """
    if pressure_bytes <= 0:
        return []
    candidates = [
        r
        for r in residents
        if r.dataset not in needing and r.size_bytes > 0 and (not r.pinned or r.ready_replicas > 1)
    ]
    candidates.sort(key=lambda r: (r.pinned, r.last_used, -r.size_bytes, r.dataset))
    victims: list[str] = []
    freed = 0
    for resident in candidates:
        if freed >= pressure_bytes:
            break
        victims.append(resident.dataset)
        freed += resident.size_bytes
    return victims
