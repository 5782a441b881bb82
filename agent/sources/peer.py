"""Copying a fixed dataset version from peers: other agents that hold it Ready.

`PeerSource` is a `BufferedSource` in front of the dataset's real source (the origin). Each
unit the engine reads (a small file, or a range of a large one) goes to one peer, the peers
taken in an order rotated per unit so that parallel reads spread over all of them. It states
no checksums: every file is verified against the version's manifest, exactly as a copy from
the origin is.

A peer is left for the next one (and the origin after the last) when it refuses the
connection or resets it, sends nothing for `stall_seconds`, is slower than
`min_bytes_per_second`, answers an HTTP error (e.g. the version is not Ready there), or sent
bytes that failed verification. Leaving happens in the middle of a read: the rest of the unit
comes from the next server and the engine does not notice. The peer is then avoided by every
copy of this agent for `avoid_seconds`, and the reason is counted
(`datacache_agent_peer_fallbacks_total`).

Small files are read in batches (`BatchSource`): up to `batch_files` whole files from one peer
in one request (`POST /v1/files`), which pays the per-request cost (HTTP on both sides, an
HMAC each side) once per batch instead of once per file. A batch is only a first try: when it
fails (the peer is gone, stalls, is slow, refuses) the peer is avoided as above and the
engine reads the files the batch did not complete one by one, which fails over as above. A
peer that does not take batches (an agent of an older release answers 501; 400, 404 or 405
mean the same) is asked one file at a time for the rest of the copy, and not avoided for it.

Wrong bytes are found per file. For a file read whole (alone or in a batch), the peer that sent
it is blamed. For a file read as ranges, the engine reads every range again from the origin
and the peers whose ranges differ are blamed (`RoutedSource`).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import logging
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlencode

from agent import metrics
from agent.checksums import ObjectChecksum
from agent.errors import SourceError
from agent.peering import MAX_BATCH_FILES, PeerKeys, PeerSettings
from agent.peerserver import FILE_PATH, FILES_PATH, MAX_BATCH_BYTES
from agent.sources.base import (
    BatchBody,
    BufferedSource,
    ObjectFacts,
    ObjectInfo,
    PartLayout,
    RangeBody,
    Source,
    StreamingSource,
)
from datacache.validation import InvalidInput, validate_peer_address

log = logging.getLogger(__name__)

_SLOW_GRACE_SECONDS = 1.0
_FIRST_AVOID_SECONDS = 2.0
_ERROR_BODY_LIMIT = 4096
_NO_BATCH_STATUSES = frozenset({400, 404, 405, 501})
"""Answers to a batch request after which the peer is asked one file at a time: 501 and 405
from a server without the endpoint (an older agent), 404 from one that knows no such path
(or, from a current agent, a file not Ready there: the per-file reads then find that out and
avoid the peer), 400 from one whose limits are lower than this agent's."""


@dataclass(frozen=True)
class Peer:
    node: str
    address: str
    """host:port of its peer server."""


def valid_peers(peers: Sequence[tuple[str, str]]) -> tuple[Peer, ...]:
    """The peers whose address is well formed (others are logged and ignored)."""
    out = []
    for node, address in peers:
        try:
            validate_peer_address(address)
        except InvalidInput as exc:
            log.warning("Ignoring peer %s: %s", node, exc)
            continue
        out.append(Peer(node, address))
    return tuple(out)


def _close_all(connections: list[http.client.HTTPConnection]) -> None:
    for conn in list(connections):
        conn.close()
    connections.clear()


class PeerHealth:
    """Which peers this agent avoids, and until when. Shared by every copy of the agent."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._strikes: dict[str, tuple[int, float]] = {}
        """address -> (failures in a row, when the last one happened)."""
        self._lock = threading.Lock()

    def avoid(self, peer: Peer, reason: str, seconds: float, detail: str) -> None:
        """Avoids `peer` after a failure: a peer that sent wrong bytes for `seconds`; one
        that was gone, slow or silent for a short time doubling with every failure in a row
        up to `seconds` (a single hiccup must not send a whole copy to the source)."""
        metrics.PEER_FALLBACKS.labels(reason).inc()
        now = time.monotonic()
        with self._lock:
            known = self._until.get(peer.address, 0.0) > now
            strikes, last = self._strikes.get(peer.address, (0, 0.0))
            strikes = 1 if now - last > seconds else strikes + 1
            self._strikes[peer.address] = (strikes, now)
            if reason != "corrupt":
                seconds = min(seconds, _FIRST_AVOID_SECONDS * 2 ** (strikes - 1))
            self._until[peer.address] = max(self._until.get(peer.address, 0.0), now + seconds)
        if not known:
            log.warning(
                "Avoiding peer %s for %.0fs (%s): %s",
                peer.node,
                seconds,
                reason,
                detail,
                extra={"peer": peer.node},
            )

    def usable(self, peer: Peer) -> bool:
        with self._lock:
            return self._until.get(peer.address, 0.0) <= time.monotonic()


class _PeerFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _NoBatches(Exception):
    """The peer does not take this batch request; ask it one file at a time."""


class _EmptyBody:
    checksum: ObjectChecksum | None = None

    def readinto(self, view: memoryview) -> int:
        return 0

    def close(self) -> None:
        pass


class _ChunkBody:
    """A `RangeBody` over a source that hands out chunks (`Source.read_range`)."""

    checksum: ObjectChecksum | None = None

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readinto(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            if not self._pending:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._pending = memoryview(chunk)
            n = min(len(view) - got, len(self._pending))
            view[got : got + n] = self._pending[:n]
            self._pending = self._pending[n:]
            got += n
        return got

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class _FailoverBody:
    """One unit's bytes: from a peer, continued from the next one (or the origin) when it
    fails part way."""

    checksum: ObjectChecksum | None = None

    def __init__(self, source: PeerSource, obj: ObjectInfo, unit: int, offset: int, length: int):
        self._source = source
        self._obj = obj
        self._unit = unit
        self._pos = offset
        self._end = offset + length
        self._peer: Peer | None = None
        self._response: http.client.HTTPResponse | None = None
        self._origin: RangeBody | None = None
        self._tried: set[str] = set()
        self._opened = 0.0
        self._received = 0
        self._open()

    def _open(self) -> None:
        source = self._source
        for peer in source.candidates(self._obj, self._unit):
            if peer.address in self._tried:
                continue
            self._tried.add(peer.address)
            try:
                self._response = source.request(peer, self._obj, self._pos, self._end - self._pos)
            except _PeerFailed as failed:
                source.avoid(peer, failed.reason, str(failed))
                continue
            self._peer, self._opened, self._received = peer, time.monotonic(), 0
            source.served(self._obj, self._unit, peer)
            return
        self._peer, self._response = None, None
        self._origin = source.open_origin(self._obj, self._pos, self._end - self._pos)

    def readinto(self, view: memoryview) -> int:
        want = min(len(view), self._end - self._pos)
        if want <= 0:
            return 0
        while True:
            if self._origin is not None:
                n = self._origin.readinto(view[:want])
                self._pos += n
                metrics.PEER_ORIGIN_BYTES.inc(n)
                return n
            assert self._response is not None and self._peer is not None
            try:
                n = self._response.readinto(view[:want])
                if n == 0:
                    raise _PeerFailed("gone", "the body ended early")
            except _PeerFailed as failed:
                self._leave(failed.reason, str(failed))
                continue
            except TimeoutError:
                stall = self._source.settings.stall_seconds
                self._leave("stalled", f"nothing received for {stall:.1f}s")
                continue
            except (OSError, http.client.HTTPException) as exc:
                self._leave("gone", f"{type(exc).__name__}: {exc}")
                continue
            self._pos += n
            self._received += n
            metrics.PEER_RECEIVED_BYTES.inc(n)
            elapsed = time.monotonic() - self._opened
            if (
                elapsed > _SLOW_GRACE_SECONDS
                and self._pos < self._end
                and self._received / elapsed < self._source.settings.min_bytes_per_second
            ):
                self._leave("slow", f"{self._received / elapsed / 1e6:.2f} MB/s")
            return n

    def _leave(self, reason: str, detail: str) -> None:
        peer, response = self._peer, self._response
        assert peer is not None
        self._source.avoid(peer, reason, detail)
        self._source.drop_connection(peer)
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()
        self._open()

    def close(self) -> None:
        if self._response is not None:
            if self._pos < self._end and self._peer is not None:
                self._source.drop_connection(self._peer)  # unread body: the connection goes
            with contextlib.suppress(Exception):
                self._response.close()
            self._response = None
        if self._origin is not None:
            self._origin.close()
            self._origin = None


class _BatchBody:
    """Whole files from one peer in one response, back to back. Ends at the first failure
    (nothing fails over in the middle of a batch): the engine reads the files not yet complete
    one by one."""

    def __init__(
        self,
        source: PeerSource,
        peer: Peer,
        response: http.client.HTTPResponse,
        objs: Sequence[ObjectInfo],
    ) -> None:
        self._source = source
        self._peer = peer
        self._response: http.client.HTTPResponse | None = response
        self._objs = objs
        self._ends = list(itertools.accumulate(o.size for o in objs))
        self._done = 0
        """Files complete."""
        self._pos = 0
        self._waited = 0.0
        """Seconds spent waiting for the peer's bytes. The engine writes, verifies and fsyncs
        each file between reads: that time is this node's, not the peer's."""

    def readinto(self, view: memoryview) -> int:
        if self._done == len(self._objs):
            return 0
        if self._response is None:
            raise SourceError(f"the batch from peer {self._peer.node} failed already")
        # Slowness is judged before a read, never after one: the bytes returned always stand,
        # so a file whose last byte arrived is complete.
        waited, floor = self._waited, self._source.settings.min_bytes_per_second
        if waited > _SLOW_GRACE_SECONDS and self._pos / waited < floor:
            self._fail("slow", f"{self._pos / waited / 1e6:.2f} MB/s")
        want = min(len(view), self._ends[self._done] - self._pos)
        started = time.monotonic()
        try:
            n = self._response.readinto(view[:want])
            self._waited += time.monotonic() - started
        except TimeoutError:
            self._fail("stalled", f"nothing received for {self._source.settings.stall_seconds}s")
        except (OSError, http.client.HTTPException) as exc:
            self._fail("gone", f"{type(exc).__name__}: {exc}")
        if n == 0:
            self._fail("gone", "the body ended early")
        self._pos += n
        metrics.PEER_RECEIVED_BYTES.inc(n)
        if self._pos == self._ends[self._done]:
            # This peer sent the whole file: if it fails verification, the peer is to blame.
            self._source.served(self._objs[self._done], 0, self._peer)
            self._done += 1
        return n

    def _fail(self, reason: str, detail: str) -> NoReturn:
        self._source.avoid(self._peer, reason, detail)
        self.close()
        raise SourceError(
            f"batch of {len(self._objs)} files from peer {self._peer.node} ended after "
            f"{self._done} ({reason}): {detail}"
        )

    def close(self) -> None:
        if self._response is None:
            return
        if self._done < len(self._objs):
            self._source.drop_connection(self._peer)  # unread body: the connection goes
        with contextlib.suppress(Exception):
            self._response.close()
        self._response = None


class PeerSource:
    """Reads one fixed version of a dataset from peers, falling back to `origin`."""

    def __init__(
        self,
        peers: Sequence[Peer],
        origin: Source,
        objects: Sequence[ObjectInfo],
        dataset: str,
        version: str,
        node: str,
        keys: PeerKeys,
        settings: PeerSettings,
        health: PeerHealth,
    ) -> None:
        self.settings = settings
        self._peers = tuple(peers)
        self._origin = origin
        self._sizes = {o.key: o.size for o in objects}
        self._dataset = dataset
        self._version = version
        self._node = node
        self._keys = keys
        self._health = health
        self._lock = threading.Lock()
        self._served: dict[str, dict[int, set[Peer]]] = {}
        self._suspects: dict[str, dict[int, set[Peer]]] = {}
        self._solo: set[str] = set()
        """Addresses of the peers asked one file at a time (they take no batches)."""
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        # Worker threads end with the copy, their connections with the source.
        weakref.finalize(self, _close_all, self._connections)

    def close(self) -> None:
        """Closes every connection to the peers."""
        _close_all(self._connections)

    # Routing -----------------------------------------------------------------------------

    def candidates(self, obj: ObjectInfo, unit: int) -> list[Peer]:
        with self._lock:
            if obj.key in self._suspects:
                return []
        usable = [p for p in self._peers if self._health.usable(p)]
        if not usable:
            return []
        spin = zlib.crc32(f"{obj.key}\0{unit}".encode()) % len(usable)
        return usable[spin:] + usable[:spin]

    def served(self, obj: ObjectInfo, unit: int, peer: Peer) -> None:
        with self._lock:
            self._served.setdefault(obj.key, {}).setdefault(unit, set()).add(peer)

    def avoid(self, peer: Peer, reason: str, detail: str) -> None:
        self._health.avoid(peer, reason, self.settings.avoid_seconds, detail)

    def distrust(self, obj: ObjectInfo) -> None:
        with self._lock:
            self._suspects[obj.key] = self._served.pop(obj.key, {})

    def blame(self, obj: ObjectInfo, offset: int) -> None:
        with self._lock:
            peers = self._suspects.get(obj.key, {}).get(offset, set())
        for peer in peers:
            self.avoid(peer, "corrupt", f"{obj.key!r} from byte {offset} failed the manifest check")

    # Reading -----------------------------------------------------------------------------

    def _connection(self, peer: Peer) -> http.client.HTTPConnection:
        connections: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "connections", {}
        )
        conn = connections.get(peer.address)
        if conn is None:
            host, port = validate_peer_address(peer.address)
            conn = http.client.HTTPConnection(
                host, port, timeout=self.settings.connect_timeout_seconds
            )
            connections[peer.address] = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def drop_connection(self, peer: Peer) -> None:
        connections = self._local.__dict__.get("connections", {})
        conn = connections.pop(peer.address, None)
        if conn is not None:
            conn.close()

    def request(
        self, peer: Peer, obj: ObjectInfo, offset: int, length: int
    ) -> http.client.HTTPResponse:
        target = f"{FILE_PATH}?" + urlencode(
            {"dataset": self._dataset, "version": self._version, "path": obj.key}
        )
        byte_range = f"bytes={offset}-{offset + length - 1}"
        headers = {
            "Range": byte_range,
            "Authorization": self._keys.sign(self._node, target, byte_range),
        }
        response = self._exchange(peer, "GET", target, headers, None)
        if response.status != 206:
            raise self._refused(peer, response)
        if response.length != length:
            self.drop_connection(peer)
            raise _PeerFailed("refused", f"answered {response.length} bytes, not {length}")
        return response

    def request_batch(self, peer: Peer, objs: Sequence[ObjectInfo]) -> http.client.HTTPResponse:
        target = f"{FILES_PATH}?" + urlencode({"dataset": self._dataset, "version": self._version})
        # No key holds a NUL (agent.keys refuses them): the list needs no other framing.
        body = b"\0".join(o.key.encode("utf-8", "surrogatepass") for o in objs)
        headers = {
            "Content-Type": "application/octet-stream",
            "Authorization": self._keys.sign(self._node, target, "", body=body),
        }
        response = self._exchange(peer, "POST", target, headers, body)
        if response.status in _NO_BATCH_STATUSES:
            raise _NoBatches(str(self._refused(peer, response)))
        if response.status != 200:
            raise self._refused(peer, response)
        length = sum(o.size for o in objs)
        if response.length != length:
            self.drop_connection(peer)
            raise _PeerFailed("refused", f"answered {response.length} bytes, not {length}")
        return response

    def _exchange(
        self, peer: Peer, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> http.client.HTTPResponse:
        """Sends a request on this thread's connection to `peer`; its response's head."""
        for attempt in (1, 2):
            conn = self._connection(peer)
            reused = conn.sock is not None
            try:
                if conn.sock is None:
                    conn.connect()
                sock: socket.socket = conn.sock
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(self.settings.stall_seconds)
                conn.request(method, target, body=body, headers=headers)
                return conn.getresponse()
            except TimeoutError as exc:
                self.drop_connection(peer)
                raise _PeerFailed("stalled", "no connection or answer in time") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.drop_connection(peer)
                if reused and attempt == 1:
                    continue  # an idle kept-alive connection the peer had closed
                raise _PeerFailed("gone", f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _refused(self, peer: Peer, response: http.client.HTTPResponse) -> _PeerFailed:
        """The failure an error answer stands for (the connection is dropped)."""
        try:
            detail = response.read(_ERROR_BODY_LIMIT).decode("utf-8", "replace").strip()
        except (OSError, http.client.HTTPException) as exc:
            detail = f"(the body failed: {exc})"
        self.drop_connection(peer)
        return _PeerFailed("refused", f"HTTP {response.status}: {detail[:200]}")

    def open_origin(self, obj: ObjectInfo, offset: int, length: int) -> RangeBody:
        origin = self._origin
        if isinstance(origin, StreamingSource):
            return origin.open_range(obj, offset, length)
        return _ChunkBody(iter(origin.read_range(obj, offset, length)))

    # The BatchSource interface ---------------------------------------------------------------

    def batch_limits(self) -> tuple[int, int]:
        return min(self.settings.batch_files, MAX_BATCH_FILES), MAX_BATCH_BYTES

    def open_batch(self, objs: Sequence[ObjectInfo]) -> BatchBody | None:
        if not objs:
            return None
        with self._lock:
            if any(o.key in self._suspects for o in objs):
                return None
        for peer in self.candidates(objs[0], 0):
            if peer.address in self._solo:
                continue
            try:
                response = self.request_batch(peer, objs)
            except _NoBatches as exc:
                with self._lock:
                    self._solo.add(peer.address)
                log.info(
                    "Peer %s takes no batch requests (%s): asking it one file at a time",
                    peer.node,
                    exc,
                    extra={"peer": peer.node, "dataset": self._dataset},
                )
                continue
            except _PeerFailed as failed:
                self.avoid(peer, failed.reason, str(failed))
                continue
            return _BatchBody(self, peer, response, objs)
        return None

    # The BufferedSource interface ------------------------------------------------------------

    def open_range(self, obj: ObjectInfo, offset: int, length: int) -> RangeBody:
        if length == 0:
            return _EmptyBody()
        return _FailoverBody(self, obj, offset, offset, length)

    def list(self) -> Iterator[ObjectInfo]:
        return self._origin.list()

    def read_range(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        body = self.open_range(obj, offset, length)
        try:
            left = length
            while left > 0:
                buf = bytearray(min(left, 1024 * 1024))
                n = body.readinto(memoryview(buf))
                if n == 0:
                    raise SourceError(f"reading {obj.key!r}: the body ended {left} bytes early")
                left -= n
                yield bytes(buf[:n])
        finally:
            body.close()

    def checksum(self, obj: ObjectInfo) -> None:
        return None

    def stat(self, key: str) -> ObjectInfo:
        origin = self._origin
        if isinstance(origin, BufferedSource):
            return origin.stat(key)
        raise SourceError(f"{key!r} changed at the source")

    def head(self, key: str, etag: str | None) -> ObjectFacts:
        """What the manifest says (no request: the manifest is the truth for a fixed
        version)."""
        return ObjectFacts(self._sizes.get(key, 0), etag or "", None, None)

    def part_layout(self, obj: ObjectInfo) -> PartLayout | None:
        return None
