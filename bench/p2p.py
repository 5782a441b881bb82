"""Peer-copying benchmark: a dataset grown from 1 to 4 replicas, with and without peers.

    python bench/p2p.py [--quick] [--rounds N] [--workdir DIR] [--json FILE]
                        [--peer-serve-bytes-per-second N] [--peer-batch-files N]

One SeaweedFS (S3) server holds one dataset: a 1 GiB object (256 MiB with --quick) and 2,000
objects of 20,000-200,000 bytes (500 with --quick). For each mode and round a fresh local
cluster starts (a coordinator and 4 agents, each a separate process with its own cache
directory, all on loopback): the dataset is created with 1 replica, and once that copy is Ready
and its version fixed, the replicas are raised to 4. Measured from that moment until all 4
are Ready:

  origin-only  agents without peer keys: the 3 new replicas read S3.
  peers        agents with a shared peer key: the 3 new replicas read the Ready copy.

Printed per mode (median over rounds): time to all-Ready, bytes read from S3 by the 3 new
replicas (from the agents' counters: bytes copied minus bytes received from peers) as a
multiple of the dataset's size, bytes received from peers, and the requests the agents' peer
servers answered (each batch of small files is one). Agents fsync (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from google.protobuf.field_mask_pb2 import FieldMask
from prometheus_client.parser import text_string_to_metric_families

from datacache.localcluster import LocalCluster, s3_client, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

MIB = 1 << 20
BUCKET = "p2pbench"
NODES = [f"node-{i}" for i in range(1, 5)]
TIMEOUT = 1800.0


@dataclass
class Run:
    mode: str
    round: int
    first_ready_seconds: float
    grow_seconds: float
    """From raising replicas to 4 until all 4 are Ready."""
    origin_bytes: int
    """Bytes the 3 new replicas read from S3."""
    peer_bytes: int
    """Bytes the 3 new replicas received from peers."""
    dataset_bytes: int
    peer_requests: int = 0
    """Requests the agents' peer servers answered (a batch of small files is one)."""


def upload(client: Any, prefix: str, large: int, small: int) -> int:
    rng = random.Random(1)  # noqa: S311 - sizes, not secrets
    client.put_object(Bucket=BUCKET, Key=f"{prefix}large.bin", Body=os.urandom(large))
    items = [(f"{prefix}small/{i:05d}.bin", rng.randint(20_000, 200_000)) for i in range(small)]

    def put(item: tuple[str, int]) -> None:
        client.put_object(Bucket=BUCKET, Key=item[0], Body=os.urandom(item[1]))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, items))
    return large + sum(size for _, size in items)


def agent_counters(cluster: LocalCluster, node: str) -> dict[str, float]:
    port = cluster.agent_metrics_ports[node]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (
                "datacache_agent_fetched_bytes_total",
                "datacache_agent_peer_received_bytes_total",
                "datacache_agent_peer_requests_total",
            ):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def set_replicas(cluster: LocalCluster, replicas: int) -> None:
    with cluster.channel() as channel:
        pb_grpc.DatasetServiceStub(channel).UpdateDataset(
            pb.UpdateDatasetRequest(
                dataset=pb.Dataset(name="bench", replicas=replicas),
                update_mask=FieldMask(paths=["replicas"]),
            ),
            timeout=10,
        )


def ready(cluster: LocalCluster) -> set[str]:
    dataset = cluster.get_dataset("bench")
    return {r.node_name for r in dataset.status.replicas if r.state == pb.REPLICA_STATE_READY}


def one_run(
    workdir: Path, endpoint: str, prefix: str, mode: str, round_no: int, args: argparse.Namespace
) -> Run:
    peers = mode == "peers"
    with LocalCluster(workdir / f"{mode}-{round_no}") as cluster:
        cluster.s3_endpoint = endpoint
        cluster.start_coordinator("--reconcile-interval-seconds=0.5")
        for node in NODES:
            cluster.start_agent(
                node,
                f"--peer-serve-bytes-per-second={args.peer_serve_bytes_per_second}",
                f"--peer-batch-files={args.peer_batch_files}",
                peers=peers,
            )
        wait_until(
            lambda: {n.name for n in cluster.list_nodes() if n.agent_connected} == set(NODES),
            60,
            "agents to register",
        )
        started = time.monotonic()
        with cluster.channel() as channel:
            pb_grpc.DatasetServiceStub(channel).CreateDataset(
                pb.CreateDatasetRequest(
                    dataset=pb.Dataset(name="bench", source=f"s3://{BUCKET}/{prefix}", replicas=1)
                ),
                timeout=10,
            )
        wait_until(lambda: len(ready(cluster)) == 1, TIMEOUT, "the first replica", interval=0.1)
        wait_until(
            lambda: bool(cluster.get_dataset("bench").status.version),
            60,
            "the version to be fixed",
            interval=0.1,
        )
        first_ready = time.monotonic() - started
        (first,) = ready(cluster)
        grow_started = time.monotonic()
        set_replicas(cluster, 4)
        wait_until(lambda: len(ready(cluster)) == 4, TIMEOUT, "4 Ready replicas", interval=0.1)
        grow = time.monotonic() - grow_started
        dataset = cluster.get_dataset("bench")
        if len({r.digest for r in dataset.status.replicas}) != 1:
            raise SystemExit("replicas hold different versions")
        copied = received = requests = 0.0
        for node in NODES:
            counters = agent_counters(cluster, node)
            requests += counters.get("datacache_agent_peer_requests_total", 0.0)
            if node != first:
                copied += counters.get("datacache_agent_fetched_bytes_total", 0.0)
                received += counters.get("datacache_agent_peer_received_bytes_total", 0.0)
        return Run(
            mode,
            round_no,
            first_ready,
            grow,
            int(copied - received),
            int(received),
            dataset.status.size_bytes,
            int(requests),
        )


def report(runs: list[Run]) -> str:
    lines = [
        f"{'mode':<12} {'all Ready (s)':>14} {'S3 bytes (x dataset)':>21} "
        f"{'peer bytes (x dataset)':>23} {'peer requests':>14}"
    ]
    medians: dict[str, float] = {}
    for mode in ("origin-only", "peers"):
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        size = mine[0].dataset_bytes
        grow = statistics.median(r.grow_seconds for r in mine)
        origin = statistics.median(r.origin_bytes for r in mine) / size
        peer = statistics.median(r.peer_bytes for r in mine) / size
        requests = statistics.median(r.peer_requests for r in mine)
        medians[mode] = grow
        lines.append(f"{mode:<12} {grow:>14.2f} {origin:>21.2f} {peer:>23.2f} {requests:>14.0f}")
    if len(medians) == 2:
        ratio = medians["origin-only"] / medians["peers"]
        lines.append(f"time to all-Ready, origin-only / peers: {ratio:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB + 500 small files")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    parser.add_argument(
        "--peer-serve-bytes-per-second",
        type=int,
        default=256 * MIB,
        help="each agent's peer serving limit (the agent's default: 256 MiB/s)",
    )
    parser.add_argument(
        "--peer-batch-files",
        type=int,
        default=64,
        help="small files per peer request (the agent's default: 64; 1: one request per file)",
    )
    args = parser.parse_args()
    large, small = (256 * MIB, 500) if args.quick else (1024 * MIB, 2000)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="datacache-p2p-"))
    base.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    with LocalCluster(base / "s3") as s3:
        endpoint = s3.start_s3()
        s3.create_bucket(BUCKET)
        size = upload(s3_client(endpoint), "set/", large, small)
        print(f"dataset: {size} bytes ({large} + {small} small files)", file=sys.stderr)
        for round_no in range(1, args.rounds + 1):
            modes = ["origin-only", "peers"] if round_no % 2 else ["peers", "origin-only"]
            for mode in modes:
                run = one_run(base, endpoint, "set/", mode, round_no, args)
                runs.append(run)
                print(json.dumps(asdict(run)), file=sys.stderr)
    print(
        f"# {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{args.rounds} rounds, peer serve limit {args.peer_serve_bytes_per_second} B/s, "
        f"{args.peer_batch_files} files per peer request"
    )
    print(report(runs))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
