"""The agent's pure lifecycle decisions: when a published copy must be replaced."""

from __future__ import annotations

from agent.credentials import DatasetCredentials
from agent.manifest import FileEntry, Manifest
from agent.replica import Want, needs_copy
from datacache.v1 import datacache_pb2 as pb

HELD = Manifest.build(
    "default/ds", "s3://b/p/", [FileEntry("f", 1, '"e"', "0" * 16, "md5-etag")], 2
)


def test_nothing_held_or_another_source_needs_a_copy() -> None:
    assert needs_copy(None, Want("s3://b/p/", 2))
    assert needs_copy(HELD, Want("s3://b/other/", 2))


def test_a_newer_revision_without_a_fixed_version_needs_a_fresh_copy() -> None:
    assert needs_copy(HELD, Want("s3://b/p/", 3))
    assert not needs_copy(HELD, Want("s3://b/p/", 2))
    assert not needs_copy(HELD, Want("s3://b/p/", 1))  # never back to an older revision


def test_a_fixed_version_other_than_the_held_one_replaces_it() -> None:
    assert needs_copy(HELD, Want("s3://b/p/", 2, "sha256:" + "1" * 64))
    # A newer revision whose fixed version is what the node holds: nothing to copy.
    assert not needs_copy(HELD, Want("s3://b/p/", 3, HELD.digest))


def test_desired_dataset_credentials_are_per_dataset_and_hidden() -> None:
    message = pb.DesiredDataset(
        name="default/ds",
        source="s3://b/p/",
        revision=4,
        version="",
        credentials=pb.Credentials(
            access_key_id="AKID", secret_access_key="s3cr3t", session_token="t0k3n"
        ),
    )
    want = Want.from_pb(message)
    assert want.credentials == DatasetCredentials("AKID", "s3cr3t", "t0k3n")
    assert "s3cr3t" not in repr(want) and "t0k3n" not in repr(want)
    assert (
        Want.from_pb(pb.DesiredDataset(name="default/ds", source="s3://b/p/")).credentials is None
    )
