"""The pod watch feeds annotated pods' demand to the tracker, through the official client
talking to a real API server with the coordinator's ServiceAccount token (RBAC: pods list and
watch); pods are real (no kubelet runs them: phases are set through the status subresource).
A watch cut mid-stream resumes after the last event it delivered; when the API server has
forgotten that version (410 Gone, here after an API server restart), the watch lists again
and carries on."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from coordinator.cluster import NodeFacts
from coordinator.demand_service import DemandTracker
from coordinator.k8s_backoff import BackoffSettings
from coordinator.k8s_listwatch import ListWatch, ListWatchSettings
from coordinator.k8s_pods import pod_watch
from datacache.localcluster import wait_until
from tests.conftest import Connect
from tests.faultproxy import Fault, Rule
from tests.kubecontrolplane import KubeTest

NODES = {f"n{i}": NodeFacts(f"n{i}") for i in range(3)}
COORDINATOR_SA = ("datacache", "datacache-coordinator")
PODS = "/api/v1/namespaces/ml/pods"
WAIT = 30.0
FAST = ListWatchSettings(backoff=BackoffSettings(initial_seconds=0.05, max_seconds=0.5))


def trial(name: str, dataset: str | None) -> dict[str, Any]:
    annotations = {"datacache.io/dataset": dataset} if dataset else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "annotations": annotations},
        "spec": {"containers": [{"name": "t", "image": "trainer"}]},
    }


def create_pod(kube: KubeTest, name: str, dataset: str | None) -> None:
    kube.plane.create(PODS, trial(name, dataset))


def set_phase(kube: KubeTest, name: str, phase: str) -> None:
    """What a kubelet reports: the pod's phase, through the status subresource."""
    kube.plane.patch(f"{PODS}/{name}/status", {"status": {"phase": phase}})


def trials(tracker: DemandTracker) -> int:
    demand = tracker.demand(NODES, now=0.0).get("ml/data")
    return demand.trials if demand else 0


@pytest.fixture
def tracked(kube: KubeTest) -> Iterator[tuple[DemandTracker, list[int]]]:
    kube.plane.ensure_namespace("ml")
    changes: list[int] = []
    yield DemandTracker(on_change=lambda: changes.append(1)), changes


def started(watch: ListWatch) -> ListWatch:
    watch.start()
    return watch


def test_demand_follows_pods(
    kube: KubeTest, tracked: tuple[DemandTracker, list[int]], connect: Connect
) -> None:
    tracker, changes = tracked
    create_pod(kube, "before", "data")
    create_pod(kube, "plain", None)
    create_pod(kube, "done", "data")
    set_phase(kube, "done", "Succeeded")
    proxied = kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")
    watch = started(pod_watch(connect(proxied), tracker, FAST))
    try:
        wait_until(lambda: trials(tracker) == 1, WAIT, "the listed pod's demand")
        wait_until(
            lambda: any("watch=true" in r.path for r in kube.proxy.active()), WAIT, "the watch"
        )
        # Finished pods are left out by the server (field selector), not by the watch.
        (listing,) = [r for r in kube.proxy.requests if "watch=true" not in r.path]
        assert "fieldSelector=status.phase" in listing.path
        for i in range(3):
            create_pod(kube, f"t{i}", "ml/data")
        wait_until(lambda: trials(tracker) == 4, WAIT, "watched pods' demand")

        set_phase(kube, "t0", "Succeeded")
        wait_until(lambda: trials(tracker) == 3, WAIT, "a finished pod to stop counting")
        kube.plane.delete(f"{PODS}/t1", missing_ok=False)
        wait_until(lambda: trials(tracker) == 2, WAIT, "a deleted pod to stop counting")

        create_pod(kube, "after", "data")
        wait_until(
            lambda: trials(tracker) == 3, WAIT, "a bare dataset name to mean the pod's namespace"
        )
        assert tracker.demand(NODES, now=0.0)["ml/data"].nodes == frozenset(NODES)
        assert changes
        assert watch.lists == 1
    finally:
        watch.stop()


def watch_versions(kube: KubeTest) -> list[str]:
    """The resourceVersion each watch request through the proxy resumed from, in order."""
    return [
        parse_qs(urlsplit(r.path).query)["resourceVersion"][0]
        for r in kube.proxy.requests
        if "watch=true" in r.path
    ]


def test_a_watch_cut_mid_stream_resumes_after_its_last_event(
    kube: KubeTest, tracked: tuple[DemandTracker, list[int]], connect: Connect
) -> None:
    tracker, _ = tracked
    create_pod(kube, "before", "data")
    one_event = len(json.dumps({"type": "ADDED", "object": kube.plane.get(f"{PODS}/before")}))
    # The first watch is cut (RST) partway through its second event or so, as a dropped
    # connection does.
    cut = Rule(Fault("reset", after_bytes=one_event * 3 // 2), path_contains="watch=true", limit=1)
    kube.proxy.set_rules([cut])
    proxied = kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")
    watch = started(pod_watch(connect(proxied), tracker, FAST))
    try:
        wait_until(lambda: trials(tracker) == 1, WAIT, "the listed pod's demand")
        wait_until(lambda: len(watch_versions(kube)) == 1, WAIT, "the first watch")
        for i in range(3):
            create_pod(kube, f"t{i}", "data")
        wait_until(lambda: trials(tracker) == 4, WAIT, "every pod's demand despite the cut")
        wait_until(lambda: len(watch_versions(kube)) == 2, WAIT, "the watch to resume")
        assert cut.matched == 1
        listed, resumed = watch_versions(kube)
        # From the last event it delivered, not from the list again: nothing is replayed,
        # and a version the server has forgotten meanwhile cannot turn the cut into a relist.
        assert int(resumed) > int(listed)
        assert watch.lists == 1
    finally:
        watch.stop()


def test_watch_lists_again_after_410_gone(
    kube: KubeTest,
    tracked: tuple[DemandTracker, list[int]],
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker, _ = tracked
    caplog.set_level(logging.INFO, logger="coordinator.k8s_listwatch")
    create_pod(kube, "before", "data")
    coordinator = kube.token_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")
    watch = started(pod_watch(connect(coordinator), tracker, FAST))
    try:
        wait_until(lambda: trials(tracker) == 1, WAIT, "the listed pod's demand")
        create_pod(kube, "watched", "data")
        wait_until(lambda: trials(tracker) == 2, WAIT, "a watched pod's demand")
        # The cluster moves on without a pod event: the watch's last version is now behind.
        kube.plane.create(
            "/api/v1/namespaces/ml/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unrelated"}},
        )
        assert watch.lists == 1
        # A restarted API server's watch cache starts at the current version and answers a
        # watch resuming from an older one with 410 Gone (as after an etcd compaction).
        kube.plane.restart_apiserver(kill=True)
        wait_until(lambda: watch.lists == 2, 60, "the watch to list again after 410 Gone")
        assert "pod watch expired (410); listing again" in caplog.messages
        create_pod(kube, "later", "data")
        wait_until(lambda: trials(tracker) == 3, WAIT, "a pod made after the relist")
        set_phase(kube, "before", "Failed")
        wait_until(lambda: trials(tracker) == 2, WAIT, "a pod finished after the relist")
        assert watch.lists == 2
    finally:
        watch.stop()
