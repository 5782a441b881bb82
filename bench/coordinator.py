"""Coordinator scale benchmark: the real coordinator process, driven over gRPC by simulated
agents.

    python bench/coordinator.py [--nodes 5000] [--datasets 1000] [--report-rate 500]
                                [--settle-seconds 15] [--report-seconds 20] [--pass-every 5]
                                [--log-level info] [--json FILE]

Steps (in a temporary directory, removed at exit):
  1. start `datacache-coordinator` (local labeler, SQLite in the work directory, default
     reconcile interval, info logs: every full reconcile pass logs its duration and what it
     recomputed);
  2. register NODES agents (zones z0-z2; 5% carry pool=gpu) and open one WatchDesiredState
     stream per node (`--watchers` fewer: the rest poll it), all from this process (grpc.aio,
     one connection per 100 streams);
  3. create DATASETS datasets: 1-5 replicas each (fixed seed), plus two `all_nodes` datasets
     restricted to pool=gpu; wait until the desired sets the streams received add up to the
     expected number of replicas (placement converged and delivered);
  4. send ReportState at REPORT_RATE per second, open loop (calls are started on schedule
     whether or not earlier ones finished), each node reporting every dataset of its desired
     set Ready, in three phases measured separately:
     - first round: one report from every node (every report is news: statuses change,
       labels are set, passes run);
     - settling: SETTLE_SECONDS of steady reports (the same state again) while the
       coordinator still works through the first round's news;
     - steady: REPORT_SECONDS of steady reports, and every PASS_EVERY seconds one agent
       registers again, which triggers a full reconcile pass (without it, a steady phase
       might see no pass at all: steady reports trigger none, and the forced full pass comes
       only every 60 s);
     latencies are measured at the client, and each phase records what else could have
     delayed a call: CPU time the hypervisor stole from this machine (/proc/stat), the
     longest this process's own event loop was late, and every call of 20 ms or more with
     when it was due (to set against the passes, whose times into the phase are listed);
  5. read the coordinator's peak and current RSS (VmHWM, VmRSS; its placement worker's
     apart), its CPU time per phase and in all, and its reconcile passes (duration and what
     each recomputed) from its log;
  6. restart the coordinator on the same database and time its first pass, which computes
     everything from scratch (`--no-restart` skips this).

What a "full placement pass" is here: one reconcile pass over the whole state, i.e. every
dataset, agent and report, placement of every dataset over every live node, label diffing,
desired sets of every node, and the status fingerprint of every dataset. The coordinator
computes again only what changed since the previous pass (see coordinator/reconciler.py), so
the pass that placed everything after the datasets were created
(`pass_seconds_initial_max`) is the one that does it all from scratch; passes in the steady
phase show what a full pass costs when little changed.

Client and coordinator share the machine; the client's own CPU use (thousands of streams and
hundreds of calls per second in Python) competes with the coordinator, so the latencies are
upper bounds of what the coordinator alone needs. The client keeps its own pauses out of the
figures as far as it can: it freezes its garbage collector's view of the streams once they are
set up, keeps only the calls in flight, and builds each node's report once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
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

# bench/transfer.py, beside this script (sys.path[0]).
from transfer import steal_seconds

from datacache.localcluster import LocalCluster
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

GIB = 1 << 30
SLOW_CALL_SECONDS = 0.020
"""Calls at least this slow are listed with when they were due (the p99 target)."""
ZONE = "topology.kubernetes.io/zone"
DIGEST = "sha256:" + "b" * 64
_PASS = re.compile(r"Reconcile pass took (\d+\.\d+) s(?: \((.*)\))?")


@dataclass
class ReportPhase:
    started_at: float = 0.0
    """Unix time, seconds (to find the phase in the coordinator's log)."""
    seconds: float = 0.0
    sent: int = 0
    errors: int = 0
    rate_achieved: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    client_gc_pauses_ms: list[float] = field(default_factory=list)
    """This process's garbage collections during the phase that took over 10 ms."""
    coordinator_cpu: float = 0.0
    """CPU time of the coordinator and its workers during the phase, in cores (1.0: one core
    busy all along)."""
    client_cpu: float = 0.0
    """This process's CPU time during the phase, in cores."""
    steal_cores: float = 0.0
    """CPU time the hypervisor gave to other machines while this one wanted it (steal, from
    /proc/stat), in cores: the machine had that much less than its two cores."""
    client_lag_max_ms: float = 0.0
    """The longest this process's event loop was late (a 5 ms sleep that took longer): calls
    that were due then were started, or their answers seen, that much late."""
    slow_calls: list[tuple[float, float]] = field(default_factory=list)
    """(seconds into the phase, latency ms) of every call that took 20 ms or more (at most
    50)."""


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
    settling: ReportPhase | None = None
    """Reports without news while the first round's news is worked through."""
    steady: ReportPhase | None = None
    """Reports without news (the same state again), with a full pass every PASS_EVERY s."""
    pass_seconds_initial_max: float = 0.0
    passes_settling: list[str] = field(default_factory=list)
    """Each pass while settling: its duration and what it recomputed."""
    pass_seconds_steady: list[float] = field(default_factory=list)
    passes_steady: list[str] = field(default_factory=list)
    """Each pass during the steady reports: its duration and what it recomputed."""
    pass_after_restart: str = ""
    """The first pass of the coordinator started again on the same database (from scratch)."""
    rss_peak_mib: float = 0.0
    rss_end_mib: float = 0.0
    workers_rss_peak_mib: float = 0.0
    """Peak RSS of the processes the coordinator started (its placement worker), summed."""
    coordinator_cpu_seconds: float = 0.0
    """The coordinator's and its workers' CPU time over the whole run."""


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
        self.requests: dict[int, tuple[tuple[str, ...], pb.ReportStateRequest]] = {}
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

    def report_request(self, i: int) -> pb.ReportStateRequest:
        """Node `i` reporting every dataset of its desired set Ready (built once per set)."""
        names = tuple(self.desired.get(self.names[i], []))
        known = self.requests.get(i)
        if known is not None and known[0] == names:
            return known[1]
        request = pb.ReportStateRequest(
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
                for name in names
            ],
            cache_capacity_bytes=1 << 40,
            cache_free_bytes=(1 << 40) - GIB * len(names),
        )
        self.requests[i] = (names, request)
        return request

    async def report(self, i: int) -> float:
        request = self.report_request(i)
        started = time.perf_counter()
        await self.stub(i).ReportState(request, timeout=60)
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


async def send_reports(
    sim: Sim, rate: float, count: int, pid: int, first: int = 0, pass_every: float = 0.0
) -> ReportPhase:
    """`count` ReportState calls started at `rate` per second (round robin over nodes from
    node `first`), whether or not earlier ones finished; latencies measured at the client.
    With `pass_every`, one agent registers again every that many seconds (a full pass)."""
    latencies: list[float] = []
    phase = ReportPhase(sent=count)
    cpu_before, client_before = cpu_seconds(pid), time.process_time()
    steal_before = steal_seconds()
    gc_started = 0.0

    def gc_pauses(event: str, info: dict[str, int]) -> None:
        nonlocal gc_started
        if event == "start":
            gc_started = time.perf_counter()
        elif (pause := time.perf_counter() - gc_started) > 0.01:
            phase.client_gc_pauses_ms.append(round(1000 * pause, 1))

    gc.callbacks.append(gc_pauses)

    async def trigger_passes() -> None:
        for i in range(sys.maxsize):
            await asyncio.sleep(pass_every)
            await sim.register(i % len(sim.names))

    triggers = asyncio.create_task(trigger_passes()) if pass_every > 0 else None

    async def watch_lag() -> None:
        while True:
            due = time.perf_counter() + 0.005
            await asyncio.sleep(0.005)
            late = 1000 * (time.perf_counter() - due)
            phase.client_lag_max_ms = max(phase.client_lag_max_ms, round(late, 1))

    lag = asyncio.create_task(watch_lag())

    async def one(i: int, due: float) -> None:
        try:
            latency = await sim.report(i)
        except grpc.aio.AioRpcError:
            phase.errors += 1
            return
        latencies.append(latency)
        if latency >= SLOW_CALL_SECONDS and len(phase.slow_calls) < 50:
            phase.slow_calls.append((round(due, 2), round(1000 * latency, 1)))

    # Only calls in flight are kept: thousands of finished tasks would make this process's
    # garbage collections (which count as latency) longer.
    pending: set[asyncio.Task[None]] = set()
    phase.started_at = time.time()
    begin = time.perf_counter()
    for k in range(count):
        delay = begin + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one((first + k) % len(sim.names), k / rate))
        pending.add(task)
        task.add_done_callback(pending.discard)
    while pending:
        await asyncio.gather(*pending)
    for helper in (triggers, lag):
        if helper is not None:
            helper.cancel()
            await asyncio.gather(helper, return_exceptions=True)
    gc.callbacks.remove(gc_pauses)
    elapsed = phase.seconds = time.perf_counter() - begin
    phase.steal_cores = round((steal_seconds() - steal_before) / elapsed, 2)
    phase.rate_achieved = count / elapsed
    phase.coordinator_cpu = round((cpu_seconds(pid) - cpu_before) / elapsed, 2)
    phase.client_cpu = round((time.process_time() - client_before) / elapsed, 2)
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


def children(pid: int) -> list[int]:
    """The processes `pid` started (the coordinator's placement worker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and the processes it started, seconds."""
    total = 0.0
    for one in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def passes(log: Path, since: float) -> list[tuple[float, str]]:
    """(duration, what it recomputed) of every reconcile pass logged since `since`."""
    return [(seconds, what) for _, seconds, what in timed_passes(log, since)]


def timed_passes(log: Path, since: float) -> list[tuple[float, float, str]]:
    """The same with when each pass ended (Unix time, seconds) first."""
    out = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        match = _PASS.search(record.get("msg", ""))
        if match and record["ts"] >= since:
            out.append((record["ts"], float(match.group(1)), match.group(2) or ""))
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
        # This process holds 5,000 streams too: a full collection of its heap would pause it
        # for a few hundred milliseconds and count as latency of every call in flight. What
        # exists now lives to the end; collect only what the report phases create.
        gc.collect()
        gc.freeze()
        initial = [seconds for seconds, _ in passes(log, created_at)]
        results.pass_seconds_initial_max = max(initial, default=0.0)

        # Reports at a fixed rate, open loop: first every node's first Ready report (every
        # one is news: status changes, labels, reconcile passes), then steady reports.
        results.report_rate_target = args.report_rate
        phase_one = await send_reports(sim, args.report_rate, args.nodes, pid)
        results.first_round = phase_one
        settling_at = time.time()
        settle_count = int(args.report_rate * args.settle_seconds)
        if settle_count:
            results.settling = await send_reports(
                sim, args.report_rate, settle_count, pid, first=args.nodes
            )
        results.passes_settling = [f"{t:.3f} s: {what}" for t, what in passes(log, settling_at)]
        reports_at = time.time()
        steady_count = int(args.report_rate * args.report_seconds)
        results.steady = await send_reports(
            sim,
            args.report_rate,
            steady_count,
            pid,
            first=args.nodes + settle_count,
            pass_every=args.pass_every,
        )
        steady = timed_passes(log, reports_at)
        results.pass_seconds_steady = [round(seconds, 3) for _, seconds, _ in steady]
        results.passes_steady = [
            f"{ended - results.steady.started_at - seconds:.2f}-"
            f"{ended - results.steady.started_at:.2f} s into the phase, {seconds:.3f} s: {what}"
            for ended, seconds, what in steady
        ]
        status = proc_status(pid)
        results.rss_peak_mib = status["VmHWM"] / (1 << 20)
        results.rss_end_mib = status["VmRSS"] / (1 << 20)
        results.workers_rss_peak_mib = sum(
            proc_status(child)["VmHWM"] for child in children(pid)
        ) / (1 << 20)
        results.coordinator_cpu_seconds = cpu_seconds(pid)
    finally:
        await sim.close()
    if args.restart:
        # A restarted coordinator knows nothing but the database: its first pass computes
        # everything from scratch (every agent has a fresh lease until it reports again).
        restarted_at = time.time()
        await asyncio.to_thread(restart, cluster, args)
        deadline = time.monotonic() + 120
        while not (after := passes(cluster.coordinator.log_path, restarted_at)):
            if time.monotonic() > deadline:
                raise RuntimeError("no reconcile pass within 120 s of the restart")
            await asyncio.sleep(0.2)
        results.pass_after_restart = f"{after[0][0]:.3f} s: {after[0][1]}"
    return results


def coordinator_flags(args: argparse.Namespace) -> list[str]:
    return ["--lease-seconds=600", f"--log-level={args.log_level}"]


def restart(cluster: LocalCluster, args: argparse.Namespace) -> None:
    cluster.coordinator.stop()
    cluster.start_coordinator(*coordinator_flags(args), timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--report-rate", type=float, default=500.0)
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=15.0,
        help="steady reports sent (and measured apart) between the first round and the "
        "steady phase; 0: none",
    )
    parser.add_argument("--report-seconds", type=float, default=20.0)
    parser.add_argument(
        "--pass-every",
        type=float,
        default=5.0,
        help="during the steady phase, one agent registers again every this many seconds, "
        "which triggers a full reconcile pass; 0: never",
    )
    parser.add_argument(
        "--watchers",
        type=int,
        default=1_000_000,
        help="nodes holding a WatchDesiredState stream (default: all); the others poll it",
    )
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument(
        "--log-level",
        default="info",
        help="the coordinator's log level (at debug, grpc logs a line for every call, which "
        "costs the coordinator more CPU than handling a report)",
    )
    parser.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="skip the last step: restart the coordinator and time its first pass",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="datacache-coordinator-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        with LocalCluster(workdir) as cluster:
            cluster.start_coordinator(*coordinator_flags(args))
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
