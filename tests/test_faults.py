"""Faults between the agent and a real S3 server: resets, short bodies, throttling, flipped
bytes, latency and stalls (injected by tests/faultproxy.py in front of SeaweedFS), and a full
disk (a real tmpfs). Each scenario ends with a byte-exact verified copy or a clear error, and
never with a partial file where a complete one is expected.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import VerificationError
from agent.fetch import FetchSettings, Progress, fetch_into, plan
from agent.journal import Journal
from agent.journal import load as load_journal
from agent.manifest import FileEntry
from agent.sources import Source, SourceOpener
from agent.sources.s3 import S3ObjectSource, S3Settings, s3_client
from datacache.localcluster import DEMO_CREDENTIALS, LocalCluster, wait_until
from datacache.localcluster import s3_client as admin_client
from datacache.validation import S3Source, parse_source
from tests.conftest import assert_fetch_fails_with_disk_full, mounted_tmpfs, run_agent_fetch
from tests.faultproxy import Fault, FaultProxy, Request, Rule

MiB = 1 << 20
SMALL_PARTS = FetchSettings(concurrency=4, part_bytes=MiB, multipart_threshold_bytes=MiB)


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in DEMO_CREDENTIALS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def proxy(s3_server: LocalCluster) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.s3_endpoint) as running:
        yield running


def upload(s3_server: LocalCluster, bucket: str, data: dict[str, bytes]) -> str:
    """Puts `data` under ds/ (directly, not through the proxy); returns the dataset URI."""
    client = admin_client(s3_server.s3_endpoint)
    for key, body in data.items():
        client.put_object(Bucket=bucket, Key=f"ds/{key}", Body=body)
    return f"s3://{bucket}/ds/"


def fetch(
    src: Source, dest: Path, settings: FetchSettings = SMALL_PARTS
) -> tuple[list[FileEntry], Progress]:
    dest.mkdir()
    progress = Progress()
    files, refused = plan(list(src.list()))
    assert refused == []
    return fetch_into(src, files, dest, settings, progress, threading.Event()), progress


def through(proxy: FaultProxy, uri: str) -> Source:
    return SourceOpener(S3Settings(endpoint_url=proxy.url)).open(uri)


def tree(root: Path) -> dict[str, bytes]:
    """Every file beneath `root` with its bytes; fails on anything that is not a plain file or
    directory."""
    found: dict[str, bytes] = {}
    for path in root.rglob("*"):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            pytest.fail(f"unexpected entry {path}")
        if path.is_file():
            found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def gets(proxy: FaultProxy, key: str) -> list[Request]:
    return [r for r in proxy.requests if r.method == "GET" and f"/ds/{key}" in r.path]


def range_of(offset: int, length: int) -> str:
    return f"bytes={offset}-{offset + length - 1}"


BIG = 3 * MiB + 5


def mixed_dataset() -> dict[str, bytes]:
    """Two files read whole and one read as three 1 MiB ranges and a 5-byte one (with
    SMALL_PARTS)."""
    return {
        "small-a.bin": os.urandom(300_000),
        "small-b.bin": os.urandom(200_000),
        "big.bin": os.urandom(BIG),
    }


def full_part(request: Request) -> bool:
    """A ranged GET of one of big.bin's 1 MiB ranges (not the 5-byte tail, too short to cut)."""
    return request.range is not None and request.range != range_of(3 * MiB, 5)


# The proxy itself ----------------------------------------------------------------------------


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers POST with the request body (decoded from chunks) as a chunked response, and GET
    with a 100 kB Content-Length body."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = b""
        while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (body[:10], body[10:]):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self) -> None:
        body = bytes(range(256)) * 400
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_proxy_forwards_chunked_bodies_over_kept_alive_connections(echo_server: str) -> None:
    with FaultProxy(echo_server) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            conn.request("POST", "/echo", body=iter([b"hello ", b"chunked ", b"world"]))
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"hello chunked world")
            first_socket = conn.sock
            conn.request("GET", "/data", headers={"Range": "bytes=0-9"})
            response = conn.getresponse()
            assert response.read() == bytes(range(256)) * 400
            assert conn.sock is first_socket, "the proxy closed a keep-alive connection"
            proxy.set_rules([Rule(Fault("flip", offset=3, xor=0x01), has_range=False)])
            conn.request("GET", "/data", headers={"Connection": "close"})
            response = conn.getresponse()
            assert response.read()[:5] == bytes([0, 1, 2, 2, 4])
        finally:
            conn.close()
        assert [(r.method, r.path, r.range) for r in proxy.requests] == [
            ("POST", "/echo", None),
            ("GET", "/data", "bytes=0-9"),
            ("GET", "/data", None),
        ]
        assert proxy.counts() == {"flip": 1}


def get_in_thread(proxy: FaultProxy, outcome: list[BaseException | bytes]) -> threading.Thread:
    """GET /data through the proxy in a thread of its own; its body or error goes to
    `outcome`."""

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        try:
            conn.request("GET", "/data")
            outcome.append(conn.getresponse().read())
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=client)
    thread.start()
    return thread


def test_proxy_stop_cuts_a_stalled_response(echo_server: str) -> None:
    proxy = FaultProxy(echo_server, [Rule(Fault("stall", seconds=60))]).start()
    outcome: list[BaseException | bytes] = []
    thread = get_in_thread(proxy, outcome)
    try:
        wait_until(lambda: proxy.counts()["stall"] == 1, 10, "the stall to begin", 0.02)
    finally:
        started = time.monotonic()
        proxy.stop()
        stopped_after = time.monotonic() - started
        thread.join(10)
    assert not thread.is_alive()
    assert stopped_after < 5
    assert len(outcome) == 1 and isinstance(outcome[0], http.client.IncompleteRead | OSError)


def test_released_stalls_send_their_bodies_and_later_stalls_still_stall(echo_server: str) -> None:
    with FaultProxy(echo_server, [Rule(Fault("stall", seconds=60))]) as proxy:
        bodies: list[BaseException | bytes] = []
        first = get_in_thread(proxy, bodies)
        wait_until(lambda: proxy.counts()["stall"] == 1, 10, "the first stall to begin", 0.02)
        proxy.release_stalls()
        first.join(10)
        assert bodies == [bytes(range(256)) * 400]

        second = get_in_thread(proxy, bodies)
        try:
            wait_until(lambda: proxy.counts()["stall"] == 2, 10, "the second stall to begin", 0.02)
            second.join(0.5)  # a stall that began after the release is still held
            assert second.is_alive() and len(bodies) == 1
        finally:
            proxy.release_stalls()
            second.join(10)
        assert bodies == [bytes(range(256)) * 400] * 2


# Resets and short bodies ---------------------------------------------------------------------


def test_resets_and_truncated_bodies_are_retried(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = mixed_dataset()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules(
        [
            # The first two ranged GETs are reset mid-body, the third ends early.
            Rule(Fault("reset", after_bytes=100_000), method="GET", when=full_part, limit=2),
            Rule(Fault("truncate", after_bytes=300_000), method="GET", when=full_part, limit=1),
            # The first whole-object GET of each small file is cut too.
            Rule(Fault("truncate", after_bytes=50_000), path_contains="small-a", limit=1),
            Rule(Fault("reset", after_bytes=10_000), path_contains="small-b", limit=1),
        ]
    )
    entries, progress = fetch(through(proxy, uri), tmp_path / "dest")

    assert tree(tmp_path / "dest") == data
    assert {e.path: e.verified for e in entries} == dict.fromkeys(data, "crc32")
    assert proxy.counts() == {"reset": 3, "truncate": 2}
    # Each cut unit was read again: 2 whole files + 4 ranges, plus one GET per fault.
    get_requests = [r for r in proxy.requests if r.method == "GET" and "/ds/" in r.path]
    assert len(get_requests) == 6 + 5
    # Cut bodies surface as transport errors the engine retries itself (the source's own
    # retries end when the headers arrive).
    assert progress.retries == 5
    assert progress.checksum_failures == 0
    assert progress.files_done == 3 and progress.bytes_done == sum(map(len, data.values()))


def test_agent_cli_completes_through_resets(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = mixed_dataset()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules(
        [
            Rule(Fault("reset", after_bytes=200_000), method="GET", when=full_part, limit=2),
            Rule(Fault("reset", after_bytes=1_000), path_contains="small-a", limit=1),
        ]
    )
    dest = tmp_path / "out" / "ds"
    result = run_agent_fetch(uri, dest, f"--s3-endpoint-url={proxy.url}")

    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    assert summary["files"] == 3
    assert summary["bytes"] == sum(map(len, data.values()))
    assert summary["verification"] == {"crc32": 3}
    assert summary["refused"] == []
    assert tree(dest) == data
    # Only the published copy is left: no staging directory beside it.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ds"]
    assert proxy.counts() == {"reset": 3}
    # Six units (two whole files, four ranges), each cut one read again.
    assert len([r for r in proxy.requests if r.method == "GET" and "/ds/" in r.path]) == 6 + 3
    assert "Retrying" in result.stderr


# Throttling ----------------------------------------------------------------------------------


def test_slowdown_is_retried_by_the_source(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = mixed_dataset()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules(
        [
            Rule(Fault("slowdown", retry_after=1), method="GET", path_contains="/ds/", limit=3),
            # The HEAD that fetches big.bin's checksum is throttled once too.
            Rule(Fault("slowdown"), method="HEAD", limit=1),
        ]
    )
    entries, progress = fetch(through(proxy, uri), tmp_path / "dest")

    assert tree(tmp_path / "dest") == data
    assert {e.verified for e in entries} == {"crc32"}
    assert proxy.counts() == {"slowdown": 4}
    # The source retried each throttled request (with backoff): the same request came again
    # after the 503.
    seen = proxy.requests
    for injected in proxy.injected:
        first = injected.request
        assert any(
            (r.method, r.path, r.range) == (first.method, first.path, first.range)
            and r.number > first.number
            for r in seen
        ), f"request {first} was not retried"
    get_requests = [r for r in seen if r.method == "GET" and "/ds/" in r.path]
    assert len(get_requests) == 6 + 3
    # The engine saw none of it.
    assert (progress.retries, progress.checksum_failures) == (0, 0)


# Flipped bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["fast", "boto3"])
def test_flipped_byte_in_whole_object_get_is_detected_and_reread(
    s3_server: LocalCluster,
    bucket: str,
    proxy: FaultProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    implementation: str,
) -> None:
    """A whole-object GET asks for the stored checksum (x-amz-checksum-mode). SeaweedFS
    returns the CRC32 boto3 sent with the upload before the body: the agent's source hands it
    to the engine, which computes the CRC32 as the bytes arrive and compares it (a checksum
    failure: the file is read again). Through boto3, botocore validates the body itself at its
    end (FlexibleChecksumError, also counted as a checksum failure). Either way the flip is
    detected and the copy is exact."""
    data = {"small.bin": os.urandom(200_000)}
    uri = upload(s3_server, bucket, data)
    proxy.set_rules(
        [Rule(Fault("flip", offset=123_456), method="GET", path_contains="/ds/", limit=1)]
    )
    caplog.set_level(logging.INFO, logger="agent.fetch")
    src = through(proxy, uri) if implementation == "fast" else boto3_source(proxy.url, uri)
    entries, progress = fetch(src, tmp_path / "dest")

    assert tree(tmp_path / "dest") == data
    assert [e.verified for e in entries] == ["crc32"]
    assert proxy.counts() == {"flip": 1}
    assert len(gets(proxy, "small.bin")) == 2
    retried = [r.getMessage() for r in caplog.records if "Retrying" in r.getMessage()]
    assert len(retried) == 1
    assert (progress.retries, progress.checksum_failures) == (0, 1)
    expected = "differs from the source" if implementation == "fast" else "stored checksum"
    assert expected in retried[0]


def test_flipped_byte_in_a_range_fails_the_copy(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Ranged GETs carry no checksum, so nothing below the engine can notice; the whole-file
    CRC32 from HEAD must, and the copy must fail rather than publish (or journal) wrong bytes.
    The daemon keeps the staging directory of a failed copy to resume it: the resume must read
    the file again rather than trust it."""
    data = {"big.bin": os.urandom(BIG)}
    uri = upload(s3_server, bucket, data)

    def flip_in_second_range() -> list[Rule]:
        return [
            Rule(
                Fault("flip", offset=4321),
                method="GET",
                when=lambda r: r.range == range_of(MiB, MiB),
                limit=1,
            )
        ]

    proxy.set_rules(flip_in_second_range())
    progress = Progress()
    src = through(proxy, uri)
    files, _ = plan(list(src.list()))
    staging, journal_path = tmp_path / "staging", tmp_path / "staging.journal"
    staging.mkdir()
    with (
        Journal(journal_path) as journal,
        pytest.raises(VerificationError, match=r"crc32 of the copy .* differs from the source"),
    ):
        fetch_into(src, files, staging, SMALL_PARTS, progress, threading.Event(), journal=journal)
    assert proxy.counts() == {"flip": 1}
    assert progress.checksum_failures == 1
    assert progress.files_done == 0
    assert load_journal(journal_path) == {}
    # Exactly the four ranges were read once each: a range is not retried for a whole-file
    # mismatch (which range was wrong cannot be told).
    assert sorted(r.range or "" for r in gets(proxy, "big.bin")) == sorted(
        range_of(off, min(MiB, BIG - off)) for off in range(0, BIG, MiB)
    )

    # Resuming into the same staging directory without the fault reads it again and succeeds.
    progress = Progress()
    with Journal(journal_path) as journal:
        entries = fetch_into(
            src,
            files,
            staging,
            SMALL_PARTS,
            progress,
            threading.Event(),
            resume=load_journal(journal_path),
            journal=journal,
        )
    assert tree(staging) == data
    assert [e.verified for e in entries] == ["crc32"]
    assert (progress.retries, progress.checksum_failures) == (0, 0)
    assert list(load_journal(journal_path)) == ["big.bin"]
    assert len(gets(proxy, "big.bin")) == 8

    # The same fault through the CLI: a clear error, and nothing that looks like a copy.
    proxy.set_rules(flip_in_second_range())
    dest = tmp_path / "cli" / "ds"
    result = run_agent_fetch(uri, dest, f"--s3-endpoint-url={proxy.url}")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "crc32 of the copy" in result.stderr and "differs from the source" in result.stderr
    assert result.stdout == ""
    assert list(dest.parent.iterdir()) == []
    assert proxy.counts() == {"flip": 2}


# Latency and stalls --------------------------------------------------------------------------


def test_latency_and_short_stalls_complete(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = mixed_dataset()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules(
        [
            Rule(Fault("stall", seconds=0.5), method="GET", has_range=True, limit=2),
            Rule(Fault("stall", seconds=0.5), path_contains="small-a", limit=1),
            Rule(Fault("latency", seconds=0.2), limit=4),
        ]
    )
    entries, progress = fetch(through(proxy, uri), tmp_path / "dest")

    assert tree(tmp_path / "dest") == data
    assert {e.verified for e in entries} == {"crc32"}
    assert proxy.counts() == {"stall": 3, "latency": 4}
    assert (progress.retries, progress.checksum_failures) == (0, 0)


def short_timeout_source(endpoint: str, uri: str, read_timeout: float) -> Source:
    """The agent's S3 source with a short read timeout."""
    settings = S3Settings(
        endpoint_url=endpoint, read_timeout_seconds=read_timeout, connect_timeout_seconds=5
    )
    return SourceOpener(settings).open(uri)


def boto3_source(endpoint: str, uri: str) -> Source:
    """The boto3 implementation of the S3 source (the reference the fast path replaced)."""
    location = parse_source(uri)
    assert isinstance(location, S3Source)
    return S3ObjectSource(s3_client(S3Settings(endpoint_url=endpoint)), location)


def test_stall_beyond_the_read_timeout_is_read_again(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = mixed_dataset()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules(
        [
            # Stalls the client gives up on (read timeout 1 s); the proxy resumes after 5 s.
            Rule(Fault("stall", seconds=5), method="GET", has_range=True, limit=1),
            Rule(Fault("stall", seconds=5), path_contains="small-b", limit=1),
        ]
    )
    src = short_timeout_source(proxy.url, uri, read_timeout=1)
    entries, progress = fetch(src, tmp_path / "dest")

    assert tree(tmp_path / "dest") == data
    assert {e.verified for e in entries} == {"crc32"}
    assert proxy.counts() == {"stall": 2}
    assert progress.retries == 2
    assert len(gets(proxy, "small-b.bin")) == 2


# Disk full -----------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: writes beyond it fail with a real ENOSPC."""
    with mounted_tmpfs(tmp_path / "tmpfs", "8m") as mountpoint:
        yield mountpoint


def large_and_medium_files() -> dict[str, bytes]:
    """One file read as ranges and four read whole by the threads."""
    return {"big.bin": os.urandom(12 * MiB)} | {f"f{i}.bin": os.urandom(2 * MiB) for i in range(4)}


def small_files_over_the_disk() -> dict[str, bytes]:
    """Files the one-thread reader takes, 21 MB in all."""
    return {f"s/{i:02d}.bin": os.urandom(900_000) for i in range(LOOP_FILES)}


@pytest.mark.parametrize("dataset", [large_and_medium_files, small_files_over_the_disk])
def test_disk_full_fails_cleanly(
    s3_server: LocalCluster,
    bucket: str,
    small_tmpfs: Path,
    dataset: Callable[[], dict[str, bytes]],
) -> None:
    uri = upload(s3_server, bucket, dataset())
    assert_fetch_fails_with_disk_full(
        small_tmpfs, uri, f"--s3-endpoint-url={s3_server.s3_endpoint}"
    )


# The one-thread reader of small files ---------------------------------------------------------

LOOP_FILES = 24
"""Enough small files for the engine to hand them to the source's one-thread reader."""


def many_small_files() -> dict[str, bytes]:
    sizes = [1, 4_096, 65_536, 150_000, 262_145, 700_000]
    return {f"s/{i:02d}.bin": os.urandom(sizes[i % len(sizes)]) for i in range(LOOP_FILES)}


def test_one_thread_keeps_every_small_file_in_flight(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """With a single reading thread, all the GETs reach the server before any body is sent:
    the reader waits on all its connections at once."""
    data = many_small_files()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules([Rule(Fault("stall", seconds=30), method="GET", path_contains="/ds/s/")])
    outcome: list[BaseException | tuple[list[FileEntry], Progress]] = []

    def run() -> None:
        try:
            outcome.append(fetch(through(proxy, uri), tmp_path / "dest", FetchSettings(1)))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        wait_until(lambda: len(gets(proxy, "s/")) == LOOP_FILES, 20, "every GET in flight at once")
    finally:
        proxy.set_rules([])
        proxy.release_stalls()
        worker.join(timeout=30)
    assert not worker.is_alive()
    result = outcome[0]
    assert not isinstance(result, BaseException), result
    entries, progress = result
    assert tree(tmp_path / "dest") == data
    assert {e.verified for e in entries} == {"crc32"}
    assert len(gets(proxy, "s/")) == LOOP_FILES
    assert (progress.retries, progress.checksum_failures) == (0, 0)


def test_small_files_cut_flipped_or_throttled_are_read_again(
    s3_server: LocalCluster,
    bucket: str,
    proxy: FaultProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = many_small_files()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules(
        [
            Rule(Fault("reset", after_bytes=30_000), path_contains="/ds/s/03.bin", limit=1),
            Rule(Fault("truncate", after_bytes=100_000), path_contains="/ds/s/04.bin", limit=1),
            Rule(Fault("reset", after_bytes=0), path_contains="/ds/s/05.bin", limit=1),
            Rule(Fault("flip", offset=60_000), path_contains="/ds/s/02.bin", limit=1),
            Rule(Fault("flip", offset=1_000), path_contains="/ds/s/10.bin", limit=1),
        ]
    )
    caplog.set_level(logging.INFO, logger="agent.fetch")
    entries, progress = fetch(through(proxy, uri), tmp_path / "dest", FetchSettings(2))

    assert tree(tmp_path / "dest") == data
    assert {e.verified for e in entries} == {"crc32"}
    assert proxy.counts() == {"reset": 2, "truncate": 1, "flip": 2}
    for key in ("03", "04", "05", "02", "10"):
        assert len(gets(proxy, f"s/{key}.bin")) == 2, key
    assert (progress.retries, progress.checksum_failures) == (3, 2)
    assert progress.files_done == LOOP_FILES
    assert any("5 of 24 small files are read again" in r.getMessage() for r in caplog.records)


def test_throttling_stops_the_small_file_reader_and_the_threads_back_off(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = many_small_files()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules([Rule(Fault("slowdown"), method="GET", path_contains="/ds/s/", limit=2)])
    settings = FetchSettings(2, small_object_connections=4)
    entries, progress = fetch(through(proxy, uri), tmp_path / "dest", settings)

    assert tree(tmp_path / "dest") == data
    assert {e.verified for e in entries} == {"crc32"}
    assert proxy.counts() == {"slowdown": 2}
    assert progress.files_done == LOOP_FILES
    # The two throttled files count as read again; the files the reader never asked for
    # after the 503s (it stopped there) do not.
    assert progress.retries == 2
    # Each file was asked for once, and the two throttled ones once more.
    assert len(gets(proxy, "s/")) == LOOP_FILES + 2


def test_a_small_file_stalled_beyond_the_read_timeout_is_read_again(
    s3_server: LocalCluster, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = many_small_files()
    uri = upload(s3_server, bucket, data)
    proxy.set_rules([Rule(Fault("stall", seconds=5), path_contains="/ds/s/07.bin", limit=1)])
    src = short_timeout_source(proxy.url, uri, read_timeout=1)
    entries, progress = fetch(src, tmp_path / "dest", FetchSettings(2))

    assert tree(tmp_path / "dest") == data
    assert {e.verified for e in entries} == {"crc32"}
    assert proxy.counts() == {"stall": 1}
    assert len(gets(proxy, "s/07.bin")) == 2
    assert progress.retries == 1
