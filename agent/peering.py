"""Peer copying between agents: its settings, and how agents prove to each other that they
belong to the cluster.

Every agent of a cluster reads the same key file (a Kubernetes Secret mounted into the agent
DaemonSet only). A request to a peer carries `Authorization: DatacachePeer
<node>:<unix seconds>:<HMAC-SHA256>` over the node, the time, the request target, the
range and, for a request with a body (a batch's list of files), the SHA-256 of the body, so the
key itself never crosses the network and a captured header is good only for the same bytes and
for `MAX_SKEW_SECONDS`. The file may hold several keys, one per line: the first
signs, all verify, so keys rotate without a window where agents refuse each other (add the
new key second everywhere, then first, then drop the old one).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError

SCHEME = "DatacachePeer"
MAX_SKEW_SECONDS = 300
"""How far a request's time may be from the server's clock, seconds."""
_RELOAD_SECONDS = 10.0
_MIN_KEY_BYTES = 16


MAX_BATCH_FILES = 64
"""Most files one batch request (`POST /v1/files`) may ask for; peers refuse more."""


@dataclass(frozen=True)
class PeerSettings:
    """How this agent serves its Ready copies to other agents and copies from them."""

    key_file: Path | None = None
    """File of shared cluster keys (one per line, at least 16 bytes each); None: no peer
    copying at all (this agent neither serves nor reads peers)."""
    port: int = 9403
    """Port of the peer server; 0: serve no peers (still read from them)."""
    listen_address: str = "0.0.0.0"  # noqa: S104 - other nodes' agents connect to it
    """Address the peer server listens on."""
    advertise_address: str = ""
    """host:port other agents dial (in a cluster: the pod IP and `port`); empty: not
    advertised, so no agent reads from this one."""
    serve_bytes_per_second: float = 256 * 1024 * 1024
    """Most bytes per second served to all peers together, so serving never starves the
    node's own pods of disk and network."""
    serve_max_connections: int = 32
    """Most peer requests served at once; more are answered 503 and read elsewhere. Memory:
    one thread (and no buffer: files are sent with sendfile) per connection, plus for a batch
    request its list of paths (at most 64 x 4 KiB = 256 KiB, read before a slot is taken)
    and up to 64 open file descriptors while it is served."""
    stall_seconds: float = 2.0
    """A peer that sends nothing for this long is left for the next one (or the source)."""
    connect_timeout_seconds: float = 1.0
    """Time to connect to a peer before trying the next one, seconds."""
    min_bytes_per_second: float = 1024 * 1024
    """A peer slower than this over a read (after its first second) is left for the next."""
    batch_files: int = 64
    """Most small files asked of a peer in one request (`POST /v1/files`, up to 64 files and
    16 MiB, what peers accept); 1: one request per file. Memory: the request's list of paths,
    at most 64 x 4 KiB per copy thread; the bytes stream through the copy's own buffers."""
    avoid_seconds: float = 60.0
    """How long a peer that sent wrong bytes is not asked, seconds; a peer that was gone,
    silent, slow or refused is avoided 2 s, doubling with each failure in a row up to this."""


class PeerKeys:
    """The cluster's peer keys, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._keys: tuple[bytes, ...] = ()
        self._mtime = -1.0
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        try:
            mtime = os.stat(self._path).st_mtime
            if mtime == self._mtime:
                return
            lines = self._path.read_bytes().splitlines()
        except OSError as exc:
            raise AgentError(f"peer key file {self._path}: {exc.strerror}") from exc
        keys = tuple(line.strip() for line in lines if line.strip())
        if not keys or any(len(k) < _MIN_KEY_BYTES for k in keys):
            raise AgentError(
                f"peer key file {self._path} must hold one or more keys of at least "
                f"{_MIN_KEY_BYTES} bytes, one per line"
            )
        self._keys, self._mtime = keys, mtime

    def keys(self) -> tuple[bytes, ...]:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= _RELOAD_SECONDS:
                self._checked = now
                # Keep the keys that worked: a half-written file must not cut peers off.
                with contextlib.suppress(AgentError):
                    self._load()
            return self._keys

    def sign(
        self,
        node: str,
        target: str,
        byte_range: str,
        now: float | None = None,
        body: bytes | None = None,
    ) -> str:
        """The Authorization header value for a request from `node`; `body` is the request's
        body when it has one."""
        stamp = int(time.time() if now is None else now)
        mac = _mac(self.keys()[0], node, stamp, target, byte_range, body)
        return f"{SCHEME} {node}:{stamp}:{mac}"

    def verify(
        self,
        header: str,
        target: str,
        byte_range: str,
        now: float | None = None,
        body: bytes | None = None,
    ) -> str:
        """The requesting node's name, or raises PermissionError saying what was wrong."""
        scheme, _, credentials = header.partition(" ")
        node, _, rest = credentials.partition(":")
        stamp, _, mac = rest.partition(":")
        if scheme != SCHEME or not node or not stamp.isdigit() or not mac:
            raise PermissionError(f"missing or malformed {SCHEME} authorization")
        current = time.time() if now is None else now
        if abs(current - int(stamp)) > MAX_SKEW_SECONDS:
            raise PermissionError(
                f"request time is {int(current) - int(stamp)}s off this node's clock "
                f"(limit {MAX_SKEW_SECONDS}s): check NTP on both nodes"
            )
        for key in self.keys():
            if hmac.compare_digest(_mac(key, node, int(stamp), target, byte_range, body), mac):
                return node
        raise PermissionError("signature does not match any peer key of this node")


def _mac(
    key: bytes, node: str, stamp: int, target: str, byte_range: str, body: bytes | None
) -> str:
    message = f"{node}\n{stamp}\n{target}\n{byte_range}"
    if body is not None:
        # A fifth line only for requests with a body: what bodiless requests sign is unchanged,
        # so agents of either release verify each other's, and no header value (it holds no
        # newline) can make a bodiless request's message equal to one with a body.
        message += f"\n{hashlib.sha256(body).hexdigest()}"
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
