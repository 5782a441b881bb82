"""Dataset custom resources <-> the coordinator: the pure translation, the real API server
serving the CRD from manifests/crd-dataset.yaml, and the controller end to end (with the
coordinator's ServiceAccount token, so its RBAC is exercised) against a real coordinator
process labelling real Node objects, real agents and real S3; Datasets made, changed and
deleted with kubectl keep reaching the coordinator across a kube-apiserver restart."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
import yaml
from google.protobuf import field_mask_pb2
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from coordinator.k8s_backoff import BackoffSettings
from coordinator.k8s_dataset_sync import (
    FINALIZER,
    SpecError,
    desired_dataset,
    parse_interval,
    refresh_due_in,
    status_of,
    update_mask,
)
from coordinator.k8s_datasets import DatasetController, DatasetControllerSettings, WorkQueue
from coordinator.k8s_labeler import api_client
from datacache.localcluster import LocalCluster, free_port, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.conftest import kubectl
from tests.faultproxy import Fault, Rule
from tests.kubecontrolplane import KubeAPIError, KubeTest
from tests.test_e2e import dataset_gone, start, upload_dataset

GROUP, VERSION, PLURAL = "datacache.io", "v1alpha1", "datasets"
COORDINATOR_SA = ("datacache", "datacache-coordinator")
WAIT = 60.0
NOW = datetime(2026, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- pure translation


def test_desired_dataset_from_spec() -> None:
    dataset = desired_dataset(
        "ml",
        "photos",
        {
            "source": "s3://b/p/",
            "replicas": 3,
            "nodeSelector": {"gpu": "true"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "credentialsSecretRef": {"name": "s3-ml"},
            "pin": True,
        },
    )
    assert dataset.name == "ml/photos"
    assert (dataset.replicas, dataset.all_nodes, dataset.pin) == (3, False, True)
    assert dict(dataset.node_selector) == {"gpu": "true"}
    assert dataset.tolerations[0] == pb.Toleration(
        key="gpu", operator="Exists", effect="NoSchedule"
    )
    assert dataset.credentials_secret == "s3-ml"
    every = desired_dataset("ml", "x", {"source": "s3://b/", "all": True})
    assert (every.all_nodes, every.replicas) == (True, 0)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"replicas": 1}, "spec.source is required"),
        ({"source": "s3://b/"}, "spec.replicas .* or spec.all"),
        ({"source": "s3://b/", "all": True, "replicas": 2}, "not both"),
        ({"source": "s3://b/", "replicas": 1, "refreshPolicy": {"interval": "10s"}}, "shorter"),
        ({"source": "s3://b/", "replicas": 1, "refreshPolicy": {"interval": "1d"}}, "not a dur"),
    ],
)
def test_invalid_specs_name_the_field(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(SpecError, match=words):
        desired_dataset("ml", "x", spec)


def test_update_mask_lists_only_differences() -> None:
    current = desired_dataset("ml", "x", {"source": "s3://b/", "replicas": 1})
    assert update_mask(current, current) == []
    wanted = desired_dataset(
        "ml", "x", {"source": "s3://b/", "replicas": 2, "nodeSelector": {"a": "b"}}
    )
    assert update_mask(current, wanted) == ["replicas", "node_selector"]
    every = desired_dataset("ml", "x", {"source": "s3://c/", "all": True})
    assert update_mask(current, every) == ["source", "all_nodes"]


def test_intervals_and_refresh_due() -> None:
    assert parse_interval("1h30m") == 5400
    assert parse_interval("90s") == 90
    created = (NOW - timedelta(hours=7)).isoformat()
    assert refresh_due_in(None, None, created, NOW) is None
    assert refresh_due_in("6h", None, created, NOW) == -3600
    last = (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert refresh_due_in("6h", last, created, NOW) == 5 * 3600


def test_status_of_a_dataset_and_stable_transition_times() -> None:
    dataset = pb.Dataset(
        name="ml/x",
        replicas=2,
        revision=3,
        status=pb.DatasetStatus(
            ready_replicas=1,
            version="sha256:abc",
            phase="Replicating",
            replicas=[
                pb.Replica(
                    node_name="n1", state=pb.REPLICA_STATE_READY, bytes_done=10, bytes_total=10
                ),
                pb.Replica(
                    node_name="n2", state=pb.REPLICA_STATE_FETCHING, bytes_done=5, bytes_total=20
                ),
            ],
        ),
    )
    first = status_of(dataset, {}, 4, NOW)
    assert first["phase"] == "Replicating"
    assert first["replicasSummary"] == "1/2"
    assert [r["progress"] for r in first["replicas"]] == ["100%", "25%"]
    assert first["observedGeneration"] == 4
    ready = {c["type"]: c for c in first["conditions"]}
    assert ready["Ready"]["status"] == "False" and ready["Synced"]["status"] == "True"
    later = status_of(dataset, first, 4, NOW + timedelta(minutes=5))
    assert later["conditions"] == first["conditions"]


def test_work_queue_deduplicates_and_keeps_the_earliest_time() -> None:
    clock = [0.0]
    queue = WorkQueue(lambda: clock[0])
    queue.add("a", 5)
    queue.add("a", 1)
    queue.add("a", 3)
    queue.add("b", 0)
    assert queue.get() == "b"
    clock[0] = 1
    assert queue.get() == "a"
    queue.close()
    assert queue.get() is None


# --------------------------------------------------------------------------- the CRD as served


def cr(name: str, spec: dict[str, Any], namespace: str = "ml") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Dataset",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def cr_path(name: str, namespace: str = "ml") -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


def get_cr(kube: KubeTest, name: str) -> dict[str, Any] | None:
    try:
        return dict(kube.plane.get(cr_path(name)))
    except KubeAPIError as exc:
        if exc.status == 404:
            return None
        raise


@contextlib.contextmanager
def custom_api(kubeconfig: Path) -> Iterator[Any]:
    """A CustomObjectsApi, closed afterwards: its pooled connections would otherwise outlive
    the test (some to an API server since restarted) and be garbage collected unclosed."""
    api = k8s.CustomObjectsApi(api_client(str(kubeconfig)))
    try:
        yield api
    finally:
        api.api_client.close()


@pytest.fixture
def admin(kube: KubeTest) -> Iterator[Any]:
    """A user's client (the cluster admin), for the Datasets the tests make."""
    with custom_api(kube.kubeconfig) as api:
        yield api


def test_served_crd_validates_prunes_and_counts_generations(kube: KubeTest, admin: Any) -> None:
    kube.plane.ensure_namespace("ml")
    with pytest.raises(ApiException) as bad:
        admin.create_namespaced_custom_object(
            GROUP, VERSION, "ml", PLURAL, cr("bad", {"source": "ftp://x/", "replicas": 0})
        )
    assert bad.value.status == 422
    assert "spec.replicas" in str(bad.value.body) and "spec.source" in str(bad.value.body)
    # The schema's CEL rules are enforced too.
    with pytest.raises(ApiException) as both:
        admin.create_namespaced_custom_object(
            GROUP,
            VERSION,
            "ml",
            PLURAL,
            cr("both", {"source": "s3://b/", "all": True, "replicas": 1}),
        )
    assert both.value.status == 422 and "not both" in str(both.value.body)

    made = admin.create_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, cr("ok", {"source": "s3://b/", "replicas": 1, "junk": 1})
    )
    assert "junk" not in made["spec"]
    assert made["metadata"]["generation"] == 1
    # Strategic merge patch does not exist for custom resources.
    with pytest.raises(ApiException) as smp:
        admin.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "ml",
            PLURAL,
            "ok",
            {"spec": {"replicas": 2}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert smp.value.status == 415
    patched = admin.patch_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, "ok", {"spec": {"replicas": 2}}
    )
    assert patched["metadata"]["generation"] == 2
    # Status writes do not bump the generation, and spec writes keep the status.
    body = {**patched, "status": {"phase": "Ready"}}
    written: dict[str, Any] = admin.replace_namespaced_custom_object_status(
        GROUP, VERSION, "ml", PLURAL, "ok", body
    )
    assert written["metadata"]["generation"] == 2 and written["status"] == {"phase": "Ready"}
    respecced = admin.patch_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, "ok", {"spec": {"replicas": 3}, "status": {"phase": "x"}}
    )
    assert respecced["metadata"]["generation"] == 3
    assert respecced["status"] == {"phase": "Ready"}
    # Updates must carry a resourceVersion.
    unconditional = dict(respecced)
    unconditional["metadata"] = {
        k: v for k, v in respecced["metadata"].items() if k != "resourceVersion"
    }
    with pytest.raises(ApiException) as rv:
        admin.replace_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "ok", unconditional)
    assert rv.value.status == 422
    # A stale one conflicts.
    stale = {**written, "spec": {"source": "s3://b/", "replicas": 4}}
    with pytest.raises(ApiException) as conflict:
        admin.replace_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "ok", stale)
    assert conflict.value.status == 409
    assert get_cr(kube, "ok") is not None


def watch_versions(kube: KubeTest) -> list[str]:
    """The resourceVersion each watch request through the proxy started from, in order."""
    return [
        parse_qs(urlsplit(r.path).query)["resourceVersion"][0]
        for r in kube.proxy.requests
        if "watch=true" in r.path
    ]


def test_a_cr_watch_cut_mid_stream_resumes_after_its_last_event(kube: KubeTest, admin: Any) -> None:
    kube.plane.ensure_namespace("ml")
    spec = {"source": "s3://b/", "replicas": 1}
    admin.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, cr("a", spec))
    one_event = len(json.dumps({"type": "ADDED", "object": get_cr(kube, "a")}))
    # The first watch is cut (RST) partway through its second event or so.
    cut = Rule(Fault("reset", after_bytes=one_event * 3 // 2), path_contains="watch=true", limit=1)
    kube.proxy.set_rules([cut])
    proxied = kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")
    settings = DatasetControllerSettings(
        resync_seconds=3600, backoff=BackoffSettings(initial_seconds=0.05, max_seconds=0.5)
    )
    # Only the CR watch matters here: no coordinator answers (its calls are retried).
    with (
        custom_api(proxied) as custom,
        grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel,
    ):
        controller = DatasetController(custom, channel, settings)
        controller.start()
        try:
            wait_until(lambda: len(watch_versions(kube)) == 1, WAIT, "the first watch")
            for name in ("b", "c", "d"):
                admin.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, cr(name, spec))
            wait_until(lambda: len(watch_versions(kube)) == 2, WAIT, "the watch to resume")
        finally:
            controller.stop()
    assert cut.matched == 1
    listed, resumed = watch_versions(kube)
    assert int(resumed) > int(listed)


# --------------------------------------------------------------------------- end to end

NODES = ["node-1", "node-2"]
LABEL = "dataset.datacache.io/ml.photos"


def coordinator_kubeconfig(kube: KubeTest) -> Path:
    """The coordinator's ServiceAccount token, straight to the API server."""
    return kube.token_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")


@contextlib.contextmanager
def controller_running(
    cluster: LocalCluster, kubeconfig: Path, settings: DatasetControllerSettings
) -> Iterator[DatasetController]:
    with custom_api(kubeconfig) as api, cluster.channel() as channel:
        controller = DatasetController(api, channel, settings)
        controller.start()
        try:
            yield controller
        finally:
            controller.stop()


def start_coordinator(cluster: LocalCluster, kube: KubeTest) -> None:
    """A coordinator process labelling the Nodes with its ServiceAccount token (the admission
    policy lets only that identity write dataset labels), and one agent per node."""
    start(
        cluster,
        len(NODES),
        coordinator_flags=("--labeler=kubernetes", f"--kubeconfig={coordinator_kubeconfig(kube)}"),
    )


@pytest.fixture
def controlled(cluster: LocalCluster, kube: KubeTest) -> Iterator[DatasetController]:
    """The controller with the coordinator's token through the fault proxy (so a test can
    make status writes conflict)."""
    kube.plane.ensure_namespace("ml")
    for node in NODES:
        kube.add_node(node, labels={"team": "ml"})
    upload_dataset(cluster, "crd-photos", "photos/")
    start_coordinator(cluster, kube)
    settings = DatasetControllerSettings(
        resync_seconds=2,
        deletion_poll_seconds=0.5,
        backoff=BackoffSettings(initial_seconds=0.05, max_seconds=0.5),
    )
    proxied = kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")
    with controller_running(cluster, proxied, settings) as controller:
        yield controller


def status(kube: KubeTest, name: str = "photos") -> dict[str, Any]:
    obj = get_cr(kube, name)
    return {} if obj is None else dict(obj.get("status") or {})


def labelled(kube: KubeTest) -> set[str]:
    return {node for node in NODES if kube.node_labels(node).get(LABEL) == "ready"}


def scale_behind_the_crs_back(cluster: LocalCluster) -> None:
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).UpdateDataset(
            pb.UpdateDatasetRequest(
                dataset=pb.Dataset(name="ml/photos", replicas=1),
                update_mask=field_mask_pb2.FieldMask(paths=["replicas"]),
            ),
            timeout=10,
        )


def test_crd_create_scale_status_and_ordered_delete(
    cluster: LocalCluster, kube: KubeTest, controlled: DatasetController, admin: Any
) -> None:
    admin.create_namespaced_custom_object(
        GROUP,
        VERSION,
        "ml",
        PLURAL,
        cr("photos", {"source": "s3://crd-photos/photos/", "replicas": 1}),
    )
    wait_until(lambda: not dataset_gone(cluster, "ml/photos"), WAIT, "the dataset to be created")
    wait_until(
        lambda: FINALIZER in ((get_cr(kube, "photos") or {})["metadata"].get("finalizers") or []),
        WAIT,
        "the finalizer",
    )

    wait_until(lambda: status(kube).get("phase") == "Ready", WAIT, "status Ready")
    first = status(kube)
    assert first["readyReplicas"] == 1
    assert first["version"].startswith("sha256:")
    assert [r["state"] for r in first["replicas"]] == ["Ready"]
    assert first["replicas"][0]["progress"] == "100%"
    assert first["observedGeneration"] == 1
    wait_until(lambda: len(labelled(kube)) == 1, WAIT, "one labelled node")

    admin.patch_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, "photos", {"spec": {"replicas": 2}}
    )
    wait_until(lambda: cluster.get_dataset("ml/photos").replicas == 2, WAIT, "scaled dataset")
    wait_until(
        lambda: (
            status(kube).get("readyReplicas") == 2 and status(kube).get("observedGeneration") == 2
        ),
        WAIT,
        "two ready replicas in the status",
    )
    assert status(kube)["replicasSummary"] == "2/2"
    wait_until(lambda: labelled(kube) == set(NODES), WAIT, "both nodes labelled")

    # A change made behind the CR's back is reverted: the CR owns its dataset.
    scale_behind_the_crs_back(cluster)
    wait_until(lambda: cluster.get_dataset("ml/photos").replicas == 2, WAIT, "the CR's count back")

    admin.delete_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "photos")
    # Held by the finalizer until the coordinator has deleted the dataset, labels first.
    held = get_cr(kube, "photos")
    assert held is not None and held["metadata"].get("deletionTimestamp")
    wait_until(lambda: get_cr(kube, "photos") is None, WAIT, "CR removed")
    assert dataset_gone(cluster, "ml/photos")
    assert labelled(kube) == set()


def test_rejected_spec_and_status_conflicts(
    cluster: LocalCluster, kube: KubeTest, controlled: DatasetController, admin: Any
) -> None:
    # Valid for the schema, refused by the coordinator: reported on the CR, nothing created.
    admin.create_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, cr("bad", {"source": "nfs://server/", "replicas": 1})
    )

    def synced(name: str) -> dict[str, Any]:
        return next(
            (c for c in status(kube, name).get("conditions", []) if c["type"] == "Synced"), {}
        )

    wait_until(lambda: synced("bad").get("status") == "False", WAIT, "a Synced=False condition")
    assert "INVALID_ARGUMENT" in synced("bad")["message"]
    assert dataset_gone(cluster, "ml/bad")

    # Status writes that hit 409 are re-read and retried.
    conflicts = Rule(
        Fault("answer", status=409), method="PUT", path_contains="/datasets/ok/status", limit=3
    )
    kube.proxy.set_rules([conflicts])
    admin.create_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, cr("ok", {"source": "s3://crd-photos/photos/", "replicas": 1})
    )
    wait_until(lambda: status(kube, "ok").get("phase") == "Ready", WAIT, "status despite 409s")
    assert conflicts.matched == 3

    # Deleting a CR whose dataset never existed just removes the finalizer.
    admin.delete_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "bad")
    wait_until(lambda: get_cr(kube, "bad") is None, WAIT, "bad CR removed")
    with pytest.raises(grpc.RpcError):
        cluster.get_dataset("ml/bad")


def test_interval_refresh_starts_a_new_revision(
    cluster: LocalCluster, kube: KubeTest, controlled: DatasetController, admin: Any
) -> None:
    spec = {"source": "s3://crd-photos/photos/", "replicas": 1, "refreshPolicy": {"interval": "1h"}}
    admin.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, cr("fresh", spec))
    wait_until(lambda: status(kube, "fresh").get("revision", 0) >= 1, WAIT, "a first revision")
    first = cluster.get_dataset("ml/fresh").revision
    assert "lastRefreshTime" not in status(kube, "fresh")  # created just now: not due

    # The last refresh was two hours ago: due now. A merge patch of the status subresource
    # needs no resourceVersion, so it cannot lose a race with the controller's own writes.
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.plane.patch(f"{cr_path('fresh')}/status", {"status": {"lastRefreshTime": two_hours_ago}})
    wait_until(lambda: cluster.get_dataset("ml/fresh").revision == first + 1, WAIT, "a refresh")

    def recorded_recently() -> bool:
        text = status(kube, "fresh").get("lastRefreshTime", "")
        recorded = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return datetime.now(UTC) - recorded < timedelta(minutes=1)

    wait_until(recorded_recently, WAIT, "the refresh time recorded in the status")
    # Only once: the next is an hour away.
    assert cluster.get_dataset("ml/fresh").revision == first + 1


def test_kubectl_datasets_reach_the_coordinator_across_an_api_server_restart(
    cluster: LocalCluster, kube: KubeTest
) -> None:
    kube.plane.ensure_namespace("ml")
    kube.add_node("node-1", labels={"team": "ml"})
    kube.add_node("node-2")
    upload_dataset(cluster, "crd-photos", "photos/")
    start_coordinator(cluster, kube)
    # No periodic resync within the test: only the watches can bring a change.
    settings = DatasetControllerSettings(
        resync_seconds=3600,
        deletion_poll_seconds=0.5,
        backoff=BackoffSettings(initial_seconds=0.05, max_seconds=1.0),
    )
    spec = {"source": "s3://crd-photos/photos/", "replicas": 1, "nodeSelector": {"team": "ml"}}
    with controller_running(cluster, coordinator_kubeconfig(kube), settings):
        kubectl(kube.kubeconfig, "apply", "-f", "-", input=yaml.safe_dump(cr("photos", spec)))
        wait_until(lambda: status(kube).get("phase") == "Ready", WAIT, "status Ready")
        wait_until(lambda: labelled(kube) == {"node-1"}, WAIT, "node-1 labelled")
        assert status(kube)["replicasSummary"] == "1/1"

        kube.plane.restart_apiserver()

        # Seen only through the coordinator's Node watch: node-2 now matches the selector.
        kube.plane.patch("/api/v1/nodes/node-2", {"metadata": {"labels": {"team": "ml"}}})
        # Seen only through the controller's Dataset watch.
        kubectl(
            kube.kubeconfig,
            "patch",
            "dataset",
            "photos",
            "-n",
            "ml",
            "--type=merge",
            "-p",
            json.dumps({"spec": {"replicas": 2}}),
        )
        wait_until(
            lambda: cluster.get_dataset("ml/photos").replicas == 2, WAIT, "the change to arrive"
        )
        wait_until(
            lambda: (
                status(kube).get("readyReplicas") == 2
                and status(kube).get("observedGeneration") == 2
            ),
            WAIT,
            "the status written after the restart",
        )
        wait_until(lambda: labelled(kube) == set(NODES), WAIT, "node-2 labelled")
        shown = kubectl(kube.kubeconfig, "get", "dataset", "photos", "-n", "ml").stdout
        assert shown.split("\n")[1].split()[2:4] == ["2/2", "Ready"], shown

        kubectl(kube.kubeconfig, "delete", "dataset", "photos", "-n", "ml", "--wait=false")
        wait_until(lambda: get_cr(kube, "photos") is None, WAIT, "the CR removed")
        assert dataset_gone(cluster, "ml/photos")
        assert labelled(kube) == set()
