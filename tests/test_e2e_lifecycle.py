"""End to end, the replica lifecycle on real parts (SeaweedFS, a coordinator and agents as
processes): refresh without downtime, one version across replicas, a source that changed
after its version was fixed, per-dataset credentials, and capacity pressure."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.health import CACHE_SERVICE
from datacache.client import ClientSettings
from datacache.localcluster import LocalCluster, free_port, s3_client, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.faultproxy import Fault, FaultProxy, Rule
from tests.tlscerts import CertificateAuthority


def upload(cluster: LocalCluster, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    client = s3_client(cluster.s3_endpoint)
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=data)


def many_files(seed: int, count: int, marker: bytes) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {f"part-{i:04d}.bin": rng.randbytes(rng.randint(1, 4000)) for i in range(count)}
    files["marker.txt"] = marker
    return files


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def start(cluster: LocalCluster, nodes: list[str], *agent_flags: str, **kw: str) -> None:
    coordinator_flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    cluster.start_coordinator("--reconcile-interval-seconds=0.5", *coordinator_flags)
    for node in nodes:
        cluster.start_agent(node, f"--health-port={free_port()}", *agent_flags)
    wait_until(
        lambda: {n.name for n in cluster.list_nodes() if n.agent_connected} >= set(nodes),
        30,
        "agents to register",
    )


def create(cluster: LocalCluster, dataset: pb.Dataset) -> None:
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).CreateDataset(
            pb.CreateDatasetRequest(dataset=dataset), timeout=10
        )


def replicas(cluster: LocalCluster, name: str) -> dict[str, pb.Replica]:
    return {r.node_name: r for r in cluster.get_dataset(name).status.replicas}


def ready(cluster: LocalCluster, name: str) -> set[str]:
    return {n for n, r in replicas(cluster, name).items() if r.state == pb.REPLICA_STATE_READY}


def dataset_dir(cluster: LocalCluster, node: str, name: str) -> Path:
    return cluster.cache_dir(node) / "datasets" / "default" / name


def test_refresh_keeps_the_old_version_readable_and_swaps_atomically(
    cluster: LocalCluster,
) -> None:
    cluster.create_bucket("life-refresh")
    old = many_files(1, 300, b"old")
    upload(cluster, "life-refresh", "data/", old)
    # One reader at a time: the refresh takes long enough to be watched.
    start(cluster, ["node-1"], "--concurrency=1")
    create(cluster, pb.Dataset(name="refresh", source="s3://life-refresh/data/", replicas=1))
    wait_until(lambda: ready(cluster, "refresh") == {"node-1"}, 60, "the first version")
    first = replicas(cluster, "refresh")["node-1"]
    directory = dataset_dir(cluster, "node-1", "refresh")
    current = directory / "current"
    old_target = os.readlink(current)

    new = many_files(2, 300, b"new")
    upload(cluster, "life-refresh", "data/", new)

    seen: list[tuple[str, bytes]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_continuously() -> None:
        # What a pod does: open files through `current`, again and again.
        while not stop.is_set():
            try:
                seen.append((os.readlink(current), (current / "marker.txt").read_bytes()))
            except OSError as exc:
                errors.append(exc)

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        with cluster.channel() as channel:
            pb_grpc.DatasetServiceStub(channel).RefreshDataset(
                pb.RefreshDatasetRequest(name="refresh"), timeout=10
            )

        def refreshing() -> bool:
            r = replicas(cluster, "refresh")["node-1"]
            return r.state == pb.REPLICA_STATE_FETCHING and r.revision > first.revision

        wait_until(refreshing, 30, "the new revision to be fetched")
        during = replicas(cluster, "refresh")["node-1"]
        assert during.serving_version == first.digest
        assert os.readlink(current) == old_target
        assert (current / "marker.txt").read_bytes() == b"old"
        wait_until(
            lambda: (
                ready(cluster, "refresh") == {"node-1"}
                and replicas(cluster, "refresh")["node-1"].revision == during.revision
            ),
            120,
            "the new version to be Ready",
        )
    finally:
        stop.set()
        reader.join(10)
    assert not errors, f"reads through `current` failed during the refresh: {errors[:3]}"
    after = replicas(cluster, "refresh")["node-1"]
    assert after.digest != first.digest and not after.serving_version
    assert tree(current) == digests({**old, **new})
    # The link switched once, from the old version to the new, and reads through it saw the
    # old content, then only the new: never a mix, never an error.
    targets = [t for t, _ in seen]
    new_target = os.readlink(current)
    assert targets[0] == old_target and targets[-1] == new_target
    assert set(targets) == {old_target, new_target}
    assert targets == sorted(targets, key=lambda t: t == new_target)
    contents = [m for _, m in seen]
    assert contents[0] == b"old" and contents[-1] == b"new"
    assert contents == sorted(contents, key=lambda m: m == b"new")
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["current", os.readlink(current), f"{os.readlink(current)}.json"]
    )


def test_two_replicas_of_a_revision_hold_one_version(cluster: LocalCluster) -> None:
    cluster.create_bucket("life-two")
    files = many_files(3, 40, b"m")
    upload(cluster, "life-two", "ds/", files)
    health_port = free_port()
    cluster.start_coordinator("--reconcile-interval-seconds=0.5")
    cluster.start_agent(
        "node-1", f"--health-port={health_port}", "--node-label=topology.kubernetes.io/zone=zone-a"
    )
    cluster.start_agent("node-2", f"--health-port={free_port()}", "--node-uid=uid-2")
    wait_until(lambda: len([n for n in cluster.list_nodes() if n.agent_connected]) == 2, 30, "2")
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    nodes = {n.name: n for n in cluster.list_nodes()}
    assert (nodes["node-1"].zone, nodes["node-2"].uid) == ("zone-a", "uid-2")
    create(cluster, pb.Dataset(name="two", source="s3://life-two/ds/", replicas=2))

    wait_until(lambda: ready(cluster, "two") == {"node-1", "node-2"}, 60, "2 Ready replicas")
    wait_until(lambda: bool(cluster.get_dataset("two").status.version), 30, "a fixed version")
    dataset = cluster.get_dataset("two")
    assert {r.digest for r in dataset.status.replicas} == {dataset.status.version}
    # The version was fixed by a copy's PublishVersion: its manifest is there to be read.
    request = pb.GetVersionManifestRequest(
        dataset_name="default/two", version=dataset.status.version
    )

    def manifest() -> list[pb.ManifestEntry]:
        with cluster.channel() as channel:
            try:
                response = pb_grpc.AgentServiceStub(channel).GetVersionManifest(request, timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                return []
        return list(response.entries)

    wait_until(lambda: bool(manifest()), 30, "the version's manifest")
    entries = manifest()
    assert [e.path for e in entries] == sorted(files)
    assert all(e.size == len(files[e.path]) for e in entries)
    for replica in dataset.status.replicas:
        assert sum(replica.verification.files_by_method.values()) == len(files)
        # Never read by a pod yet: last used when published, i.e. during this test.
        assert abs(replica.last_used_time.seconds - time.time()) < 120
    for node in ("node-1", "node-2"):
        assert tree(dataset_dir(cluster, node, "two") / "current") == digests(files)


def test_source_overwritten_after_the_version_was_fixed_fails_a_replica_from_the_source(
    cluster: LocalCluster,
) -> None:
    """A replica that must read the source (no peer copying) fails rather than publish
    another version; one that can copy from a peer gets the fixed version intact."""
    cluster.create_bucket("life-fixed")
    files = many_files(4, 20, b"m")
    upload(cluster, "life-fixed", "ds/", files)
    start(cluster, ["node-1"])
    create(cluster, pb.Dataset(name="fixed", source="s3://life-fixed/ds/", replicas=2))
    wait_until(lambda: ready(cluster, "fixed") == {"node-1"}, 60, "the first copy")
    wait_until(lambda: bool(cluster.get_dataset("fixed").status.version), 30, "a fixed version")
    version = cluster.get_dataset("fixed").status.version

    upload(cluster, "life-fixed", "ds/", {"part-0007.bin": b"overwritten at the source"})
    cluster.start_agent("node-2", f"--health-port={free_port()}", peers=False)

    def failed() -> bool:
        r = replicas(cluster, "fixed").get("node-2")
        return r is not None and r.state == pb.REPLICA_STATE_FAILED

    wait_until(failed, 60, "the second replica to fail")
    message = replicas(cluster, "fixed")["node-2"].message
    assert message == (
        f"source object s3://life-fixed/ds/part-0007.bin changed since version {version} was "
        "fixed; refresh the dataset"
    )
    assert not (dataset_dir(cluster, "node-2", "fixed") / "current").exists()
    assert list((cluster.cache_dir("node-2") / "staging").iterdir()) == []
    assert ready(cluster, "fixed") == {"node-1"}
    assert cluster.get_dataset("fixed").status.version == version

    # With peers, a new replica copies the fixed version from node-1, not the changed source.
    update = pb.Dataset(name="fixed", replicas=3)
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).UpdateDataset(
            pb.UpdateDatasetRequest(dataset=update, update_mask=FieldMask(paths=["replicas"])),
            timeout=10,
        )
    cluster.start_agent("node-3", f"--health-port={free_port()}")
    wait_until(lambda: "node-3" in ready(cluster, "fixed"), 60, "node-3 Ready from its peer")
    assert replicas(cluster, "fixed")["node-3"].digest == version
    copied = dataset_dir(cluster, "node-3", "fixed") / "current" / "part-0007.bin"
    assert copied.read_bytes() == files["part-0007.bin"]


class RecordingProxy:
    """A TCP proxy on loopback that keeps every byte clients send (request headers included)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst, record in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=(src, dst, record))
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone does not on Linux,
        # and a thread left in accept() keeps the test process from exiting.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._accepting.join(10)
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for thread in self._threads:
            thread.join(10)
        stuck = [t.name for t in (self._accepting, *self._threads) if t.is_alive()]
        assert not stuck, f"proxy threads did not stop: {stuck}"


@pytest.fixture
def recording_s3(cluster: LocalCluster) -> Iterator[RecordingProxy]:
    port = int(cluster.s3_endpoint.rsplit(":", 1)[1])
    proxy = RecordingProxy(port)
    try:
        yield proxy
    finally:
        proxy.close()


def test_dataset_credentials_reach_the_agent_and_are_never_logged(
    cluster: LocalCluster, recording_s3: RecordingProxy, tmp_path: Path
) -> None:
    cluster.create_bucket("life-creds")
    files = many_files(5, 5, b"m")
    upload(cluster, "life-creds", "ds/", files)
    secrets = tmp_path / "secrets"
    (secrets / "team-s3").mkdir(parents=True)
    key_id, secret, token = "AKIDATASETONLY", "dataset-secret-Qx81Zp", "dataset-token-Hh27Lm"
    (secrets / "team-s3" / "AWS_ACCESS_KEY_ID").write_text(key_id)
    (secrets / "team-s3" / "AWS_SECRET_ACCESS_KEY").write_text(secret)
    (secrets / "team-s3" / "AWS_SESSION_TOKEN").write_text(token)
    cluster.start_coordinator("--reconcile-interval-seconds=0.5", f"--secrets-dir={secrets}")
    cluster.start_agent(
        "node-1",
        f"--health-port={free_port()}",
        f"--s3-endpoint-url=http://127.0.0.1:{recording_s3.port}",
        "--log-level=debug",
    )
    wait_until(lambda: any(n.agent_connected for n in cluster.list_nodes()), 30, "the agent")
    create(
        cluster,
        pb.Dataset(
            name="creds", source="s3://life-creds/ds/", replicas=1, credentials_secret="team-s3"
        ),
    )
    wait_until(lambda: ready(cluster, "creds") == {"node-1"}, 60, "Ready with credentials")
    assert tree(dataset_dir(cluster, "node-1", "creds") / "current") == digests(files)

    sent = bytes(recording_s3.sent)
    assert f"Credential={key_id}/".encode() in sent
    assert token.encode() in sent  # x-amz-security-token: the session token was used too
    # The agent's own chain (the environment) signed nothing for this dataset.
    assert b"Credential=datacache-demo/" not in sent
    for process in (cluster.agents["node-1"], cluster.coordinator):
        log = process.log_path.read_text()
        assert secret not in log and token not in log, f"{process.name} logged a credential"


def test_small_quota_reports_pressure_instead_of_fetching(cluster: LocalCluster) -> None:
    cluster.create_bucket("life-quota")
    files = many_files(6, 30, b"m")
    files["big.bin"] = random.Random(6).randbytes(2 * 1024 * 1024)
    upload(cluster, "life-quota", "ds/", files)
    quota = 1024 * 1024
    start(cluster, ["node-1"], f"--cache-quota-bytes={quota}")
    create(cluster, pb.Dataset(name="quota", source="s3://life-quota/ds/", replicas=1))

    def pending() -> bool:
        r = replicas(cluster, "quota").get("node-1")
        return r is not None and r.state == pb.REPLICA_STATE_PENDING and bool(r.message)

    wait_until(pending, 60, "the replica to wait for room")
    need = sum(len(v) for v in files.values())
    message = replicas(cluster, "quota")["node-1"].message
    assert message == f"waiting for {need - quota} bytes of room"
    (node,) = cluster.list_nodes()
    assert node.cache_capacity_bytes == quota
    assert node.cache_free_bytes == quota
    assert not (dataset_dir(cluster, "node-1", "quota") / "current").exists()
    assert list((cluster.cache_dir("node-1") / "staging").iterdir()) == []

    # Room made by raising the quota: a restarted agent fetches it.
    cluster.agents["node-1"].stop()
    cluster.start_agent("node-1", f"--health-port={free_port()}", f"--cache-quota-bytes={need * 2}")
    wait_until(lambda: ready(cluster, "quota") == {"node-1"}, 60, "Ready with room")


def test_health_serves_once_the_coordinator_was_reached(cluster: LocalCluster) -> None:
    health_port = free_port()
    cluster.coordinator_address = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    agent = cluster.start_agent("node-1", f"--health-port={health_port}")

    def status(service: str = "") -> int:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2
                )
            except grpc.RpcError:
                return -1
        return int(response.status)

    wait_until(lambda: status() != -1, 30, "the health service")
    assert agent.alive() and status() == health_pb2.HealthCheckResponse.NOT_SERVING
    # The cache itself is usable already (for a liveness probe).
    wait_until(
        lambda: status(CACHE_SERVICE) == health_pb2.HealthCheckResponse.SERVING, 30, "recovered"
    )
    cluster.start_coordinator()  # listens on the address the agent dials
    wait_until(
        lambda: status() == health_pb2.HealthCheckResponse.SERVING, 30, "SERVING after registering"
    )
    cluster.coordinator.stop()
    # A coordinator gone later does not make the node's data unusable: still SERVING.
    assert status() == health_pb2.HealthCheckResponse.SERVING


def test_agent_reaches_the_coordinator_over_mtls_with_a_certificate_naming_its_node(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    server = ca.issue("datacache-coordinator", ("datacache-coordinator",), server=True)
    tokens = tmp_path / "tokens"
    tokens.write_text("lifecycle-token-0123456789\n")
    cluster.start_coordinator(
        "--reconcile-interval-seconds=0.5",
        f"--tls-cert-file={server.cert_file}",
        f"--tls-key-file={server.key_file}",
        f"--tls-client-ca-file={ca.cert_file}",
        f"--api-token-file={tokens}",
    )
    # With a client CA the coordinator asks every caller for a certificate, the tests too.
    tester = ca.issue("lifecycle-test")
    cluster.client = ClientSettings(
        tls_ca_file=ca.cert_file,
        tls_cert_file=tester.cert_file,
        tls_key_file=tester.key_file,
        token_file=tokens,
    )
    node1 = ca.issue("node-1")
    tls = (f"--tls-ca-file={ca.cert_file}", f"--health-port={free_port()}")
    cluster.start_agent(
        "node-1", *tls, f"--tls-cert-file={node1.cert_file}", f"--tls-key-file={node1.key_file}"
    )
    # An agent presenting node-1's certificate while claiming node-2 is turned away.
    impostor = cluster.start_agent(
        "node-2", *tls, f"--tls-cert-file={node1.cert_file}", f"--tls-key-file={node1.key_file}"
    )
    wait_until(lambda: any(n.agent_connected for n in cluster.list_nodes()), 30, "node-1")
    cluster.create_bucket("life-tls")
    files = many_files(7, 5, b"m")
    upload(cluster, "life-tls", "ds/", files)
    create(cluster, pb.Dataset(name="tls", source="s3://life-tls/ds/", replicas=1))
    wait_until(lambda: ready(cluster, "tls") == {"node-1"}, 60, "Ready over mTLS")
    wait_until(lambda: "PERMISSION_DENIED" in impostor.log_tail(200), 30, "the impostor refused")
    assert [n.name for n in cluster.list_nodes() if n.agent_connected] == ["node-1"]


def test_failed_refresh_leaves_the_old_version_serving(cluster: LocalCluster) -> None:
    cluster.create_bucket("life-fail")
    old = many_files(8, 10, b"old")
    upload(cluster, "life-fail", "ds/", old)
    with FaultProxy(cluster.s3_endpoint) as proxy:
        cluster.start_coordinator("--reconcile-interval-seconds=0.5")
        cluster.start_agent(
            "node-1", f"--health-port={free_port()}", f"--s3-endpoint-url={proxy.url}"
        )
        create(cluster, pb.Dataset(name="fail", source="s3://life-fail/ds/", replicas=1))
        wait_until(lambda: ready(cluster, "fail") == {"node-1"}, 60, "the first version")
        first = replicas(cluster, "fail")["node-1"]
        current = dataset_dir(cluster, "node-1", "fail") / "current"

        # Every listing of the source now answers 503 SlowDown: the refresh cannot start.
        proxy.set_rules([Rule(Fault("slowdown"), method="GET", path_contains="list-type=2")])
        upload(cluster, "life-fail", "ds/", many_files(9, 10, b"new"))
        with cluster.channel() as channel:
            pb_grpc.DatasetServiceStub(channel).RefreshDataset(
                pb.RefreshDatasetRequest(name="fail"), timeout=10
            )

        def failed() -> bool:
            r = replicas(cluster, "fail")["node-1"]
            return r.state == pb.REPLICA_STATE_FAILED and r.revision > first.revision

        wait_until(failed, 60, "the refresh to fail")
        during = replicas(cluster, "fail")["node-1"]
        assert during.serving_version == first.digest and "SlowDown" in during.message
        assert tree(current) == digests(old)
        # Still labelled: pods keep being scheduled onto the old version.
        (node,) = cluster.list_nodes()
        assert "dataset.datacache.io/default.fail" in node.labels

        proxy.set_rules([])
        wait_until(
            lambda: (
                replicas(cluster, "fail")["node-1"].revision == during.revision
                and ready(cluster, "fail") == {"node-1"}
            ),
            60,
            "the retried refresh to be Ready",
        )
        assert (current / "marker.txt").read_bytes() == b"new"
