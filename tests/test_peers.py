"""Peer copying: the peer server, its authentication, and copies read from real peer servers
on loopback (through the fault proxy where a peer misbehaves), each ending with a copy
verified against the version's manifest and the fallback counted."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import os
import random
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlencode

import pytest

from agent import metrics, peerserver, versioning
from agent.fetch import FetchSettings, PlannedFile, Progress, fetch_into, plan
from agent.manifest import FileEntry, Manifest
from agent.peering import MAX_BATCH_FILES, MAX_SKEW_SECONDS, PeerKeys, PeerSettings
from agent.peerserver import (
    FILE_PATH,
    FILES_PATH,
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_BYTES,
    PeerServer,
    ServedVersion,
)
from agent.replica import Phase
from agent.runner import Agent
from agent.scrub import RateLimiter
from agent.settings import AgentSettings
from agent.sources.base import ObjectInfo, Source
from agent.sources.local import LocalDirSource
from agent.sources.peer import Peer, PeerHealth, PeerSource
from agent.store import CacheStore
from coordinator.peers import PeerHolder, choose_peers
from datacache.validation import InvalidInput, validate_peer_address
from tests.faultproxy import Fault, FaultKind, FaultProxy, Rule

DATASET = "ml/peers"
MiB = 1024 * 1024
CLIENT = PeerSettings(stall_seconds=0.5, connect_timeout_seconds=0.5)
FETCH = FetchSettings(
    concurrency=4, part_bytes=MiB, multipart_threshold_bytes=MiB, attempts=3, fsync=False
)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def fallbacks(reason: str) -> float:
    return sample("datacache_agent_peer_fallbacks_total", {"reason": reason})


@dataclass
class Version:
    """A dataset version held by a 'peer': its directory and manifest, plus the origin."""

    origin: Path
    directory: Path
    manifest: Manifest
    files: list[PlannedFile]
    objects: list[ObjectInfo]

    @property
    def expected(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.manifest.files}

    def served(self) -> ServedVersion:
        return ServedVersion(self.directory, self.expected)


@pytest.fixture
def version(tmp_path: Path) -> Version:
    """One 4 MiB file (four ranges) and 30 small ones, copied once from a directory source to
    act as the version a peer holds."""
    rng = random.Random(7)
    origin = tmp_path / "origin"
    (origin / "small").mkdir(parents=True)
    (origin / "big.bin").write_bytes(rng.randbytes(4 * MiB))
    for i in range(30):
        (origin / "small" / f"f{i:02d}").write_bytes(rng.randbytes(rng.randint(1, 50_000)))
    (origin / "small" / "empty").write_bytes(b"")
    source = LocalDirSource(str(origin))
    files, refused = plan(list(source.list()))
    assert not refused
    directory = tmp_path / "peer" / "version"
    directory.mkdir(parents=True)
    entries = fetch_into(source, files, directory, FETCH, Progress(), threading.Event())
    manifest = Manifest.build(DATASET, f"file://{origin}", entries, revision=1)
    objects = [ObjectInfo(f.path, f.size, f.etag) for f in manifest.files]
    planned, _ = plan(objects)
    return Version(origin, directory, manifest, planned, objects)


@pytest.fixture
def keys(tmp_path: Path) -> PeerKeys:
    path = tmp_path / "peer-keys"
    path.write_text(os.urandom(24).hex() + "\n")
    return PeerKeys(path)


def serve(
    keys: PeerKeys,
    version: Version | None,
    held: str = "",
    settings: PeerSettings | None = None,
    served: ServedVersion | None = None,
) -> PeerServer:
    """A started peer server on a free loopback port holding `version` as digest `held`
    (default: its own digest), as `served` when given."""

    def lookup(dataset: str, digest: str) -> ServedVersion | None:
        if version is None or dataset != DATASET:
            return None
        if digest != (held or version.manifest.digest):
            return None
        return served or version.served()

    base = settings or PeerSettings()
    server = PeerServer(replace(base, port=0, listen_address="127.0.0.1"), keys, lookup)
    server.start()
    return server


@pytest.fixture
def servers() -> Iterator[list[PeerServer]]:
    started: list[PeerServer] = []
    yield started
    for server in started:
        server.stop()


def copy_from(
    version: Version,
    keys: PeerKeys,
    peers: list[Peer],
    dest: Path,
    settings: PeerSettings = CLIENT,
    files: list[PlannedFile] | None = None,
    fetch: FetchSettings = FETCH,
) -> list[FileEntry]:
    """A copy of the version (or of `files` of it) through `PeerSource`, checked like the
    agent checks it."""
    files = version.files if files is None else files
    dest.mkdir(parents=True)
    source = PeerSource(
        peers,
        LocalDirSource(str(version.origin)),
        version.objects,
        DATASET,
        version.manifest.digest,
        "node-2",
        keys,
        settings,
        PeerHealth(),
    )
    try:
        entries = fetch_into(
            source,
            files,
            dest,
            fetch,
            Progress(),
            threading.Event(),
            expected=version.expected,
        )
    finally:
        source.close()
    versioning.check_copy(entries, version.expected, version.manifest.digest, "origin")
    assert sorted(e.path for e in entries) == sorted("/".join(f.parts) for f in files)
    for entry in entries:
        assert (dest / entry.path).read_bytes() == (version.origin / entry.path).read_bytes()
    assert {e.verified for e in entries} == {"manifest"}
    return entries


def peer(name: str, port: int) -> Peer:
    return Peer(name, f"127.0.0.1:{port}")


# Authentication ---------------------------------------------------------------------------


def test_signed_requests_verify_and_tampering_is_refused(keys: PeerKeys) -> None:
    header = keys.sign("node-1", "/v1/file?x", "bytes=0-9", now=1_000_000)
    assert keys.verify(header, "/v1/file?x", "bytes=0-9", now=1_000_000) == "node-1"
    with pytest.raises(PermissionError, match="does not match"):
        keys.verify(header, "/v1/file?y", "bytes=0-9", now=1_000_000)
    with pytest.raises(PermissionError, match="does not match"):
        keys.verify(header, "/v1/file?x", "bytes=0-99", now=1_000_000)
    with pytest.raises(PermissionError, match="off this node's clock"):
        keys.verify(header, "/v1/file?x", "bytes=0-9", now=1_000_000 + MAX_SKEW_SECONDS + 1)
    with pytest.raises(PermissionError, match="malformed"):
        keys.verify("Bearer abc", "/v1/file?x", "bytes=0-9")


def test_a_signature_with_a_body_covers_the_body(keys: PeerKeys) -> None:
    header = keys.sign("node-1", "/v1/files?x", "", now=1_000_000, body=b"a\0b")
    assert keys.verify(header, "/v1/files?x", "", now=1_000_000, body=b"a\0b") == "node-1"
    for other in (b"a\0c", b"a", b"", None):
        with pytest.raises(PermissionError, match="does not match"):
            keys.verify(header, "/v1/files?x", "", now=1_000_000, body=other)
    bodiless = keys.sign("node-1", "/v1/files?x", "", now=1_000_000)
    with pytest.raises(PermissionError, match="does not match"):
        keys.verify(bodiless, "/v1/files?x", "", now=1_000_000, body=b"")
    # What a bodiless request signs is unchanged: agents of the previous release verify it.
    message = b"node-1\n1000000\n/v1/file?x\nbytes=0-9"
    mac = hmac.new(keys.keys()[0], message, hashlib.sha256).hexdigest()
    signed = keys.sign("node-1", "/v1/file?x", "bytes=0-9", now=1_000_000)
    assert signed == f"DatacachePeer node-1:1000000:{mac}"


def test_keys_rotate_without_refusing_peers(tmp_path: Path) -> None:
    old, new = "a" * 32, "b" * 32
    (tmp_path / "one").write_text(old + "\n")
    (tmp_path / "both").write_text(new + "\n" + old + "\n")
    signed_old = PeerKeys(tmp_path / "one").sign("n", "/t", "")
    both = PeerKeys(tmp_path / "both")
    assert both.verify(signed_old, "/t", "") == "n"
    # Signing with the new key before every peer knows it would be refused: hence the order.
    with pytest.raises(PermissionError):
        PeerKeys(tmp_path / "one").verify(both.sign("n", "/t", ""), "/t", "")


def test_a_key_file_with_short_keys_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("short\n")
    with pytest.raises(Exception, match="at least 16 bytes"):
        PeerKeys(tmp_path / "keys")


# The server ---------------------------------------------------------------------------------


def exchange(
    server: PeerServer | FaultProxy,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, bytes]:
    """One request to the peer server on a connection of its own: status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get(
    server: PeerServer,
    keys: PeerKeys | None,
    path: str,
    byte_range: str = "",
    digest: str = "",
    version: Version | None = None,
) -> tuple[int, bytes]:
    query = {
        "dataset": DATASET,
        "version": digest or (version.manifest.digest if version else ""),
        "path": path,
    }
    target = f"{FILE_PATH}?{urlencode(query)}"
    headers = {"Range": byte_range} if byte_range else {}
    if keys is not None:
        headers["Authorization"] = keys.sign("node-2", target, byte_range)
    return exchange(server, "GET", target, headers)


def test_the_server_serves_ranges_of_ready_files_to_signed_requests(
    version: Version, keys: PeerKeys, servers: list[PeerServer]
) -> None:
    server = serve(keys, version)
    servers.append(server)
    big = (version.origin / "big.bin").read_bytes()
    status, body = get(server, keys, "big.bin", "bytes=100-1099", version=version)
    assert (status, body) == (206, big[100:1100])
    status, body = get(server, keys, "small/f03", version=version)
    assert (status, body) == (200, (version.origin / "small" / "f03").read_bytes())


def test_the_server_refuses_what_it_must_not_serve(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    server = serve(keys, version)
    servers.append(server)
    other = tmp_path / "other-keys"
    other.write_text("c" * 40 + "\n")
    unauthorized = sample("datacache_agent_peer_requests_total", {"result": "unauthorized"})
    assert get(server, None, "big.bin", version=version)[0] == 401
    assert get(server, PeerKeys(other), "big.bin", version=version)[0] == 401
    # Another version than the one held (an older copy), a path not in the manifest.
    assert get(server, keys, "big.bin", digest="sha256:" + "0" * 64)[0] == 404
    assert get(server, keys, "../../etc/passwd", version=version)[0] == 404
    assert get(server, keys, "big.bin", "bytes=5-4", version=version)[0] == 416
    assert get(server, keys, "big.bin", f"bytes=0-{4 * MiB}", version=version)[0] == 416
    # A symlink planted in place of a file, and a file whose size changed, are not served.
    target = version.directory / "small" / "f01"
    size = target.stat().st_size
    target.unlink()
    outside = tmp_path / "outside"
    outside.write_bytes(b"s" * size)
    target.symlink_to(outside)
    assert get(server, keys, "small/f01", version=version)[0] == 404
    with (version.directory / "small" / "f02").open("ab") as f:
        f.write(b"x")
    assert get(server, keys, "small/f02", version=version)[0] == 404
    refused = sample("datacache_agent_peer_requests_total", {"result": "unauthorized"})
    assert refused - unauthorized == 2


def post(
    server: PeerServer | FaultProxy,
    keys: PeerKeys | None,
    paths: list[str],
    version: Version,
    signed: list[str] | None = None,
    declared: int | None = None,
) -> tuple[int, bytes]:
    """A batch request for `paths`, signed for `signed` (default: the same paths), its
    Content-Length `declared` when given (and the body then left out)."""
    target = f"{FILES_PATH}?{urlencode({'dataset': DATASET, 'version': version.manifest.digest})}"
    body = "\0".join(paths).encode()
    headers = {}
    if keys is not None:
        listed = body if signed is None else "\0".join(signed).encode()
        headers["Authorization"] = keys.sign("node-2", target, "", body=listed)
    if declared is not None:
        headers["Content-Length"], body = str(declared), b""
    return exchange(server, "POST", target, headers, body)


def test_the_server_sends_a_batch_of_whole_files_back_to_back(
    version: Version, keys: PeerKeys, servers: list[PeerServer]
) -> None:
    server = serve(keys, version)
    servers.append(server)
    paths = ["small/f03", "big.bin", "small/empty", "small/f01"]
    status, body = post(server, keys, paths, version)
    assert status == 200
    assert body == b"".join((version.origin / p).read_bytes() for p in paths)


def test_a_batch_signature_covers_its_list_of_paths(
    version: Version, keys: PeerKeys, servers: list[PeerServer]
) -> None:
    server = serve(keys, version)
    servers.append(server)
    unauthorized = sample("datacache_agent_peer_requests_total", {"result": "unauthorized"})
    # A signature captured for two files is good for no other list, shorter or longer.
    signed = ["small/f01", "small/f02"]
    for tampered in (["small/f01", "small/f03"], ["small/f01"], [*signed, "big.bin"]):
        status, body = post(server, keys, tampered, version, signed=signed)
        assert (status, body) == (401, b"signature does not match any peer key of this node\n")
    assert post(server, None, signed, version)[0] == 401
    refused = sample("datacache_agent_peer_requests_total", {"result": "unauthorized"})
    assert refused - unauthorized == 4
    assert post(server, keys, signed, version)[0] == 200


def test_the_server_refuses_batches_beyond_its_limits_or_not_servable_whole(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    # A version whose manifest lists five 4 MiB files: 20 MiB, more than one batch may ask.
    held = tmp_path / "held"
    held.mkdir()
    large = {}
    for i in range(5):
        path = f"large{i}"
        (held / path).touch()
        os.truncate(held / path, 4 * MiB)  # sparse: only the sizes matter here
        large[path] = FileEntry(path, 4 * MiB, "", "0" * 16, "manifest")
    servers.append(serve(keys, version, served=ServedVersion(held, large)))
    servers.append(serve(keys, version))
    too_large, server = servers
    status, body = post(too_large, keys, sorted(large), version)
    assert status == 400
    assert f"asks for {20 * MiB} bytes; at most {MAX_BATCH_BYTES}" in body.decode()
    assert post(too_large, keys, sorted(large)[:4], version)[0] == 200  # 16 MiB: the limit
    many = [f"small/f{i:02d}" for i in range(MAX_BATCH_FILES + 1)]
    status, body = post(server, keys, many, version)
    assert status == 400
    assert f"asks for {MAX_BATCH_FILES + 1} files; at most {MAX_BATCH_FILES}" in body.decode()
    status, body = post(server, keys, [], version, declared=MAX_BATCH_BODY_BYTES + 1)
    assert status == 400
    assert f"Content-Length of at most {MAX_BATCH_BODY_BYTES}" in body.decode()
    for bad in (["small/f01", "small/f01"], ["small/f01", ""]):
        status, body = post(server, keys, bad, version)
        assert (status, b"distinct, non-empty paths" in body) == (400, True)
    # One file it must not serve refuses the whole batch before a byte is sent.
    assert post(server, keys, ["small/f01", "../../etc/passwd"], version)[0] == 404
    with (version.directory / "small" / "f02").open("ab") as f:
        f.write(b"x")
    status, body = post(server, keys, ["small/f01", "small/f02"], version)
    assert (status, body) == (404, b"small/f02 is not its manifest's size\n")


# Copies from peers -----------------------------------------------------------------------------


def test_a_copy_reads_every_byte_from_peers_spread_over_them(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    servers += [serve(keys, version), serve(keys, version)]
    received = sample("datacache_agent_peer_received_bytes_total")
    from_origin = sample("datacache_agent_peer_origin_bytes_total")
    served = sample("datacache_agent_peer_served_bytes_total")
    copy_from(
        version, keys, [peer("a", servers[0].port), peer("b", servers[1].port)], tmp_path / "copy"
    )
    total = version.manifest.total_bytes
    assert sample("datacache_agent_peer_received_bytes_total") - received == total
    assert sample("datacache_agent_peer_origin_bytes_total") == from_origin
    assert sample("datacache_agent_peer_served_bytes_total") - served == total


def test_a_peer_killed_mid_transfer_is_left_for_the_next(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    servers += [serve(keys, version), serve(keys, version)]
    rules = [Rule(Fault("reset", after_bytes=300_000), path_contains="big.bin", limit=1)]
    gone = fallbacks("gone")
    with FaultProxy(f"http://127.0.0.1:{servers[0].port}", rules) as dying:
        peers = [peer("dying", dying.port), peer("b", servers[1].port)]
        copy_from(version, keys, peers, tmp_path / "copy")
        assert dying.counts()["reset"] == 1
    assert fallbacks("gone") - gone == 1


def test_a_peer_whose_server_is_gone_is_left_at_once(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    server = serve(keys, version)
    port = server.port
    server.stop()
    gone = fallbacks("gone")
    from_origin = sample("datacache_agent_peer_origin_bytes_total")
    copy_from(version, keys, [peer("gone", port)], tmp_path / "copy")
    assert fallbacks("gone") - gone >= 1
    total = version.manifest.total_bytes
    assert sample("datacache_agent_peer_origin_bytes_total") - from_origin == total


@pytest.mark.parametrize("target", ["big.bin", "small/f07"])
def test_a_peer_that_flips_bytes_is_blamed_and_the_file_read_from_the_origin(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path, target: str
) -> None:
    servers += [serve(keys, version), serve(keys, version)]
    rules = [Rule(Fault("flip", offset=1000), path_contains=target.replace("/", "%2F"), limit=1)]
    corrupt = fallbacks("corrupt")
    checksum_failures = sample("datacache_agent_fetch_retries_total", {"reason": "checksum"})
    with FaultProxy(f"http://127.0.0.1:{servers[0].port}", rules) as flipping:
        peers = [peer("flipping", flipping.port), peer("good", servers[1].port)]
        # One request per file here; a byte flipped inside a batch has its own test.
        one_by_one = replace(CLIENT, batch_files=1)
        copy_from(version, keys, peers, tmp_path / "copy", one_by_one)
        assert flipping.counts()["flip"] == 1
    # Exactly the peer that flipped is blamed (once), the good one is never.
    assert fallbacks("corrupt") - corrupt == 1
    if target == "small/f07":
        failures = sample("datacache_agent_fetch_retries_total", {"reason": "checksum"})
        assert failures - checksum_failures == 1


def test_a_peer_holding_an_older_version_is_left_for_the_source(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    servers.append(serve(keys, version, held="sha256:" + "1" * 64))
    refused = fallbacks("refused")
    not_ready = sample("datacache_agent_peer_requests_total", {"result": "not_ready"})
    from_origin = sample("datacache_agent_peer_origin_bytes_total")
    copy_from(version, keys, [peer("older", servers[0].port)], tmp_path / "copy")
    assert fallbacks("refused") - refused >= 1
    assert sample("datacache_agent_peer_requests_total", {"result": "not_ready"}) > not_ready
    total = version.manifest.total_bytes
    assert sample("datacache_agent_peer_origin_bytes_total") - from_origin == total


def test_a_peer_that_stalls_is_left_quickly(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    servers += [serve(keys, version), serve(keys, version)]
    rules = [Rule(Fault("stall", seconds=5.0), path_contains="big.bin", limit=1)]
    stalled = fallbacks("stalled")
    with FaultProxy(f"http://127.0.0.1:{servers[0].port}", rules) as stalling:
        peers = [peer("stalling", stalling.port), peer("b", servers[1].port)]
        copy_from(version, keys, peers, tmp_path / "copy")
        assert stalling.counts()["stall"] == 1
    assert fallbacks("stalled") - stalled == 1


def test_a_slow_peer_is_left_for_a_faster_one(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    slow_settings = PeerSettings(serve_bytes_per_second=300 * 1024)
    servers += [serve(keys, version, settings=slow_settings), serve(keys, version)]
    slow = fallbacks("slow")
    peers = [peer("slow", servers[0].port), peer("fast", servers[1].port)]
    copy_from(version, keys, peers, tmp_path / "copy", replace(CLIENT, min_bytes_per_second=MiB))
    assert fallbacks("slow") - slow >= 1


# Batches of small files ----------------------------------------------------------------------

SEQUENTIAL = replace(FETCH, concurrency=1)
"""One thread: every small file of the version in one batch, its files in size order."""


def small_files(version: Version) -> list[PlannedFile]:
    """The files a copy reads whole, in the order one batch asks them (largest first)."""
    return sorted((f for f in version.files if 0 < f.obj.size <= MiB), key=lambda f: -f.obj.size)


@pytest.mark.parametrize(("batch_files", "batches"), [(64, 4), (3, 10)])
def test_a_copy_reads_small_files_in_batches(
    version: Version,
    keys: PeerKeys,
    servers: list[PeerServer],
    tmp_path: Path,
    batch_files: int,
    batches: int,
) -> None:
    servers.append(serve(keys, version))
    ok = sample("datacache_agent_peer_requests_total", {"result": "ok"})
    received = sample("datacache_agent_peer_received_bytes_total")
    settings = replace(CLIENT, batch_files=batch_files)
    with FaultProxy(f"http://127.0.0.1:{servers[0].port}") as counting:
        copy_from(version, keys, [peer("a", counting.port)], tmp_path / "copy", settings)
        requests = counting.requests
    # 30 small files: over 4 threads, 4 batches of at most 8 (or 10 of the 3 allowed); the 4
    # ranges of big.bin one request each; the empty file none.
    assert len(small_files(version)) == 30
    assert sorted(r.method for r in requests) == ["GET"] * 4 + ["POST"] * batches
    assert sample("datacache_agent_peer_requests_total", {"result": "ok"}) - ok == 4 + batches
    total = version.manifest.total_bytes
    assert sample("datacache_agent_peer_received_bytes_total") - received == total


def test_a_peer_that_flips_a_byte_inside_a_batch_is_blamed_and_the_file_read_from_the_origin(
    version: Version, keys: PeerKeys, servers: list[PeerServer], tmp_path: Path
) -> None:
    servers += [serve(keys, version), serve(keys, version)]
    small = small_files(version)
    # Into the second file of the batch, whichever peer serves it.
    offset = small[0].obj.size + 1000
    corrupt = fallbacks("corrupt")
    checksum_failures = sample("datacache_agent_fetch_retries_total", {"reason": "checksum"})
    from_origin = sample("datacache_agent_peer_origin_bytes_total")
    with contextlib.ExitStack() as stack:
        proxies = [
            stack.enter_context(
                FaultProxy(
                    f"http://127.0.0.1:{server.port}",
                    [Rule(Fault("flip", offset=offset), method="POST", limit=1)],
                )
            )
            for server in servers
        ]
        peers = [peer(f"p{i}", proxy.port) for i, proxy in enumerate(proxies)]
        copy_from(version, keys, peers, tmp_path / "copy", files=small, fetch=SEQUENTIAL)
        assert sum(p.counts()["flip"] for p in proxies) == 1
    # The peer that sent it is blamed (once); the file is read from the origin, the files
    # after it in the batch from the other peer.
    assert fallbacks("corrupt") - corrupt == 1
    failures = sample("datacache_agent_fetch_retries_total", {"reason": "checksum"})
    assert failures - checksum_failures == 1
    origin_bytes = sample("datacache_agent_peer_origin_bytes_total") - from_origin
    assert origin_bytes == small[1].obj.size


@pytest.mark.parametrize(("kind", "reason"), [("reset", "gone"), ("stall", "stalled")])
def test_a_peer_that_fails_in_the_middle_of_a_batch_is_left_and_the_rest_read_one_by_one(
    version: Version,
    keys: PeerKeys,
    servers: list[PeerServer],
    tmp_path: Path,
    kind: FaultKind,
    reason: str,
) -> None:
    servers += [serve(keys, version), serve(keys, version)]
    small = small_files(version)
    # Cut in the middle of the third file (two arrive whole from the batch); the stall comes
    # after the head, longer than the reader waits (CLIENT.stall_seconds).
    fault = Fault(kind, after_bytes=small[0].obj.size + small[1].obj.size + 1000, seconds=5.0)
    left = fallbacks(reason)
    from_origin = sample("datacache_agent_peer_origin_bytes_total")
    with contextlib.ExitStack() as stack:
        proxies = [
            stack.enter_context(
                FaultProxy(f"http://127.0.0.1:{server.port}", [Rule(fault, method="POST", limit=1)])
            )
            for server in servers
        ]
        peers = [peer(f"p{i}", proxy.port) for i, proxy in enumerate(proxies)]
        copy_from(version, keys, peers, tmp_path / "copy", files=small, fetch=SEQUENTIAL)
        assert sum(p.counts()[kind] for p in proxies) == 1
        requests = [r for p in proxies for r in p.requests]
    assert fallbacks(reason) - left == 1
    # The files the batch did not complete came one by one from the other peer.
    complete = 2 if kind == "reset" else 0
    assert sorted(r.method for r in requests) == ["GET"] * (30 - complete) + ["POST"]
    assert sample("datacache_agent_peer_origin_bytes_total") == from_origin


@pytest.mark.parametrize("change", ["shrinks", "rewritten"])
def test_a_file_changed_on_the_serving_side_in_the_middle_of_a_batch_is_never_published(
    version: Version,
    keys: PeerKeys,
    servers: list[PeerServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    small = small_files(version)

    def change_files() -> None:
        for planned in small:
            held = version.directory / planned.obj.key
            data = held.read_bytes()
            if change == "shrinks":
                held.write_bytes(data[: len(data) // 2])
            else:
                with held.open("r+b") as f:  # in place: the server's open file sees it
                    f.write(bytes(b ^ 0x55 for b in data))

    class ChangingLimiter(RateLimiter):
        """Changes the served files once the batch's first file is sent (each small file is
        one pass through the limiter): after every check of the files, mid-response."""

        takes = 0

        def take(self, nbytes: int, cancel: threading.Event) -> None:
            ChangingLimiter.takes += 1
            if ChangingLimiter.takes == 2:
                change_files()
            super().take(nbytes, cancel)

    monkeypatch.setattr(peerserver, "RateLimiter", ChangingLimiter)
    servers.append(serve(keys, version))
    reason = "gone" if change == "shrinks" else "corrupt"
    left = fallbacks(reason)
    from_origin = sample("datacache_agent_peer_origin_bytes_total")
    # copy_from checks every file against the origin's bytes and the manifest.
    copy_from(
        version,
        keys,
        [peer("a", servers[0].port)],
        tmp_path / "copy",
        files=small,
        fetch=SEQUENTIAL,
    )
    assert ChangingLimiter.takes >= 2
    assert fallbacks(reason) - left == 1
    # Every file after the first came from the origin. The first was sent before the change,
    # but sendfile queues references to the page cache, not copies: a file rewritten in place
    # before the bytes leave (a loaded machine) changes them too, and the reader's check
    # sends that file to the origin as well.
    origin_bytes = sample("datacache_agent_peer_origin_bytes_total") - from_origin
    after_first = sum(f.obj.size for f in small[1:])
    assert origin_bytes in (after_first, after_first + small[0].obj.size)


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_peer_that_takes_no_batches_is_asked_one_file_at_a_time(
    version: Version,
    keys: PeerKeys,
    servers: list[PeerServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
) -> None:
    if status == 501:
        # An agent of the previous release: http.server answers 501 to a method it lacks.
        monkeypatch.delattr(peerserver._Handler, "do_POST")
    else:

        def refuse(handler: BaseHTTPRequestHandler) -> None:
            handler.send_error(status)

        monkeypatch.setattr(peerserver._Handler, "do_POST", refuse)
    servers.append(serve(keys, version))
    refused = fallbacks("refused")
    from_origin = sample("datacache_agent_peer_origin_bytes_total")
    with FaultProxy(f"http://127.0.0.1:{servers[0].port}") as older:
        copy_from(version, keys, [peer("older", older.port)], tmp_path / "copy")
        requests = older.requests
    posts = [r for r in requests if r.method == "POST"]
    # Only the batches already asked when the first answer came; then every small file and
    # each range of big.bin one by one, all from the peer, which is not avoided.
    assert 1 <= len(posts) <= FETCH.concurrency
    assert len(requests) - len(posts) == len(small_files(version)) + 4
    assert fallbacks("refused") == refused
    assert sample("datacache_agent_peer_origin_bytes_total") == from_origin


# Choosing peers (the coordinator) ------------------------------------------------------------

V1, V2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
ADDRESSES = {f"n{i}": f"10.0.0.{i}:9403" for i in range(8)}


def test_peers_are_ready_holders_of_the_version_that_serve_peers() -> None:
    holders = [
        PeerHolder("n1", V1),
        PeerHolder("n2", V2),  # another version
        PeerHolder("n3", V1),
        PeerHolder("n9", V1),  # serves no peers (no address)
    ]
    chosen = choose_peers("n0", V1, holders, ADDRESSES, {})
    assert sorted(chosen) == [("n1", ADDRESSES["n1"]), ("n3", ADDRESSES["n3"])]
    assert choose_peers("n0", "", holders, ADDRESSES, {}) == ()
    # A node holding the version needs no peers.
    assert choose_peers("n1", V1, holders, ADDRESSES, {}) == ()


def test_peers_in_the_same_zone_come_first_and_the_order_spreads_over_nodes() -> None:
    holders = [PeerHolder(f"n{i}", V1) for i in range(1, 8)]
    zones = {"n0": "a", "n5": "a", "n6": "a", **{f"n{i}": "b" for i in range(1, 5)}}
    chosen = choose_peers("n0", V1, holders, ADDRESSES, zones, limit=3)
    assert {n for n, _ in chosen[:2]} == {"n5", "n6"}
    assert len(chosen) == 3
    firsts = {choose_peers(f"x{i}", V1, holders, ADDRESSES, {}, limit=1)[0][0] for i in range(40)}
    assert len(firsts) > 3


def test_a_bad_peer_address_is_refused_at_registration() -> None:
    with pytest.raises(InvalidInput, match="host:port"):
        validate_peer_address("10.0.0.1")
    with pytest.raises(InvalidInput, match="host:port"):
        validate_peer_address("10.0.0.1:99999")
    with pytest.raises(InvalidInput, match="host:port"):
        validate_peer_address("a b:80")
    assert validate_peer_address("[fd00::7]:9403") == ("fd00::7", 9403)


# What an agent offers to serve -----------------------------------------------------------------


def test_an_agent_serves_only_its_ready_version(version: Version, tmp_path: Path) -> None:
    def no_source(uri: str, credentials: object) -> Source:
        raise AssertionError("no source is opened here")

    store = CacheStore(tmp_path / "cache")
    staged, _ = store.staging_for(DATASET, version.manifest.source)
    shutil.copytree(version.directory, staged, dirs_exist_ok=True)
    store.publish(staged, version.manifest)
    agent = Agent(AgentSettings(node_name="node-1", cache_dir=store.root), store, no_source)
    asyncio.run(agent.recover())
    digest = version.manifest.digest
    served = agent.served_version(DATASET, digest)
    assert served is not None and served.files == version.expected
    assert (served.directory / "big.bin").read_bytes() == (version.origin / "big.bin").read_bytes()
    assert agent.served_version(DATASET, "sha256:" + "0" * 64) is None
    assert agent.served_version("ml/other", digest) is None
    # A scrub that found a corrupt file takes the replica out of Ready while it repairs it.
    replica = agent.replicas()[DATASET]
    replica.phase = Phase.FETCHING
    assert agent.served_version(DATASET, digest) is None
    replica.phase = Phase.READY
    assert agent.served_version(DATASET, digest) is not None
