"""What the reconciler sends agents when a dataset's credentials Secret can be read, cannot
be read for a while, or refuses the dataset."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.cluster import CredentialsDenied, CredentialsError, S3Credentials
from coordinator.desired_sets import DesiredStateHub
from coordinator.labelers import LocalNodeLabeler
from coordinator.model import AgentRecord, DatasetSpec
from coordinator.reconciler import Reconciler
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store

GIB = 1 << 30
DATASET = "ml-team/imagenet"
KEYS = S3Credentials("AKIA1", "s3cr3t")


class ScriptedSecrets:
    """A `CredentialsProvider` whose next answer the test sets."""

    def __init__(self) -> None:
        self.answer: S3Credentials | CredentialsError = KEYS
        self.asked: list[tuple[str, str]] = []

    async def get(self, secret_name: str, dataset: str) -> S3Credentials:
        self.asked.append((secret_name, dataset))
        if isinstance(self.answer, CredentialsError):
            raise self.answer
        return self.answer


class Clock:
    now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "coordinator.db")
    yield s
    s.close()


def test_a_refusal_withdraws_the_credentials_a_failed_read_keeps(store: Store) -> None:
    secrets = ScriptedSecrets()
    hub = DesiredStateHub()
    clock = Clock()
    reconciler = Reconciler(
        store,
        LocalNodeLabeler(store),
        hub,
        CoordinatorSettings(db_path=Path("unused")),
        clock,
        credentials=secrets,
        lease_clock=clock,
    )
    store.upsert_agent(AgentRecord("node-0", "cache", clock(), GIB, GIB))
    reconciler.seen("node-0")
    store.create_dataset(
        DATASET, DatasetSpec(source="s3://bucket/imagenet/", replicas=1, credentials_secret="s3")
    )

    def sent() -> dict[str, S3Credentials | None]:
        return {d.name: d.credentials for d in hub.snapshot("node-0")[1]}

    async def scenario() -> None:
        try:
            await reconciler.reconcile_once()
            assert secrets.asked[-1] == ("s3", DATASET)
            assert sent() == {DATASET: KEYS}
            assert reconciler.problem(DATASET) == ""

            secrets.answer = CredentialsError("reading Secret datacache/s3 failed")
            clock.now += 1
            await reconciler.reconcile_once()
            assert sent() == {DATASET: KEYS}
            assert "reading Secret datacache/s3 failed" in reconciler.problem(DATASET)

            secrets.answer = CredentialsDenied("Secret datacache/s3 is not for datasets of ...")
            clock.now += 1
            await reconciler.reconcile_once()
            assert sent() == {}
            assert "is not for datasets of" in reconciler.problem(DATASET)

            # Once refused, a failed read has nothing to fall back on.
            secrets.answer = CredentialsError("reading Secret datacache/s3 failed")
            clock.now += 1
            await reconciler.reconcile_once()
            assert sent() == {}

            secrets.answer = KEYS
            clock.now += 1
            await reconciler.reconcile_once()
            assert sent() == {DATASET: KEYS}
            assert reconciler.problem(DATASET) == ""
        finally:
            await reconciler.close()

    asyncio.run(scenario())
