"""Coordinator scale benchmark: the real coordinator process, driven over gRPC by simulated
agents.

    python bench/coordinator.py [--nodes 5000] [--datasets 1000] [--report-rate 500]
                                [--report-seconds 20] [--json FILE]

Steps (in a temporary directory, removed at exit):
  1. start `datacache-coordinator` (local labeler, SQLite in the work directory, default
     reconcile interval, debug logs so every reconcile pass logs its duration);
  2. register NODES agents (zones z0-z2; 5% carry pool=gpu) and open one WatchDesiredState
     stream per node (`--watchers` fewer: the rest poll it), all from this process (grpc.aio,
     one connection per 100 streams);
  3. create DATASETS datasets: 1-5 replicas each (fixed seed), plus two `all_nodes` datasets
     restricted to pool=gpu; wait until the desired sets the streams received add up to the
     expected number of replicas (placement converged and delivered);
  4. send ReportState at REPORT_RATE per second, open loop (calls are started on schedule
     whether or not earlier ones finished), each node reporting every dataset of its desired
     set Ready: first one round over all nodes (every report is news: statuses change, labels
     are set, passes run), then REPORT_SECONDS of steady reports (the same state again);
     latencies are measured at the client;
  5. read the coordinator's peak and current RSS (VmHWM, VmRSS), its CPU time, and the
     durations of its reconcile passes from its log.

What a "full placement pass" is here: one reconcile pass over the whole state, i.e. reading
every dataset, agent and report from SQLite, placement of every dataset over every live node,
label diffing, desired sets of every node, and the status fingerprint of every dataset. The
passes measured are the ones that placed everything after the datasets were created and the
passes during the steady reports.

Client and coordinator share the machine; the client's own CPU use (thousands of streams and
hundreds of calls per second in Python) competes with the coordinator, so the latencies are
upper bounds of what the coordinator alone needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from datacache.localcluster import LocalCluster
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

GIB = 1 << 30
ZONE = "topology.kubernetes.io/zone"
DIGEST = "sha256:" + "b" * 64
_PASS = re.compile(r"Reconcile pass took (\d+\.\d+) s")


@dataclass
class ReportPhase:
    sent: int = 0
    errors: int = 0
    rate_achieved: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0


@dataclass
class Results:
    nodes: int
    datasets: int
    watchers: int = 0
    expected_replicas: int = 0
    register_seconds: float = 0.0
    create_seconds: float = 0.0
    converge_seconds: float = 0.0
    """From the last CreateDataset to every desired set delivered."""
    report_rate_target: float = 0.0
    first_round: ReportPhase | None = None
    """Every node's first Ready report."""
    steady: ReportPhase | None = None
    """Reports without news (the same state again)."""
    pass_seconds_initial_max: float = 0.0
    pass_seconds_steady: list[float] = field(default_factory=list)
    rss_peak_mib: float = 0.0
    rss_end_mib: float = 0.0
    coordinator_cpu_seconds: float = 0.0


class Sim:
    """Every simulated agent: identities, stubs and the latest desired set of each node."""

    def __init__(self, address: str, nodes: int, streams_per_channel: int = 100) -> None:
        # Each channel gets its own connection (a local subchannel pool), and each connection
        # carries at most ~100 streams, as HTTP/2 servers commonly limit concurrent streams.
        channels = max(1, -(-nodes // streams_per_channel))
        self.channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        self.agents: list[pb_grpc.AgentServiceAsyncStub] = [
            pb_grpc.AgentServiceStub(c) for c in self.channels
        ]
        self.datasets: pb_grpc.DatasetServiceAsyncStub = pb_grpc.DatasetServiceStub(
            self.channels[0]
        )
        self.names = [f"node-{i:05d}" for i in range(nodes)]
        self.desired: dict[str, list[str]] = {}
        self.streams: list[asyncio.Task[None]] = []

    def identity(self, i: int) -> pb.AgentIdentity:
        return pb.AgentIdentity(node_name=self.names[i], cache_id=f"cache-{i}")

    def stub(self, i: int) -> pb_grpc.AgentServiceAsyncStub:
        return self.agents[i % len(self.agents)]

    async def register(self, i: int) -> None:
        labels = {ZONE: f"z{i % 3}"}
        if i % 20 == 0:
            labels["pool"] = "gpu"
        await self.stub(i).RegisterAgent(
            pb.RegisterAgentRequest(
                agent=self.identity(i),
                cache_capacity_bytes=1 << 40,
                cache_free_bytes=1 << 40,
                node_labels=labels,
                agent_version="bench",
            ),
            timeout=60,
        )

    async def watch(self, i: int) -> None:
        call = self.stub(i).WatchDesiredState(pb.WatchDesiredStateRequest(agent=self.identity(i)))
        try:
            async for message in call:
                self.desired[self.names[i]] = [d.name for d in message.datasets]
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                print(f"watch of {self.names[i]} ended: {exc.code()}", file=sys.stderr)

    async def poll(self, i: int, every: float) -> None:
        """A node without a held stream: reads its desired set from a fresh stream's first
        message every `every` seconds."""
        while True:
            call = self.stub(i).WatchDesiredState(
                pb.WatchDesiredStateRequest(agent=self.identity(i)), timeout=60
            )
            try:
                async for message in call:
                    self.desired[self.names[i]] = [d.name for d in message.datasets]
                    break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    print(f"poll of {self.names[i]} failed: {exc.code()}", file=sys.stderr)
            finally:
                call.cancel()
            await asyncio.sleep(every)

    async def report(self, i: int) -> float:
        started = time.perf_counter()
        await self.stub(i).ReportState(
            pb.ReportStateRequest(
                agent=self.identity(i),
                replicas=[
                    pb.ReplicaReport(
                        dataset_name=name,
                        state=pb.REPLICA_STATE_READY,
                        digest=DIGEST,
                        files_done=10,
                        files_total=10,
                        bytes_done=GIB,
                        bytes_total=GIB,
                        disk_bytes=GIB,
                        revision=1,
                    )
                    for name in self.desired.get(self.names[i], [])
                ],
                cache_capacity_bytes=1 << 40,
                cache_free_bytes=(1 << 40) - GIB * len(self.desired.get(self.names[i], [])),
            ),
            timeout=60,
        )
        return time.perf_counter() - started

    async def close(self) -> None:
        for task in self.streams:
            task.cancel()
        await asyncio.gather(*self.streams, return_exceptions=True)
        for channel in self.channels:
            await channel.close(None)


async def bounded(n: int, limit: int, work: Any) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def one(i: int) -> None:
        async with semaphore:
            await work(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def send_reports(sim: Sim, rate: float, count: int) -> ReportPhase:
    """`count` ReportState calls started at `rate` per second (round robin over nodes),
    whether or not earlier ones finished; latencies measured at the client."""
    latencies: list[float] = []
    phase = ReportPhase(sent=count)

    async def one(i: int) -> None:
        try:
            latencies.append(await sim.report(i))
        except grpc.aio.AioRpcError:
            phase.errors += 1

    tasks: list[asyncio.Task[None]] = []
    begin = time.perf_counter()
    for k in range(count):
        delay = begin + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(k % len(sim.names))))
    await asyncio.gather(*tasks)
    phase.rate_achieved = count / (time.perf_counter() - begin)
    ordered = sorted(latencies)
    if ordered:
        phase.p50_ms = 1000 * statistics.median(ordered)
        phase.p99_ms = 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        phase.max_ms = 1000 * ordered[-1]
    return phase


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pass_durations(log: Path, since: float) -> list[float]:
    out = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        match = _PASS.search(record.get("msg", ""))
        if match and record["ts"] >= since:
            out.append(float(match.group(1)))
    return out


async def run(args: argparse.Namespace, cluster: LocalCluster) -> Results:
    results = Results(nodes=args.nodes, datasets=args.datasets, watchers=args.watchers)
    sim = Sim(cluster.coordinator_address, args.nodes)
    pid = cluster.coordinator.popen.pid
    log = cluster.coordinator.log_path
    try:
        started = time.perf_counter()
        await bounded(args.nodes, 64, sim.register)
        results.register_seconds = time.perf_counter() - started
        watchers = min(args.watchers, args.nodes)
        sim.streams = [asyncio.create_task(sim.watch(i)) for i in range(watchers)]
        sim.streams += [
            asyncio.create_task(sim.poll(i, args.poll_seconds)) for i in range(watchers, args.nodes)
        ]

        rng = random.Random(42)  # noqa: S311 - a fixed, reproducible workload
        expected = 0
        gpu_nodes = sum(1 for i in range(args.nodes) if i % 20 == 0)
        specs = []
        for i in range(args.datasets):
            replicas = rng.randint(1, 5)
            specs.append(
                pb.Dataset(
                    name=f"team-{i % 10}/ds-{i:04d}", source=f"s3://bench/d{i}/", replicas=replicas
                )
            )
            expected += replicas
        for i in range(2):
            specs.append(
                pb.Dataset(
                    name=f"warm/gpu-{i}",
                    source=f"s3://bench/warm{i}/",
                    all_nodes=True,
                    node_selector={"pool": "gpu"},
                )
            )
            expected += gpu_nodes
        results.expected_replicas = expected
        started = time.perf_counter()
        created_at = time.time()

        async def create(i: int) -> None:
            await sim.datasets.CreateDataset(pb.CreateDatasetRequest(dataset=specs[i]), timeout=60)

        await bounded(len(specs), 16, create)
        results.create_seconds = time.perf_counter() - started
        started = time.perf_counter()
        last_note = time.perf_counter()
        while sum(len(v) for v in sim.desired.values()) != expected:
            if time.perf_counter() - last_note > 5:
                last_note = time.perf_counter()
                print(
                    f"waiting: {sum(len(v) for v in sim.desired.values())} of {expected} "
                    f"replicas delivered to {len(sim.desired)} streams",
                    file=sys.stderr,
                )
            if time.perf_counter() - started > 600:
                raise RuntimeError(
                    f"placement did not converge: {sum(len(v) for v in sim.desired.values())} "
                    f"of {expected} replicas delivered"
                )
            await asyncio.sleep(0.05)
        results.converge_seconds = time.perf_counter() - started
        initial = pass_durations(log, created_at)
        results.pass_seconds_initial_max = max(initial, default=0.0)

        # Reports at a fixed rate, open loop: first every node's first Ready report (every
        # one is news: status changes, labels, reconcile passes), then steady reports.
        results.report_rate_target = args.report_rate
        phase_one = await send_reports(sim, args.report_rate, args.nodes)
        results.first_round = phase_one
        reports_at = time.time()
        steady_count = int(args.report_rate * args.report_seconds)
        results.steady = await send_reports(sim, args.report_rate, steady_count)
        results.pass_seconds_steady = [round(p, 3) for p in pass_durations(log, reports_at)]
        status = proc_status(pid)
        results.rss_peak_mib = status["VmHWM"] / (1 << 20)
        results.rss_end_mib = status["VmRSS"] / (1 << 20)
        results.coordinator_cpu_seconds = cpu_seconds(pid)
    finally:
        await sim.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--report-rate", type=float, default=500.0)
    parser.add_argument("--report-seconds", type=float, default=20.0)
    parser.add_argument(
        "--watchers",
        type=int,
        default=1_000_000,
        help="nodes holding a WatchDesiredState stream (default: all); the others poll it",
    )
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="datacache-coordinator-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        with LocalCluster(workdir) as cluster:
            cluster.start_coordinator(
                "--log-level=debug",
                "--lease-seconds=600",
            )
            results = asyncio.run(run(args, cluster))
    summary = asdict(results)
    steady = results.pass_seconds_steady
    summary["pass_seconds_steady_median"] = statistics.median(steady) if steady else None
    summary["pass_seconds_steady_max"] = max(steady) if steady else None
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
