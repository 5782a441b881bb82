"""Scenario 3: objects overwritten at the origin in the middle of their download."""

from __future__ import annotations

import os
import time

import pytest

from datacache.v1 import datacache_pb2 as pb
from tests.chaos.harness import (
    BIG_KEY,
    ChaosCluster,
    Monitor,
    S3Origin,
    Sizes,
    generate,
    sha256,
    wait_for,
)
from tests.chaos.report import ScenarioRecord
from tests.faultproxy import Fault, FaultProxy, Rule

NODES = ["node-1", "node-2"]


@pytest.mark.scenario(3, "Objects overwritten at the origin in the middle of a download")
def test_object_overwritten_mid_download(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord
) -> None:
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    files = generate(6, sizes)
    origin.put_all(files)
    keys = sorted(k for k in files if k != BIG_KEY)
    listed_then_changed, changed_in_flight = keys[len(keys) // 3], keys[2 * len(keys) // 3]
    rules = [
        # (a) The listing's headers go out, then its body waits while big.bin and one small
        # file are overwritten: every later read carries the old ETag in If-Match.
        Rule(Fault("stall", seconds=3), method="GET", path_contains="list-type=2", limit=2),
        # (b) A small file's body waits, in flight, while it is overwritten.
        Rule(
            Fault("stall", seconds=3),
            method="GET",
            path_contains=f"/ds/{changed_in_flight}",
            limit=1,
        ),
    ]
    with FaultProxy(chaos.local.s3_endpoint, rules) as proxy:
        chaos.start_coordinator()
        for node in NODES:
            chaos.start_agent(node, f"--s3-endpoint-url={proxy.url}")
        chaos.wait_registered(NODES)
        with Monitor(chaos, {"data": origin}) as monitor:
            chaos.create("data", origin.uri, replicas=2)

            def stalled(path: str) -> bool:
                return any(path in i.request.path for i in proxy.injected)

            wait_for(lambda: stalled("list-type=2"), 60, "a listing to be in flight")
            overwritten = time.monotonic()
            for key in (BIG_KEY, listed_then_changed):
                origin.put(key, os.urandom(len(files[key])))
            wait_for(lambda: stalled(changed_in_flight), 60, f"{changed_in_flight} in flight")
            origin.put(changed_in_flight, os.urandom(len(files[changed_in_flight])))
            record.fault(
                f"{BIG_KEY} ({len(files[BIG_KEY]):,} bytes, read as {sizes.ranges} ranges) and "
                f"{listed_then_changed} overwritten at the origin after being listed, before "
                f"being read (the listing held in flight); {changed_in_flight} overwritten "
                "while its body was held in flight"
            )

            def settled() -> bool:
                found = chaos.replicas("data")
                return len(found) == 2 and all(
                    r.state == pb.REPLICA_STATE_READY
                    or (r.state == pb.REPLICA_STATE_FAILED and r.message)
                    for r in found.values()
                )

            wait_for(settled, 90, "both replicas to be Ready or Failed")
            first = chaos.replicas("data")
            for node, replica in sorted(first.items()):
                record.observe(
                    f"{node}: {pb.ReplicaState.Name(replica.state)}"
                    + (f" ({replica.message[:160]})" if replica.message else "")
                )
            refreshed = False
            if not all(current_is(chaos, node, origin) for node in NODES):
                # A copy fixed the version before the overwrite: the dataset must be refreshed
                # to take the new objects, and it says so.
                chaos.refresh("data")
                refreshed = True
            wait_for(
                lambda: (
                    chaos.ready("data") == set(NODES)
                    and all(current_is(chaos, node, origin) for node in NODES)
                ),
                90,
                "both replicas Ready with the new objects",
            )
            record.recovered(
                time.monotonic() - overwritten,
                "from the overwrite to 2 Ready replicas holding exactly the new objects"
                + (" (after a refresh)" if refreshed else ""),
            )
            monitor.finish(record)
    counts = proxy.counts()
    restarts = sum(
        chaos.agent_metric(n, "datacache_agent_fetch_retries_total", reason="changed")
        for n in NODES
    )
    record.observe(
        f"{counts['stall']} downloads held while the objects changed; agents restarted "
        f"{restarts:.0f} reads of changed objects; refresh needed: {'yes' if refreshed else 'no'}"
    )
    for replica in first.values():
        if replica.state == pb.REPLICA_STATE_FAILED:
            assert "changed" in replica.message, replica.message
    assert record.exposed == 0 and record.lost == 0


def current_is(chaos: ChaosCluster, node: str, origin: S3Origin) -> bool:
    """Whether `node`'s published copy holds exactly what the origin holds now."""
    current = chaos.dataset_dir(node, "data") / "current"
    expected = origin.current
    try:
        found = {
            p.relative_to(current).as_posix(): sha256(p.read_bytes())
            for p in current.rglob("*")
            if p.is_file()
        }
    except OSError:
        return False
    return found == expected
