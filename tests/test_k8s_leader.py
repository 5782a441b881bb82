"""Leader election on a Lease in the fake API server, with the official client: one leader,
takeover by a second candidate when the first stops renewing, release on a clean stop, stepping
down when renewals fail, and compare-and-swap on the Lease."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from coordinator.k8s_labeler import api_client
from coordinator.k8s_leader import LeaderElection, LeaderElectionError, LeaderElectionSettings
from datacache.localcluster import wait_until
from tests.fakekube import FakeKubeAPI

FAST = LeaderElectionSettings(
    lease_duration_seconds=3, renew_deadline_seconds=2.0, retry_period_seconds=1.0
)
NAMESPACE, LEASE = "datacache", "datacache-coordinator"


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
def candidates(kube: tuple[FakeKubeAPI, Path]) -> Iterator[list[Candidate]]:
    started: list[Candidate] = []
    yield started
    for candidate in started:
        candidate.election.stop(release=False)


def start(
    kube: tuple[FakeKubeAPI, Path],
    candidates: list[Candidate],
    identity: str,
    settings: LeaderElectionSettings = FAST,
) -> Candidate:
    candidate = Candidate(api_client(str(kube[1])), identity, settings)
    candidates.append(candidate)
    return candidate


def holder(fake: FakeKubeAPI) -> str | None:
    lease = fake.get_object("leases", LEASE, NAMESPACE)
    return None if lease is None else lease["spec"].get("holderIdentity")


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


def test_empty_identity_is_refused(kube: tuple[FakeKubeAPI, Path]) -> None:
    with pytest.raises(LeaderElectionError, match="POD_NAME"):
        LeaderElection(api_client(str(kube[1])), NAMESPACE, LEASE, "", FAST)


def test_one_leader_and_takeover_when_it_stops_renewing(
    kube: tuple[FakeKubeAPI, Path], candidates: list[Candidate]
) -> None:
    fake, _ = kube
    first = start(kube, candidates, "coordinator-a")
    wait_until(lambda: first.election.is_leader, 10, "the first candidate to lead")
    assert holder(fake) == "coordinator-a"
    lease = fake.get_object("leases", LEASE, NAMESPACE)
    assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 3

    second = start(kube, candidates, "coordinator-b")
    # Several renewals happen while the second candidate waits; it never leads meanwhile.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert not second.election.is_leader
        assert first.election.is_leader
        time.sleep(0.1)
    assert holder(fake) == "coordinator-a"

    # The first dies without releasing (as a SIGKILLed pod would): the second takes over after
    # the lease duration.
    killed_at = time.monotonic()
    first.election.stop(release=False)
    assert first.seen() == ["started", "stopped"]
    wait_until(lambda: second.election.is_leader, 10, "takeover by the second candidate")
    assert time.monotonic() - killed_at >= 2  # not before the Lease could have expired
    assert holder(fake) == "coordinator-b"
    assert second.seen() == ["started"]


def test_clean_stop_releases_the_lease_for_a_fast_handover(
    kube: tuple[FakeKubeAPI, Path], candidates: list[Candidate]
) -> None:
    fake, _ = kube
    slow = LeaderElectionSettings(
        lease_duration_seconds=30, renew_deadline_seconds=2.0, retry_period_seconds=1.0
    )
    first = start(kube, candidates, "coordinator-a", slow)
    wait_until(lambda: first.election.is_leader, 10, "the first candidate to lead")
    second = start(kube, candidates, "coordinator-b", slow)
    wait_until(lambda: second.election.terms == 0 and fake.requests != [], 5, "a follower")
    first.election.stop()  # release
    assert holder(fake) in ("", None, "coordinator-b")
    # Well within the 30s lease duration.
    wait_until(lambda: second.election.is_leader, 8, "handover after release")


def test_leader_steps_down_when_renewals_fail_and_comes_back(
    kube: tuple[FakeKubeAPI, Path], candidates: list[Candidate]
) -> None:
    fake, _ = kube
    only = start(kube, candidates, "coordinator-a")
    wait_until(lambda: only.election.is_leader, 10, "leading")
    fake.fail_next(4, 500)
    wait_until(lambda: "stopped" in only.seen(), 10, "stepping down after failed renewals")
    # The API server is back and nobody else took the Lease: it leads again.
    wait_until(lambda: only.election.terms == 2, 10, "a second term")
    assert only.seen() == ["started", "stopped", "started"]


def test_conflicting_renewals_are_not_renewals(
    kube: tuple[FakeKubeAPI, Path], candidates: list[Candidate]
) -> None:
    fake, _ = kube
    only = start(kube, candidates, "coordinator-a")
    wait_until(lambda: only.election.is_leader, 10, "leading")
    fake.clear_requests()
    wait_until(
        lambda: any(r.method == "PUT" and LEASE in r.path for r in fake.requests), 5, "a renewal"
    )
    # Renewals answered 409 (a stale resourceVersion) do not count: past the renew deadline
    # the leader steps down rather than assume it still holds the Lease.
    fake.inject_conflicts("leases", name=LEASE, namespace=NAMESPACE, count=3)
    wait_until(lambda: "stopped" in only.seen(), 10, "stepping down on conflicts")


def test_leader_yields_to_a_holder_written_by_someone_else(
    kube: tuple[FakeKubeAPI, Path], candidates: list[Candidate]
) -> None:
    fake, kubeconfig = kube
    only = start(kube, candidates, "coordinator-a")
    wait_until(lambda: only.election.is_leader, 10, "leading")
    coordination = k8s.CoordinationV1Api(api_client(str(kubeconfig)))
    coordination.patch_namespaced_lease(
        LEASE,
        NAMESPACE,
        {"spec": {"holderIdentity": "coordinator-z", "leaseDurationSeconds": 60}},
    )
    wait_until(lambda: "stopped" in only.seen(), 10, "yielding to the other holder")
    assert not only.election.is_leader
    assert holder(fake) == "coordinator-z"
