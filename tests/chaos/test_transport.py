"""Scenario 1: an unreliable S3 server (connection resets, truncated bodies, stalls, 503
SlowDown throttling) and clocks that disagree (`faketime`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.chaos.harness import (
    BIG_KEY,
    ChaosCluster,
    Monitor,
    S3Origin,
    Sizes,
    generate,
    wait_for,
)
from tests.chaos.report import ScenarioRecord
from tests.faultproxy import Fault, FaultProxy, Request, Rule

NODES = ["node-1", "node-2", "node-3"]


def big_range(request: Request) -> bool:
    return request.range is not None and f"/ds/{BIG_KEY}" in request.path


@pytest.mark.scenario(1, "S3 resets, truncated bodies, stalls and 503 SlowDown")
def test_unreliable_s3(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord
) -> None:
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(generate(1, sizes))
    rules = [
        Rule(Fault("slowdown"), method="GET", path_contains="list-type=2", limit=2),
        Rule(Fault("slowdown"), method="HEAD", limit=2),
        Rule(Fault("reset", after_bytes=100_000), method="GET", when=big_range, limit=3),
        Rule(Fault("truncate", after_bytes=300_000), method="GET", when=big_range, limit=2),
        # Longer than the agents' read timeout (2 s): the read is abandoned and retried.
        Rule(Fault("stall", seconds=5), method="GET", when=big_range, limit=1),
        Rule(Fault("stall", seconds=5), method="GET", path_contains="/ds/small/d3/", limit=1),
        Rule(
            Fault("truncate", after_bytes=500), method="GET", path_contains="/ds/small/d1/", limit=4
        ),
        Rule(Fault("reset", after_bytes=0), method="GET", path_contains="/ds/small/d2/", limit=4),
        Rule(Fault("slowdown"), method="GET", path_contains="/ds/small/d4/", limit=6),
    ]
    with FaultProxy(chaos.local.s3_endpoint, rules) as proxy:
        chaos.start_coordinator()
        for node in NODES:
            chaos.start_agent(node, f"--s3-endpoint-url={proxy.url}", "--s3-read-timeout-seconds=2")
        chaos.wait_registered(NODES)
        with Monitor(chaos, {"data": origin}) as monitor:
            started = time.monotonic()
            chaos.create("data", origin.uri, replicas=3)
            chaos.wait_ready("data", 3, timeout=120)
            record.recovered(
                time.monotonic() - started,
                "from creating the dataset, with every fault armed, to 3 Ready, labelled replicas",
            )
            monitor.finish(record)
        counts = proxy.counts()
    record.fault(
        "through a fault proxy in front of SeaweedFS, for all 3 agents: "
        + ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
        + f" over {len(proxy.requests)} requests"
    )
    retries = {
        reason: sum(
            chaos.agent_metric(n, "datacache_agent_fetch_retries_total", reason=reason)
            for n in NODES
        )
        for reason in ("transport", "checksum", "changed")
    }
    record.observe(f"engine retries by reason (all agents): {retries}")
    record.observe(
        f"3 Ready replicas, all with the same digest; {len(monitor.complete_copies('data'))} "
        "complete verified copies on disk"
    )
    assert set(counts) == {"reset", "truncate", "stall", "slowdown"}
    assert counts["slowdown"] >= 4 and counts["reset"] >= 3 and counts["truncate"] >= 2
    assert retries["transport"] >= 3
    assert monitor.complete_copies("data") == set(NODES)
    assert chaos.labelled("data") == set(NODES)
    dataset = chaos.dataset("data")
    assert dataset is not None
    assert len({r.digest for r in dataset.status.replicas}) == 1
    assert record.exposed == 0 and record.lost == 0


def faketime_library() -> str:
    found = shutil.which("faketime")
    if found is None:
        pytest.skip("faketime is not installed (Debian package faketime; scripts/test installs it)")
    for candidate in Path("/usr/lib").glob("*/faketime/libfaketime.so.1"):
        return str(candidate)
    pytest.skip("libfaketime.so.1 not found (Debian package libfaketime)")


def skewed(library: str, offset: str = "", clock_file: Path | None = None) -> dict[str, str]:
    """Environment running a process under libfaketime: a fixed `offset`, or the offset
    written in `clock_file` (re-read every second, so a test can step the clock)."""
    env = {"LD_PRELOAD": library, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    if clock_file is None:
        env["FAKETIME"] = offset
    else:
        env["FAKETIME_TIMESTAMP_FILE"] = str(clock_file)
        env["FAKETIME_CACHE_DURATION"] = "1"
    return env


@pytest.mark.scenario(1, "Clock skew between agents, coordinator and S3 (faketime)")
def test_clock_skew(chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord) -> None:
    library = faketime_library()
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(generate(2, sizes))
    chaos.start_coordinator("--lease-seconds=6")
    offsets = {"node-1": "+10m", "node-2": "-10m", "node-3": "+2h"}
    for node, offset in offsets.items():
        chaos.start_agent(node, env=skewed(library, offset))
    chaos.wait_registered(NODES)
    record.fault(
        "agent clocks skewed against the coordinator's and the S3 server's: "
        + ", ".join(f"{n} {o}" for n, o in offsets.items())
        + " (libfaketime; monotonic clocks untouched); lease 6 s"
    )
    with Monitor(chaos, {"data": origin}) as monitor:
        started = time.monotonic()
        chaos.create("data", origin.uri, replicas=3)
        ready_after = chaos.wait_ready("data", 3)
        # Several leases' worth of reports from skewed agents: nobody's lease expires.
        wait_for(lambda: time.monotonic() - started > ready_after + 8, 12, "three leases")
        monitor.finish(record)
    removals = monitor.label_removals("data")
    record.recovered(ready_after, "from creation to 3 Ready, labelled replicas")
    record.observe(
        "3 Ready, labelled, verified replicas; the origin (SeaweedFS) accepted requests signed "
        "2 hours ahead (it does not enforce AWS's 15-minute limit)"
    )
    record.observe(f"label removals over 3 leases after Ready: {len(removals)}")
    assert removals == []
    assert chaos.ready("data") == set(NODES) == chaos.labelled("data")
    assert record.exposed == 0 and record.lost == 0


@pytest.mark.scenario(1, "The coordinator's wall clock steps 1 hour forward (faketime)")
def test_coordinator_clock_step(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord, tmp_path: Path
) -> None:
    library = faketime_library()
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(generate(3, sizes))
    clock = tmp_path / "coordinator.faketime"
    clock.write_text("+0\n")
    nodes = NODES[:2]
    chaos.start_coordinator("--lease-seconds=6", env=skewed(library, clock_file=clock))
    for node in nodes:
        chaos.start_agent(node)
    chaos.wait_registered(nodes)
    with Monitor(chaos, {"data": origin}) as monitor:
        chaos.create("data", origin.uri, replicas=2)
        chaos.wait_ready("data", 2)
        # An NTP step: the coordinator's wall clock jumps 1 hour ahead.
        clock.write_text("+1h\n")
        stepped = time.monotonic()
        record.fault("the coordinator's wall clock stepped 1 hour forward (an NTP step)")

        def ahead() -> float:
            seen = max(n.last_seen_time.seconds for n in chaos.local.list_nodes())
            return seen - time.time()

        wait_for(lambda: ahead() > 3000, 15, "the coordinator's clock to step")
        wait_for(lambda: time.monotonic() - stepped > 8, 10, "several passes on the new clock")
        monitor.finish(record)
    # Exact evidence: the coordinator logs every label update it makes (polling may miss a
    # flap shorter than its interval).
    stripped = [
        line
        for line in (chaos.local.workdir / "coordinator.log").read_text().splitlines()
        if '"Labels of node updated: []"' in line
    ]
    record.observe(f"label updates to no labels logged by the coordinator: {len(stripped)}")
    removals = monitor.label_removals("data")
    record.observe(
        f"label removals seen by polling after the step: {len(removals)} "
        f"({', '.join(f'{c.node} at {c.seconds:.1f}s' for c in removals) or 'none'})"
    )
    record.observe(
        f"finally Ready {sorted(chaos.ready('data'))}, labelled {sorted(chaos.labelled('data'))}"
    )
    assert record.exposed == 0 and record.lost == 0
    assert chaos.ready("data") == set(nodes) == chaos.labelled("data")
    assert removals == [] and stripped == [], "labels flapped when the clock stepped"
