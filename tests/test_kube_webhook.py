"""The pod admission webhook as a cluster uses it: a real coordinator process (Kubernetes
labeler, leader election, its ServiceAccount) serves it over TLS, and the real API server calls
it as manifests/examples/webhook.yaml registers it (same rules, namespaceSelector,
matchConditions, failurePolicy, timeout and side effects; only clientConfig differs: a URL on
loopback, which a Service cannot route to, and the serving certificate's CA as caBundle).

Pods are created through the API server with kubectl, and the outage behaviour the example's
comments promise is checked with the coordinator stopped and hung."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.labels import label_key
from coordinator.webhook import PATH
from datacache.localcluster import LocalCluster, Process, free_port, wait_until
from datacache.podspec import volume_name
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.conftest import kubectl
from tests.kubecontrolplane import KubeAPIError, KubeTest
from tests.test_webhook import dataset_volumes, pods_path, register_webhook
from tests.tlscerts import CertificateAuthority

ML = "ml"
"""The trials' namespace: unlabelled, so Pod Security allows the hostPath volume."""
DATASET = "ml/imagenet"
CACHE_DIR = "/srv/cache"
"""The coordinator's --node-cache-dir: where the hostPath volumes point."""
WEBHOOK_NAME = "pods.datacache.io"
TIMEOUT_SECONDS = 5
"""The example's timeoutSeconds."""
WAIT = 60.0
"""Bound for cross-process waits on a shared two-core machine."""


@dataclass
class Deployment:
    """The coordinator with its webhook, and how to start it again the same way."""

    kube: KubeTest
    local: LocalCluster
    cert_file: Path
    key_file: Path
    ca_file: Path
    webhook_port: int
    process: Process | None = None
    address: str = ""
    starts: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}{PATH}"

    def start(self) -> None:
        """Starts the coordinator (same database, same webhook port) and waits until it leads
        and serves its API."""
        binary = shutil.which("datacache-coordinator")
        assert binary is not None, "datacache-coordinator is not installed: pip install -e ."
        token = self.kube.token("datacache", "datacache-coordinator")
        kubeconfig = self.kube.token_kubeconfig(token, "coordinator")
        self.starts += 1
        port_file = self.local.workdir / f"coordinator-{self.starts}.port"
        process = self.local.spawn(
            f"coordinator-{self.starts}",
            [
                binary,
                "--listen=127.0.0.1:0",
                f"--port-file={port_file}",
                f"--db-path={self.local.workdir / 'coordinator.db'}",
                "--metrics-port=0",
                "--log-format=json",
                "--labeler=kubernetes",
                f"--kubeconfig={kubeconfig}",
                "--namespace=datacache",
                "--leader-elect",
                "--leader-election-identity=datacache-coordinator-0",
                f"--node-cache-dir={CACHE_DIR}",
                f"--webhook-port={self.webhook_port}",
                f"--webhook-cert-file={self.cert_file}",
                f"--webhook-key-file={self.key_file}",
            ],
            stop_grace=30,
        )
        self.process = process

        def serving() -> bool:
            assert process.alive(), process.log_tail()
            return port_file.exists()

        wait_until(serving, WAIT, "the coordinator to serve")
        self.address = f"127.0.0.1:{port_file.read_text().strip()}"
        wait_until(self._leads, WAIT, "the coordinator to lead")

    def _leads(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            try:
                pb_grpc.DatasetServiceStub(channel).ListDatasets(
                    pb.ListDatasetsRequest(), timeout=10
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False
        return True

    def create_dataset(self, name: str) -> None:
        with grpc.insecure_channel(self.address) as channel:
            pb_grpc.DatasetServiceStub(channel).CreateDataset(
                pb.CreateDatasetRequest(
                    dataset=pb.Dataset(name=name, source="s3://bucket/imagenet/", replicas=1)
                ),
                timeout=10,
            )

    def stop(self) -> None:
        """SIGTERM, as a rollout or a node drain stops the pod; waits for the exit."""
        assert self.process is not None
        self.process.popen.send_signal(signal.SIGTERM)
        assert self.process.popen.wait(30) == 0, self.process.log_tail()
        self.process.stop()


@pytest.fixture
def deployment(kube: KubeTest, tmp_path: Path) -> Iterator[Deployment]:
    """The coordinator serving the webhook with a certificate for its Service name (and for
    127.0.0.1, where the API server reaches it here), the dataset ml/imagenet created, and
    the example configuration registered and in effect."""
    kube.plane.ensure_namespace(ML)
    ca = CertificateAuthority(tmp_path / "webhook-tls")
    tls = ca.issue("datacache-webhook", ("datacache-webhook.datacache.svc",), server=True)
    with LocalCluster(tmp_path / "processes") as local:
        deployed = Deployment(
            kube, local, tls.cert_file, tls.key_file, ca.cert_file, webhook_port=free_port()
        )
        deployed.start()
        deployed.create_dataset(DATASET)
        register_webhook(kube, deployed.url, ca.cert_file, trial("probe", dataset="imagenet"), ML)
        yield deployed


def trial(name: str, *, dataset: str | None = None, restricted: bool = False) -> dict[str, Any]:
    """A trial pod as a sweep's template makes it; `restricted` makes it acceptable to the
    Pod Security "restricted" level (the datacache namespace's)."""
    container: dict[str, Any] = {"name": "trial", "image": "registry.example.com/trainer:1.0"}
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if restricted:
        spec["securityContext"] = {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    metadata: dict[str, Any] = {"name": name}
    if dataset is not None:
        metadata["annotations"] = {"datacache.io/dataset": dataset}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def create(
    kube: KubeTest, namespace: str, pod: dict[str, Any], *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`kubectl create` of `pod`, as the admin, printing the created pod as JSON."""
    return kubectl(
        kube.kubeconfig,
        "create",
        f"--namespace={namespace}",
        "--output=json",
        "--filename=-",
        input=json.dumps(pod),
        check=check,
    )


def stored(kube: KubeTest, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return dict(kube.plane.get(f"{pods_path(namespace)}/{name}"))
    except KubeAPIError as exc:
        if exc.status == 404:
            return None
        raise


def assert_unmutated(pod: dict[str, Any]) -> None:
    assert dataset_volumes(pod) == []
    assert "affinity" not in pod["spec"]
    for container in pod["spec"]["containers"]:
        paths = [m["mountPath"] for m in container.get("volumeMounts") or []]
        assert not any(p.startswith("/datasets/") for p in paths), paths


def test_api_server_sends_annotated_pods_through_the_coordinators_webhook(
    deployment: Deployment,
) -> None:
    kube = deployment.kube
    created = json.loads(create(kube, ML, trial("trainer", dataset="imagenet")).stdout)
    # As docs/sweeps.md section 3 says: a required node affinity to nodes labelled as holding
    # a Ready copy, and the copy mounted read-only from the node's cache directory.
    assert created["spec"]["affinity"]["nodeAffinity"] == {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {"key": label_key(DATASET), "operator": "In", "values": ["ready"]}
                    ]
                }
            ]
        }
    }
    assert dataset_volumes(created) == [
        {
            "name": volume_name(DATASET),
            "hostPath": {
                "path": f"{CACHE_DIR}/datasets/ml/imagenet/current",
                "type": "Directory",
            },
        }
    ]
    (container,) = created["spec"]["containers"]
    assert {
        "name": volume_name(DATASET),
        "mountPath": "/datasets/ml/imagenet",
        "readOnly": True,
    } in container["volumeMounts"]
    # What kubectl printed is what the API server stored.
    kept = stored(kube, ML, "trainer")
    assert kept is not None and kept["spec"] == created["spec"]

    # Asking for a dataset that does not exist is refused, with the webhook's reason.
    refused = create(kube, ML, trial("lost", dataset="absent"), check=False)
    assert refused.returncode != 0
    assert "Error from server (Forbidden)" in refused.stderr
    assert f'admission webhook "{WEBHOOK_NAME}" denied the request' in refused.stderr
    assert "dataset ml/absent does not exist" in refused.stderr
    assert stored(kube, ML, "lost") is None

    # Pods without the annotation are stored as they were sent.
    plain = json.loads(create(kube, ML, trial("plain")).stdout)
    assert_unmutated(plain)


def test_webhook_outage_refuses_annotated_pods_only(deployment: Deployment) -> None:
    """manifests/examples/webhook.yaml: failurePolicy Fail never admits an annotated pod
    without its data guarantees; the matchCondition keeps every other pod away from the
    webhook, so an outage does not block them; the datacache namespace is excluded, so the
    coordinator itself can always be (re)created."""
    kube = deployment.kube
    process = deployment.process
    assert process is not None

    # Hung (the process is there but does not answer): the API server gives up after the
    # configured timeout and refuses the annotated pod.
    process.popen.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        hung = create(kube, ML, trial("hung", dataset="imagenet"), check=False)
        waited = time.monotonic() - began
        assert hung.returncode != 0
        assert f'failed calling webhook "{WEBHOOK_NAME}"' in hung.stderr, hung.stderr
        assert waited >= TIMEOUT_SECONDS - 0.5, f"refused after {waited:.1f}s"
        assert stored(kube, ML, "hung") is None
        began = time.monotonic()
        assert_unmutated(json.loads(create(kube, ML, trial("plain-while-hung")).stdout))
        # Not held up by the hung webhook (a call to it would take the whole timeout).
        assert time.monotonic() - began < TIMEOUT_SECONDS
    finally:
        process.popen.send_signal(signal.SIGCONT)

    # Stopped: nothing listens on the webhook's port any more.
    deployment.stop()
    down = create(kube, ML, trial("down", dataset="imagenet"), check=False)
    assert down.returncode != 0
    assert f'failed calling webhook "{WEBHOOK_NAME}"' in down.stderr, down.stderr
    assert "connection refused" in down.stderr, down.stderr
    assert stored(kube, ML, "down") is None
    plain = json.loads(create(kube, ML, trial("plain-while-down")).stdout)
    assert_unmutated(plain)
    # The coordinator's own namespace: even an annotated pod is admitted, unchanged (the
    # restricted level there would refuse a hostPath volume anyway).
    own = create(kube, "datacache", trial("own", dataset="imagenet", restricted=True))
    assert_unmutated(json.loads(own.stdout))

    # Back up with the same database and port: annotated pods are mutated again, without
    # registering anything anew.
    deployment.start()
    back = json.loads(create(kube, ML, trial("back", dataset="imagenet")).stdout)
    assert [v["name"] for v in dataset_volumes(back)] == [volume_name(DATASET)]
