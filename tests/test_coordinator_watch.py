"""WatchDatasets over real gRPC: the initial snapshot, changes as they happen, resume after a
reconnect, OUT_OF_RANGE past the kept history, bookmarks, and a slow client cut off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.coordinator_sim import SimAgent, coordinator, datasets_stub, ready

SOURCE = "s3://bucket/data/"
Event = pb.WatchDatasetsResponse
ADDED, MODIFIED, DELETED, BOOKMARK = (
    Event.EVENT_TYPE_ADDED,
    Event.EVENT_TYPE_MODIFIED,
    Event.EVENT_TYPE_DELETED,
    Event.EVENT_TYPE_BOOKMARK,
)


def create(stub: pb_grpc.DatasetServiceStub, name: str, replicas: int = 1) -> pb.Dataset:
    response = stub.CreateDataset(
        pb.CreateDatasetRequest(dataset=pb.Dataset(name=name, source=SOURCE, replicas=replicas)),
        timeout=10,
    )
    dataset: pb.Dataset = response.dataset
    return dataset


def scale(stub: pb_grpc.DatasetServiceStub, name: str, replicas: int) -> pb.Dataset:
    response = stub.UpdateDataset(
        pb.UpdateDatasetRequest(
            dataset=pb.Dataset(name=name, replicas=replicas),
            update_mask=FieldMask(paths=["replicas"]),
        ),
        timeout=10,
    )
    dataset: pb.Dataset = response.dataset
    return dataset


def watch(
    stub: pb_grpc.DatasetServiceStub, request: pb.WatchDatasetsRequest, timeout: float
) -> Any:
    """A WatchDatasets call: iterate it, cancel() it when done (untyped in grpc-stubs)."""
    return stub.WatchDatasets(request, timeout=timeout)


def until(stream: Iterator[Event], wanted: int, skip_bookmarks: bool = True) -> Event:
    """The next event of type `wanted` (bounded by the stream's deadline)."""
    for event in stream:
        if event.type == BOOKMARK and skip_bookmarks and wanted != BOOKMARK:
            continue
        if event.type == wanted:
            return event
        raise AssertionError(f"expected event type {wanted}, got {event}")
    raise AssertionError("the stream ended")


def test_snapshot_changes_and_resume(tmp_path: Path) -> None:
    with coordinator(tmp_path, "--lease-seconds=3") as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            create(stub, "a")
            create(stub, "b")
            stream = watch(stub, pb.WatchDatasetsRequest(), 30)
            first = [next(stream), next(stream)]
            assert [(e.type, e.dataset.name) for e in first] == [
                (ADDED, "default/a"),
                (ADDED, "default/b"),
            ]
            scaled = scale(stub, "a", 3)
            # Status changes (phases computed by the first passes) may come first.
            event = until(stream, MODIFIED)
            while not (event.dataset.name == "default/a" and event.dataset.replicas == 3):
                event = until(stream, MODIFIED)
            assert event.resource_version >= scaled.resource_version
            resume_from = event.resource_version

            # A status change (an agent's Ready copy) is a change too.
            agent = SimAgent(channel, "node-1")
            agent.register()
            agent.wait_desired(lambda m: len(m.datasets) == 2, "both datasets desired")
            agent.report(ready("default/a"))
            while True:
                event = until(stream, MODIFIED)
                if event.dataset.status.ready_replicas == 1:
                    break
            bookmark = until(stream, BOOKMARK)
            assert bookmark.resource_version >= event.resource_version
            stream.cancel()

            # Meanwhile: b is deleted (no node holds it: purged at once) and c is created.
            stub.DeleteDataset(pb.DeleteDatasetRequest(name="b"), timeout=10)
            create(stub, "c")
            resumed = watch(stub, pb.WatchDatasetsRequest(resource_version=resume_from), 30)
            got: dict[str, int] = {}
            for event in resumed:
                if event.type == BOOKMARK:
                    break
                assert event.resource_version > resume_from
                got[event.dataset.name] = event.type
                if {"default/b", "default/c"} <= got.keys() and got["default/b"] == DELETED:
                    break
            assert got["default/b"] == DELETED and got["default/c"] == ADDED
            resumed.cancel()

            # One dataset only.
            single = watch(stub, pb.WatchDatasetsRequest(name="c"), 30)
            assert next(single).dataset.name == "default/c"
            scale(stub, "a", 1)
            scale(stub, "c", 2)
            assert until(single, MODIFIED).dataset.name == "default/c"
            single.cancel()


def test_out_of_range_and_bad_requests(tmp_path: Path) -> None:
    with coordinator(tmp_path, "--watch-history-size=5") as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            create(stub, "a")
            start = create(stub, "b").resource_version
            for replicas in range(2, 150):
                scale(stub, "a", replicas)

            def code(request: pb.WatchDatasetsRequest) -> grpc.StatusCode:
                with pytest.raises(grpc.RpcError) as info:
                    next(watch(stub, request, 10))
                result: grpc.StatusCode = info.value.code()
                return result

            assert (
                code(pb.WatchDatasetsRequest(resource_version=start))
                == grpc.StatusCode.OUT_OF_RANGE
            )
            assert (
                code(pb.WatchDatasetsRequest(resource_version=10**9))
                == grpc.StatusCode.OUT_OF_RANGE
            )
            assert (
                code(pb.WatchDatasetsRequest(resource_version=-1))
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            assert (
                code(pb.WatchDatasetsRequest(name="Bad Name")) == grpc.StatusCode.INVALID_ARGUMENT
            )


def test_slow_client_is_cut_off(tmp_path: Path) -> None:
    with coordinator(tmp_path, "--watch-queue-size=4") as cluster:
        channel, stub = datasets_stub(cluster)
        # No BDP probing: the client's receive window stays small, so a client that stops
        # reading soon stops the server's writes, and changes pile up on the server.
        slow = grpc.insecure_channel(cluster.coordinator_address, [("grpc.http2.bdp_probe", 0)])
        with channel, slow:
            create(stub, "a")
            stream = watch(pb_grpc.DatasetServiceStub(slow), pb.WatchDatasetsRequest(), 60)
            assert next(stream).type == ADDED
            # Big events: 60 long node-selector labels each.
            selector = {f"example.com/{'k' * 40}-{i}": "v" * 60 for i in range(60)}
            for i in range(300):
                stub.CreateDataset(
                    pb.CreateDatasetRequest(
                        dataset=pb.Dataset(
                            name=f"big-{i}", source=SOURCE, replicas=1, node_selector=selector
                        )
                    ),
                    timeout=10,
                )
            received = 0
            with pytest.raises(grpc.RpcError) as info:
                for _ in stream:
                    received += 1
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            assert "resume" in (info.value.details() or "")
            assert received < 300
