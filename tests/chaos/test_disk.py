"""Scenario 4: a node's disk fills up in the middle of a copy (a real ENOSPC from a small
tmpfs), and the source's disk answers EIO (a loop-mounted ext4 image whose backing file is cut
short under it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datacache.v1 import datacache_pb2 as pb
from tests.chaos.harness import (
    BIG_KEY,
    ChaosCluster,
    DirOrigin,
    Monitor,
    S3Origin,
    Sizes,
    generate,
    wait_for,
)
from tests.chaos.report import ScenarioRecord
from tests.conftest import mounted_tmpfs

NODES = ["node-1", "node-2", "node-3"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def failed_with(chaos: ChaosCluster, short: str, node: str, words: tuple[str, ...]) -> bool:
    replica = chaos.replicas(short).get(node)
    return (
        replica is not None
        and replica.state == pb.REPLICA_STATE_FAILED
        and any(w in replica.message for w in words)
    )


@pytest.mark.scenario(4, "ENOSPC on one node in the middle of a copy (small tmpfs)")
def test_disk_full_on_one_node(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord
) -> None:
    files = generate(7, sizes)
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(files)
    keep = S3Origin(chaos.local.s3_endpoint, bucket, prefix="keep/")
    keep.put_all({f"k{i}.bin": os.urandom(50_000) for i in range(5)})
    need = sum(len(v) for v in files.values())
    # On tmpfs every file takes whole pages: the copy needs more than the sum of its sizes.
    slack = sum(-len(v) % PAGE for v in files.values())
    size_mib = 2 * need // (1 << 20) + 4
    full = chaos.cache("node-3")
    with mounted_tmpfs(full, f"{size_mib}m"):
        chaos.start_coordinator()
        for node in NODES:
            chaos.start_agent(node)
        chaos.wait_registered(NODES)
        with Monitor(chaos, {"data": origin, "keep": keep}) as monitor:
            chaos.create("keep", keep.uri, replicas=3)
            chaos.wait_ready("keep", 3)
            # Another tenant of the disk leaves room for the sum of the sizes, but not for
            # the pages the files take: the room check passes, the copy runs out of space.
            free = shutil.disk_usage(full).free
            (full / "filler").write_bytes(b"\0" * (free - need - slack // 2))
            record.fault(
                f"node-3's cache is a {size_mib} MiB tmpfs; another writer leaves it "
                f"{need + slack // 2:,} bytes free: room for the dataset's {need:,} bytes but "
                f"not for the {slack:,} bytes of page rounding its files add"
            )
            chaos.create("data", origin.uri, replicas=3)

            def disk_full() -> bool:
                return any("disk full" in r.get("msg", "") for r in chaos.agent_log("node-3"))

            wait_for(disk_full, 60, "node-3's copy to fail with 'disk full'")
            wait_for(
                lambda: chaos.ready("data") == {"node-1", "node-2"},
                60,
                "the other nodes' copies",
            )
            message = next(
                r["msg"] for r in chaos.agent_log("node-3") if "disk full" in r.get("msg", "")
            )
            record.observe(f"node-3: {message[:220]}")
            failures = sum("disk full" in r.get("msg", "") for r in chaos.agent_log("node-3"))
            # The operator grows the disk.
            subprocess.run(
                ["mount", "-o", f"remount,size={2 * size_mib}m", str(full)],
                check=True,
                timeout=30,
            )
            grown = time.monotonic()
            chaos.wait_ready("data", 3)
            record.recovered(
                time.monotonic() - grown, "from growing the disk to 3 Ready, labelled replicas"
            )
            monitor.finish(record)
        record.observe(
            f"node-3 failed {failures} copies with 'disk full' before the disk grew, each "
            "retried with backoff; every failed copy's staging was discarded; node-3's "
            "published copy of 'keep' stayed complete: "
            f"{'node-3' in monitor.complete_copies('keep')}"
        )
        assert monitor.complete_copies("keep") == set(NODES)
        assert monitor.complete_copies("data") == set(NODES)
        assert list((full / "staging").iterdir()) == []
    assert record.exposed == 0 and record.lost == 0


class LoopImage:
    """An ext4 image on a loop device, mounted read-only, whose backing file can be cut short
    (reads of the missing part fail with EIO) and restored."""

    def __init__(self, workdir: Path, size_mib: int) -> None:
        self.image = workdir / "source.img"
        self.good = workdir / "source.img.good"
        self.mountpoint = workdir / "mnt"
        self.size_mib = size_mib
        self.device = ""

    def _run(self, *argv: str) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
        return result.stdout

    def create(self, files: dict[str, bytes]) -> None:
        with self.image.open("wb") as f:
            f.truncate(self.size_mib << 20)
        self._run("mkfs.ext4", "-q", "-F", str(self.image))
        self.device = self._run("losetup", "-f", "--show", str(self.image)).strip()
        self.mountpoint.mkdir()
        self._run("mount", self.device, str(self.mountpoint))
        try:
            root = self.mountpoint / "ds"
            for key, data in files.items():
                path = root / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        finally:
            self._run("umount", str(self.mountpoint))
        # Read-only from now on: nothing the kernel keeps in memory differs from the image.
        self._run("mount", "-o", "ro,errors=continue", self.device, str(self.mountpoint))
        shutil.copyfile(self.image, self.good)

    def physical_offset(self, path: Path) -> int:
        """Byte offset in the image of the first block of `path`."""
        out = self._run("filefrag", "-e", "-b1024", str(path))
        for line in out.splitlines():
            fields = line.replace(":", " ").replace("..", " ").split()
            if fields and fields[0] == "0" and len(fields) >= 4:
                return int(fields[3]) * 1024
        raise RuntimeError(f"no extent in filefrag output:\n{out}")

    def cut(self, at: int) -> None:
        """Reads of everything beyond `at` bytes of the image fail with EIO from now on."""
        with self.image.open("r+b") as f:
            f.truncate(at)
        for path in (self.mountpoint / "ds").rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def restore(self) -> None:
        shutil.copyfile(self.good, self.image)

    def close(self) -> None:
        if self.mountpoint.is_mount():
            subprocess.run(["umount", "-l", str(self.mountpoint)], timeout=60, check=False)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], timeout=60, check=False)


@pytest.fixture
def loop_image(tmp_path: Path) -> Iterator[LoopImage]:
    if os.geteuid() != 0:
        pytest.skip("needs root to attach a loop device and mount it")
    missing = [t for t in ("mkfs.ext4", "losetup", "filefrag", "mount") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (Debian e2fsprogs, mount)")
    image = LoopImage(tmp_path, 32)
    try:
        yield image
    finally:
        image.close()


@pytest.mark.scenario(4, "EIO from the source's disk (file:// on a failing ext4 image)")
def test_eio_from_the_source(
    chaos: ChaosCluster, loop_image: LoopImage, sizes: Sizes, record: ScenarioRecord
) -> None:
    files = generate(8, sizes)
    try:
        loop_image.create(files)
    except RuntimeError as exc:
        pytest.skip(f"cannot build a loop-mounted ext4 image here: {exc}")
    origin = DirOrigin(loop_image.mountpoint / "ds")
    # Known content: the image holds exactly these bytes (it is read-only).
    for key, data in files.items():
        origin.remember(key, data)
    nodes = NODES[:2]
    chaos.start_coordinator()
    for node in nodes:
        chaos.start_agent(node)
    chaos.wait_registered(nodes)
    big_at = loop_image.physical_offset(loop_image.mountpoint / "ds" / BIG_KEY)
    cut_at = big_at + 2 * sizes.part_bytes
    with Monitor(chaos, {"data": origin}) as monitor:
        loop_image.cut(cut_at)
        record.fault(
            f"the source's ext4 image cut short at {cut_at:,} bytes, inside {BIG_KEY} (which "
            f"starts at {big_at:,}): reads of its later ranges fail with EIO"
        )
        chaos.create("data", origin.uri, replicas=2)
        words = ("Input/output error", "EIO", "I/O error")
        wait_for(
            lambda: all(failed_with(chaos, "data", n, words) for n in nodes),
            90,
            "both copies to fail with an I/O error",
        )
        for node in nodes:
            record.observe(f"{node}: Failed: {chaos.replicas('data')[node].message[:200]}")
        loop_image.restore()
        restored = time.monotonic()
        chaos.wait_ready("data", 2, timeout=120)
        record.recovered(
            time.monotonic() - restored, "from the disk's repair to 2 Ready, labelled replicas"
        )
        monitor.finish(record)
    assert monitor.complete_copies("data") == set(nodes)
    for node in nodes:
        assert list((chaos.cache(node) / "staging").iterdir()) == []
    assert record.exposed == 0 and record.lost == 0
