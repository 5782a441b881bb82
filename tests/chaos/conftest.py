"""Fixtures of the chaos suite and the collector that writes docs/reliability.md.

Every scenario test carries `@pytest.mark.scenario(number, title)` and takes the `record`
fixture (a `ScenarioRecord`) to write down what it injected and measured. The collector keeps
one record per test, adds the test's result (passed, failed, skipped with its reason), and at
the end of the session writes the Markdown report to the file named by
`DATACACHE_RELIABILITY_REPORT`, if set (scripts/chaos sets it to docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from datacache.localcluster import LocalCluster
from tests.chaos.harness import ChaosCluster, Sizes
from tests.chaos.report import LONG_ENV, REPORT_ENV, ScenarioRecord, render

# Said in the report under "Not covered here, and why": limits of this suite, not results.
NOTES = [
    "A flipped byte in the *first* copy of an NFS or file:// dataset cannot be detected: "
    "those sources store no checksum, so the first copy is recorded as `unverified` (size "
    "only) and fixes the version; every later replica is verified against it. The NFS "
    "scenario therefore flips bytes in transit to a later replica.",
    "No kubelet runs: the scenarios register Node objects themselves (Ready, with capacity, as a "
    "kubelet would) and the agents are processes on this machine, not pods of the DaemonSet; "
    "the control plane and everything else is a real process.",
]


class Collector:
    def __init__(self) -> None:
        self.records: dict[str, ScenarioRecord] = {}
        self.started = time.monotonic()

    def record_for(self, item: pytest.Item) -> ScenarioRecord | None:
        found = self.records.get(item.nodeid)
        if found is not None:
            return found
        marker = item.get_closest_marker("scenario")
        if marker is None:
            return None
        number, title = marker.args
        record = ScenarioRecord(item.nodeid, int(number), str(title))
        self.records[item.nodeid] = record
        return record


_COLLECTOR = pytest.StashKey[Collector]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario(number, title): a chaos scenario of issue 9 (number 1-11)"
    )
    config.stash[_COLLECTOR] = Collector()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    record = item.config.stash[_COLLECTOR].record_for(item)
    if record is None:
        return report
    record.seconds += report.duration
    if report.skipped:
        if hasattr(report, "wasxfail"):
            record.result, record.reason = "xfailed", str(report.wasxfail)
        else:
            record.result = "skipped"
            longrepr = report.longrepr
            record.reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
            record.reason = record.reason.removeprefix("Skipped: ")
    elif report.failed:
        record.result = "failed"
        message = str(getattr(report.longrepr, "reprcrash", None) or report.longrepr)
        record.reason = message.splitlines()[-1][:300] if message else ""
    elif report.when == "call" and record.result != "failed":
        record.result = "xpassed" if hasattr(report, "wasxfail") else "passed"
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(REPORT_ENV)
    collector = session.config.stash.get(_COLLECTOR, None)
    if not target or collector is None or not collector.records:
        return
    sizes = Sizes.from_env()
    text = render(
        list(collector.records.values()),
        time.monotonic() - collector.started,
        sizes.describe(),
        os.environ.get(LONG_ENV) == "1",
        NOTES,
    )
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


# Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    return Sizes.from_env()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> ScenarioRecord:
    found = request.config.stash[_COLLECTOR].record_for(request.node)
    if found is None:
        pytest.fail("a chaos test needs @pytest.mark.scenario(number, title)")
    found.started = time.monotonic()
    return found


@pytest.fixture
def chaos(cluster: LocalCluster, sizes: Sizes) -> Iterator[ChaosCluster]:
    """Coordinator and agents (none started yet) reading the session's SeaweedFS."""
    yield ChaosCluster(cluster, sizes)


@pytest.fixture
def bucket(cluster: LocalCluster, request: pytest.FixtureRequest) -> str:
    name = "chaos-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    cluster.create_bucket(name)
    return name
