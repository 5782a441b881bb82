"""The pod watch feeds annotated pods' demand to the tracker, through the official client
talking to the fake API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.cluster import NodeFacts
from coordinator.demand_service import DemandTracker
from coordinator.k8s_backoff import BackoffSettings
from coordinator.k8s_labeler import core_api
from coordinator.k8s_listwatch import ListWatchSettings
from coordinator.k8s_pods import pod_watch
from datacache.localcluster import wait_until
from tests.fakekube import _META_LIST_KEYS, FakeKubeAPI, ResourceType, _str_field

PODS = ResourceType(
    group="",
    version="v1",
    plural="pods",
    kind="Pod",
    namespaced=True,
    list_merge_keys=_META_LIST_KEYS,
    field_selectors={
        "status.phase": _str_field("status.phase"),
        "spec.nodeName": _str_field("spec.nodeName"),
    },
)
NODES = {f"n{i}": NodeFacts(f"n{i}") for i in range(3)}


def trial(name: str, dataset: str | None, phase: str = "Pending") -> dict[str, Any]:
    annotations = {"datacache.io/dataset": dataset} if dataset else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "annotations": annotations},
        "spec": {"containers": [{"name": "t", "image": "trainer"}]},
        "status": {"phase": phase},
    }


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeKubeAPI, Path]]:
    with FakeKubeAPI(resources=[PODS]) as api:
        yield api, api.write_kubeconfig(tmp_path / "kubeconfig")
        assert not api.server_errors, api.server_errors


def test_demand_follows_pods(fake: tuple[FakeKubeAPI, Path]) -> None:
    api, kubeconfig = fake
    api.create_object("pods", trial("before", "data"), namespace="ml")
    api.create_object("pods", trial("plain", None), namespace="ml")
    api.create_object("pods", trial("done", "data", phase="Succeeded"), namespace="ml")
    changes: list[int] = []
    tracker = DemandTracker(on_change=lambda: changes.append(1))
    settings = ListWatchSettings(backoff=BackoffSettings(initial_seconds=0.05, max_seconds=0.2))
    watch = pod_watch(core_api(str(kubeconfig)), tracker, settings)
    watch.start()
    try:

        def trials() -> int:
            demand = tracker.demand(NODES, now=0.0).get("ml/data")
            return demand.trials if demand else 0

        wait_until(lambda: trials() == 1, 10, "the listed pod's demand")
        assert api.wait_for_watchers(1)
        for i in range(3):
            api.create_object("pods", trial(f"t{i}", "ml/data"), namespace="ml")
        wait_until(lambda: trials() == 4, 10, "watched pods' demand")

        v1 = core_api(str(kubeconfig))
        v1.patch_namespaced_pod("t0", "ml", {"status": {"phase": "Succeeded"}})
        wait_until(lambda: trials() == 3, 10, "a finished pod to stop counting")
        api.delete_object("pods", "t1", namespace="ml")
        wait_until(lambda: trials() == 2, 10, "a deleted pod to stop counting")

        api.create_object("pods", trial("after", "data"), namespace="ml")
        wait_until(lambda: trials() == 3, 10, "a bare dataset name to mean the pod's namespace")
        assert tracker.demand(NODES, now=0.0)["ml/data"].nodes == frozenset(NODES)
        assert changes
    finally:
        watch.stop()
