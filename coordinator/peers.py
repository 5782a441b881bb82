"""Which agents a new copy may read from: the pure choice of peers for one node and one
fixed dataset version.

A peer holds a Ready copy of exactly that version, is live and serves peers (it registered a
peer address). Peers in the node's zone come first (cheaper, faster links); within a zone the
order is rotated by a hash of the node's name, so the nodes copying at the same time start on
different peers instead of all reading from the first one."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAX_PEERS = 4
"""Peers handed to one copy. More spread the load further but each costs the copy a connection
per thread; four already let a copy fall back twice before it reads from the source."""


@dataclass(frozen=True)
class PeerHolder:
    """A node that holds a Ready copy of some version of a dataset."""

    node: str
    version: str
    """The digest of the copy it holds."""


def choose_peers(
    node: str,
    version: str,
    holders: Iterable[PeerHolder],
    addresses: Mapping[str, str],
    zones: Mapping[str, str],
    limit: int = MAX_PEERS,
) -> tuple[tuple[str, str], ...]:
    """(node, address) of up to `limit` peers `node` may copy `version` from; none when
    `node` holds it already (it needs no copy)."""
    if not version:
        return ()
    holders = list(holders)
    candidates = sorted(
        {h.node for h in holders if h.version == version and h.node in addresses} - {node}
    )
    if not candidates or any(h.node == node and h.version == version for h in holders):
        return ()
    spin = zlib.crc32(node.encode())
    zone = zones.get(node, "")
    ranked = sorted(
        (not zone or zones.get(peer, "") != zone, (index + spin) % len(candidates), peer)
        for index, peer in enumerate(candidates)
    )
    return tuple((peer, addresses[peer]) for _, _, peer in ranked[:limit])
