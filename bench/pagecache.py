"""Writing 1 GiB and fsyncing it, into memory freed just before or a while ago, with and
without drop-behind (`agent.pagecache`).

    python bench/pagecache.py [--dir DIR] [--mib 1024] [--rounds 3] [--idle 6]

Each round writes a file of MIB MiB in 256 KiB `pwrite`s (the agent's write size) and fsyncs
it four times, each time IDLE seconds after the previous file was deleted: first with free
memory "cold" (as the machine is), then "backed" (free page reporting off, as in
bench/transfer.py --memory backed; needs root), each in two ways:
  plain        pwrite everything, then fsync;
  drop-behind  as each 16 MiB range is written, `pagecache.write_out_and_drop` (write it to
               disk, wait, drop it from the page cache), then fsync.
It prints wall and system CPU seconds per run. On a VM whose hypervisor takes free memory back
(virtio-balloon free page reporting) "cold" memory costs the kernel about 13 us per 4 KiB page
to touch again; drop-behind reuses the same few ranges' worth of memory instead. "Backed"
memory is the state of a machine without free page reporting.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

# bench/transfer.py, beside this script (sys.path[0]).
from transfer import memory_state

from agent import pagecache

RANGE = 16 << 20
BUFFER = 256 << 10


def write(path: Path, size: int, drop_behind: bool) -> tuple[float, float]:
    buffer = memoryview(os.urandom(BUFFER))
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for offset in range(0, size, BUFFER):
            os.pwrite(fd, buffer, offset)
            end = offset + BUFFER
            if drop_behind and end % RANGE == 0:
                pagecache.write_out_and_drop(fd, end - RANGE, RANGE)
        os.fsync(fd)
    finally:
        os.close(fd)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    return time.perf_counter() - started, after - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to write")
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=6.0, help="seconds before a cold run")
    args = parser.parse_args()
    path = args.dir / "datacache-bench-pagecache.bin"
    size = args.mib << 20
    path.touch()
    try:
        for memory in ("cold", "backed"):
            with memory_state(memory, args.idle, 2 * size + (1 << 30)):
                for round_no in range(1, args.rounds + 1):
                    for drop_behind in (False, True):
                        path.unlink()
                        # The state of free memory each run starts from, not synchronisation.
                        time.sleep(args.idle)
                        wall, system = write(path, size, drop_behind)
                        mode = "drop-behind" if drop_behind else "plain"
                        print(
                            f"round {round_no} {memory:6s} {mode:11s} {wall:5.2f} s wall "
                            f"{system:5.2f} s system",
                            flush=True,
                        )
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
