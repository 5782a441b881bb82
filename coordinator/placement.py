"""Which nodes should hold which dataset: a pure function of the state, no I/O.

Rules, in order:
1. Only live nodes (agent lease valid) hold replicas.
2. Existing assignments are kept while they are still wanted (least data moved); when a dataset
   scales down, copies that are not Ready go first.
3. New replicas go to the least loaded nodes; ties are broken by rendezvous hashing of
   (dataset, node), so the choice is stable when unrelated nodes come and go.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass


@dataclass(frozen=True)
class Want:
    """A dataset and how many replicas it should have."""

    dataset: str
    replicas: int


def _affinity(dataset: str, node: str) -> int:
    digest = hashlib.sha256(f"{dataset}\x00{node}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def place(
    wants: Sequence[Want],
    live_nodes: Set[str],
    current: Mapping[str, frozenset[str]],
    ready: Mapping[str, frozenset[str]],
) -> dict[str, frozenset[str]]:
    """Returns the desired nodes of every wanted dataset.

    `current` is the previous placement and `ready` the nodes holding a Ready copy, both by
    dataset. Datasets not in `wants` get no nodes.
    """
    kept: dict[str, list[str]] = {}
    for want in sorted(wants, key=lambda w: w.dataset):
        holders = current.get(want.dataset, frozenset()) & live_nodes
        ready_here = ready.get(want.dataset, frozenset())
        ordered = sorted(
            holders,
            key=lambda n: (n not in ready_here, -_affinity(want.dataset, n)),
        )
        kept[want.dataset] = ordered[: want.replicas]

    load = Counter(node for nodes in kept.values() for node in nodes)
    result: dict[str, frozenset[str]] = {}
    for want in sorted(wants, key=lambda w: w.dataset):
        chosen = kept[want.dataset]
        candidates = sorted(
            live_nodes - set(chosen),
            key=lambda n: (load[n], -_affinity(want.dataset, n)),
        )
        for node in candidates[: max(0, want.replicas - len(chosen))]:
            chosen.append(node)
            load[node] += 1
        result[want.dataset] = frozenset(chosen)
    return result
