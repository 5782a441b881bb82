"""Credentials from Secrets in the fake API server: keys, clear errors, a short cache."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from coordinator.cluster import CredentialsDenied, CredentialsError, S3Credentials
from coordinator.k8s_labeler import core_api
from coordinator.k8s_secrets import (
    NAMESPACES_ANNOTATION,
    KubernetesCredentialsProvider,
    SecretSettings,
)
from tests.fakekube import FakeKubeAPI

NS = "datacache"
OWN = "datacache/d"  # a dataset of the coordinator's own namespace


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def provider(
    kube: tuple[FakeKubeAPI, Path], clock: Clock | None = None
) -> KubernetesCredentialsProvider:
    return KubernetesCredentialsProvider(
        core_api(str(kube[1])), SecretSettings(namespace=NS, cache_seconds=30), clock or Clock()
    )


def put_secret(
    fake: FakeKubeAPI,
    name: str,
    string_data: dict[str, str],
    ns: str = NS,
    annotations: dict[str, str] | None = None,
) -> None:
    metadata: dict[str, object] = {"name": name}
    if annotations is not None:
        metadata["annotations"] = annotations
    fake.create_object("secrets", {"metadata": metadata, "stringData": string_data}, ns)


def test_reads_the_keys(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    put_secret(
        fake,
        "s3-team",
        {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t"},
    )
    put_secret(fake, "s3-plain", {"AWS_ACCESS_KEY_ID": "AKIA2", "AWS_SECRET_ACCESS_KEY": "x\n"})
    creds = provider(kube)
    assert asyncio.run(creds.get("s3-team", OWN)) == S3Credentials("AKIA1", "s3cr3t", "t")
    assert asyncio.run(creds.get("s3-plain", OWN)) == S3Credentials("AKIA2", "x", "")
    assert "s3cr3t" not in repr(asyncio.run(creds.get("s3-team", OWN)))


@pytest.mark.parametrize(
    ("setup", "name", "words"),
    [
        (None, "absent", "does not exist: create it in the coordinator's namespace"),
        ({"AWS_ACCESS_KEY_ID": "a"}, "half", "has no key AWS_SECRET_ACCESS_KEY"),
        ({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": ""}, "blank", "is empty"),
        (None, "Bad_Name", "is not a valid Secret name"),
        (None, "../x", "is not a valid Secret name"),
    ],
)
def test_clear_errors(
    kube: tuple[FakeKubeAPI, Path], setup: dict[str, str] | None, name: str, words: str
) -> None:
    fake, _ = kube
    if setup is not None:
        put_secret(fake, name, setup)
    with pytest.raises(CredentialsError, match=words):
        asyncio.run(provider(kube).get(name, OWN))


def test_secret_in_another_namespace_is_not_read(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    put_secret(fake, "elsewhere", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}, "ml")
    with pytest.raises(CredentialsError, match="datacache/elsewhere does not exist"):
        asyncio.run(provider(kube).get("elsewhere", OWN))


def test_forbidden_names_the_rbac_fix_and_hides_values(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    fake.fail_next(1, 403)
    with pytest.raises(CredentialsError, match="needs get on secrets") as caught:
        asyncio.run(provider(kube).get("s3", OWN))
    assert caught.value.__cause__ is None


def test_non_utf8_value(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    bad = base64.b64encode(b"\xff\xfe").decode()
    fake.create_object(
        "secrets",
        {
            "metadata": {"name": "bin"},
            "data": {"AWS_ACCESS_KEY_ID": bad, "AWS_SECRET_ACCESS_KEY": bad},
        },
        NS,
    )
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID is not valid base64 UTF-8"):
        asyncio.run(provider(kube).get("bin", OWN))


def test_short_cache_then_rotation_is_seen(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    put_secret(fake, "s3", {"AWS_ACCESS_KEY_ID": "old", "AWS_SECRET_ACCESS_KEY": "old"})
    clock = Clock()
    creds = provider(kube, clock)
    assert asyncio.run(creds.get("s3", OWN)).access_key_id == "old"
    fake.delete_object("secrets", "s3", NS)
    put_secret(fake, "s3", {"AWS_ACCESS_KEY_ID": "new", "AWS_SECRET_ACCESS_KEY": "new"})
    fake.clear_requests()
    clock.now = 29
    assert asyncio.run(creds.get("s3", OWN)).access_key_id == "old"
    assert fake.requests == []
    clock.now = 31
    assert asyncio.run(creds.get("s3", OWN)).access_key_id == "new"


def test_unreachable_api_server(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    creds = provider(kube)
    fake.stop()
    with pytest.raises(CredentialsError, match="may be unreachable"):
        asyncio.run(creds.get("s3", OWN))


KEYS = {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}


@pytest.mark.parametrize(
    ("annotation", "dataset", "allowed"),
    [
        (None, "datacache/d", True),
        (None, "ml-team/d", False),
        ("ml-team", "ml-team/d", True),
        ("vision, ml-team ,", "ml-team/d", True),
        ("vision", "ml-team/d", False),
        ("ml", "ml-team/d", False),
        ("*", "ml-team/d", True),
        ("", "ml-team/d", False),
    ],
)
def test_a_secret_names_the_namespaces_whose_datasets_may_use_it(
    kube: tuple[FakeKubeAPI, Path], annotation: str | None, dataset: str, allowed: bool
) -> None:
    fake, _ = kube
    annotations = None if annotation is None else {NAMESPACES_ANNOTATION: annotation}
    put_secret(fake, "s3-team", KEYS, annotations=annotations)
    creds = provider(kube)
    if allowed:
        assert asyncio.run(creds.get("s3-team", dataset)).access_key_id == "AKIA1"
        return
    namespace = dataset.partition("/")[0]
    with pytest.raises(CredentialsDenied, match=f"not for datasets of namespace '{namespace}'"):
        asyncio.run(creds.get("s3-team", dataset))
    # The answer is the same from the cache, after an allowed read filled it.
    assert asyncio.run(creds.get("s3-team", OWN)).access_key_id == "AKIA1"
    fake.clear_requests()
    with pytest.raises(CredentialsDenied, match=f"annotate secret s3-team {NAMESPACES_ANNOTATION}"):
        asyncio.run(creds.get("s3-team", dataset))
    assert fake.requests == []


def test_a_denied_dataset_learns_nothing_of_the_keys(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    put_secret(fake, "half", {"AWS_ACCESS_KEY_ID": "AKIA1"})
    with pytest.raises(CredentialsDenied) as caught:
        asyncio.run(provider(kube).get("half", "ml-team/d"))
    assert "AWS_SECRET_ACCESS_KEY" not in str(caught.value)


def test_a_withdrawn_namespace_is_denied_once_the_cache_expires(
    kube: tuple[FakeKubeAPI, Path],
) -> None:
    fake, _ = kube
    put_secret(fake, "s3", KEYS, annotations={NAMESPACES_ANNOTATION: "ml-team"})
    clock = Clock()
    creds = provider(kube, clock)
    assert asyncio.run(creds.get("s3", "ml-team/d")).access_key_id == "AKIA1"
    fake.delete_object("secrets", "s3", NS)
    put_secret(fake, "s3", KEYS, annotations={NAMESPACES_ANNOTATION: "vision"})
    clock.now = 31
    with pytest.raises(CredentialsDenied):
        asyncio.run(creds.get("s3", "ml-team/d"))
    assert asyncio.run(creds.get("s3", "vision/d")).access_key_id == "AKIA1"
