"""Just enough inotify (Linux, through ctypes) to act the instant a file system step happens:
the chaos suite kills an agent the moment it renames a version into place, writes a manifest
or switches `current`, to land SIGKILL between the steps of publishing."""

from __future__ import annotations

import ctypes
import os
import select
import struct
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

IN_MODIFY = 0x002
IN_CREATE = 0x100
IN_MOVED_TO = 0x080
IN_ISDIR = 0x40000000
_HEADER = struct.Struct("iIII")


class InotifyError(OSError):
    pass


class Inotify:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise InotifyError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd: int = fd

    def watch(self, path: Path, mask: int = IN_CREATE | IN_MOVED_TO) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise InotifyError(ctypes.get_errno(), f"inotify_add_watch {path} failed")

    def wait(self, wanted: Callable[[str, int], bool], timeout: float) -> str | None:
        """Blocks until an event (name, mask) satisfies `wanted`; returns its name, or None
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            offset = 0
            while offset < len(data):
                _, mask, _, length = _HEADER.unpack_from(data, offset)
                raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
                offset += _HEADER.size + length
                name = raw.rstrip(b"\0").decode(errors="replace")
                if wanted(name, mask):
                    return name

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
