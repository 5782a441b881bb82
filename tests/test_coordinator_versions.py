"""Fixed versions over real gRPC: the first offer per revision wins (also under a race), the
digest is checked, stale revisions are refused, manifests page; desired sets carry revision,
version and credentials."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from coordinator.store import SCHEMA_VERSION, Store
from datacache.localcluster import wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.versions import manifest_digest
from tests.coordinator_sim import (
    SimAgent,
    code_of,
    coordinator,
    datasets_stub,
    details_of,
    entries,
    version_of,
)


def test_digest_mirrors_the_agent_manifest() -> None:
    from agent.manifest import FileEntry, content_digest

    files = [
        FileEntry("b/2", 5, "e", "00000000000000ff", "crc64nvme"),
        FileEntry("a", 0, "", "0000000000000000", "unverified"),
    ]
    assert manifest_digest(files) == content_digest(files)
    as_proto = [pb.ManifestEntry(path=f.path, size=f.size, crc64nvme=f.crc64nvme) for f in files]
    assert manifest_digest(as_proto) == content_digest(files)


def test_first_offer_fixes_the_version(tmp_path: Path) -> None:
    with coordinator(tmp_path) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            stub.CreateDataset(
                pb.CreateDatasetRequest(
                    dataset=pb.Dataset(name="d", source="s3://bucket/x/", replicas=3)
                ),
                timeout=10,
            )
            agents = [SimAgent(channel, f"node-{i}") for i in range(4)]
            for agent in agents:
                agent.register()
            # Four copies race to fix the version, each with a different manifest.
            offers = [entries(2500, prefix=f"copy{i}") for i in range(4)]
            with ThreadPoolExecutor(4) as pool:
                answers = list(
                    pool.map(lambda i: agents[i].publish("default/d", 1, offers[i]), range(4))
                )
            assert len(set(answers)) == 1
            fixed = answers[0]
            assert fixed in {version_of(o) for o in offers}
            assert agents[0].publish("default/d", 1, entries(3)) == fixed

            # The desired sets carry the revision and the fixed version.
            desired = agents[0].wait_desired(
                lambda m: any(d.version == fixed for d in m.datasets) or not m.datasets,
                "the fixed version",
            )
            for d in desired.datasets:
                assert (d.name, d.revision, d.version) == ("default/d", 1, fixed)

            # The fixed manifest, page by page, exactly as offered.
            winner = next(o for o in offers if version_of(o) == fixed)
            got: list[pb.ManifestEntry] = []
            token = ""
            while True:
                page = agents[1].stub.GetVersionManifest(
                    pb.GetVersionManifestRequest(
                        dataset_name="d", version=fixed, page_size=1000, page_token=token
                    ),
                    timeout=10,
                )
                assert len(page.entries) <= 1000
                got += page.entries
                token = page.next_page_token
                if not token:
                    break
            assert got == winner
            dataset = stub.GetDataset(pb.GetDatasetRequest(name="d"), timeout=10).dataset
            assert dataset.status.size_bytes == sum(e.size for e in winner)

            for bad in (
                pb.GetVersionManifestRequest(dataset_name="d", version=fixed, page_size=10_001),
                pb.GetVersionManifestRequest(dataset_name="d", version=fixed, page_token="x"),
            ):
                assert (
                    code_of(lambda r=bad: agents[0].stub.GetVersionManifest(r, timeout=10))  # type: ignore[misc]
                    == grpc.StatusCode.INVALID_ARGUMENT
                )
            assert (
                code_of(
                    lambda: agents[0].stub.GetVersionManifest(
                        pb.GetVersionManifestRequest(
                            dataset_name="d", version="sha256:" + "0" * 64
                        ),
                        timeout=10,
                    )
                )
                == grpc.StatusCode.FAILED_PRECONDITION
            )

            # A refresh starts revision 2: offers for revision 1 are refused.
            stub.RefreshDataset(pb.RefreshDatasetRequest(name="d"), timeout=10)
            assert (
                code_of(lambda: agents[0].publish("default/d", 1, entries(3)))
                == grpc.StatusCode.FAILED_PRECONDITION
            )
            second = agents[2].publish("default/d", 2, entries(7, prefix="new"))
            assert second != fixed
            agents[0].wait_desired(
                lambda m: [(d.revision, d.version) for d in m.datasets] in ([(2, second)], []),
                "revision 2 and its version",
            )


def test_offers_are_checked(tmp_path: Path) -> None:
    with coordinator(tmp_path) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            stub.CreateDataset(
                pb.CreateDatasetRequest(
                    dataset=pb.Dataset(name="d", source="s3://bucket/x/", replicas=1)
                ),
                timeout=10,
            )
            agent = SimAgent(channel, "node-1")
            stranger = SimAgent(channel, "node-2")
            agent.register()
            good = entries(5)
            cases = [
                (
                    lambda: agent.publish("default/d", 1, good, version="sha256:" + "1" * 64),
                    "does not match",
                ),
                (lambda: agent.publish("default/d", 1, good, version="md5:x"), "sha256"),
                (lambda: agent.publish("default/d", 1, list(reversed(good))), "order"),
                (
                    lambda: agent.publish(
                        "default/d", 1, [pb.ManifestEntry(path="../x", crc64nvme="0" * 16)]
                    ),
                    "relative",
                ),
                (
                    lambda: agent.publish(
                        "default/d", 1, [pb.ManifestEntry(path="x", crc64nvme="XYZ")]
                    ),
                    "crc64nvme",
                ),
                (lambda: agent.publish("default/d", 0, good), "revision"),
            ]
            for call, word in cases:
                assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
                assert word in details_of(call)
            assert (
                code_of(lambda: agent.publish("default/missing", 1, good))
                == grpc.StatusCode.NOT_FOUND
            )
            assert (
                code_of(lambda: stranger.publish("default/d", 1, good))
                == grpc.StatusCode.FAILED_PRECONDITION
            )
            assert agent.publish("default/d", 1, good) == version_of(good)


def test_credentials_from_the_secrets_dir(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "reader").mkdir(parents=True)
    (secrets / "reader" / "AWS_ACCESS_KEY_ID").write_text("AKIDEXAMPLE\n")
    (secrets / "reader" / "AWS_SECRET_ACCESS_KEY").write_text("very-secret\n")
    with coordinator(tmp_path / "c", f"--secrets-dir={secrets}") as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            for name, secret in (("with", "reader"), ("missing", "absent")):
                stub.CreateDataset(
                    pb.CreateDatasetRequest(
                        dataset=pb.Dataset(
                            name=name,
                            source="s3://bucket/x/",
                            replicas=1,
                            credentials_secret=secret,
                        )
                    ),
                    timeout=10,
                )
            agent = SimAgent(channel, "node-1")
            agent.register()
            desired = agent.wait_desired(lambda m: len(m.datasets) >= 1, "a desired dataset")
            # The dataset whose secret is missing is not sent; the other carries credentials.
            (only,) = desired.datasets
            assert only.name == "default/with"
            assert only.credentials.access_key_id == "AKIDEXAMPLE"
            assert only.credentials.secret_access_key == "very-secret"

            def blocked() -> pb.Dataset:
                dataset: pb.Dataset = stub.GetDataset(
                    pb.GetDatasetRequest(name="missing"), timeout=10
                ).dataset
                return dataset

            wait_until(lambda: blocked().status.phase == "Failed", 10, "phase Failed")
            assert "absent" in blocked().status.replicas[0].message
            # Once the secret appears, the dataset is sent.
            (secrets / "absent").mkdir()
            (secrets / "absent" / "AWS_ACCESS_KEY_ID").write_text("A2")
            (secrets / "absent" / "AWS_SECRET_ACCESS_KEY").write_text("S2")
            stub.UpdateDataset(
                pb.UpdateDatasetRequest(
                    dataset=pb.Dataset(name="missing", pin=True),
                    update_mask=FieldMask(paths=["pin"]),
                ),
                timeout=10,
            )
            agent.wait_desired(lambda m: len(m.datasets) == 2, "both datasets")
            wait_until(lambda: blocked().status.phase != "Failed", 10, "the problem to clear")
    # No credential ever reaches the log.
    assert "very-secret" not in (tmp_path / "c" / "coordinator.log").read_text()


V1_SCHEMA = """
CREATE TABLE datasets (name TEXT PRIMARY KEY, source TEXT NOT NULL, replicas INTEGER NOT NULL,
    create_time REAL NOT NULL, deleting INTEGER NOT NULL DEFAULT 0);
CREATE TABLE agents (node_name TEXT PRIMARY KEY, cache_id TEXT NOT NULL, last_seen REAL NOT NULL,
    capacity_bytes INTEGER NOT NULL DEFAULT 0, free_bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE assignments (dataset TEXT NOT NULL, node_name TEXT NOT NULL,
    PRIMARY KEY (dataset, node_name));
CREATE TABLE replicas (dataset TEXT NOT NULL, node_name TEXT NOT NULL, state TEXT NOT NULL,
    digest TEXT NOT NULL DEFAULT '', files_done INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0, files_total INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '',
    update_time REAL NOT NULL, PRIMARY KEY (dataset, node_name));
CREATE TABLE local_labels (node_name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (node_name, key));
INSERT INTO datasets VALUES ('default/old', 's3://bucket/old/', 2, 1000.0, 0);
INSERT INTO agents VALUES ('node-1', 'cache-1', 1000.0, 10, 5);
INSERT INTO assignments VALUES ('default/old', 'node-1');
INSERT INTO replicas VALUES ('default/old', 'node-1', 'Ready', 'sha256:x', 1, 1, 1, 1, '', 1000.0);
INSERT INTO local_labels VALUES ('node-1', 'dataset.datacache.io/default.old', 'ready');
"""


def test_old_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        record = store.get_dataset("default/old")
        assert (record.source, record.replicas, record.revision, record.all_nodes) == (
            "s3://bucket/old/",
            2,
            1,
            False,
        )
        assert record.update_time == 1000.0
        assert record.max_replicas == 0
        assert store.assignments() == {"default/old": frozenset({"node-1"})}
        (report,) = store.reports()
        assert (report.digest, report.revision, report.serving_version) == ("sha256:x", 0, "")
        assert store.local_labels() == {"node-1": {"dataset.datacache.io/default.old": "ready"}}
    finally:
        store.close()
    # Opening again is a no-op; a newer schema is refused.
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    try:
        Store(path)
    except Exception as exc:
        assert "newer" in str(exc)
    else:
        raise AssertionError("a newer schema was opened")


def test_restarted_coordinator_keeps_migrated_datasets(tmp_path: Path) -> None:
    workdir = tmp_path / "c"
    workdir.mkdir()
    with sqlite3.connect(workdir / "coordinator.db") as db:
        db.executescript(V1_SCHEMA)
    with coordinator(workdir) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            dataset = stub.GetDataset(pb.GetDatasetRequest(name="old"), timeout=10).dataset
            assert (dataset.source, dataset.replicas, dataset.revision) == (
                "s3://bucket/old/",
                2,
                1,
            )
