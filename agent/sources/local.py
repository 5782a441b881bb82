"""`file:///mounted/dir/` sources: a directory already mounted on the node (an NFS share, a
local disk, a CSI volume), read with plain system calls.

Design choices:

- **Symbolic links are never followed.** Every directory below the root is opened relative to
  its parent's descriptor with O_NOFOLLOW, and files are opened the same way, so a link planted
  anywhere in the tree cannot lead the agent out of the dataset (to /etc, to another team's
  share) even if it appears between listing and reading. Links, sockets, FIFOs and devices are
  not objects a dataset can hold: they are skipped and logged at info. Files are opened with
  O_NONBLOCK so that a FIFO swapped in for a listed file cannot block a reader forever. The
  root itself may be a link: the operator chose it.
- **Key order while streaming.** Keys are '/'-joined paths relative to the root and are listed
  in the byte order of their UTF-8 form, the order S3 lists in. Sorting each directory's
  entries with '/' appended to directory names puts a directory's whole subtree exactly where
  its keys sort among its siblings ('a-b' < 'a/x' because '-' < '/'), so the walk streams in
  key order holding one directory's names per level.
- **Version tag.** A file has no ETag; (size, mtime in nanoseconds, inode) changes when a file
  is rewritten, truncated or replaced by a rename, which is how tools update files. Each read
  checks the tag of the file it opened before and after copying its range, so a copy never
  mixes two versions of a file (`SourceChanged`). A writer that keeps size and inode and
  restores the mtime defeats this, as it defeats every mtime-based tool (make, rsync).
- **Errors.** EIO and files that end early are `SourceError` naming the path and offset, with
  the OSError as `__cause__`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from stat import S_ISLNK, S_ISREG
from typing import TYPE_CHECKING

from agent.errors import SourceChanged, SourceError
from agent.sources.base import ObjectInfo, read_chunks

if TYPE_CHECKING:
    from agent.checksums import ObjectChecksum

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MISSING = (errno.ENOENT, errno.ENOTDIR)


def version_tag(size: int, mtime_ns: int, inode: int) -> str:
    """The version tag of a file that has no ETag. Never looks like an MD5 ETag, so the engine
    never mistakes it for a content digest."""
    return f"{size}-{mtime_ns}-{inode}"


def sort_key(name: bytes, is_dir: bool) -> bytes:
    """Sort key for one directory's entries that makes a depth-first walk list in key order."""
    return name + b"/" if is_dir else name


class LocalDirSource:
    """Reads a mounted directory tree. Safe to use from many threads: it keeps no state
    between calls but the root path."""

    def __init__(self, root: str) -> None:
        if not root.startswith("/"):
            raise SourceError(f"file source {root!r}: the path must be absolute")
        self._root = root.rstrip("/") + "/"
        self._uri = f"file://{self._root}"

    def list(self) -> Iterator[ObjectInfo]:
        try:
            root_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"listing {self._uri}: {exc.strerror}") from exc
        # Directories being walked, one per level: (descriptor, key prefix, entries left).
        # `fds` holds the same descriptors, registered before their entries are read, so
        # `finally` closes every one whatever fails.
        fds = [root_fd]
        stack: list[tuple[int, str, Iterator[tuple[str, bool]]]] = []
        try:
            stack.append((root_fd, "", self._entries(root_fd, "")))
            while stack:
                fd, prefix, entries = stack[-1]
                entry = next(entries, None)
                if entry is None:
                    stack.pop()
                    os.close(fds.pop())
                    continue
                name, is_dir = entry
                if is_dir:
                    sub = self._open_subdir(fd, name, prefix + name)
                    if sub is not None:
                        fds.append(sub)
                        stack.append((sub, f"{prefix}{name}/", self._entries(sub, prefix + name)))
                    continue
                info = self._file_info(fd, name, prefix + name)
                if info is not None:
                    yield info
        finally:
            for fd in fds:
                os.close(fd)

    def _entries(self, fd: int, where: str) -> Iterator[tuple[str, bool]]:
        """The directory's files and subdirectories, sorted for a key-order walk."""
        found: list[tuple[bytes, str, bool]] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_symlink():
                        log.info(
                            "Skipping symbolic link (not followed)",
                            extra={"path": self._root + _join(where, entry.name)},
                        )
                    elif entry.is_dir(follow_symlinks=False):
                        found.append((sort_key(os.fsencode(entry.name), True), entry.name, True))
                    elif entry.is_file(follow_symlinks=False):
                        found.append((sort_key(os.fsencode(entry.name), False), entry.name, False))
                    else:
                        log.info(
                            "Skipping special file (socket, FIFO or device)",
                            extra={"path": self._root + _join(where, entry.name)},
                        )
        except OSError as exc:
            raise SourceError(f"listing {self._root}{where}: {exc.strerror}") from exc
        found.sort()
        return iter([(name, is_dir) for _, name, is_dir in found])

    def _open_subdir(self, parent_fd: int, name: str, key: str) -> int | None:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (*_MISSING, errno.ELOOP):
                # Removed or replaced by a link since its parent was read: not part of the tree.
                log.info("Skipping directory that changed while listing", extra={"key": key})
                return None
            raise SourceError(f"listing {self._root}{key}: {exc.strerror}") from exc

    def _file_info(self, parent_fd: int, name: str, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _MISSING:
                return None  # deleted since the directory was read
            raise SourceError(f"listing {self._root}{key}: {exc.strerror}") from exc
        if not S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, version_tag(st.st_size, st.st_mtime_ns, st.st_ino))

    def _open(self, key: str) -> int:
        """Opens the file at `key` without following any link on the way."""
        path = self._root + key
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise SourceError(f"{path}: not a key of this source")
        try:
            fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"opening {self._uri}: {exc.strerror}") from exc
        done: list[str] = []
        try:
            for part in parts[:-1]:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
                done.append(part)
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as exc:
            failed = "/".join([*done, parts[len(done)]])
            if exc.errno in (*_MISSING, errno.ELOOP) and _is_link(fd, parts[len(done)]):
                raise SourceError(
                    f"{path}: {self._root}{failed} is a symbolic link, which is not followed"
                ) from exc
            if exc.errno in _MISSING:
                raise SourceError(f"{path}: no such file (deleted since it was listed?)") from exc
            raise SourceError(f"opening {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _check(self, fd: int, obj: ObjectInfo) -> None:
        path = self._root + obj.key
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise SourceError(f"stat of {path}: {exc.strerror}") from exc
        if not S_ISREG(st.st_mode):
            raise SourceChanged(f"{path} changed while being copied: no longer a regular file")
        tag = version_tag(st.st_size, st.st_mtime_ns, st.st_ino)
        if tag != obj.etag:
            raise SourceChanged(
                f"{path} changed while being copied (listed as {obj.etag}, now {tag})"
            )

    def read_range(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return
        yield from read_chunks(self.open_range(obj, offset, length), length)

    def open_range(self, obj: ObjectInfo, offset: int, length: int) -> _RangeBody:
        """Bytes [offset, offset+length) of `obj`, read into the caller's buffers
        (`StreamingSource`)."""
        fd = self._open(obj.key)
        try:
            self._check(fd, obj)
        except BaseException:
            os.close(fd)
            raise
        return _RangeBody(self, fd, obj, offset, length)

    def stat(self, key: str) -> ObjectInfo:
        fd = self._open(key)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise SourceError(f"stat of {self._root}{key}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if not S_ISREG(st.st_mode):
            raise SourceError(f"{self._root}{key}: not a regular file")
        return ObjectInfo(key, st.st_size, version_tag(st.st_size, st.st_mtime_ns, st.st_ino))

    def checksum(self, obj: ObjectInfo) -> ObjectChecksum | None:
        """A plain file stores no checksum of its content."""
        return None


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _join(where: str, name: str) -> str:
    return f"{where}/{name}" if where else name


class _RangeBody:
    """A range of one opened file: its version checked when opened, when it ends short and
    after its last byte."""

    checksum: ObjectChecksum | None = None
    """A plain file states no checksum."""

    def __init__(
        self, source: LocalDirSource, fd: int, obj: ObjectInfo, offset: int, length: int
    ) -> None:
        self._source, self._fd, self._obj = source, fd, obj
        self._pos, self._end = offset, offset + length

    def readinto(self, view: memoryview) -> int:
        if self._fd < 0 or self._pos >= self._end:
            return 0
        want = min(len(view), self._end - self._pos)
        path = self._source._root + self._obj.key
        try:
            got = os.preadv(self._fd, [view[:want]], self._pos)
        except OSError as exc:
            raise SourceError(f"reading {path} at byte {self._pos}: {exc.strerror}") from exc
        if got == 0:
            self._source._check(self._fd, self._obj)
            raise SourceError(
                f"reading {path}: the file ends at byte {self._pos}, "
                f"{self._end - self._pos} bytes short"
            )
        self._pos += got
        if self._pos == self._end:
            # Also catches a rewrite that happened while the range was being read.
            self._source._check(self._fd, self._obj)
        return got

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
