"""Events on Node objects in a real API server, written with the coordinator's own
ServiceAccount token (so its RBAC is proved enough): fixed reasons, reporting controller,
folding of repeats into a count, per-node rate limiting, and never raising."""

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
from datacache.localcluster import wait_until
from tests.conftest import Connect
from tests.kubecontrolplane import KubeAPIError, KubeTest

COORDINATOR_SA = ("datacache", "datacache-coordinator")
EVENTS = "/api/v1/namespaces/default/events"
WAIT = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def coordinator_kubeconfig(kube: KubeTest) -> Path:
    return kube.token_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")


def events(kube: KubeTest) -> list[dict[str, Any]]:
    return list(kube.plane.get(EVENTS)["items"])


def test_replica_transitions_become_node_events(kube: KubeTest, connect: Connect) -> None:
    node = kube.add_node("node-1")
    sink = KubernetesEventSink(
        connect(coordinator_kubeconfig(kube)),
        EventSettings(reporting_instance="coordinator-0"),
        node_uid=lambda name: node["metadata"]["uid"] if name == "node-1" else "",
    )

    async def scenario() -> None:
        await sink.replica_event("node-1", "ml/photos", EventReason.REPLICA_READY, "verified")
        await sink.replica_event("node-1", "ml/photos", EventReason.REPLICA_FAILED, "disk full")
        await sink.replica_event("node-1", "ml/photos", EventReason.REPLICA_EVICTED, "for room")

    asyncio.run(scenario())
    found = sorted(events(kube), key=lambda e: e["reason"])
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
    # What `kubectl describe node` finds: the server selects them by the Node they are about.
    selector = f"involvedObject.kind=Node,involvedObject.uid={node['metadata']['uid']}"
    about = kube.plane.request("GET", EVENTS, query={"fieldSelector": selector})["items"]
    assert len(about) == 3


def test_repeats_fold_into_one_event_with_a_count(kube: KubeTest, connect: Connect) -> None:
    kube.add_node("node-1")
    clock = Clock()
    sink = KubernetesEventSink(connect(coordinator_kubeconfig(kube)), clock=clock)

    async def scenario() -> None:
        for _ in range(3):
            await sink.replica_event("node-1", "a", EventReason.REPLICA_FAILED, "timeout")
            clock.now += 1
        await sink.replica_event("node-1", "b", EventReason.REPLICA_FAILED, "timeout")

    asyncio.run(scenario())
    counts = sorted((e["message"], e["count"]) for e in events(kube))
    assert counts == [("dataset a: timeout", 3), ("dataset b: timeout", 1)]


def test_an_expired_event_is_created_again(kube: KubeTest, connect: Connect) -> None:
    sink = KubernetesEventSink(connect(coordinator_kubeconfig(kube)))

    async def scenario() -> None:
        await sink.replica_event("node-1", "a", EventReason.REPLICA_READY, "ok")
        (first,) = events(kube)
        kube.plane.delete(f"{EVENTS}/{first['metadata']['name']}", missing_ok=False)
        await sink.replica_event("node-1", "a", EventReason.REPLICA_READY, "ok")

    asyncio.run(scenario())
    (again,) = events(kube)
    assert again["count"] == 1


def test_rate_limit_per_node_refills(kube: KubeTest, connect: Connect) -> None:
    clock = Clock()
    sink = KubernetesEventSink(
        connect(coordinator_kubeconfig(kube)),
        EventSettings(burst=2, refill_seconds=10),
        clock=clock,
    )

    async def burst(node: str, tag: str, n: int) -> None:
        for i in range(n):
            await sink.replica_event(node, f"{tag}{i}", EventReason.REPLICA_READY, "ok")

    asyncio.run(burst("node-1", "x", 5))
    assert len(events(kube)) == 2
    asyncio.run(burst("node-2", "x", 1))  # another node has its own bucket
    assert len(events(kube)) == 3
    clock.now += 10
    asyncio.run(burst("node-1", "y", 3))
    assert len(events(kube)) == 4


def _may_create_events(kube: KubeTest, user: str) -> bool:
    review = kube.plane.create(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "resourceAttributes": {
                    "namespace": "default",
                    "verb": "create",
                    "resource": "events",
                },
            },
        },
    )
    return bool(review["status"].get("allowed"))


def test_failures_never_raise(kube: KubeTest, connect: Connect) -> None:
    # A ServiceAccount without the coordinator's role: the API server refuses its write (403).
    token = kube.roleless_token("events-test", "writer")
    with pytest.raises(KubeAPIError) as refused:
        kube.plane.request("POST", EVENTS, {"metadata": {"name": "probe"}}, token=token)
    assert refused.value.status == 403
    proxy = kube.proxy
    sink = KubernetesEventSink(connect(kube.proxied_kubeconfig(token, "writer")))
    asyncio.run(sink.replica_event("node-1", "a", EventReason.REPLICA_READY, "ok"))
    assert events(kube) == []
    assert list(proxy.statuses().values()) == [403]

    # Granted the coordinator's ClusterRole in `default` (node events live there), it may.
    binding = "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings/events-writer"
    kube.plane.create(
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "events-writer"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "datacache-coordinator",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "writer", "namespace": "events-test"}],
        },
    )
    try:
        user = "system:serviceaccount:events-test:writer"
        wait_until(lambda: _may_create_events(kube, user), WAIT, "the RoleBinding to apply")
        # The refused Event was not remembered as written: this one is created, not bumped.
        asyncio.run(sink.replica_event("node-1", "a", EventReason.REPLICA_READY, "ok"))
        assert [e["count"] for e in events(kube)] == [1]
        assert [r.method for r in proxy.requests] == ["POST", "POST"]
    finally:
        kube.plane.delete(binding)


def test_unknown_reasons_are_refused(kube: KubeTest, connect: Connect) -> None:
    proxy = kube.proxy
    sink = KubernetesEventSink(
        connect(kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator"))
    )
    asyncio.run(sink.replica_event("node-1", "a", "SomethingElse", "?"))
    assert events(kube) == []
    assert proxy.requests == []


@pytest.mark.parametrize("window", [5.0, 60.0])
def test_planner_folds_only_within_the_window(window: float) -> None:
    planner = EventPlanner(EventSettings(dedup_window_seconds=window))
    assert planner.plan("n", "d", "ReplicaReady", "m", 0).action == "create"
    planner.written("n", "d", "ReplicaReady", "m", "n.1", 1, 0)
    plan = planner.plan("n", "d", "ReplicaReady", "m", 10)
    assert plan.action == ("bump" if window > 10 else "create")
