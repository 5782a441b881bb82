"""Credentials from Secrets in the fake API server: keys, clear errors, a short cache."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from coordinator.cluster import CredentialsError, S3Credentials
from coordinator.k8s_labeler import core_api
from coordinator.k8s_secrets import KubernetesCredentialsProvider, SecretSettings
from tests.fakekube import FakeKubeAPI

NS = "datacache"


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


def put_secret(fake: FakeKubeAPI, name: str, string_data: dict[str, str], ns: str = NS) -> None:
    fake.create_object("secrets", {"metadata": {"name": name}, "stringData": string_data}, ns)


def test_reads_the_keys(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    put_secret(
        fake,
        "s3-team",
        {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t"},
    )
    put_secret(fake, "s3-plain", {"AWS_ACCESS_KEY_ID": "AKIA2", "AWS_SECRET_ACCESS_KEY": "x\n"})
    creds = provider(kube)
    assert asyncio.run(creds.get("s3-team")) == S3Credentials("AKIA1", "s3cr3t", "t")
    assert asyncio.run(creds.get("s3-plain")) == S3Credentials("AKIA2", "x", "")
    assert "s3cr3t" not in repr(asyncio.run(creds.get("s3-team")))


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
        asyncio.run(provider(kube).get(name))


def test_secret_in_another_namespace_is_not_read(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    put_secret(fake, "elsewhere", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}, "ml")
    with pytest.raises(CredentialsError, match="datacache/elsewhere does not exist"):
        asyncio.run(provider(kube).get("elsewhere"))


def test_forbidden_names_the_rbac_fix_and_hides_values(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    fake.fail_next(1, 403)
    with pytest.raises(CredentialsError, match="needs get on secrets") as caught:
        asyncio.run(provider(kube).get("s3"))
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
        asyncio.run(provider(kube).get("bin"))


def test_short_cache_then_rotation_is_seen(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    put_secret(fake, "s3", {"AWS_ACCESS_KEY_ID": "old", "AWS_SECRET_ACCESS_KEY": "old"})
    clock = Clock()
    creds = provider(kube, clock)
    assert asyncio.run(creds.get("s3")).access_key_id == "old"
    fake.delete_object("secrets", "s3", NS)
    put_secret(fake, "s3", {"AWS_ACCESS_KEY_ID": "new", "AWS_SECRET_ACCESS_KEY": "new"})
    fake.clear_requests()
    clock.now = 29
    assert asyncio.run(creds.get("s3")).access_key_id == "old"
    assert fake.requests == []
    clock.now = 31
    assert asyncio.run(creds.get("s3")).access_key_id == "new"


def test_unreachable_api_server(kube: tuple[FakeKubeAPI, Path]) -> None:
    fake, _ = kube
    creds = provider(kube)
    fake.stop()
    with pytest.raises(CredentialsError, match="may be unreachable"):
        asyncio.run(creds.get("s3"))
