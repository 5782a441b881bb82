"""The agent's transfer engine and cache store against real S3 servers."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from awscrt.checksums import crc64nvme

from agent.checksums import ObjectChecksum
from agent.errors import FetchCancelled, SourceChanged, VerificationError
from agent.fetch import FetchSettings, Progress, fetch_into, plan
from agent.journal import Journal
from agent.journal import load as load_journal
from agent.manifest import UNVERIFIED, Manifest
from agent.sources import ObjectInfo, Source, SourceOpener
from agent.sources.base import ChecksummedSource
from agent.sources.s3 import S3Settings
from agent.store import CacheStore
from datacache.localcluster import DEMO_CREDENTIALS, LocalCluster, wait_until
from datacache.localcluster import s3_client as admin_client
from tests.faultproxy import Fault, FaultProxy, Rule
from tests.residency import resident_pages

SMALL_PARTS = FetchSettings(concurrency=4, part_bytes=1 << 20, multipart_threshold_bytes=1 << 20)


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in DEMO_CREDENTIALS.items():
        monkeypatch.setenv(key, value)


def source(endpoint: str, uri: str) -> Source:
    return SourceOpener(S3Settings(endpoint_url=endpoint)).open(uri)


def test_copies_small_and_ranged_files_and_verifies(
    s3_server: LocalCluster, bucket: str, tmp_path: Path
) -> None:
    client = admin_client(s3_server.s3_endpoint)
    data = {
        "a.txt": b"hello",
        "empty": b"",
        "deep/er/x.bin": os.urandom(200_000),
        "big.bin": os.urandom(3 * (1 << 20) + 5),
    }
    for key, body in data.items():
        client.put_object(Bucket=bucket, Key=f"ds/{key}", Body=body)
    # A multipart upload without a checksum: its ETag is the MD5 of its parts' MD5s, checked
    # part by part (SeaweedFS tells the part size in a HEAD of part 1).
    upload = client.create_multipart_upload(Bucket=bucket, Key="ds/multi.bin")
    parts = [os.urandom(5 << 20), os.urandom(1000)]
    etags = [
        client.upload_part(
            Bucket=bucket,
            Key="ds/multi.bin",
            UploadId=upload["UploadId"],
            PartNumber=i + 1,
            Body=body,
        )["ETag"]
        for i, body in enumerate(parts)
    ]
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="ds/multi.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]},
    )
    data["multi.bin"] = b"".join(parts)

    src = source(s3_server.s3_endpoint, f"s3://{bucket}/ds/")
    files, refused = plan(list(src.list()))
    assert refused == []
    dest = tmp_path / "dest"
    dest.mkdir()
    progress = Progress()
    entries = fetch_into(src, files, dest, SMALL_PARTS, progress, threading.Event())

    assert {e.path: (dest / e.path).read_bytes() for e in entries} == data
    by_path = {e.path: e for e in entries}
    # SeaweedFS stores the CRC32 boto3 sends with every single-part upload.
    assert by_path["big.bin"].verified == "crc32"
    assert by_path["a.txt"].verified == "crc32"
    assert by_path["a.txt"].crc64nvme == f"{crc64nvme(b'hello'):016x}"
    assert by_path["big.bin"].crc64nvme == f"{crc64nvme(data['big.bin']):016x}"
    assert by_path["multi.bin"].verified == "md5-multipart"
    assert progress.files_done == progress.files_total == len(data)
    assert progress.bytes_done == progress.bytes_total == sum(map(len, data.values()))


@pytest.mark.parametrize("drop_behind", [True, False])
def test_a_copy_with_fsync_leaves_the_page_cache_unless_told_not_to(
    s3_server: LocalCluster, bucket: str, tmp_path: Path, drop_behind: bool
) -> None:
    client = admin_client(s3_server.s3_endpoint)
    data = {"big.bin": os.urandom(5 * (1 << 20) + 7), "small.bin": os.urandom(100_000)}
    for key, body in data.items():
        client.put_object(Bucket=bucket, Key=f"ds/{key}", Body=body)
    src = source(s3_server.s3_endpoint, f"s3://{bucket}/ds/")
    dest = tmp_path / "dest"
    dest.mkdir()
    settings = dataclasses.replace(SMALL_PARTS, drop_behind=drop_behind)
    files = plan(list(src.list()))[0]
    entries = fetch_into(src, files, dest, settings, Progress(), threading.Event())
    assert sorted(e.path for e in entries) == sorted(data)
    page = os.sysconf("SC_PAGE_SIZE")
    resident = {key: resident_pages(dest / key) for key in data}
    if drop_behind:
        assert resident == {key: 0 for key in data}
    else:
        assert resident == {key: -(-len(body) // page) for key, body in data.items()}
    assert {key: (dest / key).read_bytes() for key in data} == data


def test_object_changed_mid_copy_is_restarted_never_mixed(
    s3_server: LocalCluster, bucket: str, tmp_path: Path
) -> None:
    client = admin_client(s3_server.s3_endpoint)
    client.put_object(Bucket=bucket, Key="ds/small", Body=b"version one")
    client.put_object(Bucket=bucket, Key="ds/big", Body=b"1" * (3 << 20))
    src = source(s3_server.s3_endpoint, f"s3://{bucket}/ds/")
    listed = {o.key: o for o in src.list()}
    client.put_object(Bucket=bucket, Key="ds/small", Body=b"version two!")
    client.put_object(Bucket=bucket, Key="ds/big", Body=b"2" * (3 << 20))

    # A small file is restarted from fresh metadata and copied whole from the new version.
    dest, progress = tmp_path / "small", Progress()
    dest.mkdir()
    files, _ = plan([listed["small"]])
    (entry,) = fetch_into(src, files, dest, SMALL_PARTS, progress, threading.Event())
    assert (dest / "small").read_bytes() == b"version two!"
    assert (entry.size, entry.verified, progress.restarts) == (12, "crc32", 1)

    # A file read as ranges fails whole rather than mixing ranges of two versions.
    dest = tmp_path / "big"
    dest.mkdir()
    with pytest.raises(SourceChanged, match="changed while being copied"):
        fetch_into(src, plan([listed["big"]])[0], dest, SMALL_PARTS, Progress(), threading.Event())


def test_cancel_stops_the_copy(s3_server: LocalCluster, bucket: str, tmp_path: Path) -> None:
    client = admin_client(s3_server.s3_endpoint)
    client.put_object(Bucket=bucket, Key="ds/f", Body=b"x" * 10)
    src = source(s3_server.s3_endpoint, f"s3://{bucket}/ds/")
    cancel = threading.Event()
    cancel.set()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(FetchCancelled):
        fetch_into(src, plan(list(src.list()))[0], dest, SMALL_PARTS, Progress(), cancel)


HOSTILE_KEYS = ["../../etc/passwd", "/abs", "a/../../x", "dir/./f"]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_refused_per_file(moto_endpoint: str, key: str, tmp_path: Path) -> None:
    client = admin_client(moto_endpoint)
    bucket = "hostile-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="ds/good.txt", Body=b"fine")
    client.put_object(Bucket=bucket, Key="ds/" + key, Body=b"evil")
    src = source(moto_endpoint, f"s3://{bucket}/ds/")
    listed = list(src.list())
    assert any(o.key == key for o in listed), "the server must store the hostile key"
    files, refused = plan(listed)
    assert [f.obj.key for f in files] == ["good.txt"]
    assert [k for k, _ in refused] == [key]
    dest = tmp_path / "dest"
    dest.mkdir()
    fetch_into(src, files, dest, SMALL_PARTS, Progress(), threading.Event())
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "dest",
        "dest/good.txt",
    ]


def test_file_directory_collision_is_refused(moto_endpoint: str) -> None:
    client = admin_client(moto_endpoint)
    client.create_bucket(Bucket="collide")
    client.put_object(Bucket="collide", Key="ds/a/b", Body=b"file")
    client.put_object(Bucket="collide", Key="ds/a/b/c", Body=b"nested")
    files, refused = plan(list(source(moto_endpoint, "s3://collide/ds/").list()))
    assert [f.obj.key for f in files] == ["a/b/c"]
    assert len(refused) == 1 and "both a file and a directory" in refused[0][1]


def _published(store: CacheStore, name: str, content: bytes) -> Manifest:
    staged, _ = store.staging_for(name, "s3://bucket/p/")
    (staged / "f").write_bytes(content)
    from agent.manifest import FileEntry

    entry = FileEntry("f", len(content), '"x"', f"{crc64nvme(content):016x}", UNVERIFIED)
    manifest = Manifest.build(name, "s3://bucket/p/", [entry])
    store.publish(staged, manifest)
    return manifest


def test_store_publish_recover_and_delete(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "cache")
    manifest = _published(store, "default/ds.one", b"one")
    assert (store.current_path("default/ds.one") / "f").read_bytes() == b"one"
    leftover, journal = store.staging_for("default/ds.one", "s3://bucket/other/")
    (leftover / "partial").write_bytes(b"half")
    journal.write_text("")
    other, _ = store.staging_for("default/ds", "s3://bucket/p/")
    # A dataset directory with files but no `current`: a crash before publishing.
    (store.datasets / "default" / "unpublished" / "abc").mkdir(parents=True)

    reopened = CacheStore(tmp_path / "cache")
    assert reopened.cache_id == store.cache_id
    assert reopened.recover() == {"default/ds.one": manifest}
    assert not (store.datasets / "default" / "unpublished").exists()
    # Copies in progress survive a restart; those of datasets no longer wanted are pruned.
    assert leftover.exists() and other.exists()
    reopened.prune_staging({"default/ds.one"})
    assert leftover.exists() and journal.exists() and not other.exists()

    newer = _published(reopened, "default/ds.one", b"two")
    assert newer.version != manifest.version
    assert (reopened.current_path("default/ds.one") / "f").read_bytes() == b"two"
    assert not (reopened.dataset_dir("default/ds.one") / manifest.version).exists()

    reopened.delete("default/ds.one")
    assert not reopened.dataset_dir("default/ds.one").exists()
    assert reopened.recover() == {}


def test_tampered_manifest_is_not_trusted(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "cache")
    manifest = _published(store, "ds", b"content")
    path = store.dataset_dir("ds") / f"{manifest.version}.json"
    path.write_text(path.read_text().replace('"size":7', '"size":8'))
    assert '"size":8' in path.read_text()
    assert CacheStore(tmp_path / "cache").recover() == {}


class CountingSource:
    """Passes reads through to a real source, counting them."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.reads: list[str] = []

    def list(self) -> Iterator[ObjectInfo]:
        return self.inner.list()

    def read_range(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        self.reads.append(obj.key)
        return self.inner.read_range(obj, offset, length)

    def checksum(self, obj: ObjectInfo) -> ObjectChecksum | None:
        assert isinstance(self.inner, ChecksummedSource)
        return self.inner.checksum(obj)

    def stat(self, key: str) -> ObjectInfo:
        assert isinstance(self.inner, ChecksummedSource)
        return self.inner.stat(key)


def test_resume_keeps_intact_files_and_removes_the_rest(
    s3_server: LocalCluster, bucket: str, tmp_path: Path
) -> None:
    client = admin_client(s3_server.s3_endpoint)
    data = {f"d{i % 3}/f{i}": os.urandom(1000 + i) for i in range(12)}
    for key, body in data.items():
        client.put_object(Bucket=bucket, Key=f"ds/{key}", Body=body)
    src = source(s3_server.s3_endpoint, f"s3://{bucket}/ds/")
    files, _ = plan(list(src.list()))
    dest, journal_path = tmp_path / "staging", tmp_path / "staging.journal"
    dest.mkdir()
    with Journal(journal_path) as journal:
        first = fetch_into(
            src, files, dest, SMALL_PARTS, Progress(), threading.Event(), journal=journal
        )
    # What a crash and a meddler leave behind: a torn file, a lost file, strays and a symlink.
    (dest / "d0" / "f0").write_bytes(b"torn")
    (dest / "d1" / "f1").unlink()
    (dest / "stray.tmp").write_bytes(b"x")
    (dest / "d2" / "link").symlink_to("/etc/passwd")
    (dest / "empty-dir").mkdir()

    counting = CountingSource(src)
    progress = Progress()
    second = fetch_into(
        counting,
        files,
        dest,
        SMALL_PARTS,
        progress,
        threading.Event(),
        resume=load_journal(journal_path),
    )
    assert sorted(counting.reads) == ["d0/f0", "d1/f1"]
    assert sorted(first, key=lambda e: e.path) == sorted(second, key=lambda e: e.path)
    assert tree(dest) == data
    assert progress.files_done == progress.files_total == len(data)


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() or p.is_symlink()
    } | {
        p.relative_to(root).as_posix(): b"<dir>"
        for p in root.rglob("*")
        if p.is_dir() and not any(p.iterdir())
    }


# Multipart uploads ---------------------------------------------------------------------------


def multipart_upload(
    client: Any, bucket: str, key: str, parts: list[bytes], algorithm: str | None = None
) -> None:
    extra: dict[str, str] = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
    done = []
    for number, body in enumerate(parts, 1):
        answer = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body,
            **extra,
        )
        part = {"ETag": answer["ETag"], "PartNumber": number}
        if algorithm:
            part[f"Checksum{algorithm}"] = answer[f"Checksum{algorithm}"]
        done.append(part)
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )


def test_multipart_uploads_are_verified_part_by_part(
    s3_server: LocalCluster, bucket: str, tmp_path: Path
) -> None:
    """Without a full-object checksum, a multipart upload is read part by part (the part
    size comes from a HEAD of part 1) and checked against its composite checksum, or else its
    ETag (MD5 of the parts' MD5s)."""
    client = admin_client(s3_server.s3_endpoint)
    data = {
        "composite.bin": [os.urandom(5 << 20), os.urandom(5 << 20), os.urandom(777)],
        "md5.bin": [os.urandom(5 << 20), os.urandom(3 << 20)],
    }
    multipart_upload(client, bucket, "ds/composite.bin", data["composite.bin"], "CRC32C")
    multipart_upload(client, bucket, "ds/md5.bin", data["md5.bin"])
    src = source(s3_server.s3_endpoint, f"s3://{bucket}/ds/")
    dest = tmp_path / "dest"
    dest.mkdir()
    entries = fetch_into(
        src, plan(list(src.list()))[0], dest, SMALL_PARTS, Progress(), threading.Event()
    )
    assert {e.path: e.verified for e in entries} == {
        "composite.bin": "crc32c-composite",
        "md5.bin": "md5-multipart",
    }
    assert tree(dest) == {key: b"".join(parts) for key, parts in data.items()}


def test_a_flipped_byte_in_a_part_fails_the_multipart_check(
    s3_server: LocalCluster, bucket: str, tmp_path: Path
) -> None:
    client = admin_client(s3_server.s3_endpoint)
    multipart_upload(client, bucket, "ds/m.bin", [os.urandom(5 << 20), os.urandom(1 << 20)])
    with FaultProxy(s3_server.s3_endpoint) as proxy:
        proxy.set_rules([Rule(Fault("flip", offset=12345), method="GET", has_range=True, limit=1)])
        src = source(proxy.url, f"s3://{bucket}/ds/")
        dest = tmp_path / "dest"
        dest.mkdir()
        with pytest.raises(VerificationError, match="MD5 of the copy's parts"):
            fetch_into(
                src, plan(list(src.list()))[0], dest, SMALL_PARTS, Progress(), threading.Event()
            )
        assert proxy.counts() == {"flip": 1}
        # Exactly the two parts were asked for, by their byte ranges.
        ranges = sorted(
            r.range or "" for r in proxy.requests if r.method == "GET" and "/ds/m.bin" in r.path
        )
        assert ranges == [f"bytes=0-{(5 << 20) - 1}", f"bytes={5 << 20}-{(6 << 20) - 1}"]


# Resuming a file read as ranges --------------------------------------------------------------

_FETCH_WITH_JOURNAL = """
import sys, threading
from pathlib import Path
from agent.fetch import FetchSettings, Progress, fetch_into, plan
from agent.journal import Journal
from agent.sources import SourceOpener
from agent.sources.s3 import S3Settings

endpoint, uri, dest, journal = sys.argv[1:]
src = SourceOpener(S3Settings(endpoint_url=endpoint)).open(uri)
files, _ = plan(list(src.list()))
settings = FetchSettings(concurrency=2, part_bytes=1 << 20, multipart_threshold_bytes=1 << 20)
with Journal(Path(journal)) as j:
    fetch_into(src, files, Path(dest), settings, Progress(), threading.Event(), journal=j)
print("finished")
"""


def journalled_ranges(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if "range" in data:
                found.append(data)
    return found


def test_sigkill_mid_file_resumes_with_the_completed_ranges(
    s3_server: LocalCluster, bucket: str, tmp_path: Path
) -> None:
    """The engine in its own process, killed with SIGKILL while one range of a large file
    hangs: the next run keeps the journalled ranges that read back intact, fetches the rest
    (and a kept range altered on disk meanwhile), and verifies the whole file."""
    mib = 1 << 20
    body = os.urandom(8 * mib + 5)
    admin_client(s3_server.s3_endpoint).put_object(Bucket=bucket, Key="ds/big.bin", Body=body)
    uri = f"s3://{bucket}/ds/"
    staging, journal_path = tmp_path / "staging", tmp_path / "staging.journal"
    staging.mkdir()
    hung = f"bytes={3 * mib}-{4 * mib - 1}"
    with FaultProxy(s3_server.s3_endpoint) as proxy:
        proxy.set_rules([Rule(Fault("stall", seconds=120), when=lambda r: r.range == hung)])
        argv = [sys.executable, "-c", _FETCH_WITH_JOURNAL, proxy.url, uri]
        process = subprocess.Popen(
            [*argv, str(staging), str(journal_path)],
            env={**os.environ, **DEMO_CREDENTIALS},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(
                lambda: len(journalled_ranges(journal_path)) == 8 or process.poll() is not None,
                60,
                "every range but the hung one to be journalled",
                0.05,
            )
            assert process.poll() is None, process.communicate(timeout=30)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            out, err = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, (out, err)
    kept_offsets = sorted(r["offset"] for r in journalled_ranges(journal_path))
    assert kept_offsets == [o for o in range(0, 9 * mib, mib) if o != 3 * mib]
    # Damage one kept range on disk: its read-back fails, so it is fetched again.
    with (staging / "big.bin").open("r+b") as f:
        f.seek(5 * mib + 10)
        f.write(bytes([body[5 * mib + 10] ^ 0xFF]))

    with FaultProxy(s3_server.s3_endpoint) as proxy:
        src = source(proxy.url, uri)
        progress = Progress()
        with Journal(journal_path) as journal:
            (entry,) = fetch_into(
                src,
                plan(list(src.list()))[0],
                staging,
                SMALL_PARTS,
                progress,
                threading.Event(),
                resume=load_journal(journal_path),
                journal=journal,
            )
        fetched = sorted(
            r.range or "" for r in proxy.requests if r.method == "GET" and "/ds/big.bin" in r.path
        )
    assert fetched == sorted([hung, f"bytes={5 * mib}-{6 * mib - 1}"])
    assert (staging / "big.bin").read_bytes() == body
    assert (entry.path, entry.verified) == ("big.bin", "crc32")
    assert entry.crc64nvme == f"{crc64nvme(body):016x}"
    assert progress.bytes_done == progress.bytes_total == len(body)
    assert list(load_journal(journal_path)) == ["big.bin"]
    assert load_journal(journal_path).ranges == {}


def test_ranges_of_a_file_that_failed_verification_are_not_kept(
    s3_server: LocalCluster, bucket: str, tmp_path: Path
) -> None:
    body = os.urandom(3 << 20)
    admin_client(s3_server.s3_endpoint).put_object(Bucket=bucket, Key="ds/f.bin", Body=body)
    staging, journal_path = tmp_path / "staging", tmp_path / "staging.journal"
    staging.mkdir()
    with FaultProxy(s3_server.s3_endpoint) as proxy:
        proxy.set_rules([Rule(Fault("flip", offset=7), has_range=True, limit=1)])
        src = source(proxy.url, f"s3://{bucket}/ds/")
        files = plan(list(src.list()))[0]
        with Journal(journal_path) as journal, pytest.raises(VerificationError):
            fetch_into(
                src, files, staging, SMALL_PARTS, Progress(), threading.Event(), journal=journal
            )
        assert len(journalled_ranges(journal_path)) == 3
        assert load_journal(journal_path).ranges == {}
        with Journal(journal_path) as journal:
            fetch_into(
                src,
                files,
                staging,
                SMALL_PARTS,
                Progress(),
                threading.Event(),
                resume=load_journal(journal_path),
                journal=journal,
            )
        assert len([r for r in proxy.requests if r.method == "GET" and r.range]) == 6
    assert (staging / "f.bin").read_bytes() == body


_FETCH_COMMAND_MODULES = """
import json, sys
from agent.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
unused = ("prometheus_client", "grpc", "boto3", "botocore", "agent.sources.nfs", "agent.store")
print(json.dumps({"code": code, "loaded": [m for m in unused if m in sys.modules]}))
"""


def test_the_fetch_command_loads_only_what_an_s3_copy_uses(
    s3_server: LocalCluster, bucket: str, tmp_path: Path
) -> None:
    """`datacache-agent fetch` pays its imports on every copy: an S3 copy must not load the
    metrics library (it serves none), gRPC, boto3, the libnfs bindings or the cache store."""
    body = os.urandom(70_000)
    admin_client(s3_server.s3_endpoint).put_object(Bucket=bucket, Key="ds/a.bin", Body=body)
    dest = tmp_path / "copy"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _FETCH_COMMAND_MODULES,
            "fetch",
            f"s3://{bucket}/ds/",
            str(dest),
            f"--s3-endpoint-url={s3_server.s3_endpoint}",
            "--no-progress",
        ],
        env={**os.environ, **DEMO_CREDENTIALS},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary, result = (json.loads(line) for line in done.stdout.splitlines()[-2:])
    assert (result["code"] in (0, None), summary["files"]) == (True, 1)
    assert (dest / "a.bin").read_bytes() == body
    assert result["loaded"] == []


def test_small_object_connections_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import agent.__main__ as cli

    def settings(*args: str) -> FetchSettings:
        ctx = cli.fetch.make_context("fetch", ["s3://b/p/", str(tmp_path / "copy"), *args])
        return cli._fetch_settings(ctx.params)

    assert settings().small_object_connections == FetchSettings().small_object_connections
    assert settings("--small-object-connections=0").small_object_connections == 0
    monkeypatch.setenv("DATACACHE_SMALL_OBJECT_CONNECTIONS", "16")
    assert settings().small_object_connections == 16
    with pytest.raises(click.BadParameter, match="1024"):
        settings("--small-object-connections=5000")


_ENTRY_WITH_TEARDOWN_MARK = """
import atexit, sys
import agent.__main__ as cli
atexit.register(lambda: print("teardown ran", file=sys.stderr, flush=True))
sys.argv[0] = "datacache-agent"
cli.entry()
"""


def _entry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _ENTRY_WITH_TEARDOWN_MARK, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_fetch_command_exits_without_teardown_and_keeps_its_output_and_code(
    tmp_path: Path,
) -> None:
    """A finished `fetch` leaves with `os._exit`: its summary must still reach a pipe whole,
    its exit status must be the command's, and only `fetch` may skip the teardown."""
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    body = os.urandom(300_000)
    (source / "sub" / "a.bin").write_bytes(body)

    copied = _entry("fetch", source.as_uri() + "/", str(tmp_path / "copy"), "--no-progress")
    assert copied.returncode == 0, copied.stderr
    assert json.loads(copied.stdout.splitlines()[-1])["files"] == 1
    assert (tmp_path / "copy" / "sub" / "a.bin").read_bytes() == body
    assert "teardown ran" not in copied.stderr

    refused = _entry("fetch", "ftp://nowhere/x/", str(tmp_path / "other"), "--no-progress")
    assert refused.returncode == 2
    assert "SOURCE" in refused.stderr
    assert "teardown ran" not in refused.stderr
    assert not (tmp_path / "other").exists()

    version = _entry("--version")
    assert version.returncode == 0
    assert "datacache-agent" in version.stdout
    assert "teardown ran" in version.stderr
