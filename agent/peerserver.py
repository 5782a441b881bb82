"""The peer server: other agents read the files of this node's Ready dataset versions from it.

`GET /v1/file?dataset=<ns/name>&version=<sha256:...>&path=<file>` with an optional single
`Range: bytes=a-b` answers the file's bytes (206 for a range), sent with sendfile (no copy
through Python, no buffer per connection).

`POST /v1/files?dataset=<ns/name>&version=<sha256:...>` with a body of paths separated by NUL
bytes (no path holds one) answers those whole files back to back, in the order asked, at most
`MAX_BATCH_FILES` of them and `MAX_BATCH_BYTES` together (400 beyond): one request, and one
signature each side, for many small files. The reader knows every file's size from the
manifest, so the response needs no framing. POST because the list does not fit a request line
(64 paths of up to 4 KiB, tripled by percent-encoding, against http.server's 64 KiB limit) and
a GET's body has no defined meaning; the signature covers the body's SHA-256, so a captured
header is good for no other list. Every file is opened and checked as for a GET before the
first byte is sent: one that fails refuses the whole batch with its status. A file that
shrinks while it is sent ends the response short (the connection is closed), which the reader
detects; one that changes in place is caught by the reader's check against the manifest.

Both serve only:

- requests signed with a cluster peer key (`agent.peering`): 401 otherwise;
- a version this node holds Ready right now (not one being copied, repaired after a failed
  scrub, or deleted): 404 otherwise, and the reader goes elsewhere;
- files of that version's manifest, opened beneath the version's directory without following
  symlinks, whose size still matches the manifest.

Every byte passes a rate limiter shared by all connections (`serve_bytes_per_second`), and at
most `serve_max_connections` requests are served at once (503 beyond), so serving peers never
starves the node's own pods. The reader verifies every file against the manifest anyway: this
server's checks keep bad bytes from being sent, the reader's keep them from being published.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from agent import metrics
from agent.errors import FetchCancelled
from agent.keys import MAX_PATH_BYTES
from agent.manifest import FileEntry
from agent.peering import MAX_BATCH_FILES, PeerKeys, PeerSettings
from agent.scrub import RateLimiter

log = logging.getLogger(__name__)

FILE_PATH = "/v1/file"
FILES_PATH = "/v1/files"
MAX_BATCH_BYTES = 16 * 1024 * 1024
"""Most bytes (the files' manifest sizes together) one batch request may ask for."""
MAX_BATCH_BODY_BYTES = MAX_BATCH_FILES * (MAX_PATH_BYTES + 1)
"""Longest body of a batch request: its paths (each at most `MAX_PATH_BYTES`), NUL-separated."""
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_SEND_CHUNK = 1024 * 1024
_MIN_SEND_CHUNK = 16 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)


@dataclass(frozen=True)
class ServedVersion:
    """A Ready version this node may serve: its directory and its files by path."""

    directory: Path
    files: Mapping[str, FileEntry]


Lookup = Callable[[str, str], ServedVersion | None]
"""(dataset, version digest) -> the version if it is Ready here now, else None."""


def open_beneath(directory: Path, path: str) -> int:
    """Opens `directory/path` read-only, refusing symlinks at every step."""
    parts = path.split("/")
    fd = os.open(directory, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        try:
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except PermissionError:
            # O_NOATIME needs ownership of the file; an agent that is not root copes without.
            return os.open(parts[-1], _FILE_FLAGS & ~getattr(os, "O_NOATIME", 0), dir_fd=fd)
    finally:
        os.close(fd)


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, result: str, message: str) -> None:
        super().__init__(message)
        self.status, self.result = status, result


_BUSY = (HTTPStatus.SERVICE_UNAVAILABLE, "busy", "too many peer reads")

_Send = tuple[int, int, int, str]
"""One file's part of a response: (descriptor, offset, length, path)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Without it the last segment of a body waits for the reader's ACK of the headers'
        # segment, which Linux delays up to 40 ms: measured 40 ms per small-file request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("peer request: " + format, *args)

    def do_GET(self) -> None:
        server = self.server
        if not server.slots.acquire(blocking=False):
            self._refuse(_Refused(*_BUSY))
            return
        try:
            try:
                fd, offset, length, size, served = self._open()
            except _Refused as refused:
                self._refuse(refused)
                return
            try:
                headers: dict[str, str] = {}
                if self.headers.get("Range"):
                    headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{size}"
                self._start(
                    HTTPStatus.PARTIAL_CONTENT if headers else HTTPStatus.OK, length, headers
                )
                self._stream(served[0], [(fd, offset, length, served[1])])
            finally:
                os.close(fd)
        finally:
            server.slots.release()

    def do_POST(self) -> None:
        server = self.server
        try:
            dataset, version_here, paths = self._batch()
        except _Refused as refused:
            self._refuse(refused)
            return
        # The slot is taken only once the body is read, as a GET's once its headers are: a
        # client that sends slowly holds a thread, never a slot.
        if not server.slots.acquire(blocking=False):
            self._refuse(_Refused(*_BUSY))
            return
        files: list[_Send] = []
        try:
            try:
                # Every file is opened and checked before the first byte is sent, so a batch
                # that cannot be served whole is refused with a status, not cut short.
                for path in paths:
                    fd = _open_checked(version_here, path)
                    files.append((fd, 0, version_here.files[path].size, path))
            except _Refused as refused:
                self._refuse(refused)
                return
            self._start(HTTPStatus.OK, sum(f[2] for f in files), {})
            self._stream(dataset, files)
        finally:
            for fd, *_ in files:
                os.close(fd)
            server.slots.release()

    def _open(self) -> tuple[int, int, int, int, tuple[str, str]]:
        server = self.server
        url = urlsplit(self.path)
        if url.path != FILE_PATH:
            raise _Refused(HTTPStatus.NOT_FOUND, "bad_request", f"no such endpoint {url.path!r}")
        query = parse_qs(url.query, keep_blank_values=True)
        dataset, version, path = (query.get(k, [""])[0] for k in ("dataset", "version", "path"))
        if not dataset or not version or not path:
            raise _Refused(
                HTTPStatus.BAD_REQUEST, "bad_request", "dataset, version and path are required"
            )
        byte_range = self.headers.get("Range", "")
        try:
            server.keys.verify(self.headers.get("Authorization", ""), self.path, byte_range)
        except PermissionError as exc:
            raise _Refused(HTTPStatus.UNAUTHORIZED, "unauthorized", str(exc)) from exc
        version_here = server.lookup(dataset, version)
        if version_here is None or path not in version_here.files:
            raise _Refused(
                HTTPStatus.NOT_FOUND, "not_ready", f"{dataset} {version} {path} is not Ready here"
            )
        fd = _open_checked(version_here, path)
        try:
            size = version_here.files[path].size
            offset, length = 0, size
            if byte_range:
                match = _RANGE.fullmatch(byte_range.strip())
                last = int(match.group(2)) if match and match.group(2) else size - 1
                if match is None or int(match.group(1)) > last or last >= size:
                    raise _Refused(
                        HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                        "bad_request",
                        f"range {byte_range!r} of a {size}-byte file",
                    )
                offset, length = int(match.group(1)), last - int(match.group(1)) + 1
        except BaseException:
            os.close(fd)
            raise
        return fd, offset, length, size, (dataset, path)

    def _batch(self) -> tuple[str, ServedVersion, list[str]]:
        """Reads and checks a batch request (`POST /v1/files`): its dataset, the version held
        here and the paths asked, or raises `_Refused`."""
        server = self.server
        declared = self.headers.get("Content-Length", "")
        if not declared.isdigit() or int(declared) > MAX_BATCH_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            raise _Refused(
                HTTPStatus.BAD_REQUEST,
                "bad_request",
                f"a batch request needs a Content-Length of at most {MAX_BATCH_BODY_BYTES} "
                f"bytes (its paths, NUL-separated), not {declared or 'none'!r}",
            )
        body = self.rfile.read(int(declared))
        if len(body) < int(declared):
            self.close_connection = True
            raise _Refused(HTTPStatus.BAD_REQUEST, "bad_request", "the request body ended early")
        url = urlsplit(self.path)
        if url.path != FILES_PATH:
            raise _Refused(HTTPStatus.NOT_FOUND, "bad_request", f"no such endpoint {url.path!r}")
        query = parse_qs(url.query, keep_blank_values=True)
        dataset, version = (query.get(k, [""])[0] for k in ("dataset", "version"))
        if not dataset or not version:
            raise _Refused(
                HTTPStatus.BAD_REQUEST, "bad_request", "dataset and version are required"
            )
        try:
            server.keys.verify(self.headers.get("Authorization", ""), self.path, "", body=body)
        except PermissionError as exc:
            raise _Refused(HTTPStatus.UNAUTHORIZED, "unauthorized", str(exc)) from exc
        try:
            paths = body.decode("utf-8", "surrogatepass").split("\0")
        except UnicodeDecodeError as exc:
            raise _Refused(
                HTTPStatus.BAD_REQUEST, "bad_request", f"the paths are not UTF-8: {exc}"
            ) from exc
        if not all(paths) or len(set(paths)) != len(paths):
            raise _Refused(
                HTTPStatus.BAD_REQUEST,
                "bad_request",
                "the body must list distinct, non-empty paths separated by NUL bytes",
            )
        if len(paths) > MAX_BATCH_FILES:
            raise _Refused(
                HTTPStatus.BAD_REQUEST,
                "bad_request",
                f"a batch asks for {len(paths)} files; at most {MAX_BATCH_FILES} per request",
            )
        version_here = server.lookup(dataset, version)
        if version_here is None:
            raise _Refused(
                HTTPStatus.NOT_FOUND, "not_ready", f"{dataset} {version} is not Ready here"
            )
        missing = [p for p in paths if p not in version_here.files]
        if missing:
            raise _Refused(
                HTTPStatus.NOT_FOUND,
                "not_ready",
                f"{dataset} {version} {missing[0]} is not Ready here",
            )
        total = sum(version_here.files[p].size for p in paths)
        if total > MAX_BATCH_BYTES:
            raise _Refused(
                HTTPStatus.BAD_REQUEST,
                "bad_request",
                f"a batch asks for {total} bytes; at most {MAX_BATCH_BYTES} per request "
                f"(ask larger files one by one from {FILE_PATH})",
            )
        return dataset, version_here, paths

    def _start(self, status: HTTPStatus, length: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def _stream(self, dataset: str, files: list[_Send]) -> None:
        """Sends the files' bytes back to back, each through the rate limiter."""
        server = self.server
        out = self.connection.fileno()
        total = sum(f[2] for f in files)
        sent = 0
        try:
            for fd, offset, length, path in files:
                pos, end = offset, offset + length
                try:
                    while pos < end:
                        chunk = min(server.send_chunk, end - pos)
                        server.limiter.take(chunk, server.stopping)
                        n = os.sendfile(out, fd, pos, chunk)
                        if n == 0:
                            break
                        pos += n
                        sent += n
                except (FetchCancelled, OSError) as exc:
                    if not isinstance(exc, FetchCancelled) and exc.errno not in (
                        errno.EPIPE,
                        errno.ECONNRESET,
                    ):
                        log.warning(
                            "Serving a peer failed: %s",
                            exc,
                            extra={"dataset": dataset, "object": path},
                        )
                if pos < end:
                    # The send failed or the file shrank: the reader sees a short body (the
                    # connection is closed below) and goes elsewhere.
                    break
        finally:
            metrics.PEER_SERVED_BYTES.inc(sent)
        if sent < total:
            self.close_connection = True
            metrics.PEER_REQUESTS.labels("aborted").inc()
        else:
            metrics.PEER_REQUESTS.labels("ok").inc()

    def _refuse(self, refused: _Refused) -> None:
        metrics.PEER_REQUESTS.labels(refused.result).inc()
        body = (str(refused) + "\n").encode()
        self.send_response(refused.status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if refused.status is HTTPStatus.UNAUTHORIZED:
            log.warning("Peer request refused: %s", refused, extra={"peer": self.client_address[0]})


def _open_checked(version: ServedVersion, path: str) -> int:
    """Opens a file of `version` (listed in its manifest) if it still has its manifest's size;
    raises `_Refused` otherwise."""
    try:
        fd = open_beneath(version.directory, path)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _Refused(
                HTTPStatus.SERVICE_UNAVAILABLE, "busy", f"{path}: {exc.strerror}"
            ) from exc
        raise _Refused(HTTPStatus.NOT_FOUND, "not_ready", f"{path}: {exc.strerror}") from exc
    try:
        if os.fstat(fd).st_size != version.files[path].size:
            raise _Refused(HTTPStatus.NOT_FOUND, "not_ready", f"{path} is not its manifest's size")
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops the connects of a copy's threads arriving
    # together; each dropped SYN costs the reader a second.
    request_queue_size = 256

    def __init__(
        self,
        address: tuple[str, int],
        keys: PeerKeys,
        lookup: Lookup,
        settings: PeerSettings,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.keys = keys
        self.lookup = lookup
        self.limiter = RateLimiter(settings.serve_bytes_per_second)
        # About 20 sends a second at the limit: a low limit trickles instead of pausing for
        # seconds between bursts (which readers would take for a stall).
        self.send_chunk = int(
            min(_SEND_CHUNK, max(_MIN_SEND_CHUNK, settings.serve_bytes_per_second / 20))
        )
        self.slots = threading.BoundedSemaphore(settings.serve_max_connections)
        self.stopping = threading.Event()

    def handle_error(self, request: object, client_address: object) -> None:
        # A reader that went away mid-request (it moved to another peer) is routine.
        log.debug("Peer connection from %s ended with an error", client_address, exc_info=True)


class PeerServer:
    """Runs the peer server on a thread."""

    def __init__(self, settings: PeerSettings, keys: PeerKeys, lookup: Lookup) -> None:
        self._server = _Server((settings.listen_address, settings.port), keys, lookup, settings)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="peer-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=5)
