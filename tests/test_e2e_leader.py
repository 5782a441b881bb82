"""Coordinator processes wired for a cluster: leader election on a Lease in the fake API
server, and the admission webhook served over HTTPS by a real coordinator."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import ssl
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from datacache.localcluster import LocalCluster, Process, free_port, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.fakekube import FakeKubeAPI
from tests.test_webhook import _write_cert, pod, review


def _coordinator(
    cluster: LocalCluster, tmp_path: Path, name: str, *flags: str
) -> tuple[Process, str]:
    binary = shutil.which("datacache-coordinator")
    assert binary is not None
    port_file = tmp_path / f"{name}.port"
    process = cluster.spawn(
        name,
        [
            binary,
            "--listen=127.0.0.1:0",
            f"--port-file={port_file}",
            f"--db-path={tmp_path / name}.db",
            "--metrics-port=0",
            "--log-format=json",
            *flags,
        ],
    )

    def serving() -> bool:
        assert process.alive(), process.log_tail()
        return port_file.exists()

    wait_until(serving, 30, f"{name} to serve")
    return process, f"127.0.0.1:{port_file.read_text().strip()}"


def _list_code(address: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.DatasetServiceStub(channel).ListDatasets(pb.ListDatasetsRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_only_the_leader_serves_and_a_follower_takes_over(
    cluster: LocalCluster, kube: tuple[FakeKubeAPI, Path], tmp_path: Path
) -> None:
    fake, kubeconfig = kube
    flags = ("--labeler=kubernetes", f"--kubeconfig={kubeconfig}", "--leader-elect")
    first, first_address = _coordinator(
        cluster, tmp_path, "first", *flags, "--leader-election-identity=first"
    )
    wait_until(lambda: _list_code(first_address) == grpc.StatusCode.OK, 30, "a leader")
    second, second_address = _coordinator(
        cluster, tmp_path, "second", *flags, "--leader-election-identity=second"
    )
    # A follower is Ready (health SERVING) but sends API callers to the leader.
    with grpc.insecure_channel(second_address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.DatasetServiceStub(channel).ListDatasets(pb.ListDatasetsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not the leader" in (refused.value.details() or "")
    lease = fake.get_object("leases", "datacache-coordinator", namespace="datacache")
    assert lease is not None and lease["spec"]["holderIdentity"] == "first"

    # A leader that stops gives the Lease up; the follower takes over.
    first.stop()
    wait_until(lambda: _list_code(second_address) == grpc.StatusCode.OK, 30, "the takeover")
    lease = fake.get_object("leases", "datacache-coordinator", namespace="datacache")
    assert lease is not None and lease["spec"]["holderIdentity"] == "second"
    second.stop()


def test_coordinator_serves_the_admission_webhook(cluster: LocalCluster, tmp_path: Path) -> None:
    cert, key = _write_cert(tmp_path, "webhook")
    port = free_port()
    _, address = _coordinator(
        cluster,
        tmp_path,
        "hooked",
        f"--webhook-port={port}",
        f"--webhook-cert-file={cert}",
        f"--webhook-key-file={key}",
        "--node-cache-dir=/srv/cache",
    )
    with grpc.insecure_channel(address) as channel:
        pb_grpc.DatasetServiceStub(channel).CreateDataset(
            pb.CreateDatasetRequest(
                dataset=pb.Dataset(name="ml/imagenet", source="s3://bucket/x/", replicas=1)
            ),
            timeout=10,
        )

    def answer(annotation: str) -> dict[str, object]:
        context = ssl.create_default_context(cafile=str(cert))
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        try:
            body = json.dumps(review(pod({"datacache.io/dataset": annotation})))
            connection.request("POST", "/mutate", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200
            result: dict[str, object] = json.loads(response.read())["response"]
            return result
        finally:
            connection.close()

    allowed = answer("imagenet")
    assert allowed["allowed"] is True
    ops = json.loads(base64.b64decode(str(allowed["patch"])))
    volume = next(op["value"] for op in ops if op["path"] == "/spec/volumes/-")
    assert volume["hostPath"]["path"] == "/srv/cache/datasets/ml/imagenet/current"
    denied = answer("absent")
    assert denied["allowed"] is False
    assert "ml/absent does not exist" in str(denied["status"])
