"""NFS benchmark: `datacache-agent fetch nfs://...` against libnfs's own `nfs-cp` and `nfs-cat`.

    python bench/nfs.py [--quick] [--rounds N] [--nfs-version 3|4] [--workdir DIR] [--json FILE]

One file of 1 GiB (256 MiB with --quick, random bytes, fixed seed) is written into the export
of a real nfs-ganesha server (tests/nfsserver.py: its own network and mount namespace with a
private rpcbind, reached over a veth pair, so every tool is a remote NFS client over real TCP).
Tools, run once per round each, in an order rotated every round; medians are reported:

  agent         datacache-agent fetch nfs://ADDR/export/large/ DEST --no-fsync
  agent-fsync   datacache-agent fetch nfs://ADDR/export/large/ DEST   (fsyncs the file and dir)
  nfs-cp        nfs-cp nfs://ADDR/export/large/object.bin DEST/object.bin   (never fsyncs)
  nfs-cp-fsync  the same, then fsync of the file and its directory, timed together
  nfs-cat       nfs-cat nfs://ADDR/export/large/object.bin > DEST/object.bin

nfs-cp and nfs-cat are libnfs's command-line tools (Debian libnfs-utils, the same libnfs the
agent loads): one NFS context, one read in flight. The agent reads with several contexts in
parallel and computes the file's CRC64/NVME as the bytes arrive (NFS states no checksum, so the
copy is recorded `unverified` against the source, with its digest in the manifest).

Each run gets a fresh, empty DEST, deleted and `sync`ed after it; the server's file stays in
its page cache. Measured per run, as in bench/transfer.py (whose helpers this uses): wall
time including process start-up, peak RSS, the tool's CPU time, ganesha's CPU time, and the
CPU time of everything else on the machine; every copy is checked (size and BLAKE2b).

Needs root and the Debian packages nfs-ganesha, nfs-ganesha-vfs, rpcbind and libnfs-utils
(`scripts/test` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

# bench/transfer.py, beside this script (sys.path[0]); tests/ comes with the editable install.
import transfer
from transfer import (
    GIB,
    MIB,
    SEED,
    BenchError,
    Context,
    Run,
    Workload,
    _blake2b,
    _console,
    _random_chunks,
    _run_line,
    memory_state,
)

from tests.nfsserver import NfsServer, unavailable_reason

TOOLS = ("agent", "agent-fsync", "nfs-cp", "nfs-cp-fsync", "nfs-cat")
TARGET_RATIO = 1.5
"""Issue target: the agent at least 1.5x as fast as libnfs's command-line tools."""


def write_export(export: Path, size: int) -> Workload:
    rng = random.Random(f"{SEED}-nfs")  # noqa: S311 (reproducible test data)
    (export / "large").mkdir(parents=True, exist_ok=True)
    digest = _blake2b()
    with (export / "large" / "object.bin").open("wb") as out:
        for chunk in _random_chunks(rng, size):
            digest.update(chunk)
            out.write(chunk)
    title = f"1 file of {size // GIB} GiB" if size % GIB == 0 else f"1 file of {size // MIB} MiB"
    return Workload(
        "nfs", title + " over NFS", "large/", {"object.bin": (size, digest.hexdigest())}
    )


def argv_for(ctx: Context, tool: str, uri: str, dest: Path, version: str) -> list[str]:
    url = f"{uri}large/object.bin" + ("?version=4" if version == "4" else "")
    if tool.startswith("agent"):
        return [
            ctx.agent,
            "fetch",
            f"{uri}large/",
            str(dest),
            f"--nfs-version={version}",
            "--no-progress",
            "--log-format=json",
            "--log-level=warning",
            *([] if tool == "agent-fsync" else ["--no-fsync"]),
        ]
    if tool.startswith("nfs-cp"):
        return ["nfs-cp", url, str(dest / "object.bin")]
    return [
        "sh",
        "-c",
        f"exec nfs-cat {shlex.quote(url)} > {shlex.quote(str(dest / 'object.bin'))}",
    ]


def run_tool(
    ctx: Context, tool: str, workload: Workload, uri: str, version: str, round_no: int
) -> Run:
    return transfer.run_tool(
        ctx, tool, workload, round_no, lambda dest: argv_for(ctx, tool, uri, dest, version)
    )


def report(runs: list[Run], workload: Workload) -> str:
    ok = [r for r in runs if r.error is None]
    lines, medians = transfer.tool_table(runs, workload, TOOLS)
    for agent, peers in (("agent", ("nfs-cp", "nfs-cat")), ("agent-fsync", ("nfs-cp-fsync",))):
        for peer in peers:
            if agent in medians and peer in medians:
                ratio = medians[peer] / medians[agent]
                verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
                lines.append(
                    f"speed ratio {agent}/{peer} (= {peer} median time / {agent} median time): "
                    f"{ratio:.2f} (target >= {TARGET_RATIO}: {verdict})"
                )
    methods = {m for r in ok for m in (r.verification or {})}
    if methods:
        lines.append(f"agent verification per file: {sorted(methods)}")
    for r in runs:
        if r.error is not None:
            lines.append(f"FAILED {r.tool} round {r.round}: {r.error}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nfs-version", choices=("3", "4"), default="3")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument(
        "--memory", choices=["cold", "backed"], default="cold", help="see bench/transfer.py"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=8.0,
        metavar="SECONDS",
        help="start each run this long after the previous run's output was deleted (see "
        "bench/transfer.py)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        raise BenchError(f"no NFS server can run here: {reason}")
    for tool in ("nfs-cp", "nfs-cat"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed: apt-get install libnfs-utils")
    command = shlex.join(["python", "bench/nfs.py", *argv])
    print(f"command: {command}\nstarted: {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC", flush=True)
    print(
        f"machine: {os.cpu_count()} cores, kernel {platform.release()}, Python "
        f"{platform.python_version()}",
        flush=True,
    )
    size = 256 * MIB if args.quick else GIB
    with (
        memory_state(args.memory, args.settle, 4 * size + GIB) as memory,
        tempfile.TemporaryDirectory(prefix="datacache-bench-nfs-", dir=args.workdir) as tmp,
    ):
        print(f"free memory at each run's start: {memory}", flush=True)
        print(f"agent modules compiled to bytecode: {transfer.compile_agent()}", flush=True)
        work = Path(tmp)
        server = NfsServer(work / "nfs")
        workload = write_export(server.export_dir, size)
        with server:
            assert server.ganesha_pid is not None
            ctx = Context(
                endpoint="",
                workdir=work,
                agent=_console("datacache-agent"),
                s5cmd="",
                server_pid=server.ganesha_pid,
                env=dict(os.environ),
                drop_caches=False,
                quiet_wait=args.quiet_wait,
                settle_seconds=args.settle,
                memory=args.memory,
            )
            uri = server.uri()
            print(f"server: nfs-ganesha at {uri} (NFSv{args.nfs_version})", flush=True)
            runs: list[Run] = []
            for round_no in range(1, args.rounds + 1):
                shift = (round_no - 1) % len(TOOLS)
                for tool in TOOLS[shift:] + TOOLS[:shift]:
                    run = run_tool(ctx, tool, workload, uri, args.nfs_version, round_no)
                    runs.append(run)
                    print(_run_line(run), flush=True)
        print(report(runs, workload))
        if args.json is not None:
            args.json.write_text(
                json.dumps({"command": command, "runs": [asdict(r) for r in runs]}, indent=1)
            )
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
