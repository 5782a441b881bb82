"""End to end on real parts: SeaweedFS S3, a coordinator and agents as separate processes on
real sockets. Labels in local mode (the coordinator's store)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from datacache.localcluster import DEMO_CREDENTIALS, LocalCluster, s3_client, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

LABEL = "dataset.datacache.io/default.photos"


def upload_dataset(cluster: LocalCluster, bucket: str, prefix: str) -> dict[str, str]:
    """Uploads small files and one file above the ranged-read threshold; returns sha256s."""
    cluster.create_bucket(bucket)
    client = s3_client(cluster.s3_endpoint)
    rng = random.Random(42)
    contents = {
        f"dir-{i % 3}/file-{i}.bin": rng.randbytes(rng.randint(0, 50_000)) for i in range(30)
    }
    contents["big/blob.bin"] = rng.randbytes(3 * 1024 * 1024 + 17)
    for key, data in contents.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=data)
    return {key: hashlib.sha256(data).hexdigest() for key, data in contents.items()}


def tree_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def create(cluster: LocalCluster, name: str, source: str, replicas: int) -> None:
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).CreateDataset(
            pb.CreateDatasetRequest(
                dataset=pb.Dataset(name=name, source=source, replicas=replicas)
            ),
            timeout=10,
        )


def ready_nodes(cluster: LocalCluster, name: str) -> set[str]:
    dataset = cluster.get_dataset(name)
    return {r.node_name for r in dataset.status.replicas if r.state == pb.REPLICA_STATE_READY}


def dataset_gone(cluster: LocalCluster, name: str) -> bool:
    try:
        cluster.get_dataset(name)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    return False


def node_labels(cluster: LocalCluster) -> dict[str, dict[str, str]]:
    return {n.name: dict(n.labels) for n in cluster.list_nodes()}


def start(
    cluster: LocalCluster,
    nodes: int,
    *agent_flags: str,
    coordinator_flags: tuple[str, ...] = (),
) -> list[str]:
    cluster.start_coordinator("--reconcile-interval-seconds=0.5", *coordinator_flags)
    names = [f"node-{i}" for i in range(1, nodes + 1)]
    for node in names:
        cluster.start_agent(node, *agent_flags)
    wait_until(
        lambda: {n.name for n in cluster.list_nodes() if n.agent_connected} == set(names),
        30,
        "agents to register",
    )
    return names


def test_dataset_is_replicated_labelled_and_deleted(cluster: LocalCluster) -> None:
    expected = upload_dataset(cluster, "e2e-photos", "photos/v1/")
    nodes = start(cluster, 3, "--multipart-threshold-bytes=1048576", "--part-bytes=1048576")
    create(cluster, "photos", "s3://e2e-photos/photos/v1/", replicas=2)

    wait_until(lambda: len(ready_nodes(cluster, "photos")) == 2, 60, "2 Ready replicas")
    holders = ready_nodes(cluster, "photos")
    wait_until(
        lambda: (
            {n for n, labels in node_labels(cluster).items() if labels.get(LABEL) == "ready"}
            == holders
        ),
        20,
        "labels on the Ready nodes",
    )
    dataset = cluster.get_dataset("photos")
    digests = {r.digest for r in dataset.status.replicas}
    assert len(digests) == 1 and digests.pop().startswith("sha256:")
    for replica in dataset.status.replicas:
        assert replica.files_total == len(expected)
        assert replica.bytes_total == replica.bytes_done > 3 * 1024 * 1024
    for node in nodes:
        current = cluster.cache_dir(node) / "datasets" / "default" / "photos" / "current"
        if node in holders:
            assert tree_digests(current) == expected
        else:
            assert not current.exists()
            assert LABEL not in node_labels(cluster).get(node, {})

    cli = subprocess.run(
        ["datacache", f"--coordinator={cluster.coordinator_address}", "dataset", "get", "photos"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split() for line in cli.stdout.splitlines() if line.startswith("node-")]
    assert sorted(row[0] for row in rows if row[1] == "Ready") == sorted(holders)
    assert "Phase:       Ready" in cli.stdout
    listing = subprocess.run(
        ["datacache", f"--coordinator={cluster.coordinator_address}", "nodes"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listing.stdout.count(f"{LABEL}=ready") == 2

    deleted = subprocess.run(
        [
            "datacache",
            f"--coordinator={cluster.coordinator_address}",
            "dataset",
            "delete",
            "photos",
        ],
        capture_output=True,
        text=True,
    )
    assert deleted.returncode == 0, deleted.stderr

    wait_until(lambda: dataset_gone(cluster, "photos"), 30, "the dataset to be deleted")
    assert all(LABEL not in labels for labels in node_labels(cluster).values())
    for node in nodes:
        assert not (cluster.cache_dir(node) / "datasets" / "default" / "photos").exists()
    # Every line every process logged is one JSON object, and no credential ever appears.
    secret = DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    for log in cluster.workdir.glob("*.log"):
        text = log.read_text()
        assert secret not in text, log
        if log.name.startswith(("agent-", "coordinator")):
            records = [json.loads(line) for line in text.splitlines()]
            assert records and all({"ts", "level", "msg"} <= r.keys() for r in records), log
            if log.name.startswith("agent-"):
                assert all(r["node"] == log.stem.removeprefix("agent-") for r in records), log
                if log.stem.removeprefix("agent-") in holders:
                    assert any(r.get("dataset") == "default/photos" for r in records), log


def test_agent_restart_keeps_verified_copy(cluster: LocalCluster) -> None:
    upload_dataset(cluster, "e2e-restart", "data/")
    start(cluster, 1)
    create(cluster, "restart", "s3://e2e-restart/data/", replicas=1)
    wait_until(lambda: ready_nodes(cluster, "restart") == {"node-1"}, 60, "Ready replica")
    version_dir = (
        cluster.cache_dir("node-1") / "datasets" / "default" / "restart" / "current"
    ).resolve()
    mtime = version_dir.stat().st_mtime_ns

    cluster.agents["node-1"].kill()
    cluster.start_agent("node-1")
    wait_until(
        lambda: any(n.agent_connected for n in cluster.list_nodes()), 30, "agent to re-register"
    )
    wait_until(lambda: ready_nodes(cluster, "restart") == {"node-1"}, 30, "Ready after restart")
    # The published version was recovered from disk, not fetched again.
    assert version_dir.stat().st_mtime_ns == mtime
    assert (
        cluster.cache_dir("node-1") / "datasets" / "default" / "restart" / "current"
    ).resolve() == version_dir


def test_grpc_status_codes_health_and_reflection(cluster: LocalCluster) -> None:
    cluster.start_coordinator()
    with cluster.channel() as channel:
        stub = pb_grpc.DatasetServiceStub(channel)

        def code_of(request: pb.CreateDatasetRequest) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as info:
                stub.CreateDataset(request, timeout=10)
            code: grpc.StatusCode = info.value.code()
            return code

        bad = [
            pb.Dataset(name="Bad_Name", source="s3://bucket/x/", replicas=1),
            pb.Dataset(name="ok", source="ftp://bucket/x/", replicas=1),
            pb.Dataset(name="ok", source="s3://bucket/../x/", replicas=1),
            pb.Dataset(name="ok", source="s3://bucket/x/", replicas=0),
        ]
        for dataset in bad:
            assert (
                code_of(pb.CreateDatasetRequest(dataset=dataset))
                == grpc.StatusCode.INVALID_ARGUMENT
            )
        good = pb.Dataset(name="ok", source="s3://bucket/x/", replicas=1)
        stub.CreateDataset(pb.CreateDatasetRequest(dataset=good), timeout=10)
        assert code_of(pb.CreateDatasetRequest(dataset=good)) == grpc.StatusCode.ALREADY_EXISTS

        with pytest.raises(grpc.RpcError) as info:
            stub.GetDataset(pb.GetDatasetRequest(name="missing"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "missing" in (info.value.details() or "")

        agents = pb_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            agents.ReportState(
                pb.ReportStateRequest(agent=pb.AgentIdentity(node_name="n1", cache_id="c")),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "datacache.v1.DatasetService", "datacache.v1.AgentService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert {"datacache.v1.DatasetService", "datacache.v1.AgentService"} <= names


def test_agent_killed_mid_copy_resumes_and_never_exposes_partial_data(
    cluster: LocalCluster,
) -> None:
    cluster.create_bucket("e2e-kill")
    client = s3_client(cluster.s3_endpoint)
    rng = random.Random(7)
    contents = {f"part-{i:04d}.bin": rng.randbytes(rng.randint(1, 4000)) for i in range(400)}
    for key, data in contents.items():
        client.put_object(Bucket="e2e-kill", Key=f"data/{key}", Body=data)
    # One reader at a time makes the copy slow enough to be caught in the middle.
    start(cluster, 1, "--concurrency=1")
    create(cluster, "killed", "s3://e2e-kill/data/", replicas=1)

    staging = cluster.cache_dir("node-1") / "staging"

    def journalled() -> int:
        return sum(len(p.read_text().splitlines()) for p in staging.glob("*.journal"))

    wait_until(lambda: journalled() >= 50, 60, "the copy to be under way")
    cluster.agents["node-1"].kill()
    done_before_kill = journalled()
    assert done_before_kill < len(contents), "the copy finished before it could be interrupted"
    dataset_dir = cluster.cache_dir("node-1") / "datasets" / "default" / "killed"
    assert not (dataset_dir / "current").exists()
    assert ready_nodes(cluster, "killed") == set()

    restarted = cluster.start_agent("node-1")
    wait_until(lambda: ready_nodes(cluster, "killed") == {"node-1"}, 60, "Ready after restart")
    assert tree_digests(dataset_dir / "current") == {
        key: hashlib.sha256(data).hexdigest() for key, data in contents.items()
    }
    assert list(staging.iterdir()) == []
    resumed = [line for line in restarted.log_path.read_text().splitlines() if "Resuming" in line]
    assert resumed, "the restarted agent did not resume"
    kept = int(resumed[0].split("Resuming: ")[1].split()[0])
    # Every file journalled before the kill was kept (a torn last line may lose one).
    assert done_before_kill - 1 <= kept < len(contents)


def test_scrub_quarantines_and_repairs_bit_rot(cluster: LocalCluster) -> None:
    expected = upload_dataset(cluster, "e2e-rot", "data/")
    start(cluster, 1, "--scrub-interval-seconds=1")
    create(cluster, "rot", "s3://e2e-rot/data/", replicas=1)
    wait_until(lambda: ready_nodes(cluster, "rot") == {"node-1"}, 60, "Ready replica")
    current = cluster.cache_dir("node-1") / "datasets" / "default" / "rot" / "current"
    victim = current / "big" / "blob.bin"
    with victim.open("r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    quarantine = cluster.cache_dir("node-1") / "quarantine" / "default" / "rot"

    wait_until(
        lambda: any(quarantine.rglob("blob.bin.*")), 30, "the corrupt file to be quarantined"
    )
    wait_until(lambda: tree_digests(current) == expected, 30, "the file to be repaired")
    wait_until(lambda: ready_nodes(cluster, "rot") == {"node-1"}, 30, "Ready after repair")
    (rotten,) = quarantine.rglob("blob.bin.*")
    assert hashlib.sha256(rotten.read_bytes()).hexdigest() != expected["big/blob.bin"]


def cli(cluster: LocalCluster, *args: str) -> str:
    result = subprocess.run(
        ["datacache", f"--coordinator={cluster.coordinator_address}", *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_scale_affinity_and_lease_expiry(cluster: LocalCluster) -> None:
    upload_dataset(cluster, "e2e-scale", "data/")
    cluster.start_coordinator("--reconcile-interval-seconds=0.5", "--lease-seconds=3")
    for node in ("node-1", "node-2", "node-3"):
        cluster.start_agent(node)
    cli(
        cluster, "dataset", "create", "scale", "--source", "s3://e2e-scale/data/", "--replicas", "1"
    )
    wait_until(lambda: len(ready_nodes(cluster, "scale")) == 1, 60, "1 Ready replica")

    cli(cluster, "dataset", "update", "scale", "--replicas", "2")
    wait_until(lambda: len(ready_nodes(cluster, "scale")) == 2, 60, "2 Ready replicas")
    snippets = yaml.safe_load(cli(cluster, "dataset", "affinity", "scale"))
    terms = snippets["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "dataset.datacache.io/default.scale", "operator": "In", "values": ["ready"]}
    ]
    assert (
        snippets["volumes"][0]["hostPath"]["path"]
        == "/var/lib/datacache/datasets/default/scale/current"
    )
    assert set(snippets["readyNodes"]) == ready_nodes(cluster, "scale")

    # A node whose agent stops reporting loses its replica and label once the lease expires;
    # the replica is placed on the remaining node.
    lost = sorted(ready_nodes(cluster, "scale"))[0]
    cluster.agents[lost].kill()
    spare = {"node-1", "node-2", "node-3"} - ready_nodes(cluster, "scale")
    wait_until(
        lambda: ready_nodes(cluster, "scale") == ({"node-1", "node-2", "node-3"} - {lost}),
        60,
        "re-replication after lease expiry",
    )
    labels = node_labels(cluster)
    assert "dataset.datacache.io/default.scale" not in labels.get(lost, {})
    assert all(labels[n]["dataset.datacache.io/default.scale"] == "ready" for n in spare)

    cli(cluster, "dataset", "update", "scale", "--replicas", "1")
    wait_until(lambda: len(ready_nodes(cluster, "scale")) == 1, 60, "scale down to 1")
    (kept,) = ready_nodes(cluster, "scale")
    wait_until(
        lambda: (
            sum(
                (cluster.cache_dir(n) / "datasets" / "default" / "scale").exists()
                for n in ("node-1", "node-2", "node-3")
                if n != lost
            )
            == 1
        ),
        30,
        "the extra copy to be deleted",
    )
    assert (cluster.cache_dir(kept) / "datasets" / "default" / "scale" / "current").exists()


def test_wiped_cache_is_a_new_node_that_starts_empty(cluster: LocalCluster) -> None:
    """An agent that comes back with an empty cache directory (a new cache id) is a new node:
    the coordinator forgets the old copy and its label at once, then the copy is fetched and
    labelled again. The same identity coming back (test_agent_restart_keeps_verified_copy)
    keeps everything instead."""
    upload_dataset(cluster, "e2e-wiped", "data/")
    start(cluster, 1)
    create(cluster, "wiped", "s3://e2e-wiped/data/", replicas=1)
    wait_until(lambda: ready_nodes(cluster, "wiped") == {"node-1"}, 60, "Ready replica")
    key = "dataset.datacache.io/default.wiped"
    wait_until(lambda: key in node_labels(cluster).get("node-1", {}), 20, "the label")

    cluster.agents["node-1"].kill()
    shutil.rmtree(cluster.cache_dir("node-1"))
    log_start = len(cluster.coordinator.log_path.read_text().splitlines())
    cluster.start_agent("node-1")

    def messages() -> list[str]:
        lines = cluster.coordinator.log_path.read_text().splitlines()[log_start:]
        records = [json.loads(line) for line in lines]
        return [r["msg"] for r in records if r.get("node") == "node-1"]

    def relabelled() -> bool:
        seen = messages()
        replaced = [i for i, m in enumerate(seen) if "replacing the previous node" in m]
        if not replaced:
            return False
        # The old copy's label went before the new copy's came.
        after = seen[replaced[0] :]
        if "Labels of node updated: []" not in after:
            return False
        removed = after.index("Labels of node updated: []")
        return any(m.startswith("Labels of node updated: ['") for m in after[removed:])

    wait_until(relabelled, 60, "the label removed, then set again for the new copy")
    assert ready_nodes(cluster, "wiped") == {"node-1"}
    current = cluster.cache_dir("node-1") / "datasets" / "default" / "wiped" / "current"
    assert current.exists()
