"""The peer server: other agents read the files of this node's Ready dataset versions from it.

`GET /v1/file?dataset=<ns/name>&version=<sha256:...>&path=<file>` with an optional single
`Range: bytes=a-b` answers the file's bytes (206 for a range), sent with sendfile (no copy
through Python, no buffer per connection). It serves only:

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
from agent.manifest import FileEntry
from agent.peering import PeerKeys, PeerSettings
from agent.scrub import RateLimiter

log = logging.getLogger(__name__)

FILE_PATH = "/v1/file"
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        log.debug("peer request: " + format, *args)

    def do_GET(self) -> None:
        server = self.server
        if not server.slots.acquire(blocking=False):
            self._refuse(_Refused(HTTPStatus.SERVICE_UNAVAILABLE, "busy", "too many peer reads"))
            return
        try:
            fd, offset, length, size, served = self._open()
            ranged = bool(self.headers.get("Range"))
        except _Refused as refused:
            self._refuse(refused)
            server.slots.release()
            return
        try:
            self._send(fd, offset, length, size, ranged, served)
        finally:
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
        entry = version_here.files.get(path) if version_here is not None else None
        if version_here is None or entry is None:
            raise _Refused(
                HTTPStatus.NOT_FOUND, "not_ready", f"{dataset} {version} {path} is not Ready here"
            )
        try:
            fd = open_beneath(version_here.directory, path)
        except OSError as exc:
            raise _Refused(HTTPStatus.NOT_FOUND, "not_ready", f"{path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size != entry.size:
                raise _Refused(
                    HTTPStatus.NOT_FOUND, "not_ready", f"{path} is not its manifest's size"
                )
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

    def _send(
        self, fd: int, offset: int, length: int, size: int, ranged: bool, served: tuple[str, str]
    ) -> None:
        server = self.server
        self.send_response(HTTPStatus.PARTIAL_CONTENT if ranged else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if ranged:
            self.send_header("Content-Range", f"bytes {offset}-{offset + length - 1}/{size}")
        self.end_headers()
        self.wfile.flush()
        out = self.connection.fileno()
        sent = 0
        try:
            while sent < length:
                chunk = min(server.send_chunk, length - sent)
                server.limiter.take(chunk, server.stopping)
                n = os.sendfile(out, fd, offset + sent, chunk)
                if n == 0:
                    break  # the file shrank: the reader sees a short body and goes elsewhere
                sent += n
        except (FetchCancelled, OSError) as exc:
            if not isinstance(exc, FetchCancelled) and exc.errno not in (
                errno.EPIPE,
                errno.ECONNRESET,
            ):
                log.warning(
                    "Serving a peer failed: %s",
                    exc,
                    extra={"dataset": served[0], "object": served[1]},
                )
            self.close_connection = True
        finally:
            metrics.PEER_SERVED_BYTES.inc(sent)
        if sent < length:
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
