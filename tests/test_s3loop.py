"""The one-thread reader of small S3 objects (`S3HttpSource.get_many`) against a small HTTP(S)
server on loopback: bytes and stated checksums delivered per object, over plain HTTP and TLS,
and every unusual response reported as `failed` (never delivered) while the rest go on."""

from __future__ import annotations

import base64
import hashlib
import http.server
import socket
import ssl
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.checksums import ObjectChecksum
from agent.sources import SourceOpener
from agent.sources.base import ObjectInfo
from agent.sources.s3 import S3Settings
from agent.sources.s3http import S3HttpSource
from datacache.localcluster import DEMO_CREDENTIALS
from tests.tlscerts import CertificateAuthority


def body_of(name: str) -> bytes:
    """A deterministic body per object name, 0-300 kB (several TLS records)."""
    size = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 300_000
    return (hashlib.sha256(name.encode()).digest() * (size // 32 + 1))[:size]


class _Objects(http.server.BaseHTTPRequestHandler):
    """GET /bkt/ds/<name>: the body of `name`, with its CRC32 stated. Names starting with
    `missing` get a 404, `cut` half the body then a closed connection, `chunked` a chunked
    body, `close` the body with `Connection: close`."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        body = body_of(name)
        if name.startswith("missing"):
            payload = b"<Error><Code>NoSuchKey</Code></Error>"
            self.send_response(404)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        self.send_response(200)
        self.send_header("x-amz-checksum-crc32", crc)
        self.send_header("x-amz-checksum-type", "FULL_OBJECT")
        if name.startswith("chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            return
        self.send_header("Content-Length", str(len(body)))
        if name.startswith("close"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if name.startswith("cut"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # The client drops connections on purpose here (bodies it refuses).
        pass


def _serve(context: ssl.SSLContext | None) -> Iterator[str]:
    server = _QuietServer(("127.0.0.1", 0), _Objects)
    server.daemon_threads = True
    scheme = "http"
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"{scheme}://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(params=["http", "https"])
def endpoint(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    for key, value in DEMO_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    context = None
    if request.param == "https":
        ca = CertificateAuthority(tmp_path / "ca")
        pair = ca.issue("s3", server=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_file, pair.key_file)
        monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_file))
    yield from _serve(context)


class Recorder:
    def __init__(self) -> None:
        self.bodies: dict[int, bytearray] = {}
        self.checksums: dict[int, ObjectChecksum | None] = {}
        self.ended: list[int] = []
        self.failures: dict[int, str] = {}
        self.unattempted: set[int] = set()

    def begin(self, index: int, checksum: ObjectChecksum | None) -> None:
        assert index not in self.bodies, "begun twice"
        self.bodies[index] = bytearray()
        self.checksums[index] = checksum

    def write(self, index: int, data: memoryview) -> None:
        assert index not in self.ended
        self.bodies[index] += data

    def end(self, index: int) -> None:
        self.ended.append(index)

    def failed(self, index: int, reason: str, attempted: bool = True) -> None:
        assert index not in self.ended and index not in self.failures
        self.failures[index] = reason
        if not attempted:
            self.unattempted.add(index)


def source_for(endpoint: str) -> S3HttpSource:
    source = SourceOpener(S3Settings(endpoint_url=endpoint, read_timeout_seconds=10)).open(
        "s3://bkt/ds/"
    )
    assert isinstance(source, S3HttpSource)
    return source


def objects(names: list[str]) -> list[ObjectInfo]:
    return [ObjectInfo(name, len(body_of(name)), '"etag"') for name in names]


@pytest.mark.parametrize("connections", [1, 4, 64])
def test_delivers_every_object_whole_with_its_stated_checksum(
    endpoint: str, connections: int
) -> None:
    names = [f"f{i:03d}" for i in range(40)]
    objs = objects(names)
    recorder = Recorder()
    source_for(endpoint).get_many(objs, recorder, connections, threading.Event())

    assert recorder.failures == {}
    assert sorted(recorder.ended) == list(range(len(objs)))
    for i, name in enumerate(names):
        assert bytes(recorder.bodies[i]) == body_of(name), name
        stated = recorder.checksums[i]
        assert stated is not None
        assert (stated.algorithm, stated.value) == ("crc32", zlib.crc32(body_of(name)))


def test_unusual_responses_are_reported_failed_and_the_rest_delivered(endpoint: str) -> None:
    names = ["a", "missing-1", "b", "cut-1", "c", "chunked-1", "d", "close-1", "e", "f"]
    objs = objects(names)
    # One object listed with another size than the server sends.
    objs.append(ObjectInfo("g", len(body_of("g")) + 1, '"etag"'))
    recorder = Recorder()
    source_for(endpoint).get_many(objs, recorder, 3, threading.Event())

    failed = {names[i] if i < len(names) else "g": why for i, why in recorder.failures.items()}
    assert set(failed) == {"missing-1", "cut-1", "chunked-1", "g"}
    assert "HTTP 404" in failed["missing-1"]
    assert "closed" in failed["cut-1"]
    assert "chunked" in failed["chunked-1"]
    assert "bytes" in failed["g"]
    delivered = {names[i] for i in recorder.ended}
    assert delivered == {"a", "b", "c", "d", "close-1", "e", "f"}
    for i in recorder.ended:
        assert bytes(recorder.bodies[i]) == body_of(names[i])


def test_a_cancelled_read_stops(endpoint: str) -> None:
    from agent.errors import FetchCancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(FetchCancelled):
        source_for(endpoint).get_many(objects(["a", "b"]), Recorder(), 2, cancel)


def test_no_server_reports_every_object_failed() -> None:
    recorder = Recorder()
    source = source_for(f"http://127.0.0.1:{closed_port()}")
    source.get_many(objects(["a", "b", "c"]), recorder, 2, threading.Event())
    assert set(recorder.failures) == {0, 1, 2}
    assert recorder.unattempted == {0, 1, 2}
    assert recorder.ended == []


def closed_port() -> int:
    """A loopback port nothing listens on (bound a moment ago, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
