"""Credentials from Secrets in a real API server, read with the coordinator's own
ServiceAccount token (RBAC: get on secrets in its namespace `datacache`): keys, clear errors,
a short cache, and which datasets may use a Secret."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.cluster import CredentialsDenied, CredentialsError, S3Credentials
from coordinator.k8s_labeler import core_api
from coordinator.k8s_secrets import (
    NAMESPACES_ANNOTATION,
    KubernetesCredentialsProvider,
    SecretSettings,
)
from tests.kubecontrolplane import KubeAPIError, KubeTest, free_port

NS = "datacache"
OWN = "datacache/d"  # a dataset of the coordinator's own namespace
COORDINATOR_SA = ("datacache", "datacache-coordinator")
Provider = Callable[..., KubernetesCredentialsProvider]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider() -> Iterator[Callable[..., KubernetesCredentialsProvider]]:
    """Providers reading with a kubeconfig's identity; their clients are closed after the test
    (pooled connections would otherwise outlive it, to be garbage collected unclosed)."""
    made: list[Any] = []

    def make(kubeconfig: Path, clock: Clock | None = None) -> KubernetesCredentialsProvider:
        api = core_api(str(kubeconfig))
        made.append(api)
        settings = SecretSettings(namespace=NS, cache_seconds=30)
        return KubernetesCredentialsProvider(api, settings, clock or Clock())

    yield make
    for api in made:
        api.api_client.close()


def coordinator(kube: KubeTest) -> Path:
    """The coordinator's identity, straight to the API server."""
    return kube.token_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")


def proxied_coordinator(kube: KubeTest) -> Path:
    """The coordinator's identity through the fault proxy, which records each request."""
    return kube.proxied_kubeconfig(kube.token(*COORDINATOR_SA), "coordinator")


def put_secret(
    kube: KubeTest,
    name: str,
    string_data: dict[str, str],
    ns: str = NS,
    annotations: dict[str, str] | None = None,
) -> None:
    metadata: dict[str, object] = {"name": name}
    if annotations is not None:
        metadata["annotations"] = annotations
    kube.plane.create(
        f"/api/v1/namespaces/{ns}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "stringData": string_data},
    )


def test_reads_the_keys(kube: KubeTest, provider: Provider) -> None:
    put_secret(
        kube,
        "s3-team",
        {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t"},
    )
    put_secret(kube, "s3-plain", {"AWS_ACCESS_KEY_ID": "AKIA2", "AWS_SECRET_ACCESS_KEY": "x\n"})
    creds = provider(coordinator(kube))
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
    kube: KubeTest, provider: Provider, setup: dict[str, str] | None, name: str, words: str
) -> None:
    if setup is not None:
        put_secret(kube, name, setup)
    proxy = kube.proxy
    with pytest.raises(CredentialsError, match=words):
        asyncio.run(provider(proxied_coordinator(kube)).get(name, OWN))
    if "valid Secret name" in words:
        # Refused before any request: a name like ../x never reaches a URL.
        assert proxy.requests == []


def test_secret_in_another_namespace_is_not_read(kube: KubeTest, provider: Provider) -> None:
    kube.plane.ensure_namespace("ml")
    put_secret(kube, "elsewhere", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}, "ml")
    with pytest.raises(CredentialsError, match="datacache/elsewhere does not exist"):
        asyncio.run(provider(coordinator(kube)).get("elsewhere", OWN))


def test_forbidden_names_the_rbac_fix_and_hides_values(kube: KubeTest, provider: Provider) -> None:
    put_secret(kube, "s3", {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t"})
    # An identity without the coordinator's Role, as a coordinator whose RoleBinding is missing.
    token = kube.roleless_token("secrets-test", "nobody")
    with pytest.raises(KubeAPIError) as refused:
        kube.plane.request("GET", f"/api/v1/namespaces/{NS}/secrets/s3", token=token)
    assert refused.value.status == 403
    creds = provider(kube.token_kubeconfig(token, "nobody"))
    with pytest.raises(CredentialsError, match="needs get on secrets") as caught:
        asyncio.run(creds.get("s3", OWN))
    assert "(403)" in str(caught.value)
    assert "s3cr3t" not in str(caught.value) and "AKIA1" not in str(caught.value)
    assert caught.value.__cause__ is None


def test_non_utf8_value(kube: KubeTest, provider: Provider) -> None:
    bad = base64.b64encode(b"\xff\xfe").decode()
    kube.plane.create(
        f"/api/v1/namespaces/{NS}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bin"},
            "data": {"AWS_ACCESS_KEY_ID": bad, "AWS_SECRET_ACCESS_KEY": bad},
        },
    )
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID is not valid base64 UTF-8"):
        asyncio.run(provider(coordinator(kube)).get("bin", OWN))


def test_short_cache_then_rotation_is_seen(kube: KubeTest, provider: Provider) -> None:
    put_secret(kube, "s3", {"AWS_ACCESS_KEY_ID": "old", "AWS_SECRET_ACCESS_KEY": "old"})
    clock = Clock()
    creds = provider(proxied_coordinator(kube), clock)
    assert asyncio.run(creds.get("s3", OWN)).access_key_id == "old"
    kube.plane.delete(f"/api/v1/namespaces/{NS}/secrets/s3", missing_ok=False)
    put_secret(kube, "s3", {"AWS_ACCESS_KEY_ID": "new", "AWS_SECRET_ACCESS_KEY": "new"})
    before = len(kube.proxy.requests)
    clock.now = 29
    assert asyncio.run(creds.get("s3", OWN)).access_key_id == "old"
    assert kube.proxy.requests[before:] == []
    clock.now = 31
    assert asyncio.run(creds.get("s3", OWN)).access_key_id == "new"
    assert [r.method for r in kube.proxy.requests[before:]] == ["GET"]


def test_unreachable_api_server(kube: KubeTest, provider: Provider) -> None:
    # Nothing listens on a free port: the connection is refused, as with an API server down.
    unreachable = kube.plane.write_token_kubeconfig(
        kube.tmp_path / "unreachable.kubeconfig",
        kube.token(*COORDINATOR_SA),
        server=f"https://127.0.0.1:{free_port()}",
    )
    with pytest.raises(CredentialsError, match="may be unreachable"):
        asyncio.run(provider(unreachable).get("s3", OWN))


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
    kube: KubeTest, provider: Provider, annotation: str | None, dataset: str, allowed: bool
) -> None:
    annotations = None if annotation is None else {NAMESPACES_ANNOTATION: annotation}
    put_secret(kube, "s3-team", KEYS, annotations=annotations)
    creds = provider(proxied_coordinator(kube))
    if allowed:
        assert asyncio.run(creds.get("s3-team", dataset)).access_key_id == "AKIA1"
        return
    namespace = dataset.partition("/")[0]
    with pytest.raises(CredentialsDenied, match=f"not for datasets of namespace '{namespace}'"):
        asyncio.run(creds.get("s3-team", dataset))
    # The answer is the same from the cache, after an allowed read filled it.
    assert asyncio.run(creds.get("s3-team", OWN)).access_key_id == "AKIA1"
    before = len(kube.proxy.requests)
    with pytest.raises(CredentialsDenied, match=f"annotate secret s3-team {NAMESPACES_ANNOTATION}"):
        asyncio.run(creds.get("s3-team", dataset))
    assert kube.proxy.requests[before:] == []


def test_a_denied_dataset_learns_nothing_of_the_keys(kube: KubeTest, provider: Provider) -> None:
    put_secret(kube, "half", {"AWS_ACCESS_KEY_ID": "AKIA1"})
    with pytest.raises(CredentialsDenied) as caught:
        asyncio.run(provider(coordinator(kube)).get("half", "ml-team/d"))
    assert "AWS_SECRET_ACCESS_KEY" not in str(caught.value)


def test_a_withdrawn_namespace_is_denied_once_the_cache_expires(
    kube: KubeTest, provider: Provider
) -> None:
    put_secret(kube, "s3", KEYS, annotations={NAMESPACES_ANNOTATION: "ml-team"})
    clock = Clock()
    creds = provider(coordinator(kube), clock)
    assert asyncio.run(creds.get("s3", "ml-team/d")).access_key_id == "AKIA1"
    kube.plane.patch(
        f"/api/v1/namespaces/{NS}/secrets/s3",
        {"metadata": {"annotations": {NAMESPACES_ANNOTATION: "vision"}}},
    )
    clock.now = 31
    with pytest.raises(CredentialsDenied):
        asyncio.run(creds.get("s3", "ml-team/d"))
    assert asyncio.run(creds.get("s3", "vision/d")).access_key_id == "AKIA1"
