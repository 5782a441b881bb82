"""The destination tree of a copy, handled through directory descriptors that never follow
symbolic links: a planted link cannot send a write, a removal or an fsync outside it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
KEPT_DIR_FDS = 256
"""Up to this many directories stay open during a copy (saves two opens per file)."""


def open_dir(root_fd: int, parts: tuple[str, ...], create: bool) -> int:
    """Opens the directory root/parts... without following symlinks, creating it if asked."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


class Dirs:
    """Descriptors of the copy's directories, opened once (each without following symlinks)
    when there are few enough of them to keep open; otherwise opened per file."""

    def __init__(self, root_fd: int, dirs: list[tuple[str, ...]]) -> None:
        self.root_fd = root_fd
        self._fds: dict[tuple[str, ...], int] = {}
        self._keep = len(dirs) <= KEPT_DIR_FDS

    def create(self, dirs: list[tuple[str, ...]]) -> None:
        """Creates the directories (parents first, as `dirs` is ordered)."""
        for parts in dirs:
            parent = self._fds.get(parts[:-1]) if len(parts) > 1 else self.root_fd
            if parent is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(parts[-1], 0o755, dir_fd=parent)
                fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
            else:
                fd = open_dir(self.root_fd, parts, create=True)
            if self._keep:
                self._fds[parts] = fd
            else:
                os.close(fd)

    def open_file(self, parts: tuple[str, ...], flags: int) -> int:
        if not parts[:-1]:
            return os.open(parts[-1], flags, 0o644, dir_fd=self.root_fd)
        parent = self._fds.get(parts[:-1])
        if parent is not None:
            return os.open(parts[-1], flags, 0o644, dir_fd=parent)
        parent = open_dir(self.root_fd, parts[:-1], create=False)
        try:
            return os.open(parts[-1], flags, 0o644, dir_fd=parent)
        finally:
            os.close(parent)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def prune(dest: Path, keep: set[str], dirs: list[tuple[str, ...]]) -> None:
    """Removes from `dest` everything but the kept files and the directories they need, without
    following symlinks."""
    needed = {"/".join(d) for d in dirs}
    for top, dirnames, filenames in os.walk(dest, topdown=False):
        rel_top = os.path.relpath(top, dest)
        for name in filenames + dirnames:
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            full = os.path.join(top, name)
            if os.path.islink(full) or not os.path.isdir(full):
                if rel not in keep:
                    os.unlink(full)
            elif rel not in needed:
                os.rmdir(full)


def fsync_tree(root_fd: int, dirs: list[tuple[str, ...]]) -> None:
    """fsyncs the directories (deepest first) and the root: the files' names are durable."""
    for parts in sorted(dirs, key=len, reverse=True):
        fd = open_dir(root_fd, parts, create=False)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.fsync(root_fd)
