"""Shared fixtures: one real SeaweedFS S3 server per session, local clusters per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from datacache.localcluster import LocalCluster


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A SeaweedFS server on loopback, shared by the session (it takes seconds to start)."""
    with LocalCluster(tmp_path_factory.mktemp("s3")) as cluster:
        cluster.start_s3()
        yield cluster


@pytest.fixture
def cluster(tmp_path: Path, s3_server: LocalCluster) -> Iterator[LocalCluster]:
    """A fresh local cluster (no coordinator or agents yet) reading from the shared S3."""
    with LocalCluster(tmp_path / "cluster") as local:
        local.s3_endpoint = s3_server.s3_endpoint
        yield local
