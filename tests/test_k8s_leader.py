"""Leader election on the coordinator's Lease in a real API server, with the official client
and the coordinator's own ServiceAccount (its Role may create, get and update that Lease only):
one leader, takeover by a second candidate when the first stops renewing, release on a clean
stop, stepping down when renewals fail, and compare-and-swap on the Lease. Failed and
conflicting renewals come from a fault proxy in front of the API server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from coordinator.k8s_labeler import api_client
from coordinator.k8s_leader import LeaderElection, LeaderElectionError, LeaderElectionSettings
from datacache.localcluster import wait_until
from tests.faultproxy import Fault, Rule
from tests.kubecontrolplane import KubeAPIError, KubeTest

FAST = LeaderElectionSettings(
    lease_duration_seconds=3, renew_deadline_seconds=2.0, retry_period_seconds=1.0
)
NAMESPACE, LEASE = "datacache", "datacache-coordinator"
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{LEASE}"
# Cross-process waits on a shared two-core machine: generous, and still bounded.
WAIT = 30.0


class Candidate:
    def __init__(self, client: Any, identity: str, settings: LeaderElectionSettings) -> None:
        self.election = LeaderElection(client, NAMESPACE, LEASE, identity, settings)
        self.events: list[str] = []
        self._lock = threading.Lock()
        self.election.run_in_thread(lambda: self._note("started"), lambda: self._note("stopped"))

    def _note(self, what: str) -> None:
        with self._lock:
            self.events.append(what)

    def seen(self) -> list[str]:
        with self._lock:
            return list(self.events)


@pytest.fixture
def candidates(kube: KubeTest) -> Iterator[list[Candidate]]:
    started: list[Candidate] = []
    yield started
    # Before the kube fixture's cleanup deletes the Lease, so no candidate recreates it.
    for candidate in started:
        candidate.election.stop(release=False)


def coordinator_kubeconfig(kube: KubeTest) -> Path:
    """Straight to the API server, as the coordinator's ServiceAccount."""
    return kube.token_kubeconfig(kube.token(NAMESPACE, "datacache-coordinator"), "coordinator")


def proxied_coordinator_kubeconfig(kube: KubeTest) -> Path:
    """Through the fault proxy, as the coordinator's ServiceAccount."""
    return kube.proxied_kubeconfig(kube.token(NAMESPACE, "datacache-coordinator"))


def start(
    kubeconfig: Path,
    candidates: list[Candidate],
    identity: str,
    settings: LeaderElectionSettings = FAST,
) -> Candidate:
    candidate = Candidate(api_client(str(kubeconfig)), identity, settings)
    candidates.append(candidate)
    return candidate


def lease(kube: KubeTest) -> dict[str, Any] | None:
    try:
        return dict(kube.plane.get(LEASE_PATH))
    except KubeAPIError as exc:
        if exc.status == 404:
            return None
        raise


def lease_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def holder(kube: KubeTest) -> str | None:
    found = lease(kube)
    return None if found is None else found["spec"].get("holderIdentity")


def lease_puts(kube: KubeTest, since: int = 0) -> list[int]:
    """Numbers of the Lease writes (renewals, takeovers, releases) the proxy relayed or
    answered, from request number `since` on."""
    return [
        r.number
        for r in kube.proxy.requests[since:]
        if r.method == "PUT" and f"/leases/{LEASE}" in r.path
    ]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"retry_period_seconds": 0.5}, "at least 1s"),
        ({"renew_deadline_seconds": 2.0, "retry_period_seconds": 2.0}, "must exceed 1.2"),
        ({"lease_duration_seconds": 10, "renew_deadline_seconds": 10.0}, "could overlap"),
    ],
)
def test_settings_that_cannot_work_are_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(LeaderElectionError, match=words):
        LeaderElectionSettings(**kwargs)


def test_empty_identity_is_refused(kube: KubeTest) -> None:
    with pytest.raises(LeaderElectionError, match="POD_NAME"):
        LeaderElection(api_client(str(coordinator_kubeconfig(kube))), NAMESPACE, LEASE, "", FAST)


def test_one_leader_and_takeover_when_it_stops_renewing(
    kube: KubeTest, candidates: list[Candidate]
) -> None:
    kubeconfig = coordinator_kubeconfig(kube)
    assert lease(kube) is None
    first = start(kubeconfig, candidates, "coordinator-a")
    wait_until(lambda: first.election.is_leader, WAIT, "the first candidate to lead")
    created = lease(kube)
    # The coordinator's Role lets it create the Lease (create cannot be limited by name).
    assert created is not None
    assert created["spec"]["holderIdentity"] == "coordinator-a"
    assert created["spec"]["leaseDurationSeconds"] == 3

    second = start(kubeconfig, candidates, "coordinator-b")
    # Several renewals happen while the second candidate waits; it never leads meanwhile.
    renewed_from = created["spec"]["renewTime"]
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert not second.election.is_leader
        assert first.election.is_leader
        time.sleep(0.1)
    renewed = lease(kube)
    assert renewed is not None
    assert renewed["spec"]["holderIdentity"] == "coordinator-a"
    assert renewed["spec"]["renewTime"] != renewed_from

    # The first dies without releasing (as a SIGKILLed pod would): the second takes over after
    # the lease duration.
    first.election.stop(release=False)
    assert first.seen() == ["started", "stopped"]
    left = lease(kube)
    assert left is not None and left["spec"]["holderIdentity"] == "coordinator-a"
    wait_until(lambda: second.election.is_leader, WAIT, "takeover by the second candidate")
    taken = lease(kube)
    assert taken is not None and taken["spec"]["holderIdentity"] == "coordinator-b"
    # Not before the Lease expired: a full lease duration after the last renewal at the
    # earliest (both times come from this machine's clock).
    waited = lease_time(taken["spec"]["acquireTime"]) - lease_time(left["spec"]["renewTime"])
    assert waited.total_seconds() >= FAST.lease_duration_seconds, waited
    assert second.seen() == ["started"]


def test_clean_stop_releases_the_lease_for_a_fast_handover(
    kube: KubeTest, candidates: list[Candidate], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.k8s_leader")
    slow = LeaderElectionSettings(
        lease_duration_seconds=30, renew_deadline_seconds=2.0, retry_period_seconds=1.0
    )
    first = start(coordinator_kubeconfig(kube), candidates, "coordinator-a", slow)
    wait_until(lambda: first.election.is_leader, WAIT, "the first candidate to lead")
    created = lease(kube)
    assert created is not None
    # The follower alone goes through the proxy: its Lease reads show it is campaigning.
    second = start(proxied_coordinator_kubeconfig(kube), candidates, "coordinator-b", slow)

    def follower_read_the_held_lease() -> bool:
        reads = [r for r in kube.proxy.requests if r.method == "GET" and LEASE in r.path]
        return len(reads) >= 2

    wait_until(follower_read_the_held_lease, WAIT, "the second candidate to follow")
    assert second.election.terms == 0

    # A renewal is a read, then a write that bumps the resourceVersion: after one, a release
    # written with the version of the leader's last read would be refused (409) and the
    # follower would wait out the 30s.
    def renewed() -> bool:
        current = lease(kube)
        assert current is not None and current["spec"]["holderIdentity"] == "coordinator-a"
        version: str = current["metadata"]["resourceVersion"]
        return bool(version != created["metadata"]["resourceVersion"])

    wait_until(renewed, WAIT, "a renewal by the leader")

    stopped_at = time.monotonic()
    first.election.stop()  # releases
    after_stop = lease(kube)
    assert after_stop is not None
    # Released: the holder is empty, or the follower already took the free Lease; it is not
    # the stopped leader, whose Lease would otherwise stay held for 30s.
    assert after_stop["spec"].get("holderIdentity") in ("", None, "coordinator-b"), after_stop
    released = [r for r in caplog.records if "released by coordinator-a" in r.getMessage()]
    refused = [r for r in caplog.records if "release refused" in r.getMessage()]
    assert released and not refused, [r.getMessage() for r in caplog.records]
    wait_until(lambda: second.election.is_leader, WAIT, "handover after release")
    handover = time.monotonic() - stopped_at
    # The follower retries every 1-1.2s and takes a released Lease at once: far less than the
    # 30s it would wait for an unreleased one.
    assert handover < 10, f"handover took {handover:.1f}s"
    assert holder(kube) == "coordinator-b"
    assert first.seen() == ["started", "stopped"]
    assert second.seen() == ["started"]


def test_leader_steps_down_when_renewals_fail_and_comes_back(
    kube: KubeTest, candidates: list[Candidate]
) -> None:
    proxy = kube.proxy
    only = start(proxied_coordinator_kubeconfig(kube), candidates, "coordinator-a")
    wait_until(lambda: only.election.is_leader, WAIT, "leading")
    proxy.set_rules([Rule(Fault("answer", status=500), method="PUT", path_contains="/leases/")])
    wait_until(lambda: "stopped" in only.seen(), WAIT, "stepping down after failed renewals")
    assert not only.election.is_leader
    failed = [i.request.number for i in proxy.injected]
    assert len(failed) >= 2 and all(proxy.statuses()[n] == 500 for n in failed)
    # The API server answers again and nobody else took the Lease: it leads again.
    proxy.set_rules([])
    wait_until(lambda: only.election.terms == 2, WAIT, "a second term")
    assert only.seen() == ["started", "stopped", "started"]
    assert holder(kube) == "coordinator-a"


def test_conflicting_renewals_are_not_renewals(kube: KubeTest, candidates: list[Candidate]) -> None:
    proxy = kube.proxy
    only = start(proxied_coordinator_kubeconfig(kube), candidates, "coordinator-a")
    wait_until(lambda: only.election.is_leader, WAIT, "leading")
    since = len(proxy.requests)
    wait_until(lambda: lease_puts(kube, since) != [], WAIT, "a renewal")
    renewal = lease_puts(kube, since)[0]
    wait_until(lambda: renewal in proxy.statuses(), WAIT, "the renewal's answer")
    assert proxy.statuses()[renewal] == 200
    # Renewals answered 409 (a stale resourceVersion) do not count: past the renew deadline
    # the leader steps down rather than assume it still holds the Lease.
    proxy.set_rules(
        [
            Rule(
                Fault("answer", status=409),
                method="PUT",
                path_contains=f"/leases/{LEASE}",
                limit=3,
            )
        ]
    )
    wait_until(lambda: "stopped" in only.seen(), WAIT, "stepping down on conflicts")
    conflicts = [i.request.number for i in proxy.injected]
    assert len(conflicts) >= 2 and all(proxy.statuses()[n] == 409 for n in conflicts)
    # Once writes succeed again it wins the Lease back (nobody else campaigned).
    wait_until(lambda: only.election.terms == 2, WAIT, "a second term")
    assert holder(kube) == "coordinator-a"


def test_leader_yields_to_a_holder_written_by_someone_else(
    kube: KubeTest, candidates: list[Candidate]
) -> None:
    only = start(coordinator_kubeconfig(kube), candidates, "coordinator-a")
    wait_until(lambda: only.election.is_leader, WAIT, "leading")
    kube.plane.patch(
        LEASE_PATH, {"spec": {"holderIdentity": "coordinator-z", "leaseDurationSeconds": 60}}
    )
    wait_until(lambda: "stopped" in only.seen(), WAIT, "yielding to the other holder")
    assert not only.election.is_leader
    assert holder(kube) == "coordinator-z"
