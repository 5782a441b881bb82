from __future__ import annotations

import pytest

from datacache.validation import (
    FileSource,
    InvalidInput,
    NfsSource,
    S3Source,
    parse_source,
    split_dataset_name,
    validate_dataset_name,
    validate_node_name,
    validate_replicas,
)


@pytest.mark.parametrize("name", ["a", "imagenet-2012", "team.cifar10", "x" * 253, "0abc"])
def test_names_without_namespace_are_in_default(name: str) -> None:
    assert validate_dataset_name(name) == f"default/{name}"
    assert split_dataset_name(name) == ("default", name)


@pytest.mark.parametrize("name", ["team-a/imagenet", "x" * 63 + "/" + "y" * 253, "0/a.b"])
def test_canonical_names_are_kept(name: str) -> None:
    assert validate_dataset_name(name) == name
    assert "/".join(split_dataset_name(name)) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty"),
        ("Upper", "DNS-1123"),
        ("-lead", "DNS-1123"),
        ("trail-", "DNS-1123"),
        ("a..b", "DNS-1123"),
        ("a/b/c", "more than one '/'"),
        ("/b", "empty namespace"),
        ("a.b/c", "namespace 'a.b' is not a DNS-1123 label"),
        ("x" * 64 + "/c", "DNS-1123 label"),
        ("a/", "empty"),
        ("a_b", "DNS-1123"),
        ("x" * 254, "254 characters"),
        ("naïve", "DNS-1123"),
    ],
)
def test_invalid_dataset_names_say_why(name: str, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        validate_dataset_name(name)


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [
        ("s3://bucket/prefix/", "bucket", "prefix/"),
        ("s3://bucket/prefix", "bucket", "prefix/"),
        ("s3://my.bucket-1/a/b/c/", "my.bucket-1", "a/b/c/"),
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
    ],
)
def test_parse_source(uri: str, bucket: str, prefix: str) -> None:
    source = parse_source(uri)
    assert isinstance(source, S3Source)
    assert (source.bucket, source.prefix) == (bucket, prefix)
    assert parse_source(source.uri) == source


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "empty"),
        ("http://bucket/x", "scheme"),
        ("file://host/x", "no host"),
        ("file://relative", "no host"),
        ("file:///a/../b", "'..'"),
        ("nfs://server", "export"),
        ("nfs://bad_host!/x", "not a valid NFS server"),
        ("nfs://server:99999/x", "port"),
        ("s3://bucket:9000/x", "no port"),
        ("bucket/prefix", "scheme"),
        ("s3://Bucket/x", "not a valid S3 bucket"),
        ("s3://b/x", "not a valid S3 bucket"),
        ("s3://bucket/../etc/", "'..'"),
        ("s3://bucket/a//b/", "empty"),
        ("s3://bucket/x?versionId=1", "query"),
        ("s3://user@bucket/x", "bucket"),
        ("s3://bucket/a\nb", "control"),
        ("s3://bucket/" + "p" * 1100, "longer than"),
    ],
)
def test_invalid_sources_say_why(uri: str, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        parse_source(uri)


@pytest.mark.parametrize("replicas", [0, -1, 10_001])
def test_replica_bounds(replicas: int) -> None:
    with pytest.raises(InvalidInput, match="replicas"):
        validate_replicas(replicas)


def test_parse_file_and_nfs_sources() -> None:
    assert parse_source("file:///mnt/data") == FileSource("/mnt/data/")
    assert parse_source("file:///") == FileSource("/")
    nfs = parse_source("nfs://filer.local:2049/export/sets/imagenet")
    assert nfs == NfsSource("filer.local", 2049, "/export/sets/imagenet/")
    assert parse_source(nfs.uri) == nfs
    assert parse_source("nfs://10.0.0.5/export/") == NfsSource("10.0.0.5", None, "/export/")


@pytest.mark.parametrize("name", ["", "a/b", "Node1", "x" * 254, "-a"])
def test_invalid_node_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="node name"):
        validate_node_name(name)
