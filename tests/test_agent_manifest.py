"""The agent's version digest is the coordinator's, and one version's pure checks."""

from __future__ import annotations

import hashlib

import pytest

from agent.errors import VersionMismatch, VersionUnavailable
from agent.fetch import PlannedFile
from agent.manifest import FileEntry, Manifest, content_digest
from agent.sources import ObjectInfo
from agent.versioning import check_copy, expected_entries, offer, select
from datacache.v1 import datacache_pb2 as pb
from datacache.versions import manifest_digest

ENTRIES = [
    FileEntry("b/c.bin", 5, '"e2"', "00000000000000ff", "crc64nvme"),
    FileEntry("a.txt", 3, '"e1"', "0123456789abcdef", "md5-etag"),
]


def test_agent_and_coordinator_compute_the_same_digest() -> None:
    as_proto = [
        pb.ManifestEntry(path=e.path, size=e.size, etag=e.etag, crc64nvme=e.crc64nvme)
        for e in ENTRIES
    ]
    digest = Manifest.build("default/ds", "s3://b/p/", ENTRIES).digest
    assert digest == content_digest(ENTRIES) == manifest_digest(as_proto)
    # The algorithm itself is pinned: changing it would split every fixed version in two.
    h = hashlib.sha256(b"a.txt\x003\x000123456789abcdef\nb/c.bin\x005\x0000000000000000ff\n")
    assert digest == "sha256:" + h.hexdigest()


def test_manifest_round_trips_with_revision_and_publish_time() -> None:
    manifest = Manifest.build("default/ds", "s3://b/p/", ENTRIES, 4).with_revision(4, 12.5)
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest and again.revision == 4 and again.published_at == 12.5
    assert manifest.verification() == {"crc64nvme": 1, "md5-etag": 1}


def fixed() -> tuple[str, dict[str, FileEntry]]:
    digest = content_digest(ENTRIES)
    as_proto = [
        pb.ManifestEntry(path=e.path, size=e.size, etag=e.etag, crc64nvme=e.crc64nvme)
        for e in ENTRIES
    ]
    return digest, expected_entries(as_proto, digest)


def planned(key: str, size: int, etag: str) -> PlannedFile:
    return PlannedFile(ObjectInfo(key=key, size=size, etag=etag), tuple(key.split("/")))


def test_listing_matching_the_fixed_version_is_copied_without_additions() -> None:
    version, expected = fixed()
    listing = [planned("a.txt", 3, '"e1"'), planned("b/c.bin", 5, '"e2"'), planned("new", 1, "x")]
    assert [p.obj.key for p in select(listing, expected, version, "s3://b/p/")] == [
        "a.txt",
        "b/c.bin",
    ]


@pytest.mark.parametrize(
    "listing",
    [
        [planned("a.txt", 3, '"overwritten"'), planned("b/c.bin", 5, '"e2"')],
        [planned("a.txt", 4, '"e1"'), planned("b/c.bin", 5, '"e2"')],
        [planned("b/c.bin", 5, '"e2"')],
    ],
)
def test_source_that_changed_since_the_version_was_fixed_is_refused(
    listing: list[PlannedFile],
) -> None:
    version, expected = fixed()
    with pytest.raises(VersionMismatch) as raised:
        select(listing, expected, version, "s3://b/p/")
    assert str(raised.value) == (
        f"source object s3://b/p/a.txt changed since version {version} was fixed; "
        "refresh the dataset"
    )


def test_copy_with_other_bytes_than_the_fixed_version_is_refused() -> None:
    version, expected = fixed()
    check_copy(ENTRIES, expected, version, "s3://b/p/")
    flipped = [ENTRIES[0], FileEntry("a.txt", 3, '"e1"', "1123456789abcdef", "unverified")]
    with pytest.raises(VersionMismatch, match=r"a\.txt changed since version"):
        check_copy(flipped, expected, version, "s3://b/p/")


def test_manifest_from_the_coordinator_must_match_its_version() -> None:
    version, _ = fixed()
    entry = pb.ManifestEntry(path="a.txt", size=3, etag='"e1"', crc64nvme="0123456789abcdef")
    with pytest.raises(VersionUnavailable, match="does not match version"):
        expected_entries([entry], version)
    bad = pb.ManifestEntry(path="a.txt", size=3, crc64nvme="not-hex")
    with pytest.raises(VersionUnavailable, match="bad entry"):
        expected_entries([bad], version)


def test_offer_sends_entries_in_path_order_in_batches() -> None:
    files = [FileEntry(f"f{i:04d}", i, "", f"{i:016x}", "unverified") for i in range(2500)]
    manifest = Manifest.build("default/ds", "s3://b/p/", list(reversed(files)), 7)
    agent = pb.AgentIdentity(node_name="n1", cache_id="c")
    messages = list(offer(manifest, agent))
    assert [len(m.entries) for m in messages] == [1000, 1000, 500]
    first = messages[0]
    assert (first.dataset_name, first.revision, first.version) == ("default/ds", 7, manifest.digest)
    assert first.agent.node_name == "n1" and not messages[1].dataset_name
    paths = [e.path for m in messages for e in m.entries]
    assert paths == sorted(paths) == [f.path for f in files]
