"""Scenario 9: hostile input. Object keys that try to escape the cache (moto stores them;
SeaweedFS refuses them), symbolic links planted in the cache, file/directory collisions, names
over 255 bytes, a 100,000-key listing, oversized gRPC messages, malformed dataset names and
source URIs through the CLI and the API."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import secrets
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from datacache.localcluster import DEMO_CREDENTIALS, s3_client
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.chaos.harness import (
    ChaosCluster,
    Monitor,
    S3Origin,
    Sizes,
    console,
    generate,
    sha256,
    wait_for,
)
from tests.chaos.report import ScenarioRecord
from tests.conftest import mounted_tmpfs

NODES = ["node-1", "node-2"]


def files_under(root: Path) -> dict[str, str]:
    """Every file and link beneath `root` (links not followed), with a digest or target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = sha256(path.read_bytes())
    return found


@pytest.mark.scenario(
    9, "Hostile listing: traversal, absolute, over-long and colliding keys (moto)"
)
def test_hostile_listing(
    chaos: ChaosCluster, moto_endpoint: str, sizes: Sizes, record: ScenarioRecord, tmp_path: Path
) -> None:
    bucket = "hostile-" + secrets.token_hex(4)
    s3_client(moto_endpoint).create_bucket(Bucket=bucket)
    escape = f"escaped-{secrets.token_hex(4)}.txt"
    hostile = {
        f"../../../../{escape}": b"traversal",
        f"a/../../../{escape}": b"inner traversal",
        f"/{escape}": b"absolute",
        f"//{escape}": b"double slash",
        "..": b"dot-dot",
        ".": b"dot",
        "x/./y": b"dot component",
        "x//y": b"empty component",
        "n" * 256: b"256-byte name",
        "d/" + "\u00e9" * 128: b"256 bytes of UTF-8",
        "collide": b"a file that is also a directory of the next key",
    }
    fine = generate(15, sizes)
    fine["n" * 255] = b"255-byte name: allowed"
    fine["..hidden/x..y"] = b"dots inside names are fine"
    fine["collide/inner"] = b"kept: the colliding file key is the one refused"
    origin = S3Origin(moto_endpoint, bucket)
    origin.put_all({**fine, **hostile}, unsafe=hostile)
    record.fault(
        f"{len(hostile)} hostile keys among {len(fine)} good ones: {sorted(hostile)[:6]}..."
    )
    outside_before = files_under(tmp_path)
    chaos.start_coordinator()
    for node in NODES:
        chaos.start_agent(node, f"--s3-endpoint-url={moto_endpoint}")
    chaos.wait_registered(NODES)
    with Monitor(chaos, {"data": origin}) as monitor:
        started = time.monotonic()
        chaos.create("data", origin.uri, replicas=2)
        chaos.wait_ready("data", 2)
        record.recovered(time.monotonic() - started, "from creation to 2 Ready replicas")
        monitor.finish(record)
    refused = [
        r
        for r in chaos.agent_log("node-1") + chaos.agent_log("node-2")
        if r.get("msg", "").startswith("Refused object")
    ]
    refused_keys = {str(r.get("object")) for r in refused}
    record.observe(
        f"{len(refused_keys)} keys refused with a logged reason (e.g. "
        f"{refused[0]['msg'] if refused else '-'}); 2 Ready replicas of the {len(fine)} good keys"
    )
    escaped = [p for p in (Path("/") / escape, tmp_path / escape) if p.exists()]
    new_outside = {
        p
        for p in files_under(tmp_path).keys() - outside_before.keys()
        if "/cluster/" not in p and not p.startswith(str(tmp_path / "cluster"))
    }
    record.observe(f"files written outside the cache root: {len(escaped) + len(new_outside)}")
    assert escaped == [] and new_outside == set()
    assert monitor.complete_copies("data") == set(NODES)
    for node in NODES:
        current = chaos.dataset_dir(node, "data") / "current"
        found = {p.relative_to(current).as_posix() for p in current.rglob("*") if p.is_file()}
        assert found == set(fine), found ^ set(fine)
    assert "collide" in refused_keys
    assert record.exposed == 0 and record.lost == 0


def planted_links_scenario(
    chaos: ChaosCluster,
    origin: S3Origin,
    record: ScenarioRecord,
    plant: dict[str, tuple[Path, Path]],
) -> set[str]:
    """Plants, for each node, a link (first path) to somewhere outside the cache (second),
    runs the dataset onto every node, and returns the nodes whose outside target changed."""
    victim = b"a file outside the cache that must never change\n"
    before = {}
    for node, (link, target) in plant.items():
        if not target.exists():
            target.mkdir()
            (target / "victim").write_bytes(victim)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target / "victim" if link.suffix == ".bin" else target)
        before[node] = files_under(target)
        record.fault(
            f"{node}: {link.relative_to(chaos.cache(node))} -> a "
            f"{'file' if link.suffix == '.bin' else 'directory'} outside the cache"
        )
    nodes = sorted(plant)
    chaos.start_coordinator()
    for node in nodes:
        chaos.start_agent(node)
    chaos.wait_registered(nodes)
    with Monitor(chaos, {"data": origin}) as monitor:
        started = time.monotonic()
        chaos.create("data", origin.uri, replicas=len(nodes))

        def settled() -> bool:
            found = chaos.replicas("data")
            return len(found) == len(nodes) and all(
                r.state == pb.REPLICA_STATE_READY
                or (r.state == pb.REPLICA_STATE_FAILED and r.message)
                for r in found.values()
            )

        wait_for(settled, 60, "every replica Ready or Failed")
        record.recovered(time.monotonic() - started, "from creation to every replica settled")
        monitor.finish(record)
    for node, replica in sorted(chaos.replicas("data").items()):
        record.observe(
            f"{node}: {pb.ReplicaState.Name(replica.state)}"
            + (f" ({replica.message[:160]})" if replica.message else "")
        )
    changed = {n for n, (_, target) in plant.items() if files_under(target) != before[n]}
    for node in sorted(changed):
        written = sorted(set(files_under(plant[node][1])) - set(before[node]))
        record.observe(
            f"{node}: {len(written)} files written outside the cache, e.g. {written[:2]}"
        )
    record.observe(f"directories outside the cache changed: {sorted(changed) or 'none'}")
    return changed


@pytest.mark.scenario(9, "A symbolic link planted in a copy's staging directory")
def test_symlink_planted_in_staging(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord, tmp_path: Path
) -> None:
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    files = generate(16, sizes)
    origin.put_all(files)
    key = sorted(k for k in files if k.startswith("small/"))[0]
    tag = hashlib.sha256(origin.uri.encode()).hexdigest()[:12]
    link = chaos.cache("node-1") / "staging" / f"default.data.{tag}" / key
    changed = planted_links_scenario(
        chaos, origin, record, {"node-1": (link, tmp_path / "outside")}
    )
    assert changed == set()
    assert chaos.ready("data") == {"node-1"}
    assert record.exposed == 0 and record.lost == 0


@pytest.mark.scenario(9, "Symbolic links planted as the cache's dataset and namespace directories")
def test_symlinked_dataset_directories(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord, tmp_path: Path
) -> None:
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(generate(17, sizes))
    plant = {
        "node-1": (chaos.cache("node-1") / "datasets" / "default" / "data", tmp_path / "out-1"),
        "node-2": (chaos.cache("node-2") / "datasets" / "default", tmp_path / "out-2"),
    }
    changed = planted_links_scenario(chaos, origin, record, plant)
    assert record.exposed == 0 and record.lost == 0
    assert changed == set(), "the agent wrote outside its cache through a planted link"


@pytest.mark.scenario(9, "A 100,000-key listing (file:// on tmpfs, `datacache-agent fetch`)")
def test_huge_listing(sizes: Sizes, record: ScenarioRecord, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "fs", "1g") as fs:
        source = fs / "source"
        per_dir = 1000
        started = time.monotonic()
        for d in range(sizes.many_keys // per_dir):
            directory = source / f"d{d:04d}"
            directory.mkdir(parents=True)
            for i in range(per_dir):
                (directory / f"f{i:05d}").write_bytes(b"%d" % (d * per_dir + i))
        # A file/directory collision hidden among them.
        (source / "d0000" / "f00000.dir").mkdir()
        made = time.monotonic() - started
        dest = fs / "dest"
        argv = [
            console("datacache-agent"),
            "fetch",
            f"file://{source}/",
            str(dest),
            "--no-progress",
            "--no-fsync",
            "--log-format=json",
        ]
        started = time.monotonic()
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, **DEMO_CREDENTIALS},
            check=False,
        )
        seconds = time.monotonic() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads(result.stdout)
        copied = sum(1 for _ in dest.rglob("f*") if _.is_file())
    record.fault(
        f"a listing of {sizes.many_keys:,} keys in {sizes.many_keys // per_dir} directories "
        f"(made in {made:.1f}s)"
    )
    record.observe(
        f"`datacache-agent fetch` listed, planned, copied and verified {summary['files']:,} "
        f"files in {seconds:.1f}s ({summary['files'] / seconds:,.0f} files/s), peak RSS of the "
        f"largest child process {peak_kib / 1024:.0f} MiB"
    )
    record.recovered(seconds, "wall time of the whole copy of the huge listing")
    record.exposed, record.lost, record.checks = 0, 0, 1
    assert summary["files"] == sizes.many_keys == copied
    assert peak_kib < 2 * 1024 * 1024


@pytest.mark.scenario(9, "Oversized gRPC messages, malformed dataset names and URIs (API and CLI)")
def test_hostile_api_input(chaos: ChaosCluster, record: ScenarioRecord) -> None:
    chaos.start_coordinator()
    codes: dict[str, str] = {}
    with chaos.local.channel() as channel:
        stub = pb_grpc.DatasetServiceStub(channel)

        def code(dataset: pb.Dataset) -> str:
            try:
                stub.CreateDataset(pb.CreateDatasetRequest(dataset=dataset), timeout=10)
            except grpc.RpcError as exc:
                return str(exc.code().name)
            return "OK"

        bad_names = [
            "",
            "UPPER",
            "a/b/c",
            "../x",
            "a b",
            "x" * 300,
            "a\x00b",
            "ns/" + "y" * 260,
            "-x",
        ]
        bad_sources = [
            "",
            "s3://",
            "s3://bucket/../x/",
            "s3://Bucket_Bad/x/",
            "s3://bucket:99/x/",
            "s3://bucket/x/?versionId=1",
            "nfs://server",
            "nfs://bad_host!/export/",
            "file://relative/dir/",
            "file:///etc/../x/",
            "ftp://host/x/",
            "s3://bucket/" + "p" * 2000 + "/",
            "s3://bucket/x\x07/",
        ]
        for name in bad_names:
            codes[f"name {name[:20]!r}"] = code(
                pb.Dataset(name=name, source="s3://b/x/", replicas=1)
            )
        for source in bad_sources:
            codes[f"source {source[:30]!r}"] = code(
                pb.Dataset(name="ok", source=source, replicas=1)
            )
        codes["replicas -1"] = code(pb.Dataset(name="ok", source="s3://b/x/", replicas=-1))
        codes["replicas 10^6"] = code(pb.Dataset(name="ok", source="s3://b/x/", replicas=1_000_000))
        # Bigger than the 4 MiB the server accepts.
        codes["8 MiB message"] = code(
            pb.Dataset(name="ok", source="s3://b/" + "x" * (8 << 20), replicas=1)
        )
        big_selector = {f"k{i}": "v" * 50 for i in range(40_000)}
        codes["3 MiB node selector"] = code(
            pb.Dataset(name="ok", source="s3://b/x/", replicas=1, node_selector=big_selector)
        )
        listed = stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10)
    cli_codes: dict[str, int] = {}
    for args in (
        ["dataset", "create", "Bad_Name", "--source", "s3://b/x/"],
        ["dataset", "create", "ok", "--source", "s3://b/../x/"],
        ["dataset", "create", "ok", "--source", "nfs://server"],
        ["dataset", "get", "../../etc"],
        ["dataset", "create", "ok", "--source", "s3://b/x/", "--replicas", "0"],
    ):
        result = subprocess.run(
            [console("datacache"), f"--coordinator={chaos.local.coordinator_address}", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        cli_codes[" ".join(args)] = result.returncode
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode in (1, 2), (args, result.stdout, result.stderr)
    record.fault(
        f"{len(codes)} malformed CreateDataset requests over gRPC (names, URIs, replica counts, "
        f"an 8 MiB message, a 3 MiB node selector) and {len(cli_codes)} through the CLI"
    )
    tally: dict[str, int] = {}
    for value in codes.values():
        tally[value] = tally.get(value, 0) + 1
    record.observe(
        f"gRPC answers: {tally}; CLI exit codes: {sorted(set(cli_codes.values()))}, no traceback"
    )
    record.observe(
        f"datasets created by all of it: {len(listed.datasets)}; coordinator alive: "
        f"{chaos.local.coordinator.alive()}"
    )
    record.exposed, record.lost, record.checks = 0, 0, 0
    assert all(c in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED") for c in codes.values()), codes
    assert codes["8 MiB message"] == "RESOURCE_EXHAUSTED"
    assert len(listed.datasets) == 0
    assert chaos.local.coordinator.alive()
