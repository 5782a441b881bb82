"""Dataset custom resources <-> the coordinator: the pure translation, the fake API server
serving the CRD from manifests/crd-dataset.yaml, and the controller end to end against a real
coordinator process (labelling fake Node objects), real agents and real S3."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
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
from datacache.localcluster import LocalCluster, wait_until
from datacache.v1 import datacache_pb2 as pb
from tests.fakekube import FakeKubeAPI, custom_resource
from tests.test_e2e import dataset_gone, start, upload_dataset

CRD_PATH = Path(__file__).resolve().parent.parent / "manifests" / "crd-dataset.yaml"
CRD = yaml.safe_load(CRD_PATH.read_text())
DATASETS = custom_resource(CRD)
GROUP, VERSION, PLURAL = "datacache.io", "v1alpha1", "datasets"
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


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeKubeAPI, Path]]:
    with FakeKubeAPI(resources=[DATASETS]) as server:
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")
        assert not server.server_errors, server.server_errors


def cr(name: str, spec: dict[str, Any], namespace: str = "ml") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Dataset",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def test_served_crd_validates_prunes_and_counts_generations(
    fake: tuple[FakeKubeAPI, Path],
) -> None:
    server, kubeconfig = fake
    api: Any = k8s.CustomObjectsApi(api_client(str(kubeconfig)))
    with pytest.raises(ApiException) as bad:
        api.create_namespaced_custom_object(
            GROUP, VERSION, "ml", PLURAL, cr("bad", {"source": "ftp://x/", "replicas": 0})
        )
    assert bad.value.status == 422
    assert "spec.replicas" in str(bad.value.body) and "spec.source" in str(bad.value.body)

    made = api.create_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, cr("ok", {"source": "s3://b/", "replicas": 1, "junk": 1})
    )
    assert "junk" not in made["spec"]
    assert made["metadata"]["generation"] == 1
    # Strategic merge patch does not exist for custom resources.
    with pytest.raises(ApiException) as smp:
        api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "ml",
            PLURAL,
            "ok",
            {"spec": {"replicas": 2}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert smp.value.status == 415
    patched = api.patch_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, "ok", {"spec": {"replicas": 2}}
    )
    assert patched["metadata"]["generation"] == 2
    # Status writes do not bump the generation, and spec writes keep the status.
    body = {**patched, "status": {"phase": "Ready"}}
    written: dict[str, Any] = api.replace_namespaced_custom_object_status(
        GROUP, VERSION, "ml", PLURAL, "ok", body
    )
    assert written["metadata"]["generation"] == 2 and written["status"] == {"phase": "Ready"}
    # Updates must carry a resourceVersion.
    unconditional = dict(written)
    unconditional["metadata"] = {
        k: v for k, v in written["metadata"].items() if k != "resourceVersion"
    }
    with pytest.raises(ApiException) as rv:
        api.replace_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, "ok", unconditional)
    assert rv.value.status == 422
    assert server.get_object("datasets", "ok", "ml") is not None


# --------------------------------------------------------------------------- end to end

NODES = ["node-1", "node-2"]
LABEL = "dataset.datacache.io/ml.photos"


@pytest.fixture
def controlled(
    cluster: LocalCluster, fake: tuple[FakeKubeAPI, Path]
) -> Iterator[tuple[FakeKubeAPI, Any, DatasetController]]:
    server, kubeconfig = fake
    for node in NODES:
        server.add_node(node, labels={"team": "ml"})
    upload_dataset(cluster, "crd-photos", "photos/")
    start(
        cluster,
        len(NODES),
        coordinator_flags=("--labeler=kubernetes", f"--kubeconfig={kubeconfig}"),
    )
    api: Any = k8s.CustomObjectsApi(api_client(str(kubeconfig)))
    with cluster.channel() as channel:
        controller = DatasetController(
            api,
            channel,
            DatasetControllerSettings(
                resync_seconds=2,
                deletion_poll_seconds=0.5,
                backoff=BackoffSettings(initial_seconds=0.05, max_seconds=0.5),
            ),
        )
        controller.start()
        try:
            yield server, api, controller
        finally:
            controller.stop()


def status(server: FakeKubeAPI, name: str = "photos") -> dict[str, Any]:
    obj = server.get_object("datasets", name, "ml")
    return {} if obj is None else dict(obj.get("status") or {})


def labelled(server: FakeKubeAPI) -> set[str]:
    found = set()
    for node in NODES:
        obj = server.get_node(node)
        if obj is not None and obj["metadata"].get("labels", {}).get(LABEL) == "ready":
            found.add(node)
    return found


def test_crd_create_scale_status_and_ordered_delete(
    cluster: LocalCluster, controlled: tuple[FakeKubeAPI, Any, DatasetController]
) -> None:
    server, api, _ = controlled
    api.create_namespaced_custom_object(
        GROUP,
        VERSION,
        "ml",
        PLURAL,
        cr("photos", {"source": "s3://crd-photos/photos/", "replicas": 1}),
    )
    wait_until(lambda: not dataset_gone(cluster, "ml/photos"), 20, "the dataset to be created")
    obj = server.get_object("datasets", "photos", "ml")
    assert obj is not None and FINALIZER in obj["metadata"]["finalizers"]

    wait_until(lambda: status(server).get("phase") == "Ready", 60, "status Ready")
    first = status(server)
    assert first["readyReplicas"] == 1
    assert first["version"].startswith("sha256:")
    assert [r["state"] for r in first["replicas"]] == ["Ready"]
    assert first["replicas"][0]["progress"] == "100%"
    assert first["observedGeneration"] == 1
    wait_until(lambda: len(labelled(server)) == 1, 20, "one labelled node")

    api.patch_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, "photos", {"spec": {"replicas": 2}}
    )
    wait_until(lambda: cluster.get_dataset("ml/photos").replicas == 2, 20, "scaled dataset")
    wait_until(
        lambda: (
            status(server).get("readyReplicas") == 2
            and status(server).get("observedGeneration") == 2
        ),
        60,
        "two ready replicas in the status",
    )
    assert status(server)["replicasSummary"] == "2/2"
    wait_until(lambda: labelled(server) == set(NODES), 20, "both nodes labelled")

    # A change made behind the CR's back is reverted: the CR owns its dataset.
    with cluster.channel() as channel:
        from google.protobuf import field_mask_pb2

        from datacache.v1 import datacache_pb2_grpc as pb_grpc

        pb_grpc.DatasetServiceStub(channel).UpdateDataset(
            pb.UpdateDatasetRequest(
                dataset=pb.Dataset(name="ml/photos", replicas=1),
                update_mask=field_mask_pb2.FieldMask(paths=["replicas"]),
            ),
            timeout=10,
        )
    wait_until(lambda: cluster.get_dataset("ml/photos").replicas == 2, 20, "the CR's count back")

    server.delete_object("datasets", "photos", "ml")
    # Held by the finalizer until the coordinator has deleted the dataset, labels first.
    held = server.get_object("datasets", "photos", "ml")
    assert held is not None and held["metadata"].get("deletionTimestamp")
    wait_until(lambda: server.get_object("datasets", "photos", "ml") is None, 60, "CR removed")
    assert dataset_gone(cluster, "ml/photos")
    assert labelled(server) == set()


def test_rejected_spec_and_status_conflicts(
    cluster: LocalCluster, controlled: tuple[FakeKubeAPI, Any, DatasetController]
) -> None:
    server, api, _ = controlled
    # Valid for the schema, refused by the coordinator: reported on the CR, nothing created.
    api.create_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, cr("bad", {"source": "nfs://server/", "replicas": 1})
    )

    def synced(name: str) -> dict[str, Any]:
        return next(
            (c for c in status(server, name).get("conditions", []) if c["type"] == "Synced"), {}
        )

    wait_until(lambda: synced("bad").get("status") == "False", 20, "a Synced=False condition")
    assert "INVALID_ARGUMENT" in synced("bad")["message"]
    assert dataset_gone(cluster, "ml/bad")

    # Status writes that hit 409 are re-read and retried.
    api.create_namespaced_custom_object(
        GROUP, VERSION, "ml", PLURAL, cr("ok", {"source": "s3://crd-photos/photos/", "replicas": 1})
    )
    server.inject_conflicts("datasets", name="ok", namespace="ml", count=3)
    wait_until(lambda: status(server, "ok").get("phase") == "Ready", 60, "status despite 409s")

    # Deleting a CR whose dataset never existed just removes the finalizer.
    server.delete_object("datasets", "bad", "ml")
    wait_until(lambda: server.get_object("datasets", "bad", "ml") is None, 20, "bad CR removed")
    with pytest.raises(grpc.RpcError):
        cluster.get_dataset("ml/bad")


def test_interval_refresh_starts_a_new_revision(
    cluster: LocalCluster, controlled: tuple[FakeKubeAPI, Any, DatasetController]
) -> None:
    server, api, _ = controlled
    spec = {"source": "s3://crd-photos/photos/", "replicas": 1, "refreshPolicy": {"interval": "1h"}}
    api.create_namespaced_custom_object(GROUP, VERSION, "ml", PLURAL, cr("fresh", spec))
    wait_until(lambda: status(server, "fresh").get("revision", 0) >= 1, 30, "a first revision")
    first = cluster.get_dataset("ml/fresh").revision
    assert "lastRefreshTime" not in status(server, "fresh")  # created just now: not due

    # The last refresh was two hours ago: due now.
    obj = server.get_object("datasets", "fresh", "ml")
    assert obj is not None
    obj["status"]["lastRefreshTime"] = (datetime.now(UTC) - timedelta(hours=2)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    api.replace_namespaced_custom_object_status(GROUP, VERSION, "ml", PLURAL, "fresh", obj)
    wait_until(lambda: cluster.get_dataset("ml/fresh").revision == first + 1, 30, "a refresh")

    def recorded_recently() -> bool:
        text = status(server, "fresh").get("lastRefreshTime", "")
        recorded = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return datetime.now(UTC) - recorded < timedelta(minutes=1)

    wait_until(recorded_recently, 10, "the refresh time recorded in the status")
    # Only once: the next is an hour away.
    assert cluster.get_dataset("ml/fresh").revision == first + 1
