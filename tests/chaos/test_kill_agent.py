"""Scenario 5: SIGKILL of an agent at successive steps of a transfer and of publishing, each
followed by a restart; the agent must converge without ever exposing a partial version and
without fetching again what it had published.

The transfer is caught by stalling chosen reads at the fault proxy; publishing, which makes
no network call, by inotify on the dataset's directory: the agent is killed the instant it
renames the version into place, creates or renames the manifest, creates the new link, or
switches `current`."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import partial

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
from tests.chaos.inotify import IN_CREATE, IN_ISDIR, IN_MOVED_TO, Inotify
from tests.chaos.report import ScenarioRecord
from tests.faultproxy import Fault, FaultProxy, Rule

NODE = "node-1"
Step = tuple[str, Callable[[str, int], bool]]
PUBLISH_STEPS: list[Step] = [
    (
        "the staged version renamed into place",
        lambda name, mask: bool(mask & IN_MOVED_TO and mask & IN_ISDIR),
    ),
    (
        "the manifest's temporary file created",
        lambda name, mask: bool(mask & IN_CREATE) and name.endswith(".tmp") and ".json." in name,
    ),
    (
        "the manifest renamed into place",
        lambda name, mask: bool(mask & IN_MOVED_TO) and name.endswith(".json"),
    ),
    (
        "the new `current` link created beside the old",
        lambda name, mask: bool(mask & IN_CREATE) and name.startswith(".current."),
    ),
    (
        "`current` switched to the new version",
        lambda name, mask: bool(mask & IN_MOVED_TO) and name == "current",
    ),
]


def disk_state(chaos: ChaosCluster) -> str:
    directory = chaos.dataset_dir(NODE, "data")
    staging = chaos.cache(NODE) / "staging"
    journals = list(staging.glob("*.journal"))
    lines = sum(len(j.read_text(errors="replace").splitlines()) for j in journals)
    try:
        entries = sorted(p.name for p in directory.iterdir())
    except OSError:
        entries = []
    current = os.readlink(directory / "current") if (directory / "current").is_symlink() else "-"
    return (
        f"dataset dir {entries or 'absent'}, current -> {current}; staging "
        f"{sorted(p.name for p in staging.iterdir() if p.is_dir()) or 'empty'}, "
        f"{lines} journal lines"
    )


@pytest.mark.scenario(5, "SIGKILL of an agent at every step of a transfer and of publishing")
def test_agent_killed_at_every_step(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord
) -> None:
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    files = generate(9, sizes)
    origin.put_all(files)
    kills: list[str] = []

    def kill_now() -> None:
        process = chaos.local.agents[NODE]
        os.kill(process.popen.pid, signal.SIGKILL)
        process.kill()  # reaps it

    with FaultProxy(chaos.local.s3_endpoint) as proxy:

        def start() -> None:
            chaos.start_agent(NODE, f"--s3-endpoint-url={proxy.url}")

        def stalls() -> int:
            return proxy.counts()["stall"]

        def more_stalls(than: int) -> bool:
            return stalls() > than

        chaos.start_coordinator()
        start()
        chaos.wait_registered([NODE])
        with Monitor(chaos, {"data": origin}) as monitor:
            # T1: listed, the first reads in flight.
            proxy.set_rules([Rule(Fault("stall", seconds=60), method="GET", path_contains="/ds/")])
            chaos.create("data", origin.uri, replicas=1)
            wait_for(lambda: stalls() >= 1, 60, "the first read to be in flight")
            kill_now()
            kills.append(f"listed, first read in flight: {disk_state(chaos)}")

            # T2: part of the large file and of the small files copied and journalled.
            last = f"bytes={(sizes.ranges - 1) * sizes.part_bytes}-{sizes.big_bytes - 1}"
            proxy.set_rules(
                [
                    Rule(
                        Fault("stall", seconds=60),
                        method="GET",
                        when=lambda r: r.range == last and BIG_KEY in r.path,
                        limit=1,
                    )
                ]
            )
            before = stalls()
            start()
            wait_for(lambda: stalls() > before, 60, f"the last range of {BIG_KEY} in flight")
            journal = chaos.cache(NODE) / "staging"
            wait_for(
                lambda: any(j.stat().st_size > 0 for j in journal.glob("*.journal")),
                30,
                "something journalled",
            )
            kill_now()
            kills.append(f"mid-copy, resumed copy's last range in flight: {disk_state(chaos)}")

            # P1-P5: the steps of publishing. Each listing is held at the proxy until the watch
            # on the dataset directory is in place, so the copy cannot publish before it.
            directory = chaos.dataset_dir(NODE, "data")
            for what, wanted in PUBLISH_STEPS:
                proxy.set_rules(
                    [Rule(Fault("stall", seconds=60), method="GET", path_contains="list-type=2")]
                )
                listings = stalls()
                start()
                wait_for(partial(more_stalls, listings), 60, "the listing in flight")
                directory.mkdir(parents=True, exist_ok=True)
                with Inotify() as inotify:
                    inotify.watch(directory)
                    proxy.set_rules([])
                    proxy.release_stalls()
                    seen = inotify.wait(wanted, 60)
                    if seen is not None:
                        kill_now()
                assert seen is not None, f"the agent never reached: {what}"
                kills.append(f"publishing, right after {what} ({seen}): {disk_state(chaos)}")
                if (directory / "current").is_symlink():
                    # Only a rename separates the new link from the switch, and a loaded
                    # machine can deliver the kill after it: the version is then published,
                    # which is the last step's state, and a restart has nothing to list.
                    kills.append("(that kill landed after `current` switched)")
                    break

            # Published before the last kill: the restart must keep it, not fetch it again.
            restarted = time.monotonic()
            mark = len(chaos.agent_log(NODE))
            start()
            chaos.wait_ready("data", 1)
            record.observe(
                f"after the kill that followed the switch of `current`, the restarted agent was "
                f"Ready in {time.monotonic() - restarted:.1f}s"
            )
            after = chaos.agent_log(NODE)[mark:]
            fetched_again = [r for r in after if r.get("msg", "").startswith("Fetching")]
            found = [r for r in after if r.get("msg") == "Found published copy"]

            # A refresh killed mid-publish: the old version keeps serving throughout.
            old_version = os.readlink(directory / "current")
            changed = sorted(k for k in files if k != BIG_KEY)[:3]
            for key in changed:
                origin.put(key, os.urandom(len(files[key]) + 1))
            proxy.set_rules(
                [Rule(Fault("stall", seconds=1.5), method="GET", path_contains="list-type=2")]
            )
            with Inotify() as inotify:
                inotify.watch(directory)
                chaos.refresh("data")
                seen = inotify.wait(PUBLISH_STEPS[2][1], 60)
                if seen is not None:
                    kill_now()
            assert seen is not None, "the refresh never reached publishing"
            serving = os.readlink(directory / "current")
            kills.append(
                f"refresh, right after the new manifest renamed into place: {disk_state(chaos)}"
            )
            restarted = time.monotonic()
            start()
            wait_for(
                lambda: (
                    chaos.ready("data") == {NODE}
                    and (dataset := chaos.dataset("data")) is not None
                    and all(r.revision == dataset.revision for r in dataset.status.replicas)
                    and os.readlink(directory / "current") != old_version
                ),
                60,
                "the refreshed version Ready",
            )
            record.recovered(
                time.monotonic() - restarted,
                "from restarting the agent killed while publishing a refresh to the new version "
                "Ready",
            )
            monitor.finish(record)
    for kill in kills:
        record.fault(f"SIGKILL, {kill}")
    record.observe(
        f"restart after the last publishing kill: {len(found)} 'Found published copy' in the log, "
        f"{len(fetched_again)} fetches started after it"
    )
    record.observe(
        f"while the refresh was killed mid-publish `current` still named {serving} "
        f"(the old version {old_version}); the refreshed version then replaced it"
    )
    assert serving == old_version
    assert found and not fetched_again
    assert monitor.complete_copies("data") == {NODE}
    assert list((chaos.cache(NODE) / "staging").iterdir()) == []
    assert record.exposed == 0 and record.lost == 0
