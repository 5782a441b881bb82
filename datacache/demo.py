"""`datacache demo`: a whole local cluster replicating a generated sample dataset.

A SeaweedFS S3 server receives a sample dataset (small files in nested directories plus two
files large enough to be copied as parallel ranges), a coordinator starts in local mode (labels
kept in its store), agents start as separate processes with their own cache directories, and
one dataset is created with the requested replica count. The demo ends with a table of nodes,
replica states and labels once the replicas are Ready.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import boto3.s3.transfer
import click

from datacache.cli_render import render_dataset, render_nodes
from datacache.localcluster import ClusterError, LocalCluster, s3_client

BUCKET = "datacache-demo"
PREFIX = "sample/"
DATASET = "sample"


def generate_sample(root: Path, seed: int = 7) -> tuple[int, int]:
    """Writes the sample dataset under `root`; returns (files, bytes)."""
    rng = random.Random(seed)  # noqa: S311 - sample data, not secrets
    files = total = 0
    for i in range(120):
        path = root / f"shard-{i % 6:02d}" / f"record-{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(1_000, 96_000))
        path.write_bytes(data)
        files, total = files + 1, total + len(data)
    for name, size in (("weights/model-a.bin", 24 << 20), ("weights/model-b.bin", 40 << 20)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        files, total = files + 1, total + size
    labels = root / "labels.csv"
    labels.write_text("".join(f"record-{i:04d},{rng.randint(0, 9)}\n" for i in range(120)))
    return files + 1, total + labels.stat().st_size


def upload(cluster: LocalCluster, root: Path) -> None:
    client = s3_client(cluster.s3_endpoint)
    config = boto3.s3.transfer.TransferConfig(multipart_threshold=16 << 20, max_concurrency=8)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = PREFIX + path.relative_to(root).as_posix()
        client.upload_file(str(path), BUCKET, key, Config=config)


def run_demo(node_count: int, replicas: int, workdir: str | None, timeout: float) -> int:
    if replicas > node_count:
        raise click.BadParameter(f"--replicas {replicas} is more than --nodes {node_count}")
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="datacache-demo-"))
    say = click.echo
    try:
        with LocalCluster(base) as cluster:
            say(f"Working directory: {base}")
            say("Starting SeaweedFS (S3 on loopback)...")
            cluster.start_s3()
            cluster.create_bucket(BUCKET)
            files, nbytes = generate_sample(base / "sample-data")
            upload(cluster, base / "sample-data")
            say(f"Uploaded s3://{BUCKET}/{PREFIX}: {files} files, {nbytes / 2**20:.1f} MiB")

            address = cluster.start_coordinator()
            say(f"Coordinator serving on {address} (local mode: labels kept in its store)")
            nodes = [f"node-{i}" for i in range(1, node_count + 1)]
            for node in nodes:
                cluster.start_agent(node)
            say(f"Agents started: {', '.join(nodes)}")

            from datacache.v1 import datacache_pb2 as pb
            from datacache.v1 import datacache_pb2_grpc as pb_grpc

            with cluster.channel() as channel:
                pb_grpc.DatasetServiceStub(channel).CreateDataset(
                    pb.CreateDatasetRequest(
                        dataset=pb.Dataset(
                            name=DATASET, source=f"s3://{BUCKET}/{PREFIX}", replicas=replicas
                        )
                    ),
                    timeout=10,
                )
            say(f"Dataset {DATASET!r} created with {replicas} replicas; waiting for Ready...")
            started = time.monotonic()
            deadline = started + timeout
            while True:
                dataset = cluster.get_dataset(DATASET)
                labelled = sum(1 for n in cluster.list_nodes() if n.labels)
                if dataset.status.ready_replicas >= replicas and labelled >= replicas:
                    break
                for name, process in cluster.agents.items():
                    if not process.alive():
                        raise ClusterError(f"agent {name} exited:\n{process.log_tail()}")
                if time.monotonic() > deadline:
                    raise ClusterError(f"replicas not Ready after {timeout:.0f}s")
                time.sleep(0.5)
            say(f"\n{replicas} replicas Ready in {time.monotonic() - started:.1f}s\n")
            say(render_dataset(dataset))
            say("")
            say(render_nodes(cluster.list_nodes()))
            say("")
            for replica in dataset.status.replicas:
                path = (
                    cluster.cache_dir(replica.node_name)
                    / "datasets"
                    / "default"
                    / DATASET
                    / "current"
                )
                say(f"{replica.node_name} serves the dataset from {path}")
            if workdir is None:
                say("\nStopping; the temporary working directory is removed (--workdir keeps it).")
    except ClusterError as exc:
        say(f"demo failed: {exc}", err=True)
        say(f"logs are in {base}", err=True)
        return 1
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0
