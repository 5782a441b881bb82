"""Many small S3 objects read from one thread over many non-blocking connections.

Why: with a thread per connection, every `recv` and `pwrite` releases the GIL and takes it
back, and on thousands of small objects the threads spend more time handing the GIL over
than copying (about 49 futex calls per object, CPU growing with the thread count). A server
also works harder for a client that drains its sockets late. One thread waiting on all its
connections at once (`selectors`) has no one to hand the GIL to, and keeps dozens of
requests in flight: on 2,000 objects of 20-200 KB here it read, checksummed and wrote them
in 0.67-0.83 s where 16 threads took 1.1-1.2 s (docs/benchmarks.md).

This is a fast path for the happy case only. Anything unusual on a response (a status other
than 200, a body not sized by Content-Length, a reset, a short body, a timeout) makes that
object `failed`, and the engine reads it again through the threaded path, which retries,
refreshes credentials, restarts changed objects and reports. A throttling or server error
stops new requests: the threaded path's backoff handles a busy server better.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from agent.checksums import MULTIPART_ETAG, from_s3_headers
from agent.errors import FetchCancelled
from agent.sources.base import ObjectInfo, ObjectReceiver
from agent.sources.s3http import BadResponse, parse_head

_BUFFER_BYTES = 256 * 1024
"""One read buffer for every connection (only one thread reads them)."""
_HEAD_LIMIT = 64 * 1024
_CONNECT_THREADS = 16
"""Connections are opened (TCP and TLS handshakes) this many at a time, before the loop."""
_STOP_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses after which no new request is started here."""
_TIMEOUT_CHECK_SECONDS = 1.0


class _Failure(Exception):
    """The object on a connection cannot be delivered here."""


class _Stream:
    """One connection and the object it is reading."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls = hasattr(sock, "pending")
        """An SSLSocket: decrypted bytes may wait in it with nothing left on the socket."""
        self.index = -1
        """The object being read (its index in the request), -1 between objects."""
        self.head = bytearray()
        self.in_body = False
        self.remaining = 0
        self.keep_alive = True
        self.last_activity = 0.0


class Loop:
    """Reads whole objects: `run` returns once each was delivered to the receiver or reported
    failed. Used for one `run` (its selector is closed at the end)."""

    def __init__(
        self,
        connect: Callable[[], socket.socket],
        request: Callable[[ObjectInfo], bytes],
        read_timeout: float,
        cancel: threading.Event,
    ) -> None:
        self._connect = connect
        self._request = request
        self._read_timeout = read_timeout
        self._cancel = cancel
        self._raw = bytearray(_BUFFER_BYTES)
        self._buffer = memoryview(self._raw)
        self._would_block: tuple[type[BaseException], ...] = (BlockingIOError,)
        self._reconnects = 0
        self._selector = selectors.DefaultSelector()
        self._stop_reason = ""
        """Set when a throttling or server error was seen: no new requests after it."""

    def run(self, objs: Sequence[ObjectInfo], receiver: ObjectReceiver, connections: int) -> None:
        self._pending: Iterator[int] = iter(range(len(objs)))
        self._receiver = receiver
        self._objs = objs
        self._reconnects = connections
        """Connections that failed and may still be replaced (a server closing each
        connection after its response, with `Connection: close`, does not count)."""
        try:
            for stream in self._open(min(connections, len(objs))):
                self._register(stream)
                self._next(stream)
            self._serve()
        finally:
            for key in list(self._selector.get_map().values()):
                with contextlib.suppress(OSError):
                    key.data.sock.close()
            self._selector.close()
        for index in self._pending:
            receiver.failed(index, self._stop_reason or "no connection to read it on", False)

    def _open(self, count: int) -> list[_Stream]:
        if count <= 0:
            return []
        with ThreadPoolExecutor(min(count, _CONNECT_THREADS)) as pool:
            streams = list(pool.map(lambda _: self._connected(), range(count)))
        return [stream for stream in streams if stream is not None]

    def _connected(self) -> _Stream | None:
        """A new non-blocking connection, or None when it cannot be opened (the threaded
        path will report why, when it fails too)."""
        try:
            sock = self._connect()
        except OSError:
            return None
        sock.setblocking(False)
        stream = _Stream(sock)
        if stream.tls:
            import ssl

            self._would_block = (BlockingIOError, ssl.SSLWantReadError)
        return stream

    def _register(self, stream: _Stream) -> None:
        self._selector.register(stream.sock, selectors.EVENT_READ, stream)

    def _next(self, stream: _Stream) -> None:
        """Starts the next object on `stream` (or on a new connection, when the server closes
        this one), or closes it when there is none to start."""
        index = None if self._stop_reason else next(self._pending, None)
        if index is None:
            self._drop(stream)
            return
        if not stream.keep_alive:
            self._drop(stream)
            replacement = self._connected()
            if replacement is None:
                self._receiver.failed(index, "cannot open a new connection", False)
                return
            stream = replacement
            self._register(stream)
        stream.index = index
        stream.head.clear()
        stream.in_body = False
        stream.last_activity = time.monotonic()
        request = self._request(self._objs[index])
        try:
            sent = stream.sock.send(request)
        except OSError as exc:
            self._fail(stream, f"sending the request: {exc}")
            return
        if sent != len(request):
            # Nothing else is queued on the socket, so this does not happen in practice.
            self._fail(stream, "the request did not fit the socket's buffer")

    def _serve(self) -> None:
        select = self._selector.select
        checked = time.monotonic()
        while self._selector.get_map():
            if self._cancel.is_set():
                raise FetchCancelled("fetch cancelled")
            for key, _ in select(_TIMEOUT_CHECK_SECONDS):
                stream = key.data
                try:
                    done = self._readable(stream)
                except _Failure as exc:
                    self._fail(stream, str(exc))
                    continue
                if done:
                    self._receiver.end(stream.index)
                    stream.index = -1
                    self._next(stream)
            now = time.monotonic()
            if now - checked >= _TIMEOUT_CHECK_SECONDS:
                checked = now
                for key in list(self._selector.get_map().values()):
                    stream = key.data
                    if now - stream.last_activity > self._read_timeout:
                        self._fail(stream, f"no data for {self._read_timeout:g} s")

    def _readable(self, stream: _Stream) -> bool:
        """Takes what arrived on `stream`; True once its object is complete."""
        buf = self._buffer
        while True:
            try:
                n = stream.sock.recv_into(buf)
            except self._would_block:
                return False
            except OSError as exc:
                raise _Failure(f"reading: {exc}") from exc
            if n == 0:
                raise _Failure("the connection closed before the response ended")
            stream.last_activity = time.monotonic()
            view = buf[:n]
            if not stream.in_body:
                view = self._take_head(stream, view)
                if not stream.in_body:
                    continue
            if len(view) > stream.remaining:
                raise _Failure("the response is longer than its Content-Length")
            if view:
                self._receiver.write(stream.index, view)
                stream.remaining -= len(view)
            if stream.remaining == 0:
                return True
            if not stream.tls or not stream.sock.pending():  # type: ignore[attr-defined]
                return False

    def _take_head(self, stream: _Stream, view: memoryview) -> memoryview:
        """Adds `view` (the start of the read buffer) to the response head; once complete,
        checks it, begins the object and returns the body bytes that came with it."""
        source: bytearray
        if stream.head:
            stream.head += view
            source, offset = stream.head, len(stream.head) - len(view)
            end = source.find(b"\r\n\r\n", max(0, offset - 3))
        else:
            # The usual case: the whole head in the first read, found without a copy.
            source, offset = self._raw, 0
            end = source.find(b"\r\n\r\n", 0, len(view))
        if end < 0:
            if source is self._raw:
                stream.head += view
            if len(stream.head) > _HEAD_LIMIT:
                raise _Failure("response head too long")
            return view[:0]
        head, body_start = bytes(source[:end]), end + 4 - offset
        try:
            status, headers = parse_head(head)
        except BadResponse as exc:
            raise _Failure(str(exc)) from exc
        obj = self._objs[stream.index]
        if status != 200:
            if status in _STOP_STATUSES:
                self._stop_reason = f"the server answered HTTP {status}: read one by one"
            raise _Failure(f"HTTP {status}")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _Failure("chunked body")
        if headers.get("content-length") != str(obj.size):
            raise _Failure(
                f"expected {obj.size} bytes, the response has {headers.get('content-length')}"
            )
        stream.keep_alive = "close" not in headers.get("connection", "").lower()
        checksum = from_s3_headers(headers, MULTIPART_ETAG.fullmatch(obj.etag) is not None)[0]
        stream.in_body = True
        stream.remaining = obj.size
        self._receiver.begin(stream.index, checksum)
        return view[body_start:]

    def _fail(self, stream: _Stream, reason: str) -> None:
        """Reports the object on `stream` failed and replaces the connection (its state is
        unknown), within the budget of reconnections."""
        index = stream.index
        stream.index = -1
        self._drop(stream)
        if index >= 0:
            self._receiver.failed(index, reason)
        if self._stop_reason or self._reconnects <= 0:
            return
        self._reconnects -= 1
        replacement = self._connected()
        if replacement is not None:
            self._register(replacement)
            self._next(replacement)

    def _drop(self, stream: _Stream) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(stream.sock)
        with contextlib.suppress(OSError):
            stream.sock.close()
