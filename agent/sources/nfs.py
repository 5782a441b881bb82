"""`nfs://server[:port]/export/dir/` sources, read in user space through libnfs.

Nodes need no NFS mount, no kernel NFS client and no privileges: the agent speaks NFS itself
through libnfs, loaded with ctypes (ctypes releases the GIL during each call, so reader
threads run in parallel).

Design choices:

- **ABI.** Bound to libnfs 4.x, soname libnfs.so.13 (Debian 12 `libnfs13` 4.0.0). The structs
  below copy `include/nfsc/libnfs.h` of that version: `struct nfs_stat_64` is 17 uint64s and
  `struct nfsdirent` carries READDIRPLUS attributes. libnfs 6 changed `nfs_pread`'s argument
  order, so other sonames are refused rather than guessed at.
- **One context per concurrent reader.** A libnfs context is not thread-safe. The source keeps
  a bounded pool of contexts, created lazily when a reader finds none idle, each with its own
  TCP connection; several connections are also what makes it fast (reading into memory on 2
  cores: ~0.9 GB/s with one, up to ~2 GB/s with two, NFSv3). A context whose call failed in
  transport is destroyed, never reused; one idle longer than the server's idle timeout is
  replaced before use.
- **NFSv3 by default, NFSv4 on request** (`version=4`). NFSv4 servers identify clients by
  name, and libnfs's default name ("Libnfs pid:<pid> <seconds>") is the same for contexts
  made in the same second: each v4 context gets a unique name, otherwise the server expires
  one context's state when the next connects (NFS4ERR_EXPIRED).
- **File data is not copied out of libnfs.** The engine's reads (`read_lent`) use
  `nfs_pread_async` and service the context on the calling thread until the reply is in;
  the callback hands the bytes to the engine while they sit in libnfs's reply buffer, and the
  engine writes and digests them there. The copy into a buffer of ours that `nfs_pread` makes
  was about 8% of the agent's CPU on a 1 GiB file (`perf`, docs/benchmarks.md). `readinto`
  (the synchronous call) serves `read_range`.
- **Reads of at most 1 MiB per call.** Larger `nfs_pread`s over NFSv4 fail in libnfs 4.0.0,
  and 1 MiB (`READ_CHUNK_BYTES`) bounds buffer memory per reader.
- **Every wait is bounded.** Each RPC times out after `timeout_seconds` (for `read_lent`,
  the wait for its reply); automatic reconnection is off, so a dead or unreachable server
  fails the call (`SourceError`) and the engine's bounded retries take over with a fresh
  context. Waiting for a free context is bounded too.
- **Listings see the server's current state**: libnfs's directory cache is off.
- **Version tag** as for `file://` sources: (size, mtime in ns, file id), checked on the opened
  file before and after each range, so a changed file raises `SourceChanged`. NFSv3 listings
  take these from READDIRPLUS; libnfs 4.0.0 leaves the file id of NFSv4 directory entries
  unset, so NFSv4 listings ask for each file's attributes (one round trip per file).
- **Symbolic links** and special files are skipped and logged at info; files are opened with
  O_NOFOLLOW. A link in the middle of a path (a directory replaced by a link after listing)
  is resolved by libnfs on the client, inside the mounted export; the version check still
  refuses any file but the one listed.
- **Subdirectory mounts.** The dataset path is mounted directly when the server allows it
  (nfs-ganesha does); otherwise its closest mountable parent is, and the rest of
  the path is walked inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from stat import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG
from typing import TYPE_CHECKING, Any

from agent.errors import SourceChanged, SourceError
from agent.sources.base import READ_CHUNK_BYTES, ObjectInfo, read_chunks
from agent.sources.local import sort_key, version_tag
from agent.sources.nfs_settings import NfsSettings
from datacache.validation import NfsSource as NfsLocation

if TYPE_CHECKING:
    from agent.checksums import ObjectChecksum

log = logging.getLogger(__name__)

LIBNFS_SONAME = "libnfs.so.13"
INSTALL_HINT = "install libnfs13 (Debian/Ubuntu: apt-get install libnfs13)"
MAX_READ_BYTES = min(READ_CHUNK_BYTES, 1024 * 1024)

# NF3 file types that libnfs puts in nfsdirent.type (also for NFSv4).
_NF3REG, _NF3DIR, _NF3LNK = 1, 2, 5
# NFS status errors: the call failed, the connection is fine. Anything else (EIO from a
# dropped connection, EINTR from a timeout, ...) retires the context.
_HARMLESS_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EACCES,
        errno.EPERM,
        errno.ESTALE,
        errno.ENAMETOOLONG,
        errno.EINVAL,
    }
)


# struct nfs_stat_64 of libnfs 4.0.0: 17 uint64 fields, each named nfs_<field>.
_STAT64_FIELDS = (
    "dev",
    "ino",
    "mode",
    "nlink",
    "uid",
    "gid",
    "rdev",
    "size",
    "blksize",
    "blocks",
    "atime",
    "mtime",
    "ctime",
    "atime_nsec",
    "mtime_nsec",
    "ctime_nsec",
    "used",
)


class _Stat64(ctypes.Structure):
    _fields_ = [(f"nfs_{name}", ctypes.c_uint64) for name in _STAT64_FIELDS]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Dirent(ctypes.Structure):
    pass


_Dirent._fields_ = [
    ("next", ctypes.POINTER(_Dirent)),
    ("name", ctypes.c_char_p),
    ("inode", ctypes.c_uint64),
    ("type", ctypes.c_uint32),
    ("mode", ctypes.c_uint32),
    ("size", ctypes.c_uint64),
    ("atime", _Timeval),
    ("mtime", _Timeval),
    ("ctime", _Timeval),
    ("uid", ctypes.c_uint32),
    ("gid", ctypes.c_uint32),
    ("nlink", ctypes.c_uint32),
    ("dev", ctypes.c_uint64),
    ("rdev", ctypes.c_uint64),
    ("blksize", ctypes.c_uint64),
    ("blocks", ctypes.c_uint64),
    ("used", ctypes.c_uint64),
    ("atime_nsec", ctypes.c_uint32),
    ("mtime_nsec", ctypes.c_uint32),
    ("ctime_nsec", ctypes.c_uint32),
]

_P = ctypes.c_void_p
_READ_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, _P, _P, _P)
"""nfs_cb: (status: bytes read or -errno, context, data or error string, private data)."""
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "nfs_init_context": (_P, []),
    "nfs_destroy_context": (None, [_P]),
    "nfs_get_error": (ctypes.c_char_p, [_P]),
    "nfs_set_version": (ctypes.c_int, [_P, ctypes.c_int]),
    "nfs4_set_client_name": (None, [_P, ctypes.c_char_p]),
    "nfs_set_timeout": (None, [_P, ctypes.c_int]),
    "nfs_set_autoreconnect": (None, [_P, ctypes.c_int]),
    "nfs_set_dircache": (None, [_P, ctypes.c_int]),
    "nfs_parse_url_dir": (_P, [_P, ctypes.c_char_p]),
    "nfs_destroy_url": (None, [_P]),
    "nfs_mount": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "nfs_opendir": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(_P)]),
    "nfs_readdir": (ctypes.POINTER(_Dirent), [_P, _P]),
    "nfs_closedir": (None, [_P, _P]),
    "nfs_lstat64": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(_Stat64)]),
    "nfs_fstat64": (ctypes.c_int, [_P, _P, ctypes.POINTER(_Stat64)]),
    "nfs_open": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(_P)]),
    "nfs_pread": (ctypes.c_int, [_P, _P, ctypes.c_uint64, ctypes.c_uint64, _P]),
    "nfs_close": (ctypes.c_int, [_P, _P]),
    "nfs_pread_async": (
        ctypes.c_int,
        [_P, _P, ctypes.c_uint64, ctypes.c_uint64, _READ_CALLBACK, _P],
    ),
    "nfs_get_fd": (ctypes.c_int, [_P]),
    "nfs_which_events": (ctypes.c_int, [_P]),
    "nfs_service": (ctypes.c_int, [_P, ctypes.c_int]),
}
_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def libnfs() -> ctypes.CDLL:
    """libnfs with the prototypes of its sync API; SourceError when it is not installed."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(LIBNFS_SONAME)
            except OSError as exc:
                raise SourceError(
                    f"nfs:// sources need libnfs 4.x ({LIBNFS_SONAME}): {INSTALL_HINT}"
                ) from exc
            for name, (restype, argtypes) in _PROTOTYPES.items():
                function = getattr(lib, name)
                function.restype = restype
                function.argtypes = argtypes
            _lib = lib
        return _lib


class _CallFailed(Exception):
    """A libnfs call returned -errno; converted to SourceError with the location added."""

    def __init__(self, code: int, what: str, detail: str) -> None:
        super().__init__(f"{what} failed: {detail} [{errno.errorcode.get(code, code)}]")
        self.code = code
        self.os_error = OSError(code, detail)


def _mtime_ns(seconds: int, nanoseconds: int) -> int:
    return seconds * 1_000_000_000 + nanoseconds


class _Context:
    """One libnfs context: one mounted TCP connection, used by one thread at a time."""

    def __init__(self, lib: ctypes.CDLL, settings: NfsSettings, client_name: str) -> None:
        self.lib = lib
        self.broken = False
        self.last_used = time.monotonic()
        ptr = lib.nfs_init_context()
        if not ptr:
            raise _CallFailed(errno.ENOMEM, "nfs_init_context", "libnfs could not allocate")
        self.ptr: int = ptr
        self.timeout_seconds = settings.timeout_seconds
        self._lent: _LentRead | None = None
        # Kept as long as the context: libnfs calls it for every reply, and again for the
        # reads still pending when the context is destroyed.
        self._on_read_callback = _READ_CALLBACK(self._on_read)
        try:
            self.check(lib.nfs_set_version(ptr, settings.version), "nfs_set_version")
            if settings.version == 4:
                lib.nfs4_set_client_name(ptr, client_name.encode())
            lib.nfs_set_timeout(ptr, settings.timeout_seconds * 1000)
            lib.nfs_set_autoreconnect(ptr, 0)
            lib.nfs_set_dircache(ptr, 0)
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        if self.ptr:
            self.lib.nfs_destroy_context(self.ptr)
            self.ptr = 0

    def check(self, rc: int, what: str) -> int:
        if rc >= 0:
            return rc
        raw = self.lib.nfs_get_error(self.ptr)
        raise self._failed(-rc, what, raw.decode(errors="replace") if raw else os.strerror(-rc))

    def _failed(self, code: int, what: str, detail: str) -> _CallFailed:
        if code not in _HARMLESS_ERRNOS:
            self.broken = True
        return _CallFailed(code, what, detail)

    def set_port(self, port: int) -> None:
        # libnfs 4.0.0 has no setter for the NFS port: URL arguments are the only way in.
        url = self.lib.nfs_parse_url_dir(self.ptr, f"nfs://localhost/?nfsport={port}".encode())
        if not url:
            self.check(-errno.EINVAL, f"setting NFS port {port}")
        self.lib.nfs_destroy_url(url)

    def mount(self, server: str, export: bytes) -> None:
        self.check(self.lib.nfs_mount(self.ptr, server.encode(), export), "mount")

    def lstat(self, path: bytes) -> _Stat64:
        st = _Stat64()
        self.check(self.lib.nfs_lstat64(self.ptr, path, ctypes.byref(st)), "stat")
        return st

    def listdir(self, path: bytes, version: int) -> list[_Entry]:
        handle = ctypes.c_void_p()
        self.check(self.lib.nfs_opendir(self.ptr, path, ctypes.byref(handle)), "opendir")
        entries: list[_Entry] = []
        try:
            # nfs_opendir has read the whole directory; nfs_readdir only walks it in memory.
            while True:
                found = self.lib.nfs_readdir(self.ptr, handle)
                if not found:
                    break
                d = found.contents
                if d.name in (b".", b".."):
                    continue
                entries.append(
                    _Entry(
                        d.name,
                        _kind(d.type, d.mode),
                        d.size,
                        _mtime_ns(d.mtime.tv_sec, d.mtime_nsec),
                        d.inode,
                        version == 3 and d.type != 0,
                    )
                )
        finally:
            self.lib.nfs_closedir(self.ptr, handle)
        return entries

    def open(self, path: bytes) -> int:
        handle = ctypes.c_void_p()
        flags = os.O_RDONLY | os.O_NOFOLLOW
        self.check(self.lib.nfs_open(self.ptr, path, flags, ctypes.byref(handle)), "open")
        return int(handle.value or 0)

    def fstat(self, handle: int) -> _Stat64:
        st = _Stat64()
        self.check(self.lib.nfs_fstat64(self.ptr, handle, ctypes.byref(st)), "stat")
        return st

    def pread_into(self, handle: int, offset: int, view: memoryview) -> int:
        """Reads into `view` (writable, at most `MAX_READ_BYTES`) straight from libnfs: no
        intermediate buffer, no bytes object. Returns the bytes read (0 at end of file)."""
        target = (ctypes.c_char * len(view)).from_buffer(view)
        return self.check(self.lib.nfs_pread(self.ptr, handle, offset, len(view), target), "read")

    def pread_lent(
        self, handle: int, offset: int, count: int, consume: Callable[[memoryview], None]
    ) -> int:
        """Reads `count` bytes (at most `MAX_READ_BYTES`) at `offset` and calls `consume` with
        them while they are still in libnfs's reply buffer: no copy into a buffer of ours.
        Returns the bytes read (0 at end of file). Waits at most `timeout_seconds`."""
        read = self._lent = _LentRead(consume, count)
        try:
            self.check(
                self.lib.nfs_pread_async(
                    self.ptr, handle, offset, count, self._on_read_callback, None
                ),
                "read",
            )
            self._serve_until(read)
        finally:
            self._lent = None
        if read.error is not None:
            raise read.error
        assert read.status is not None
        if read.status < 0:
            raise self._failed(-read.status, "read", read.detail)
        return read.status

    def _serve_until(self, read: _LentRead) -> None:
        poller = select.poll()
        fd = self.lib.nfs_get_fd(self.ptr)
        deadline = time.monotonic() + self.timeout_seconds
        while read.status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failed(
                    errno.ETIMEDOUT, "read", f"no reply within {self.timeout_seconds} s"
                )
            poller.register(fd, self.lib.nfs_which_events(self.ptr))
            ready = poller.poll(min(left, 1.0) * 1000)
            serviced = self.lib.nfs_service(self.ptr, ready[0][1] if ready else 0)
            if serviced < 0 and read.status is None:
                self.check(-errno.EIO, "read")

    def _on_read(self, status: int, _nfs: int | None, data: int | None, _private: Any) -> None:
        read = self._lent
        if read is None:
            return  # a read abandoned after its timeout, cancelled as the context goes
        if status > 0 and (not data or status > read.count):
            # Never hand the engine bytes that are not there, or more than it asked for.
            status, read.detail = -errno.EIO, f"libnfs returned {status} bytes for {read.count}"
        elif status < 0:
            read.detail = ctypes.string_at(data).decode(errors="replace") if data else ""
            read.detail = read.detail or os.strerror(-status)
        elif status > 0:
            assert data is not None
            view = memoryview((ctypes.c_char * status).from_address(data)).cast("B")
            try:
                read.consume(view)
            except BaseException as exc:  # raised in a C callback, it would be lost
                read.error = exc
            finally:
                view.release()
        read.status = status

    def close(self, handle: int) -> None:
        # On a broken connection the close would only wait for its timeout; destroying the
        # context frees the handle.
        if not self.broken:
            self.check(self.lib.nfs_close(self.ptr, handle), "close")


class _LentRead:
    """One `pread_lent` in flight: what to do with its bytes, and how it ended."""

    __slots__ = ("consume", "count", "detail", "error", "status")

    def __init__(self, consume: Callable[[memoryview], None], count: int) -> None:
        self.consume = consume
        self.count = count
        """The bytes asked for."""
        self.status: int | None = None
        """Bytes read, or -errno; None until the reply came."""
        self.detail = ""
        self.error: BaseException | None = None
        """What `consume` raised."""


@dataclass(frozen=True)
class _Entry:
    name: bytes
    kind: str
    """'file', 'dir', 'link', 'other' or 'unknown' (listed without attributes)."""
    size: int
    mtime_ns: int
    inode: int
    exact: bool
    """Whether size, mtime and file id are the file's: READDIRPLUS gives them over NFSv3,
    libnfs 4.0.0 leaves the file id unset over NFSv4."""


def _kind(nf3_type: int, mode: int) -> str:
    if nf3_type == _NF3REG:
        return "file"
    if nf3_type == _NF3DIR:
        return "dir"
    if nf3_type == _NF3LNK:
        return "link"
    if nf3_type:
        return "other"
    return {S_IFREG: "file", S_IFDIR: "dir", S_IFLNK: "link", 0: "unknown"}.get(
        S_IFMT(mode), "other"
    )


class _Pool:
    """At most `limit` contexts, created on demand, each lent to one thread at a time."""

    def __init__(self, limit: int, idle_seconds: float, acquire_timeout: float) -> None:
        self._limit = limit
        self._idle_seconds = idle_seconds
        self._acquire_timeout = acquire_timeout
        self._cond = threading.Condition()
        self._idle: list[_Context] = []
        self._alive = 0
        self._closed = False

    def acquire(self, create: Callable[[], _Context]) -> _Context:
        deadline = time.monotonic() + self._acquire_timeout
        stale: list[_Context] = []
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise SourceError("the NFS source is closed")
                    now = time.monotonic()
                    while self._idle:
                        ctx = self._idle.pop()
                        if now - ctx.last_used < self._idle_seconds:
                            return ctx
                        stale.append(ctx)
                        self._alive -= 1
                    if self._alive < self._limit:
                        self._alive += 1
                        break
                    if not self._cond.wait(deadline - now):
                        raise SourceError(
                            f"all {self._limit} NFS connections stayed busy for "
                            f"{self._acquire_timeout:.0f}s"
                        )
        finally:
            for ctx in stale:
                ctx.destroy()
        try:
            made: _Context = create()
        except BaseException:
            with self._cond:
                self._alive -= 1
                self._cond.notify()
            raise
        return made

    def release(self, ctx: _Context) -> None:
        with self._cond:
            keep = not ctx.broken and not self._closed
            if keep:
                ctx.last_used = time.monotonic()
                self._idle.append(ctx)
            else:
                self._alive -= 1
            self._cond.notify()
        if not keep:
            ctx.destroy()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._alive -= len(idle)
            self._cond.notify_all()
        for ctx in idle:
            ctx.destroy()


class NfsSource:
    """Reads a directory tree on an NFS server. Thread-safe: each reading thread borrows its
    own libnfs context from the pool."""

    read_bytes = MAX_READ_BYTES
    """The engine reads 1 MiB at a time from NFS (256 KiB from other sources): each read is an
    RPC round trip, a `poll` and a hand-over of the GIL, and libnfs copies every reply out of
    its own buffer anyway. On 1 GiB here (8 alternating runs each) the agent used 0.62 s of
    CPU with 1 MiB reads against 0.69 s with 256 KiB, and 128 KiB took 1.0 s of wall time
    against 0.7 s (docs/benchmarks.md)."""

    def __init__(self, location: NfsLocation, settings: NfsSettings | None = None) -> None:
        self._settings = settings = settings or NfsSettings()
        if settings.version not in (3, 4):
            raise SourceError(f"NFS version {settings.version} is not supported: use 3 or 4")
        if settings.max_connections < 1 or settings.timeout_seconds < 1:
            raise SourceError("NFS settings need max_connections >= 1 and timeout_seconds >= 1")
        self._lib = libnfs()
        self._location = location
        self._uri = location.uri
        self._pool = _Pool(
            settings.max_connections, settings.idle_seconds, settings.acquire_timeout_seconds
        )
        # Contexts hold sockets and server-side state: released when the source is collected
        # if nobody called close().
        self._finalizer = weakref.finalize(self, self._pool.close)
        self._client_prefix = (
            f"datacache {socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"
        )
        self._serial = 0
        self._lock = threading.Lock()
        self._split: tuple[bytes, bytes] | None = None
        """(export mounted, dataset directory inside it), known after the first mount."""

    def close(self) -> None:
        """Destroys idle contexts now, busy ones when their readers finish."""
        self._finalizer()

    def _error(self, path: bytes, failure: _CallFailed) -> SourceError:
        """The SourceError for a failed call on `path` (a path inside the mounted export)."""
        export = self._split[0] if self._split and self._split[0] != b"/" else b""
        where = (export + path).decode("utf-8", "surrogateescape")
        version = self._settings.version
        return SourceError(f"nfs://{self._netloc()}{where} (NFSv{version}): {failure}")

    def _netloc(self) -> str:
        loc = self._location
        host = f"[{loc.server}]" if ":" in loc.server else loc.server
        return f"{host}:{loc.port}" if loc.port else host

    def _bare_context(self) -> _Context:
        with self._lock:
            self._serial += 1
            name = f"{self._client_prefix} ctx {self._serial}"
        ctx = _Context(self._lib, self._settings, name)
        try:
            if self._location.port:
                ctx.set_port(self._location.port)
        except BaseException:
            ctx.destroy()
            raise
        return ctx

    def _new_context(self) -> _Context:
        """A mounted context. The first one finds what to mount: the dataset's directory if
        the server lets clients mount below an export, else its closest mountable parent."""
        with self._lock:
            split = self._split
        full = self._location.path.rstrip("/").encode() or b"/"
        candidates = [split[0]] if split else _parents(full)
        refused: _CallFailed | None = None
        for export in candidates:
            try:
                # A fresh context per attempt: a refused mount may leave one in any state.
                ctx = self._bare_context()
            except _CallFailed as exc:
                raise self._error(b"", exc) from exc.os_error
            try:
                ctx.mount(self._location.server, export)
            except _CallFailed as exc:
                ctx.destroy()
                if split or ctx.broken or exc.code not in (errno.EACCES, errno.EPERM, errno.ENOENT):
                    raise self._mount_error(export, exc) from exc.os_error
                refused = refused or exc
                continue
            except BaseException:
                ctx.destroy()
                raise
            if not split:
                inside = full[len(export) :] if export != b"/" else full
                with self._lock:
                    self._split = (export, inside)
            return ctx
        assert refused is not None
        raise self._mount_error(full, refused) from refused.os_error

    def _mount_error(self, export: bytes, failure: _CallFailed) -> SourceError:
        return SourceError(
            f"nfs://{self._netloc()}{export.decode('utf-8', 'surrogateescape')} "
            f"(NFSv{self._settings.version}): {failure}"
        )

    def _path(self, key: str) -> bytes:
        """The path of `key` inside the mounted export."""
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise SourceError(f"{self._uri}{key}: not a key of this source")
        assert self._split is not None
        return self._split[1] + b"/" + key.encode("utf-8", "surrogateescape")

    @contextlib.contextmanager
    def _context(self) -> Iterator[_Context]:
        ctx = self._pool.acquire(self._new_context)
        try:
            yield ctx
        finally:
            self._pool.release(ctx)

    def list(self) -> Iterator[ObjectInfo]:
        # Directories being walked, one per level: (key prefix, items left in key order).
        # An item is a file's ObjectInfo or a subdirectory's key.
        stack = [("", self._read_dir(""))]
        while stack:
            item = next(stack[-1][1], None)
            if item is None:
                stack.pop()
            elif isinstance(item, str):
                stack.append((item + "/", self._read_dir(item)))
            else:
                yield item

    def _read_dir(self, key: str) -> Iterator[ObjectInfo | str]:
        """One directory's files and subdirectories, sorted for a key-order walk. A context is
        borrowed per directory, not for the whole listing: a caller that reads while it lists
        does not hold two."""
        with self._context() as ctx:
            assert self._split is not None
            base = self._split[1]
            path = base + b"/" + key.encode("utf-8", "surrogateescape") if key else base or b"/"
            try:
                entries = ctx.listdir(path, self._settings.version)
            except _CallFailed as exc:
                raise self._error(path, exc) from exc.os_error
            items: list[tuple[bytes, ObjectInfo | str]] = []
            uri = self._uri
            for listed in entries:
                entry = self._resolve(ctx, path, listed)
                if entry is None:
                    continue
                name = entry.name.decode("utf-8", "surrogateescape")
                child = f"{key}/{name}" if key else name
                if entry.kind == "link":
                    log.info("Skipping symbolic link (not followed)", extra={"path": uri + child})
                elif entry.kind == "other":
                    log.info("Skipping special file", extra={"path": uri + child})
                elif entry.kind == "dir":
                    items.append((sort_key(entry.name, True), child))
                else:
                    info = self._file_info(ctx, path + b"/" + entry.name, child, entry)
                    if info is not None:
                        items.append((sort_key(entry.name, False), info))
        items.sort(key=lambda pair: pair[0])
        return iter([item for _, item in items])

    def _resolve(self, ctx: _Context, dir_path: bytes, entry: _Entry) -> _Entry | None:
        """The entry with its type known: servers may list entries without attributes."""
        if entry.kind != "unknown":
            return entry
        st = self._lstat(ctx, dir_path + b"/" + entry.name)
        if st is None:
            return None
        mtime = _mtime_ns(st.nfs_mtime, st.nfs_mtime_nsec)
        return _Entry(entry.name, _kind(0, st.nfs_mode), st.nfs_size, mtime, st.nfs_ino, True)

    def _lstat(self, ctx: _Context, path: bytes) -> _Stat64 | None:
        """The entry's attributes, or None if it was deleted meanwhile."""
        try:
            return ctx.lstat(path)
        except _CallFailed as exc:
            if exc.code == errno.ENOENT:
                return None
            raise self._error(path, exc) from exc.os_error

    def _file_info(self, ctx: _Context, path: bytes, key: str, entry: _Entry) -> ObjectInfo | None:
        if entry.exact:
            return ObjectInfo(key, entry.size, version_tag(entry.size, entry.mtime_ns, entry.inode))
        st = self._lstat(ctx, path)
        if st is None or S_IFMT(st.nfs_mode) != S_IFREG:
            return None
        return ObjectInfo(key, st.nfs_size, _tag(st))

    def _check(self, st: _Stat64, obj: ObjectInfo) -> None:
        if S_IFMT(st.nfs_mode) != S_IFREG:
            raise SourceChanged(
                f"{self._uri}{obj.key} changed while being copied: no longer a regular file"
            )
        tag = _tag(st)
        if tag != obj.etag:
            raise SourceChanged(
                f"{self._uri}{obj.key} changed while being copied (listed as {obj.etag}, now {tag})"
            )

    def read_range(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return
        yield from read_chunks(self.open_range(obj, offset, length), length)

    def open_range(self, obj: ObjectInfo, offset: int, length: int) -> _RangeBody:
        """Bytes [offset, offset+length) of `obj`, read into the caller's buffers
        (`StreamingSource`). Holds one context until closed."""
        return _RangeBody(self, obj, offset, length)

    def stat(self, key: str) -> ObjectInfo:
        with self._context() as ctx:
            path = self._path(key)
            try:
                st = ctx.lstat(path)
            except _CallFailed as exc:
                raise self._error(path, exc) from exc.os_error
        if S_IFMT(st.nfs_mode) != S_IFREG:
            raise SourceError(f"{self._uri}{key}: not a regular file")
        return ObjectInfo(key, st.nfs_size, _tag(st))

    def checksum(self, obj: ObjectInfo) -> ObjectChecksum | None:
        """NFS stores no checksum of a file's content."""
        return None


class _RangeBody:
    """A range of one NFS file being read: the file opened on one context of the pool, its
    version checked when opened, when it ends short, and after its last byte."""

    checksum: ObjectChecksum | None = None
    """NFS states no checksum."""

    def __init__(self, source: NfsSource, obj: ObjectInfo, offset: int, length: int) -> None:
        self._source, self._obj = source, obj
        self._pos, self._end = offset, offset + length
        self._path = source._path(obj.key)
        self._ctx: _Context | None = source._pool.acquire(source._new_context)
        self._handle = 0
        try:
            try:
                self._handle = self._ctx.open(self._path)
            except _CallFailed as exc:
                if exc.code in (errno.ENOENT, errno.ENOTDIR):
                    raise SourceError(
                        f"{source._uri}{obj.key}: no such file (deleted since it was listed?)"
                    ) from exc.os_error
                raise source._error(self._path, exc) from exc.os_error
            self._checked()
        except BaseException:
            self.close()
            raise

    def _checked(self) -> None:
        assert self._ctx is not None
        try:
            self._source._check(self._ctx.fstat(self._handle), self._obj)
        except _CallFailed as exc:
            raise self._source._error(self._path, exc) from exc.os_error

    def readinto(self, view: memoryview) -> int:
        return self._read(
            len(view), lambda ctx, want: ctx.pread_into(self._handle, self._pos, view[:want])
        )

    def read_lent(self, limit: int, consume: Callable[[memoryview], None]) -> int:
        """`readinto` without the copy (`LentRangeBody`)."""
        return self._read(
            limit, lambda ctx, want: ctx.pread_lent(self._handle, self._pos, want, consume)
        )

    def _read(self, limit: int, call: Callable[[_Context, int], int]) -> int:
        ctx = self._ctx
        if ctx is None or self._pos >= self._end:
            return 0
        want = min(limit, MAX_READ_BYTES, self._end - self._pos)
        try:
            got = call(ctx, want)
        except _CallFailed as exc:
            raise self._source._error(self._path, exc) from exc.os_error
        if got == 0:
            self._checked()
            raise SourceError(
                f"reading {self._source._uri}{self._obj.key}: the file ends at byte "
                f"{self._pos}, {self._end - self._pos} bytes short"
            )
        self._pos += got
        if self._pos == self._end:
            # Also catches a rewrite that happened while the range was being read.
            self._checked()
        return got

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        try:
            if self._handle:
                ctx.close(self._handle)
        except _CallFailed as exc:
            log.info("Closing an NFS file failed: %s", exc)
        finally:
            self._source._pool.release(ctx)


def _tag(st: _Stat64) -> str:
    return version_tag(st.nfs_size, _mtime_ns(st.nfs_mtime, st.nfs_mtime_nsec), st.nfs_ino)


def _parents(path: bytes) -> list[bytes]:
    """`path` and each of its parents, longest first: b'/a/b' -> [b'/a/b', b'/a', b'/']."""
    found = [path]
    while path != b"/":
        path = path.rsplit(b"/", 1)[0] or b"/"
        found.append(path)
    return found
