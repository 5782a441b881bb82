"""Two coordinator processes campaigning for the real Lease `datacache/datacache-coordinator`
as the coordinator's ServiceAccount, with the shipped election timing (15s lease duration,
2s retry period): exactly one leads and the other answers UNAVAILABLE; a SIGKILLed leader is
replaced once its Lease has expired, a SIGTERMed one hands over at once because it releases
the Lease on the way out."""

from __future__ import annotations

import logging
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.k8s_leader import LeaderElectionSettings
from datacache.localcluster import LocalCluster, Process, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.kubecontrolplane import KubeTest

log = logging.getLogger(__name__)
NAMESPACE, LEASE = "datacache", "datacache-coordinator"
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{LEASE}"
ELECTION = LeaderElectionSettings()
"""The coordinator runs with the default timing (there is no flag for it)."""
# The official client waits retry_period times a jitter of up to 1.2 between attempts.
LONGEST_RETRY = ELECTION.retry_period_seconds * 1.2
WAIT = 60.0
"""Bound for cross-process waits on a shared two-core machine."""
# Coordinators are stopped with SIGTERM and given this long to release the Lease and exit.
STOP_GRACE = 30.0


class Coordinator:
    """A `datacache-coordinator` process with --labeler=kubernetes and --leader-elect."""

    def __init__(self, process: Process, address: str, identity: str) -> None:
        self.process = process
        self.address = address
        self.identity = identity

    def list_code(self) -> grpc.StatusCode:
        """How a DatasetService call ends: OK on the leader, UNAVAILABLE on a follower."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                pb_grpc.DatasetServiceStub(channel).ListDatasets(
                    pb.ListDatasetsRequest(), timeout=10
                )
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    def leads(self) -> bool:
        assert self.process.alive(), self.process.log_tail()
        return self.list_code() == grpc.StatusCode.OK


@pytest.fixture
def local(kube: KubeTest, tmp_path: Path) -> Iterator[LocalCluster]:
    """The coordinators' processes; stopped before the kube fixture's cleanup deletes the
    Lease, so none recreates it."""
    with LocalCluster(tmp_path / "processes") as cluster:
        yield cluster


def start_coordinator(kube: KubeTest, local: LocalCluster, identity: str) -> Coordinator:
    binary = shutil.which("datacache-coordinator")
    assert binary is not None, "datacache-coordinator is not installed: pip install -e ."
    kubeconfig = kube.token_kubeconfig(kube.token(NAMESPACE, "datacache-coordinator"), identity)
    port_file = local.workdir / f"{identity}.port"
    process = local.spawn(
        identity,
        [
            binary,
            "--listen=127.0.0.1:0",
            f"--port-file={port_file}",
            f"--db-path={local.workdir / identity}.db",
            "--metrics-port=0",
            "--log-format=json",
            "--labeler=kubernetes",
            f"--kubeconfig={kubeconfig}",
            f"--namespace={NAMESPACE}",
            "--leader-elect",
            f"--leader-election-identity={identity}",
        ],
        stop_grace=STOP_GRACE,
    )

    def serving() -> bool:
        assert process.alive(), process.log_tail()
        return port_file.exists()

    wait_until(serving, WAIT, f"{identity} to serve")
    return Coordinator(process, f"127.0.0.1:{port_file.read_text().strip()}", identity)


def lease(kube: KubeTest) -> dict[str, Any]:
    return dict(kube.plane.get(LEASE_PATH))


def lease_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def assert_follows(follower: Coordinator) -> None:
    """A follower is Ready (health SERVING) but sends API callers to the leader."""
    with grpc.insecure_channel(follower.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.DatasetServiceStub(channel).ListDatasets(pb.ListDatasetsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not the leader" in (refused.value.details() or "")


def leader_and_follower(kube: KubeTest, local: LocalCluster) -> tuple[Coordinator, Coordinator]:
    """coordinator-a leads (it created the Lease), coordinator-b follows; checked over a few
    renewals, so the roles are stable rather than seen once."""
    first = start_coordinator(kube, local, "coordinator-a")
    wait_until(first.leads, WAIT, "coordinator-a to lead")
    created = lease(kube)
    assert created["spec"]["holderIdentity"] == "coordinator-a"
    assert created["spec"]["leaseDurationSeconds"] == ELECTION.lease_duration_seconds
    second = start_coordinator(kube, local, "coordinator-b")
    assert_follows(second)

    def renewed_twice() -> bool:
        current = lease(kube)
        assert current["spec"]["holderIdentity"] == "coordinator-a"
        assert first.list_code() == grpc.StatusCode.OK
        assert second.list_code() == grpc.StatusCode.UNAVAILABLE
        versions.add(current["metadata"]["resourceVersion"])
        return len(versions) >= 3

    versions = {created["metadata"]["resourceVersion"]}
    wait_until(renewed_twice, WAIT, "two renewals by coordinator-a")
    return first, second


def test_two_coordinators_one_leads_and_a_sigkilled_leader_is_replaced(
    kube: KubeTest, local: LocalCluster
) -> None:
    first, second = leader_and_follower(kube, local)

    # Killed: no release, so the follower must wait until the Lease has expired.
    first.process.kill()
    killed_at = time.monotonic()
    left = lease(kube)
    assert left["spec"]["holderIdentity"] == "coordinator-a"
    last_renewal = lease_time(left["spec"]["renewTime"])
    wait_until(second.leads, ELECTION.lease_duration_seconds + WAIT, "coordinator-b to lead")
    takeover = time.monotonic() - killed_at
    log.info("takeover %.1fs after SIGKILL of the leader", takeover)
    taken = lease(kube)
    assert taken["spec"]["holderIdentity"] == "coordinator-b"
    # Never before the Lease expired: the follower took it a full lease duration after the
    # last renewal at the earliest (both times come from this machine's clock).
    waited = (lease_time(taken["spec"]["acquireTime"]) - last_renewal).total_seconds()
    assert waited >= ELECTION.lease_duration_seconds, f"took over {waited:.1f}s after renewal"
    # And soon after: the follower notices at its next attempt, and saw the last renewal at
    # most one attempt late. The rest is slack for a loaded machine.
    bound = ELECTION.lease_duration_seconds + 2 * LONGEST_RETRY + 10
    assert takeover <= bound, f"takeover took {takeover:.1f}s (bound {bound:.0f}s)"
    second.process.stop()


def test_a_sigtermed_leader_releases_the_lease_and_hands_over_at_once(
    kube: KubeTest, local: LocalCluster
) -> None:
    first, second = leader_and_follower(kube, local)

    terminated_at = time.monotonic()
    first.process.popen.send_signal(signal.SIGTERM)
    assert first.process.popen.wait(STOP_GRACE) == 0, first.process.log_tail()
    exited_at = time.monotonic()
    # Released on the way out: the holder is empty, or the follower has already taken the
    # free Lease. An unreleased Lease would still name coordinator-a for up to 15s.
    released = lease(kube)
    assert released["spec"].get("holderIdentity") in ("", None, "coordinator-b"), released
    output = first.process.log_path.read_text()
    assert "released by coordinator-a" in output
    assert "release refused" not in output and "release failed" not in output

    wait_until(second.leads, WAIT, "coordinator-b to lead")
    handover = time.monotonic() - terminated_at
    log.info("handover %.1fs after SIGTERM to the leader", handover)
    assert lease(kube)["spec"]["holderIdentity"] == "coordinator-b"
    # The follower takes a released Lease at its next attempt, at most a retry period (with
    # jitter) after the release; 3s of slack for the check itself on a loaded machine.
    after_exit = time.monotonic() - exited_at
    assert after_exit <= LONGEST_RETRY + 3, f"led {after_exit:.1f}s after the leader exited"
    assert handover < ELECTION.lease_duration_seconds / 2, f"handover took {handover:.1f}s"
    second.process.stop()
