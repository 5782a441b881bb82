"""Scenario 10: bit rot on the nodes' disks, found by the scrub and repaired from the origin."""

from __future__ import annotations

import os
import time

import pytest

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

NODES = ["node-1", "node-2"]


@pytest.mark.scenario(10, "Bit rot on disk found by the scrub and repaired")
def test_bit_rot_is_scrubbed_and_repaired(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord
) -> None:
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    files = generate(18, sizes)
    origin.put_all(files)
    chaos.start_coordinator()
    for node in NODES:
        chaos.start_agent(node, "--scrub-interval-seconds=1")
    chaos.wait_registered(NODES)
    small = sorted(k for k in files if k != BIG_KEY and len(files[k]) > 100)[:2]
    damage = {
        ("node-1", BIG_KEY): f"one bit flipped at byte {sizes.big_bytes // 2:,}",
        ("node-2", small[0]): "truncated by one byte",
        ("node-2", small[1]): "deleted",
    }
    with Monitor(chaos, {"data": origin}) as monitor:
        chaos.create("data", origin.uri, replicas=2)
        chaos.wait_ready("data", 2)
        for node, key in damage:
            monitor.excuse(node, "data", key)
        for (node, key), what in damage.items():
            path = chaos.dataset_dir(node, "data") / "current" / key
            if what.startswith("one bit"):
                with path.open("r+b") as f:
                    f.seek(sizes.big_bytes // 2)
                    byte = f.read(1)[0]
                    f.seek(sizes.big_bytes // 2)
                    f.write(bytes([byte ^ 0x10]))
            elif what.startswith("truncated"):
                os.truncate(path, len(files[key]) - 1)
            else:
                path.unlink()
        rotted = time.monotonic()
        record.fault(
            "on-disk damage to published copies: "
            + "; ".join(f"{n}:{k} {w}" for (n, k), w in damage.items())
            + " (scrub every 1 s)"
        )

        def quarantined(node: str) -> int:
            return sum(1 for p in (chaos.cache(node) / "quarantine").rglob("*") if p.is_file())

        detected = wait_for(
            lambda: quarantined("node-1") >= 1 and quarantined("node-2") >= 1,
            60,
            "the scrub to quarantine the damaged files",
        )

        def repaired() -> bool:
            for node, key in damage:
                path = chaos.dataset_dir(node, "data") / "current" / key
                try:
                    if sha256(path.read_bytes()) != sha256(files[key]):
                        return False
                except OSError:
                    return False
            return chaos.ready("data") == set(NODES) == chaos.labelled("data")

        wait_for(repaired, 60, "the damaged files repaired and both replicas Ready")
        record.recovered(
            time.monotonic() - rotted,
            f"from the damage to every file repaired and both replicas Ready and labelled "
            f"(quarantined after {detected:.1f}s)",
        )
        monitor.finish(record)
    corrupt = sum(
        chaos.agent_metric(n, "datacache_agent_scrubbed_files_total", result="corrupt")
        for n in NODES
    )
    removals = monitor.label_removals("data")
    record.observe(
        f"scrub counted {corrupt:.0f} corrupt files; quarantine holds "
        f"{quarantined('node-1') + quarantined('node-2')} files; labels taken off during repair: "
        f"{sorted({c.node for c in removals}) or 'none seen by polling'}"
    )
    assert corrupt >= 2
    assert monitor.complete_copies("data") == set(NODES)
    assert record.exposed == 0 and record.lost == 0
