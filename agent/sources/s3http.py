"""S3 (and S3-compatible) sources read over plain HTTP/1.1: the agent's fast path.

Why not botocore on this path: it costs 4-5 ms of CPU per GET (request building, endpoint
rules, event hooks, response parsing), with the GIL held, against about 1 ms per object for
everything s5cmd does (docs/benchmarks.md). Here each request is a few lines of bytes on a
kept-alive socket, signed with a small SigV4 implementation (the signing key is derived once
per day, the payload is `UNSIGNED-PAYLOAD`), and bodies are read with `recv_into` straight
into the caller's buffer. Many small objects are read by one thread over non-blocking
connections instead (`get_many`, `agent.sources.s3loop`).

Credentials come from botocore's standard chain (env, config files, IRSA, instance role),
resolved once and refreshed when botocore says they expire. When the environment holds a key
pair, the chain's first provider, it is read directly so that `datacache-agent fetch` does not
pay for importing botocore (0.2-0.3 s). Secrets are never logged or put in an error message.

Errors map to the agent's: 412 -> `SourceChanged`; 404, 403, 416 and other 4xx ->
`SourceError` naming the S3 error code; 5xx, 429, throttling and connection failures before a
response are retried here a bounded number of times with jittered backoff (as botocore's
standard mode did), then raised as `SourceError`; a body cut short, reset or silent for the
read timeout raises `SourceError`, which the engine retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import random
import re
import socket
import struct
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_plus, urlsplit

from agent.checksums import MULTIPART_ETAG, ObjectChecksum, from_s3_headers
from agent.errors import SourceChanged, SourceError
from agent.sources.base import (
    READ_CHUNK_BYTES,
    ObjectFacts,
    ObjectInfo,
    ObjectReceiver,
    PartLayout,
)
from agent.sources.s3 import S3Settings
from datacache.validation import S3Source as S3Location

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

_UNSIGNED = "UNSIGNED-PAYLOAD"
_HEAD_LIMIT = 64 * 1024
_ERROR_BODY_LIMIT = 64 * 1024
_ATTEMPTS = 5
"""Tries of one request that fails before its body (connection errors, 5xx, throttling)."""
_MAX_BACKOFF_SECONDS = 5.0
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504, 429})
_RETRYABLE_CODES = frozenset(
    {"RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling", "ThrottlingException"}
)
_TOKEN_CODES = frozenset({"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired"})
_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
_REFRESH_MARGIN_SECONDS = 300.0


class _Retryable(Exception):
    """A request failed before its body in a way worth trying again."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


# Credentials ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = ""
    token: str | None = None

    def __repr__(self) -> str:
        # Never print the secret or the token, whoever logs this object.
        return f"Credentials(access_key={self.access_key!r}, secret_key=***, token=***)"


class CredentialChain:
    """botocore's credential chain, asked once and again only when the credentials expire."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._static: Credentials | None = None
        self._refreshable: Any = None
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret and not os.environ.get("AWS_CREDENTIAL_EXPIRATION"):
            # botocore's first provider reads exactly these variables; static, never refreshed.
            token = os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_SECURITY_TOKEN")
            self._static = Credentials(key, secret, token or None)

    def get(self) -> Credentials | None:
        """The current credentials; None for anonymous access (no credentials anywhere)."""
        if self._static is not None:
            return self._static
        with self._lock:
            if self._refreshable is None:
                import botocore.session

                self._refreshable = botocore.session.get_session().get_credentials() or False
            if self._refreshable is False:
                return None
            # botocore refreshes expiring credentials inside this call.
            frozen = self._refreshable.get_frozen_credentials()
            return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def invalidate(self) -> None:
        """After the server said the token expired: the next `get` asks the chain again."""
        with self._lock:
            if self._static is None:
                self._refreshable = None


def default_region(configured: str | None) -> str:
    """The signing region: the setting, then the environment, then botocore's configuration
    files, then us-east-1."""
    if configured:
        return configured
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return os.environ[name]
    import botocore.session

    region = botocore.session.get_session().get_config_variable("region")
    return str(region) if region else "us-east-1"


# SigV4 ---------------------------------------------------------------------------------------


def uri_encode(text: str, keep_slash: bool) -> str:
    """Percent-encodes every byte of the UTF-8 text except A-Z a-z 0-9 - _ . ~ (and '/' in an
    object key), as SigV4 requires of S3 keys and query values."""
    return quote(text, safe="/~" if keep_slash else "~")


class Signer:
    """AWS Signature Version 4 for S3 requests with unsigned payloads."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self._second = -1
        self._stamp = ""

    def _now(self) -> str:
        # One strftime per second, not per request.
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
        return self._stamp

    def _key(self, secret: str, day: str) -> bytes:
        with self._lock:
            key = self._keys.get((secret, day))
            if key is None:
                key = ("AWS4" + secret).encode()
                for part in (day, self.region, self.service, "aws4_request"):
                    key = hmac.new(key, part.encode(), hashlib.sha256).digest()
                # One entry per day and secret: forget older days.
                self._keys = {(secret, day): key}
            return key

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        query: str,
        headers: dict[str, str],
        credentials: Credentials,
        amz_date: str | None = None,
    ) -> None:
        """Adds x-amz-date, x-amz-content-sha256, the token and Authorization to `headers`.
        `path` and `query` are exactly what goes on the request line (already encoded, the
        query's parameters sorted). Signs host and every x-amz-* header."""
        amz_date = amz_date or self._now()
        headers["x-amz-date"] = amz_date
        headers["x-amz-content-sha256"] = _UNSIGNED
        if credentials.token:
            headers["x-amz-security-token"] = credentials.token
        signed = [("host", host)]
        for name, value in headers.items():
            lowered = name.lower()
            if lowered.startswith("x-amz-"):
                signed.append((lowered, " ".join(value.split()) if " " in value else value))
        signed.sort()
        names = ";".join(n for n, _ in signed)
        canonical = "\n".join(
            (method, path, query, "".join(f"{n}:{v}\n" for n, v in signed), names, _UNSIGNED)
        )
        day = amz_date[:8]
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
            f"{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        signature = hmac.digest(
            self._key(credentials.secret_key, day), to_sign.encode(), "sha256"
        ).hex()
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={names}, Signature={signature}"
        )


def canonical_query(params: Mapping[str, str]) -> str:
    return "&".join(
        f"{uri_encode(k, False)}={uri_encode(v, False)}" for k, v in sorted(params.items())
    )


# HTTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    base_path: str
    """Path prefix of the endpoint URL ('' usually), without a trailing '/'."""

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        split = urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise SourceError(f"S3 endpoint {url!r} must be http:// or https://host[:port]")
        port = split.port or (443 if split.scheme == "https" else 80)
        return cls(split.scheme, split.hostname, port, split.path.rstrip("/"))

    def host_header(self, host: str) -> str:
        default = 443 if self.scheme == "https" else 80
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return host if self.port == default else f"{host}:{self.port}"


_TIMEOUTS = (TimeoutError, BlockingIOError)
"""What a read or write that timed out raises: a Python socket timeout, or SO_RCVTIMEO /
SO_SNDTIMEO expiring on a blocking socket (EAGAIN)."""


def _kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Makes `sock` blocking, with its reads and writes timed out by the kernel (SO_RCVTIMEO,
    SO_SNDTIMEO): one system call per recv. A Python socket timeout polls before each recv,
    and every system call releases and takes back the GIL: on 2,000 small objects read by 8
    threads that was 5,500 more calls, each a chance of handing the GIL over."""
    sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class _Connection:
    """One kept-alive HTTP/1.1 connection."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
                sock.settimeout(read_timeout)
            else:
                _kernel_timeouts(sock, read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket = sock
        self.host = host
        self.pending = b""
        """Bytes received past the end of the last response head."""
        self.used = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_head(self) -> tuple[int, dict[str, str]]:
        data = self.pending
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(data) > _HEAD_LIMIT:
                raise BadResponse("response head too long")
            more = self.sock.recv(65536)
            if not more:
                raise BadResponse("connection closed before a complete response head")
            data += more
        self.pending = data[end + 4 :]
        return parse_head(data[:end])


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased, repeats joined) of a response head, without
    its closing blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BadResponse(f"malformed status line {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(parts[1]), headers


class BadResponse(Exception):
    """A response that does not parse as HTTP/1.1."""


class Response:
    """A response whose head was read; the body is read with `readinto`. A response that is
    not read to its end, or is closed early, closes its connection."""

    def __init__(
        self, pool: _Pool, conn: _Connection, status: int, headers: dict[str, str], bodiless: bool
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._until_close = False
        if bodiless:
            self.remaining = 0
        elif self._chunked:
            self.remaining = -1
        elif length is not None and length.isdigit():
            self.remaining = int(length)
        else:
            self.remaining, self._until_close = -1, True
        self._keep = not self._until_close and "close" not in headers.get("connection", "").lower()
        self.received = 0
        self.prefetched: bytes | None = None
        """The body, when it was read already (to look at an error code)."""
        if self.remaining == 0:
            self._finish()

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._keep:
                self._pool.put(conn)
            else:
                conn.close()

    def close(self) -> None:
        """Abandons the rest of the body (and the connection with it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def readinto(self, view: memoryview) -> int:
        """Fills `view` from the body (Content-Length bodies only); returns the bytes read,
        fewer than len(view) only at the end of the body. Raises OSError when the connection
        fails or ends before the body does."""
        conn = self._conn
        if conn is None or self.remaining <= 0:
            return 0
        want = min(len(view), self.remaining)
        got = 0
        pending = conn.pending
        if pending:
            got = min(want, len(pending))
            view[:got] = pending[:got]
            conn.pending = pending[got:]
        sock = conn.sock
        try:
            while got < want:
                n = sock.recv_into(view[got:want])
                if n == 0:
                    raise ConnectionError(
                        f"connection closed after {self.received + got} body bytes, "
                        f"{self.remaining - got} missing"
                    )
                got += n
        except BaseException:
            self.close()
            raise
        self.remaining -= got
        self.received += got
        if self.remaining == 0:
            self._finish()
        return got

    def read_small(self, limit: int = _ERROR_BODY_LIMIT) -> bytes:
        """The whole body, when it is small (error documents, listings); longer bodies are cut
        at `limit` and the connection is dropped."""
        if self.prefetched is not None:
            return self.prefetched[:limit]
        conn = self._conn
        if conn is None:
            return b""
        try:
            if self._chunked:
                return self._read_chunked(conn, limit)
            if self._until_close:
                data = conn.pending
                while len(data) < limit and (more := conn.sock.recv(65536)):
                    data += more
                self.close()
                return data[:limit]
            if self.remaining > limit:
                buf = bytearray(limit)
                n = self.readinto(memoryview(buf))
                self.close()
                return bytes(buf[:n])
            buf = bytearray(self.remaining)
            n = self.readinto(memoryview(buf))
            return bytes(buf[:n])
        except BaseException:
            self.close()
            raise

    def _read_chunked(self, conn: _Connection, limit: int) -> bytes:
        data = conn.pending
        body = b""
        while True:
            while b"\r\n" not in data:
                if len(data) > _HEAD_LIMIT:
                    raise BadResponse("malformed chunked body")
                more = conn.sock.recv(65536)
                if not more:
                    raise ConnectionError("connection closed inside a chunked body")
                data += more
            line, _, data = data.partition(b"\r\n")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while not (data.startswith(b"\r\n") or b"\r\n\r\n" in data):
                    more = conn.sock.recv(65536)
                    if not more:
                        raise ConnectionError("connection closed inside a chunked body")
                    data += more
                data = data[2:] if data.startswith(b"\r\n") else data.split(b"\r\n\r\n", 1)[1]
                conn.pending = data
                self.remaining = 0
                self._finish()
                return body
            while len(data) < size + 2:
                more = conn.sock.recv(65536)
                if not more:
                    raise ConnectionError("connection closed inside a chunked body")
                data += more
            if len(body) < limit:
                body += data[:size]
            data = data[size + 2 :]
            if len(body) > limit:
                self.close()
                return body[:limit]


class _Pool:
    """Idle kept-alive connections to one host, shared by the threads of a source (in practice
    one connection per worker thread)."""

    def __init__(self, endpoint: Endpoint, settings: S3Settings) -> None:
        self._endpoint = endpoint
        self._settings = settings
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        # Sources have no close() in their protocol: idle connections go with the source.
        weakref.finalize(self, _close_all, self._idle)
        self.tls: ssl.SSLContext | None = None
        if endpoint.scheme == "https":
            import ssl

            self.tls = ssl.create_default_context()

    def get(self, host: str) -> _Connection:
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i].host == host:
                    return self._idle.pop(i)
        return self.connect(host)

    def connect(self, host: str) -> _Connection:
        """A new connection, outside the pool."""
        return _Connection(
            host,
            self._endpoint.port,
            self.tls,
            self._settings.connect_timeout_seconds,
            self._settings.read_timeout_seconds,
        )

    def put(self, conn: _Connection) -> None:
        conn.used = True
        with self._lock:
            if len(self._idle) < self._settings.max_connections:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle = list(self._idle)
            self._idle.clear()
        _close_all(idle)


def _close_all(connections: list[_Connection]) -> None:
    for conn in connections:
        conn.close()


# The source ----------------------------------------------------------------------------------


class Body:
    """A GET in progress: what the response states, and its bytes."""

    def __init__(self, response: Response, checksum: ObjectChecksum | None, url: str) -> None:
        self._response = response
        self.checksum = checksum
        """The full-object checksum stated by a whole-object GET (None for ranges)."""
        self._url = url

    def readinto(self, view: memoryview) -> int:
        """Fills `view` (fewer bytes only at the end of the body); 0 at the end."""
        try:
            return self._response.readinto(view)
        except (OSError, BadResponse) as exc:
            raise SourceError(f"reading {self._url}: {_describe(exc)}") from exc

    def close(self) -> None:
        self._response.close()


class S3HttpSource:
    """Reads one S3 prefix over kept-alive HTTP connections. Implements `Source`,
    `ChecksummedSource`, the engine's buffered read path (`open_range`) and `MultiGetSource`
    for small objects."""

    def __init__(
        self,
        location: S3Location,
        settings: S3Settings,
        credentials: CredentialChain | None = None,
        region: str | None = None,
    ) -> None:
        url = settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
        url = url or os.environ.get("AWS_ENDPOINT_URL")
        self._region = region or default_region(settings.region)
        self._endpoint = Endpoint.parse(url or _aws_endpoint(self._region))
        self._location = location
        self._settings = settings
        self._credentials = credentials or CredentialChain()
        self._signer = Signer(self._region)
        self._pool = _Pool(self._endpoint, settings)
        bucket = location.bucket
        virtual = settings.addressing_style == "virtual" or (
            settings.addressing_style == "auto"
            and not url
            and "." not in bucket
            and bucket == bucket.lower()
        )
        if virtual:
            self._host = f"{bucket}.{self._endpoint.host}"
            self._bucket_path = self._endpoint.base_path
        else:
            self._host = self._endpoint.host
            self._bucket_path = f"{self._endpoint.base_path}/{uri_encode(bucket, False)}"
        self._host_header = self._endpoint.host_header(self._host)
        self._checksums: dict[tuple[str, str], ObjectChecksum | None] = {}
        self._lock = threading.Lock()

    # Protocol ------------------------------------------------------------------------------

    def list(self) -> Iterator[ObjectInfo]:
        prefix = self._location.prefix
        token: str | None = None
        while True:
            params = {"list-type": "2", "encoding-type": "url"}
            if prefix:
                params["prefix"] = prefix
            if token:
                params["continuation-token"] = token
            try:
                response = self._request("GET", self._bucket_path or "/", params, {})
                body = response.read_small(limit=64 << 20)
            except (OSError, BadResponse) as exc:
                raise SourceError(f"listing {self._location.uri} failed: {_describe(exc)}") from exc
            if response.status != 200:
                raise SourceError(f"listing {self._location.uri} failed: {_code(response, body)}")
            objects, token = _parse_listing(body, self._location.uri)
            for key, size, etag in objects:
                if not key.startswith(prefix):
                    raise SourceError(f"listing {self._location.uri}: key {key!r} outside prefix")
                yield ObjectInfo(key=key[len(prefix) :], size=size, etag=etag)
            if token is None:
                return

    def read_range(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return
        body = self.open_range(obj, offset, length)
        try:
            buf = bytearray(min(READ_CHUNK_BYTES, length))
            view = memoryview(buf)
            while n := body.readinto(view):
                yield bytes(view[:n])
        finally:
            body.close()

    def checksum(self, obj: ObjectInfo) -> ObjectChecksum | None:
        with self._lock:
            if (obj.key, obj.etag) in self._checksums:
                return self._checksums.pop((obj.key, obj.etag))
        return self.head(obj.key, obj.etag).checksum

    def stat(self, key: str) -> ObjectInfo:
        facts = self.head(key, None)
        return ObjectInfo(key=key, size=facts.size, etag=facts.etag)

    # Fast path -----------------------------------------------------------------------------

    def open_range(self, obj: ObjectInfo, offset: int, length: int) -> Body:
        """Starts a GET of bytes [offset, offset+length) of `obj` as listed (If-Match its
        ETag). A whole-object GET asks for the stored checksum (`x-amz-checksum-mode`), which
        the body then states before its first byte."""
        key = self._location.prefix + obj.key
        url = f"s3://{self._location.bucket}/{key}"
        whole = offset == 0 and length == obj.size
        if whole:
            headers = _whole_get_headers(obj)
        else:
            headers = {"If-Match": obj.etag, "Range": f"bytes={offset}-{offset + length - 1}"}
        response = self._checked("GET", key, {}, headers, url)
        expected = 200 if whole else 206
        declared = response.headers.get("content-length")
        if response.status != expected or declared != str(length):
            response.close()
            raise SourceError(
                f"reading {url}: expected {length} bytes (HTTP {expected}), got HTTP "
                f"{response.status} with {declared} bytes"
            )
        multipart = MULTIPART_ETAG.fullmatch(obj.etag) is not None
        stated = from_s3_headers(response.headers, multipart)[0] if whole else None
        if whole:
            with self._lock:
                self._checksums[(obj.key, obj.etag)] = stated
        return Body(response, stated, url)

    def get_many(
        self,
        objs: Sequence[ObjectInfo],
        receiver: ObjectReceiver,
        connections: int,
        cancel: threading.Event,
    ) -> None:
        """Whole GETs of `objs` (If-Match their ETags, stating their checksums) from one thread
        over up to `connections` new connections (`agent.sources.s3loop`)."""
        from agent.sources.s3loop import Loop

        def connect() -> socket.socket:
            return self._pool.connect(self._host).sock

        def request(obj: ObjectInfo) -> bytes:
            path = self._object_path(self._location.prefix + obj.key)
            return self._request_bytes("GET", path, "", path, _whole_get_headers(obj))

        loop = Loop(connect, request, self._settings.read_timeout_seconds, cancel)
        loop.run(objs, receiver, connections)

    def head(self, key: str, etag: str | None) -> ObjectFacts:
        """HEAD of the object, If-Match `etag` when given."""
        full_key = self._location.prefix + key
        headers = {"x-amz-checksum-mode": "ENABLED"}
        if etag is not None:
            headers["If-Match"] = etag
        url = f"s3://{self._location.bucket}/{full_key}"
        response = self._checked("HEAD", full_key, {}, headers, url, what="metadata of ")
        try:
            size = int(response.headers["content-length"])
            got_etag = response.headers["etag"]
        except (KeyError, ValueError) as exc:
            raise SourceError(f"reading metadata of {url}: incomplete response") from exc
        multipart = MULTIPART_ETAG.fullmatch(got_etag) is not None
        checksum, composite = from_s3_headers(response.headers, multipart)
        return ObjectFacts(size, got_etag, checksum, composite)

    def part_layout(self, obj: ObjectInfo) -> PartLayout | None:
        """The part layout of a multipart upload, when the server tells it: a HEAD of part 1
        gives the part size and the parts count, a HEAD of the last part confirms that every
        part but the last has that size (as every S3 client uploads)."""
        match = MULTIPART_ETAG.fullmatch(obj.etag)
        if match is None:
            return None
        count = int(match.group(1))
        first = self._head_part(obj, 1)
        if first is None:
            return None
        part_size, parts_count = first
        if parts_count != count or part_size <= 0:
            return None
        last_size = obj.size - (count - 1) * part_size
        if not 0 < last_size <= part_size:
            return None
        if count > 1:
            last = self._head_part(obj, count)
            if last is None or last[0] != last_size:
                return None
        return PartLayout(part_size=part_size, count=count)

    def _head_part(self, obj: ObjectInfo, number: int) -> tuple[int, int] | None:
        key = self._location.prefix + obj.key
        url = f"s3://{self._location.bucket}/{key}"
        params = {"partNumber": str(number)}
        response = self._checked("HEAD", key, params, {}, url, what="metadata of ")
        count = response.headers.get("x-amz-mp-parts-count", "")
        length = response.headers.get("content-length", "")
        if not (count.isdigit() and length.isdigit()):
            return None
        return int(length), int(count)

    def close(self) -> None:
        self._pool.close()

    # Requests ------------------------------------------------------------------------------

    def _checked(
        self,
        method: str,
        key: str,
        params: dict[str, str],
        headers: dict[str, str],
        url: str,
        what: str = "",
    ) -> Response:
        """A request for an object; maps error statuses to the agent's errors."""
        path = self._object_path(key)
        try:
            response = self._request(method, path, params, headers)
        except (OSError, BadResponse) as exc:
            raise SourceError(f"reading {what}{url}: {_describe(exc)}") from exc
        if response.status < 300:
            return response
        body = b"" if method == "HEAD" else _quietly(response.read_small)
        response.close()
        if response.status == 412:
            raise SourceChanged(f"{url} changed while being copied")
        raise SourceError(f"reading {what}{url}: {_code(response, body)}")

    def _object_path(self, key: str) -> str:
        """The request path of the object `key` (the full key, prefix included)."""
        return f"{self._bucket_path}/{uri_encode(key, True)}"

    def _request(
        self, method: str, path: str, params: dict[str, str], headers: dict[str, str]
    ) -> Response:
        """Sends a request and reads the response head. Connection failures and throttling or
        server errors are tried again (bounded); other statuses are returned."""
        query = canonical_query(params)
        target = f"{path}?{query}" if query else path
        last: BaseException | None = None
        refreshed = False
        for attempt in range(_ATTEMPTS):
            if attempt:
                delay = getattr(last, "delay", None)
                backoff = random.uniform(0, min(_MAX_BACKOFF_SECONDS, 0.1 * 2**attempt))  # noqa: S311
                time.sleep(min(_MAX_BACKOFF_SECONDS, delay) if delay is not None else backoff)
            try:
                response = self._send(method, path, query, target, headers)
            except _Retryable as exc:
                last = exc
                log.info("Retrying S3 %s %s: %s", method, path, exc)
                continue
            if response.status == 400 and method != "HEAD" and not refreshed:
                body = response.read_small()
                code = _code(response, body)
                if code in _TOKEN_CODES:
                    response.close()
                    self._credentials.invalidate()
                    refreshed = True
                    continue
                if code in _RETRYABLE_CODES:
                    last = _Retryable(f"HTTP 400 {code}")
                    continue
                response.prefetched = body
                return response
            if response.status in _RETRYABLE_STATUS:
                body = b"" if method == "HEAD" else _quietly(response.read_small)
                response.close()
                retry_after = response.headers.get("retry-after", "")
                last = _Retryable(
                    f"HTTP {response.status} {_code(response, body)}",
                    float(retry_after) if retry_after.isdigit() else None,
                )
                log.info("Retrying S3 %s %s: %s", method, path, last)
                continue
            return response
        assert last is not None
        raise BadResponse(f"{last} (after {_ATTEMPTS} attempts)")

    def _request_bytes(
        self, method: str, path: str, query: str, target: str, headers: dict[str, str]
    ) -> bytes:
        """The request, signed when there are credentials."""
        all_headers = dict(headers)
        credentials = self._credentials.get()
        if credentials is not None:
            self._signer.sign(method, self._host_header, path, query, all_headers, credentials)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def _send(
        self, method: str, path: str, query: str, target: str, headers: dict[str, str]
    ) -> Response:
        request = self._request_bytes(method, path, query, target, headers)
        # A kept-alive connection the server has closed meanwhile fails at once: that costs no
        # attempt, a fresh connection is tried straight away.
        for _ in range(2):
            try:
                conn = self._pool.get(self._host)
            except OSError as exc:
                raise _Retryable(f"cannot connect: {_describe(exc)}") from exc
            try:
                conn.send(request)
                status, response_headers = conn.read_head()
            except (OSError, BadResponse) as exc:
                conn.close()
                if conn.used and not isinstance(exc, _TIMEOUTS):
                    continue
                raise _Retryable(_describe(exc)) from exc
            return Response(self._pool, conn, status, response_headers, method == "HEAD")
        raise _Retryable("kept-alive connections closed by the server")


def _whole_get_headers(obj: ObjectInfo) -> dict[str, str]:
    """A whole-object GET: pinned to the listed ETag, asking for the stored checksum."""
    return {"If-Match": obj.etag, "x-amz-checksum-mode": "ENABLED"}


def _quietly(read: Any) -> bytes:
    try:
        data: bytes = read()
    except (OSError, BadResponse):
        return b""
    return data


def _code(response: Response, body: bytes) -> str:
    match = _CODE.search(body)
    if match:
        return match.group(1).decode("utf-8", "replace")
    return str(response.status)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _TIMEOUTS):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, BadResponse | _Retryable) else f"{type(exc).__name__}: {text}"


def _aws_endpoint(region: str) -> str:
    return f"https://s3.{region}.amazonaws.com"


_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _parse_listing(body: bytes, uri: str) -> tuple[list[tuple[str, int, str]], str | None]:
    """(key, size, etag) of a ListObjectsV2 page, and the continuation token if truncated."""
    # The configured endpoint's own answer, parsed by the standard library (no DTDs fetched).
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(body)  # noqa: S314
    except ET.ParseError as exc:
        raise SourceError(f"listing {uri} failed: unreadable response ({exc})") from exc
    ns = _NS if root.tag.startswith(_NS) else ""
    encoded = (root.findtext(f"{ns}EncodingType") or "") == "url"
    objects = []
    for item in root.iterfind(f"{ns}Contents"):
        key = item.findtext(f"{ns}Key") or ""
        objects.append(
            (
                unquote_plus(key) if encoded else key,
                int(item.findtext(f"{ns}Size") or 0),
                item.findtext(f"{ns}ETag") or "",
            )
        )
    truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    token = root.findtext(f"{ns}NextContinuationToken") if truncated else None
    if truncated and not token:
        raise SourceError(f"listing {uri} failed: truncated page without a continuation token")
    return objects, token
