"""agent.pagecache: finished ranges go to disk and leave the page cache, and write errors are
raised, not left for a later fsync."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from agent import pagecache
from agent.fetch import FetchSettings, Progress, fetch_into, plan
from agent.sources import ObjectInfo
from agent.sources.local import LocalDirSource
from datacache.localcluster import wait_until
from tests.residency import resident_pages

MIB = 1 << 20


def test_written_out_ranges_leave_the_page_cache_and_keep_their_bytes(tmp_path: Path) -> None:
    path = tmp_path / "file"
    data = os.urandom(8 * MIB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, data, 0)
        assert resident_pages(path) == 8 * MIB // os.sysconf("SC_PAGE_SIZE")
        pagecache.write_out_and_drop(fd, 0, 4 * MIB)
        # The first half is gone from the cache; the second, not written out, stays.
        assert resident_pages(path) == 4 * MIB // os.sysconf("SC_PAGE_SIZE")
        os.fsync(fd)
        pagecache.drop(fd)
        assert resident_pages(path) == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_descriptors_that_cannot_be_written_out_are_left_alone() -> None:
    read_end, write_end = os.pipe()
    try:
        pagecache.write_out_and_drop(write_end, 0, MIB)  # ESPIPE: nothing to do
        pagecache.drop(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_failed_write_out_is_raised(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError, match="writing back") as info:
        pagecache.write_out_and_drop(fd, 0, MIB)  # a closed descriptor
    assert info.value.errno == errno.EBADF


class HoldingLastRange(LocalDirSource):
    """A local source that holds the read of one range until told to go on."""

    def __init__(self, root: str, held_offset: int) -> None:
        super().__init__(root)
        self._held_offset = held_offset
        self.go_on = threading.Event()

    def open_range(self, obj: ObjectInfo, offset: int, length: int) -> Any:
        if offset == self._held_offset:
            assert self.go_on.wait(30), "the test never let the held range go on"
        return super().open_range(obj, offset, length)


@pytest.mark.parametrize("drop_behind", [True, False])
def test_ranges_leave_the_page_cache_while_the_copy_goes_on(
    tmp_path: Path, drop_behind: bool
) -> None:
    origin, dest = tmp_path / "origin", tmp_path / "dest"
    origin.mkdir()
    dest.mkdir()
    data = os.urandom(6 * MIB)
    (origin / "big.bin").write_bytes(data)
    source = HoldingLastRange(str(origin), held_offset=5 * MIB)
    settings = FetchSettings(
        concurrency=3, part_bytes=MIB, multipart_threshold_bytes=MIB, drop_behind=drop_behind
    )
    progress = Progress()
    files = plan(list(source.list()))[0]
    copy = threading.Thread(
        target=fetch_into, args=(source, files, dest, settings, progress, threading.Event())
    )
    copy.start()
    try:
        wait_until(lambda: progress.bytes_done == 5 * MIB, 30, "every range but the held one")
        resident = resident_pages(dest / "big.bin")
    finally:
        source.go_on.set()
        copy.join(30)
    assert not copy.is_alive()
    # Five finished ranges of 1 MiB: dropped one by one, or all still cached.
    assert resident == (0 if drop_behind else 5 * MIB // os.sysconf("SC_PAGE_SIZE"))
    assert (dest / "big.bin").read_bytes() == data
