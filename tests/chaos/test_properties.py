"""Scenario 11: property-based tests (hypothesis).

tests/test_keys.py checks that `key_to_parts` never accepts an escaping key, and
tests/test_placement.py checks placement's invariants on one pass (constraints, room, minimal
movement, nodes joining and leaving). These add the end-to-end properties:

- a whole random listing of hostile and plain keys, planned and copied by the real transfer
  engine into a directory, writes exactly the planned files, each with its object's bytes, and
  nothing anywhere else; every key is either copied or refused, never both;
- placement run again on its own answer moves nothing (the coordinator reconciles every few
  seconds: an answer that is not a fixpoint would move replicas forever), and Ready copies are
  never dropped while they are not more than asked for.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.fetch import FetchSettings, Progress, fetch_into, plan
from agent.keys import is_directory_marker
from agent.sources import READ_CHUNK_BYTES, ObjectInfo
from coordinator.placement import Node, Want, eligible, place
from tests.chaos.report import ScenarioRecord
from tests.test_placement import nodes_strategy, previous_strategy, wants_strategy

COMPONENTS = [
    "a",
    "b",
    "c.d",
    "..",
    ".",
    "",
    "..x",
    "x" * 255,
    "y" * 256,
    "\u00e9" * 128,
    "nul\x00",
]
key_strategy = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4).map(
    "/".join
) | st.sampled_from(["/abs", "/", "a/", "../../etc/passwd", "a/b", "a/b/c", "a"])
listing_strategy = st.dictionaries(key_strategy, st.binary(max_size=64), max_size=12)


class MemorySource:
    """A source holding objects in memory (no checksums: files are recorded unverified)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def list(self) -> Iterator[ObjectInfo]:
        for key in sorted(self.objects):
            data = self.objects[key]
            yield ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest()[:16])

    def read_range(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        data = self.objects[obj.key][offset : offset + length]
        for start in range(0, len(data), READ_CHUNK_BYTES):
            yield data[start : start + READ_CHUNK_BYTES]


RUNS = {"listings": 0, "placements": 0}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(listing_strategy)
def hostile_listing_property(objects: dict[str, bytes]) -> None:
    RUNS["listings"] += 1
    source = MemorySource(objects)
    files, refused = plan(list(source.list()))
    planned = {"/".join(f.parts): f.obj.key for f in files}
    refused_keys = {key for key, _ in refused}
    keys = {k for k in objects if not is_directory_marker(k)}
    # Every key is copied or refused (a directory marker may be skipped silently).
    assert keys <= set(planned.values()) | refused_keys <= set(objects)
    assert not any(is_directory_marker(k) for k in planned.values())
    assert not set(planned.values()) & refused_keys
    assert all(path == key for path, key in planned.items())
    paths = set(planned)
    assert not any(p.startswith(q + "/") for p in paths for q in paths)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        dest = root / "cache" / "staging"
        dest.mkdir(parents=True)
        entries = fetch_into(
            source,
            files,
            dest,
            FetchSettings(concurrency=2, fsync=False),
            Progress(),
            threading.Event(),
        )
        written = {}
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath) / name
                assert not path.is_symlink()
                written[
                    path.relative_to(dest).as_posix() if path.is_relative_to(dest) else str(path)
                ] = path.read_bytes()
    assert written == {path: objects[key] for path, key in planned.items()}
    assert sorted(e.path for e in entries) == sorted(planned)


@settings(max_examples=300, deadline=None)
@given(wants_strategy, nodes_strategy, previous_strategy, previous_strategy)
def placement_property(
    wants: list[Want],
    nodes: dict[str, Node],
    current: dict[str, frozenset[str]],
    ready: dict[str, frozenset[str]],
) -> None:
    RUNS["placements"] += 1
    # Room is charged only for newly placed replicas, so a static free-space figure is
    # not a fixpoint by construction; the cluster's next report would show the room taken.
    roomy = {
        n: Node(node.name, node.labels, node.taints, node.unschedulable)
        for n, node in nodes.items()
    }
    first = place(wants, roomy, current, ready)
    assert place(wants, roomy, current, ready) == first, "placement is not deterministic"
    assert place(wants, roomy, first, ready) == first, "placement moves its own answer"
    for want in wants:
        if want.all_nodes:
            continue
        kept_ready = {
            n
            for n in ready.get(want.dataset, frozenset()) & current.get(want.dataset, frozenset())
            if n in roomy and eligible(want, roomy[n])
        }
        if len(kept_ready) <= want.replicas:
            assert kept_ready <= first[want.dataset], (want, kept_ready, first[want.dataset])


@pytest.mark.scenario(11, "Property-based tests: key-to-path mapping and placement invariants")
def test_properties_report(record: ScenarioRecord) -> None:
    """Runs both properties again under the clock and records how many examples passed."""
    started = time.monotonic()
    before = dict(RUNS)
    hostile_listing_property()
    placement_property()
    listings = RUNS["listings"] - before["listings"]
    placements = RUNS["placements"] - before["placements"]
    record.fault(
        f"{listings} random listings mixing hostile keys (.., ., empty components, absolute, "
        "NUL, 256-byte names, file/directory collisions) copied by the real transfer engine"
    )
    record.fault(f"{placements} random clusters, datasets, assignments and Ready sets placed twice")
    record.observe(
        "every listing wrote exactly its safe keys' bytes inside the destination and nothing "
        "else; placement was deterministic, a fixpoint of its own answer, and kept every Ready "
        f"assigned copy not in excess ({time.monotonic() - started:.1f}s)"
    )
    record.exposed, record.lost, record.checks = 0, 0, 0
    assert listings >= 50 and placements >= 100
