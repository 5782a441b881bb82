"""A fault-injecting HTTP/1.1 reverse proxy for tests, run on its own asyncio loop in a thread.

It sits in front of a real server (SeaweedFS's S3 port, or a kube-apiserver over TLS) on
127.0.0.1 and forwards every request unchanged (keep-alive connections, Content-Length and
chunked bodies in both directions, the `Host` header kept so SigV4 signatures still match).
For each request a rule may choose one fault:

- ``reset``: send the headers and `after_bytes` bytes of the body, then reset the connection
  (RST: SO_LINGER 0 and close);
- ``truncate``: the same but close cleanly (FIN), so the body ends early;
- ``flip``: XOR the body byte at `offset` with `xor` (same length, wrong content);
- ``slowdown``: answer 503 with S3's SlowDown XML error without asking the server;
- ``answer``: answer `status` with a Kubernetes `Status` body (and `Retry-After` if given)
  without asking the server, as an API server does when it throttles (429) or conflicts (409);
- ``latency``: wait `seconds` before the response;
- ``stall``: send the headers, then nothing for `seconds` (or until `release_stalls()`), then
  the rest of the body (if the client is still there).

Rules match on method, a substring of the path, the presence of a `Range` header, the request's
number and any extra predicate, and can be limited to their first N matches so retries succeed.
Every wait is bounded, and `stop()` closes every connection and joins the thread.

Body offsets count the decoded body of the response (the bytes of the requested range for a
ranged GET). A body fault whose offset lies beyond the body is not applied and not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

FaultKind = Literal["reset", "truncate", "flip", "slowdown", "answer", "latency", "stall"]

_HEADER_LIMIT = 64 * 1024
_PIECE = 64 * 1024
_CONNECT_TIMEOUT = 5.0
_STOP_TIMEOUT = 5.0


class ProxyError(RuntimeError):
    """The proxy failed to start or to stop in time."""


@dataclass(frozen=True)
class Request:
    """A request as the proxy saw it."""

    number: int
    """1-based, in the order the proxy read the requests."""
    method: str
    path: str
    """Path with the query string."""
    range: str | None
    """The `Range` header, if any."""
    content_type: str | None = None
    """The `Content-Type` header, if any (which kind of patch a PATCH is)."""


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    after_bytes: int = 0
    """reset, truncate: body bytes sent before the connection is cut."""
    offset: int = 0
    """flip: body offset of the byte changed."""
    xor: int = 0xFF
    """flip: the byte is XORed with this."""
    seconds: float = 0.0
    """latency: delay before the response; stall: pause after the headers."""
    retry_after: int | None = None
    """slowdown, answer: value of a `Retry-After` header, if any."""
    status: int = 0
    """answer: the HTTP status."""


@dataclass
class Rule:
    """Injects `fault` into requests matching every given condition, for the first `limit`
    matches (all of them when `limit` is None)."""

    fault: Fault
    method: str | None = None
    path_contains: str | None = None
    has_range: bool | None = None
    numbers: frozenset[int] | None = None
    """Request numbers (Request.number) the rule applies to."""
    when: Callable[[Request], bool] | None = None
    limit: int | None = None
    matched: int = field(default=0, init=False)

    def matches(self, request: Request) -> bool:
        if self.limit is not None and self.matched >= self.limit:
            return False
        if self.method is not None and request.method != self.method:
            return False
        if self.path_contains is not None and self.path_contains not in request.path:
            return False
        if self.has_range is not None and (request.range is not None) != self.has_range:
            return False
        if self.numbers is not None and request.number not in self.numbers:
            return False
        return self.when is None or self.when(request)


RuleFunction = Callable[[Request], Fault | None]


@dataclass(frozen=True)
class Injected:
    request: Request
    fault: Fault


class _Head:
    """A request or response head: the start line and the raw header lines."""

    def __init__(self, raw: bytes) -> None:
        lines = raw.decode("latin-1").split("\r\n")
        self.start = lines[0]
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"malformed header line {line!r}")
            self.headers.append((name.strip(), value.strip()))

    def get(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    def without(self, name: str) -> None:
        self.headers = [(k, v) for k, v in self.headers if k.lower() != name.lower()]

    def encode(self) -> bytes:
        lines = [self.start, *(f"{k}: {v}" for k, v in self.headers), "", ""]
        return "\r\n".join(lines).encode("latin-1")

    @property
    def chunked(self) -> bool:
        return "chunked" in (self.get("Transfer-Encoding") or "").lower()

    @property
    def content_length(self) -> int | None:
        value = self.get("Content-Length")
        return None if value is None else int(value)

    def wants_close(self) -> bool:
        return "close" in (self.get("Connection") or "").lower()


async def _read_head(reader: asyncio.StreamReader) -> _Head | None:
    """The next head, or None at a clean end of stream before any byte of it."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    return _Head(raw[:-4])


async def _body(reader: asyncio.StreamReader, head: _Head, bodiless: bool) -> AsyncIterator[bytes]:
    """The decoded body of a message whose head was just read; for a response without
    length or chunking, everything up to the end of the stream."""
    if bodiless:
        return
    if head.chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers (rare) are dropped; read up to the blank line ending them.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            remaining = size
            while remaining:
                piece = await reader.read(min(_PIECE, remaining))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(piece)
                yield piece
            await reader.readexactly(2)
        return
    length = head.content_length
    if length is None:
        while piece := await reader.read(_PIECE):
            yield piece
        return
    remaining = length
    while remaining:
        piece = await reader.read(min(_PIECE, remaining))
        if not piece:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(piece)
        yield piece


def _frame(piece: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece


class _Link:
    """One client connection and the upstream connection serving it (opened on demand)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream[1].transport.abort()
            self.upstream = None

    def abort(self) -> None:
        self.writer.transport.abort()
        self.drop_upstream()


class _Cut(Exception):
    """The client connection was cut on purpose; stop serving it."""


_REASONS = {
    403: ("Forbidden", "Forbidden"),
    404: ("Not Found", "NotFound"),
    409: ("Conflict", "Conflict"),
    410: ("Gone", "Expired"),
    429: ("Too Many Requests", "TooManyRequests"),
    500: ("Internal Server Error", "InternalError"),
    503: ("Service Unavailable", "ServiceUnavailable"),
}


def _status_response(request: Request, fault: Fault) -> bytes:
    """A Kubernetes API error, shaped as kube-apiserver shapes one."""
    phrase, reason = _REASONS.get(fault.status, ("Error", "Unknown"))
    body = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"injected by the fault proxy into request {request.number}",
            "reason": reason,
            "code": fault.status,
        }
    ).encode()
    headers = [
        f"HTTP/1.1 {fault.status} {phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if fault.retry_after is not None:
        headers.append(f"Retry-After: {fault.retry_after}")
    return ("\r\n".join([*headers, "", ""])).encode("latin-1") + body


def _slowdown_response(request: Request, fault: Fault) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
        f"<Resource>{request.path.split('?', 1)[0]}</Resource>"
        f"<RequestId>faultproxy-{request.number}</RequestId></Error>"
    ).encode()
    headers = [
        "HTTP/1.1 503 Slow Down",
        "Content-Type: application/xml",
        f"Content-Length: {len(body)}",
        f"x-amz-request-id: faultproxy-{request.number}",
    ]
    if fault.retry_after is not None:
        headers.append(f"Retry-After: {fault.retry_after}")
    head = ("\r\n".join([*headers, "", ""])).encode("latin-1")
    return head if request.method == "HEAD" else head + body


class FaultProxy:
    """The proxy. Use as a context manager, or call `start()` and `stop()`."""

    def __init__(
        self,
        upstream: str,
        rules: Sequence[Rule] | RuleFunction = (),
        *,
        upstream_ssl: ssl.SSLContext | None = None,
    ) -> None:
        """`upstream` is the server's base URL (http://host:port, or https://host:port with
        `upstream_ssl`, the context the proxy connects with; clients then speak plain HTTP to
        the proxy). `rules` is either a list of rules (the first that matches a request
        chooses its fault) or a function from a request to a fault or None."""
        split = urlsplit(upstream)
        scheme = "https" if upstream_ssl is not None else "http"
        if split.scheme != scheme or split.hostname is None or split.port is None:
            raise ValueError(f"upstream must be {scheme}://host:port, not {upstream!r}")
        self._upstream_address = (split.hostname, split.port)
        self._upstream_ssl = upstream_ssl
        self._rules = rules
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._injected: list[Injected] = []
        self._active: dict[int, Request] = {}
        self._statuses: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._links: set[_Link] = set()
        self._stopping: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        """Set (and replaced) by `release_stalls()`: ends the stalls in progress."""
        self.port = 0

    # Public ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_rules(self, rules: Sequence[Rule] | RuleFunction) -> None:
        with self._lock:
            self._rules = rules

    @property
    def requests(self) -> list[Request]:
        """Every request seen so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def injected(self) -> list[Injected]:
        """Every fault applied so far, in order."""
        with self._lock:
            return list(self._injected)

    def statuses(self) -> dict[int, int]:
        """The status of each answered request, by request number (faults included)."""
        with self._lock:
            return dict(self._statuses)

    def active(self) -> list[Request]:
        """The requests whose responses are being relayed now (open watches, for one)."""
        with self._lock:
            return sorted(self._active.values(), key=lambda r: r.number)

    def counts(self) -> Counter[str]:
        """Faults applied so far by kind."""
        with self._lock:
            return Counter(i.fault.kind for i in self._injected)

    def release_stalls(self) -> None:
        """Ends every stall of a request the proxy has already read, in progress or about to
        start (its response head may still be on its way): their bodies follow at once.
        Requests read later stall as their rules say. Returns once the stalls were told."""
        loop = self._loop
        if loop is None:
            raise ProxyError("the fault proxy is not running")
        told = threading.Event()

        def release() -> None:
            if self._release is not None:
                self._release.set()
            self._release = asyncio.Event()
            told.set()

        loop.call_soon_threadsafe(release)
        if not told.wait(_STOP_TIMEOUT):
            raise ProxyError("the fault proxy's loop did not answer")

    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._stopping = asyncio.Event()
                self._release = asyncio.Event()
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve_client, "127.0.0.1", 0, limit=_HEADER_LIMIT)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not started.wait(_STOP_TIMEOUT) or failure:
            self._thread.join(_STOP_TIMEOUT)
            raise ProxyError("the fault proxy did not start") from (failure[0] if failure else None)
        return self

    def stop(self) -> None:
        """Closes the listener and every connection, stops the loop and joins the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        error: BaseException | None = None
        if not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(2 * _STOP_TIMEOUT)
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(2 * _STOP_TIMEOUT)
        if thread.is_alive():
            raise ProxyError("the fault proxy thread did not stop") from error
        if error is not None:
            raise ProxyError("the fault proxy did not shut down cleanly") from error

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Loop side ------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        assert self._server is not None and self._stopping is not None
        self._stopping.set()
        self._server.close()
        # Cutting both sides of every connection ends each handler (its reads see the end of
        # the stream, its pauses end with `_stopping`); cancelling is only the fallback.
        for link in list(self._links):
            link.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_STOP_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_STOP_TIMEOUT)
        await asyncio.wait_for(self._server.wait_closed(), _STOP_TIMEOUT)
        # Let the transports just aborted run their connection_lost callbacks (which close the
        # sockets) before the loop stops.
        for _ in range(3):
            await asyncio.sleep(0)

    def _choose(
        self, method: str, path: str, range_header: str | None, content_type: str | None = None
    ) -> tuple[Request, Fault | None]:
        with self._lock:
            request = Request(len(self._requests) + 1, method, path, range_header, content_type)
            self._requests.append(request)
            rules = self._rules
            fault: Fault | None = None
            if callable(rules):
                fault = rules(request)
            else:
                for rule in rules:
                    if rule.matches(request):
                        rule.matched += 1
                        fault = rule.fault
                        break
        return request, fault

    def _record(self, request: Request, fault: Fault) -> None:
        with self._lock:
            self._injected.append(Injected(request, fault))

    async def _pause(self, seconds: float, release: asyncio.Event | None = None) -> None:
        """Waits `seconds`, or less if the proxy is stopping or `release` is set."""
        assert self._stopping is not None
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if release is not None:
            waits.append(asyncio.ensure_future(release.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        link = _Link(reader, writer)
        self._tasks.add(task)
        self._links.add(link)
        try:
            while True:
                head = await _read_head(reader)
                if head is None or not await self._exchange(head, link):
                    return
        except (_Cut, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            # A cut on purpose, a client or server gone, or a malformed message: drop both
            # connections, as a proxy would.
            pass
        except asyncio.CancelledError:
            # Only stop() cancels, and only handlers that did not end by themselves; ending
            # normally keeps Python 3.11's StreamReaderProtocol from logging the cancellation.
            if not (self._stopping is not None and self._stopping.is_set()):
                raise
        finally:
            self._links.discard(link)
            link.abort()
            self._tasks.discard(task)

    async def _upstream(self, link: _Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The link's upstream connection, (re)opened if the server closed it."""
        if link.upstream is not None:
            up_reader, up_writer = link.upstream
            if not (up_reader.at_eof() or up_writer.is_closing()):
                return link.upstream
            link.drop_upstream()
        host, port = self._upstream_address
        link.upstream = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                limit=_HEADER_LIMIT,
                ssl=self._upstream_ssl,
                server_hostname=host if self._upstream_ssl is not None else None,
            ),
            _CONNECT_TIMEOUT,
        )
        return link.upstream

    async def _exchange(self, head: _Head, link: _Link) -> bool:
        """Serves one request; returns whether the client connection stays open."""
        reader, writer = link.reader, link.writer
        method, path, _ = head.start.split(" ", 2)
        request, fault = self._choose(method, path, head.get("Range"), head.get("Content-Type"))
        kind = fault.kind if fault is not None else None
        client_close = head.wants_close()
        # The proxy sends request bodies at once instead of waiting for 100 Continue.
        head.without("Expect")
        # A request without Content-Length or chunking has no body (RFC 9112 6.3).
        no_body = not head.chunked and head.content_length is None

        if fault is not None and kind in ("slowdown", "answer"):
            async for _ in _body(reader, head, bodiless=no_body):
                pass
            self._record(request, fault)
            with self._lock:
                self._statuses[request.number] = fault.status if kind == "answer" else 503
            answer = _slowdown_response if kind == "slowdown" else _status_response
            writer.write(answer(request, fault))
            await writer.drain()
            return not client_close

        with self._lock:
            self._active[request.number] = request
        # Taken now, not when the stall starts: a release between the two still ends it.
        release = self._release
        try:
            return await self._relay(head, link, request, fault, client_close, no_body, release)
        finally:
            with self._lock:
                self._active.pop(request.number, None)

    async def _relay(
        self,
        head: _Head,
        link: _Link,
        request: Request,
        fault: Fault | None,
        client_close: bool,
        no_body: bool,
        release: asyncio.Event | None,
    ) -> bool:
        reader, writer = link.reader, link.writer
        method = request.method
        kind = fault.kind if fault is not None else None
        up_reader, up_writer = await self._upstream(link)
        up_writer.write(head.encode())
        async for piece in _body(reader, head, bodiless=no_body):
            up_writer.write(_frame(piece, head.chunked))
            await up_writer.drain()
        if head.chunked:
            up_writer.write(b"0\r\n\r\n")
        await up_writer.drain()

        response = await _read_head(up_reader)
        if response is None:
            raise ConnectionResetError("the upstream server closed the connection")
        status = int(response.start.split(" ", 2)[1])
        with self._lock:
            self._statuses[request.number] = status
        bodiless = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        until_close = not bodiless and not response.chunked and response.content_length is None

        if fault is not None and kind == "latency":
            self._record(request, fault)
            await self._pause(fault.seconds)
        writer.write(response.encode())
        await writer.drain()
        if fault is not None and kind == "stall":
            self._record(request, fault)
            await self._pause(fault.seconds, release)

        sent = 0
        async for piece in _body(up_reader, response, bodiless):
            if fault is not None and kind == "flip" and sent <= fault.offset < sent + len(piece):
                i = fault.offset - sent
                piece = piece[:i] + bytes([piece[i] ^ fault.xor]) + piece[i + 1 :]
                self._record(request, fault)
            if (
                fault is not None
                and kind in ("reset", "truncate")
                and sent + len(piece) > fault.after_bytes
            ):
                writer.write(_frame(piece[: fault.after_bytes - sent], response.chunked))
                await self._cut(writer, reset=kind == "reset")
                self._record(request, fault)
                raise _Cut
            writer.write(_frame(piece, response.chunked))
            await writer.drain()
            sent += len(piece)
        if response.chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        if until_close or response.wants_close():
            link.drop_upstream()
        return not (client_close or response.wants_close() or until_close)

    async def _cut(self, writer: asyncio.StreamWriter, reset: bool) -> None:
        """Flushes what was written, then cuts the connection: RST or FIN."""
        writer.transport.set_write_buffer_limits(high=0)
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(writer.wait_closed(), _STOP_TIMEOUT)
