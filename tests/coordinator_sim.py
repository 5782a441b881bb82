"""Helpers for coordinator tests: a real coordinator process on a loopback port, and simulated
agents that speak the agent API over real gRPC (register, watch, report, publish)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from datacache.localcluster import LocalCluster, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from datacache.versions import manifest_digest

GIB = 1 << 30


@contextlib.contextmanager
def coordinator(workdir: Path, *flags: str) -> Iterator[LocalCluster]:
    """A coordinator process (no S3, no agent processes), stopped on exit."""
    with LocalCluster(workdir) as cluster:
        cluster.start_coordinator("--reconcile-interval-seconds=0.2", *flags)
        yield cluster


def entries(count: int, prefix: str = "f") -> list[pb.ManifestEntry]:
    return [
        pb.ManifestEntry(path=f"{prefix}-{i:05d}", size=i + 1, etag=f"e{i}", crc64nvme=f"{i:016x}")
        for i in range(count)
    ]


def version_of(items: Sequence[pb.ManifestEntry]) -> str:
    return manifest_digest(items)


class SimAgent:
    """One node's agent, driven by the test."""

    def __init__(
        self,
        channel: grpc.Channel,
        node: str,
        cache_id: str = "cache-1",
        uid: str = "",
        labels: dict[str, str] | None = None,
        capacity: int = 100 * GIB,
        free: int = 100 * GIB,
    ) -> None:
        self.stub = pb_grpc.AgentServiceStub(channel)
        self.node = node
        self.identity = pb.AgentIdentity(node_name=node, cache_id=cache_id, node_uid=uid)
        self.labels = labels or {}
        self.capacity = capacity
        self.free = free

    def register(self) -> pb.RegisterAgentResponse:
        response: pb.RegisterAgentResponse = self.stub.RegisterAgent(
            pb.RegisterAgentRequest(
                agent=self.identity,
                cache_capacity_bytes=self.capacity,
                cache_free_bytes=self.free,
                node_labels=self.labels,
                agent_version="sim",
            ),
            timeout=10,
        )
        return response

    def report(self, *replicas: pb.ReplicaReport, pressure: int = 0) -> None:
        self.stub.ReportState(
            pb.ReportStateRequest(
                agent=self.identity,
                replicas=replicas,
                cache_capacity_bytes=self.capacity,
                cache_free_bytes=self.free,
                pressure_bytes=pressure,
            ),
            timeout=10,
        )

    def desired(self) -> pb.WatchDesiredStateResponse:
        """The node's current desired set (the first message of a fresh stream)."""
        call = self.stub.WatchDesiredState(
            pb.WatchDesiredStateRequest(agent=self.identity), timeout=10
        )
        try:
            first: pb.WatchDesiredStateResponse = next(iter(call))
            return first
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs

    def desired_names(self) -> set[str]:
        return {d.name for d in self.desired().datasets}

    def wait_desired(
        self, condition: Callable[[pb.WatchDesiredStateResponse], bool], what: str
    ) -> pb.WatchDesiredStateResponse:
        found: list[pb.WatchDesiredStateResponse] = []

        def check() -> bool:
            message = self.desired()
            found[:] = [message]
            return condition(message)

        wait_until(check, 20, f"{self.node}: {what}")
        return found[0]

    def publish(
        self, dataset: str, revision: int, items: Sequence[pb.ManifestEntry], version: str = ""
    ) -> str:
        version = version or version_of(items)

        def messages() -> Iterator[pb.PublishVersionRequest]:
            yield pb.PublishVersionRequest(
                agent=self.identity,
                dataset_name=dataset,
                revision=revision,
                version=version,
                entries=items[:1000],
            )
            for start in range(1000, len(items), 1000):
                yield pb.PublishVersionRequest(entries=items[start : start + 1000])

        response: pb.PublishVersionResponse = self.stub.PublishVersion(messages(), timeout=30)
        return response.version


def ready(dataset: str, digest: str = "sha256:" + "a" * 64, **fields: object) -> pb.ReplicaReport:
    values: dict[str, object] = {
        "dataset_name": dataset,
        "state": pb.REPLICA_STATE_READY,
        "digest": digest,
        "files_done": 3,
        "files_total": 3,
        "bytes_done": 300,
        "bytes_total": 300,
        "disk_bytes": 300,
    }
    values.update(fields)
    return pb.ReplicaReport(**values)  # type: ignore[arg-type]


def datasets_stub(cluster: LocalCluster) -> tuple[grpc.Channel, pb_grpc.DatasetServiceStub]:
    channel = grpc.insecure_channel(cluster.coordinator_address)
    return channel, pb_grpc.DatasetServiceStub(channel)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    raise AssertionError("the call succeeded")


def details_of(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.details() or ""
    raise AssertionError("the call succeeded")
