"""Events on Node objects in the fake API server: fixed reasons, reporting controller, folding
of repeats into a count, per-node rate limiting, and never raising."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from coordinator.cluster import EventReason
from coordinator.k8s_events import (
    REPORTING_CONTROLLER,
    EventPlanner,
    EventSettings,
    KubernetesEventSink,
)
from coordinator.k8s_labeler import core_api
from tests.fakekube import FakeKubeAPI


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(fake: FakeKubeAPI) -> list[dict[str, Any]]:
    return fake.list_objects("events", "default")


def test_replica_transitions_become_node_events(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, kubeconfig = kube
    node = fake.add_node("node-1")
    sink = KubernetesEventSink(
        core_api(str(kubeconfig)),
        EventSettings(reporting_instance="coordinator-0"),
        node_uid=lambda name: node["metadata"]["uid"] if name == "node-1" else "",
    )

    async def scenario() -> None:
        await sink.replica_event("node-1", "ml/photos", EventReason.REPLICA_READY, "verified")
        await sink.replica_event("node-1", "ml/photos", EventReason.REPLICA_FAILED, "disk full")
        await sink.replica_event("node-1", "ml/photos", EventReason.REPLICA_EVICTED, "for room")

    asyncio.run(scenario())
    found = sorted(events(fake), key=lambda e: e["reason"])
    assert [(e["reason"], e["type"]) for e in found] == [
        ("ReplicaEvicted", "Normal"),
        ("ReplicaFailed", "Warning"),
        ("ReplicaReady", "Normal"),
    ]
    for event in found:
        assert event["involvedObject"] == {
            "kind": "Node",
            "apiVersion": "v1",
            "name": "node-1",
            "uid": node["metadata"]["uid"],
        }
        assert event["reportingComponent"] == REPORTING_CONTROLLER
        assert event["reportingInstance"] == "coordinator-0"
        assert event["count"] == 1
        assert event["metadata"]["name"].startswith("node-1.")
        assert "ml/photos" in event["message"]


def test_repeats_fold_into_one_event_with_a_count(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, kubeconfig = kube
    fake.add_node("node-1")
    clock = Clock()
    sink = KubernetesEventSink(core_api(str(kubeconfig)), clock=clock)

    async def scenario() -> None:
        for _ in range(3):
            await sink.replica_event("node-1", "a", EventReason.REPLICA_FAILED, "timeout")
            clock.now += 1
        await sink.replica_event("node-1", "b", EventReason.REPLICA_FAILED, "timeout")

    asyncio.run(scenario())
    counts = sorted((e["message"], e["count"]) for e in events(fake))
    assert counts == [("dataset a: timeout", 3), ("dataset b: timeout", 1)]


def test_an_expired_event_is_created_again(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, kubeconfig = kube
    sink = KubernetesEventSink(core_api(str(kubeconfig)))

    async def scenario() -> None:
        await sink.replica_event("node-1", "a", EventReason.REPLICA_READY, "ok")
        (first,) = events(fake)
        fake.delete_object("events", first["metadata"]["name"], "default")
        await sink.replica_event("node-1", "a", EventReason.REPLICA_READY, "ok")

    asyncio.run(scenario())
    (again,) = events(fake)
    assert again["count"] == 1


def test_rate_limit_per_node_refills(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, kubeconfig = kube
    clock = Clock()
    sink = KubernetesEventSink(
        core_api(str(kubeconfig)), EventSettings(burst=2, refill_seconds=10), clock=clock
    )

    async def burst(node: str, tag: str, n: int) -> None:
        for i in range(n):
            await sink.replica_event(node, f"{tag}{i}", EventReason.REPLICA_READY, "ok")

    asyncio.run(burst("node-1", "x", 5))
    assert len(events(fake)) == 2
    asyncio.run(burst("node-2", "x", 1))  # another node has its own bucket
    assert len(events(fake)) == 3
    clock.now += 10
    asyncio.run(burst("node-1", "y", 3))
    assert len(events(fake)) == 4


def test_failures_never_raise(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, kubeconfig = kube
    sink = KubernetesEventSink(core_api(str(kubeconfig)))
    fake.fail_next(1, 403)
    asyncio.run(sink.replica_event("node-1", "a", EventReason.REPLICA_READY, "ok"))
    assert events(fake) == []
    # Not remembered as written: the next one is created, not bumped.
    asyncio.run(sink.replica_event("node-1", "a", EventReason.REPLICA_READY, "ok"))
    assert [e["count"] for e in events(fake)] == [1]


def test_unknown_reasons_are_refused(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, kubeconfig = kube
    sink = KubernetesEventSink(core_api(str(kubeconfig)))
    asyncio.run(sink.replica_event("node-1", "a", "SomethingElse", "?"))
    assert events(fake) == []


@pytest.mark.parametrize("window", [5.0, 60.0])
def test_planner_folds_only_within_the_window(window: float) -> None:
    planner = EventPlanner(EventSettings(dedup_window_seconds=window))
    assert planner.plan("n", "d", "ReplicaReady", "m", 0).action == "create"
    planner.written("n", "d", "ReplicaReady", "m", "n.1", 1, 0)
    plan = planner.plan("n", "d", "ReplicaReady", "m", 10)
    assert plan.action == ("bump" if window > 10 else "create")
