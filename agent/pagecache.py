"""Writing finished file ranges to disk and dropping them from the page cache (Linux).

A copy with fsync on writes every byte to disk before it counts anyway. Doing it range by
range as ranges finish (`sync_file_range`), instead of in one fsync at the end, and then
dropping those ranges from the page cache (`posix_fadvise(DONTNEED)`), keeps the copy's page
cache to the ranges in flight:

- a dataset larger than memory does not push the page cache of the node's running jobs out;
- the disk writes are spread over the copy instead of coming in one burst at its end;
- the copy reuses the same memory. Where touching memory for the first time is expensive (a VM
  whose hypervisor takes free memory back, "free page reporting"), writing 1 GiB and fsyncing
  it took 2.84-3.40 s after 6 s idle and 0.98-1.07 s this way (`bench/pagecache.py`,
  docs/benchmarks.md).

The final fsync of each file still runs: `sync_file_range` writes no metadata and does not
flush the drive's cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP)
"""Errors that say the file or system cannot do this, not that a write failed."""


def _load() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load()


def write_out_and_drop(fd: int, offset: int, length: int) -> None:
    """Writes the `length` bytes at `offset` of `fd` to disk, waits for them, then drops them
    from the page cache. Raises OSError when writing them failed (ENOSPC, EIO): the error is
    raised here rather than left for a later fsync. Does nothing where the system cannot."""
    if _sync_file_range is None or length <= 0:
        return
    if _sync_file_range(fd, offset, length, _WAIT_BEFORE | _WRITE | _WAIT_AFTER) != 0:
        code = ctypes.get_errno()
        if code in _UNSUPPORTED:
            return
        raise OSError(code, f"writing back {length} bytes at {offset}: {os.strerror(code)}")
    drop(fd, offset, length)


def drop(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drops written-back bytes of `fd` from the page cache (length 0: to the end); a hint,
    so it never fails. Pages not yet on disk stay."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
