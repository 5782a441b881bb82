"""The gRPC edge: validates requests, calls the store and reconciler, maps errors to codes."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from coordinator import metrics
from coordinator.errors import (
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    LabelerError,
    NotFound,
)
from coordinator.labelers import NodeLabeler
from coordinator.labels import READY_VALUE, label_key
from coordinator.model import AgentRecord, DatasetRecord, ReplicaReport, ReplicaState
from coordinator.reconciler import DesiredStateHub, Reconciler
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from datacache.validation import (
    InvalidInput,
    parse_source,
    validate_dataset_name,
    validate_node_name,
    validate_replicas,
)

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_REPORTED_REPLICAS = 10_000
MAX_MESSAGE_CHARS = 2048
MAX_CACHE_ID_CHARS = 128

_STATE_TO_PB = {
    ReplicaState.PENDING: pb.REPLICA_STATE_PENDING,
    ReplicaState.FETCHING: pb.REPLICA_STATE_FETCHING,
    ReplicaState.READY: pb.REPLICA_STATE_READY,
    ReplicaState.FAILED: pb.REPLICA_STATE_FAILED,
    ReplicaState.EVICTING: pb.REPLICA_STATE_EVICTING,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}

_CODES: list[tuple[type[CoordinatorError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (LabelerError, grpc.StatusCode.UNAVAILABLE),
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def _status_of(exc: CoordinatorError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def grpc_errors(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Maps the coordinator's exceptions to gRPC status codes at the edge."""

    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Resp:
        code = grpc.StatusCode.INTERNAL
        try:
            response = await method(self, request, context)
            code = grpc.StatusCode.OK
            return response
        except InvalidInput as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        except CoordinatorError as exc:
            code = _status_of(exc)
            await context.abort(code, str(exc))
        finally:
            metrics.GRPC_REQUESTS.labels(name, code.name).inc()
        raise AssertionError("unreachable: abort() raises")

    return wrapper


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def replica_view(assigned: frozenset[str], reports: list[ReplicaReport]) -> list[pb.Replica]:
    """Per-node replica rows: assigned nodes without a report are Pending; nodes reporting a
    dataset they are no longer assigned are Evicting."""
    by_node = {r.node_name: r for r in reports}
    rows = []
    for node in sorted(assigned | by_node.keys()):
        report = by_node.get(node)
        if report is None:
            rows.append(pb.Replica(node_name=node, state=pb.REPLICA_STATE_PENDING))
            continue
        state = report.state if node in assigned else ReplicaState.EVICTING
        rows.append(
            pb.Replica(
                node_name=node,
                state=_STATE_TO_PB[state],
                digest=report.digest,
                files_done=report.files_done,
                bytes_done=report.bytes_done,
                files_total=report.files_total,
                bytes_total=report.bytes_total,
                message=report.message,
                update_time=_timestamp(report.update_time),
            )
        )
    return rows


class DatasetService(pb_grpc.DatasetServiceServicer):
    def __init__(self, store: Store, reconciler: Reconciler, settings: CoordinatorSettings) -> None:
        self._store = store
        self._reconciler = reconciler
        self._settings = settings

    def _to_pb(
        self,
        record: DatasetRecord,
        assignments: dict[str, frozenset[str]] | None = None,
        live: set[str] | None = None,
    ) -> pb.Dataset:
        """The API view of a dataset. A list passes `assignments` and `live` read once for the
        whole page instead of once per dataset."""
        if assignments is None:
            assignments = self._store.assignments()
        if live is None:
            live = self._reconciler.live_nodes()
        assigned = assignments.get(record.name, frozenset())
        reports = [r for r in self._store.reports(record.name) if r.node_name in live]
        rows = replica_view(assigned, reports)
        return pb.Dataset(
            name=record.name,
            source=record.source,
            replicas=record.replicas,
            create_time=_timestamp(record.create_time),
            status=pb.DatasetStatus(
                ready_replicas=sum(1 for r in rows if r.state == pb.REPLICA_STATE_READY),
                replicas=rows,
            ),
        )

    @grpc_errors
    async def CreateDataset(
        self, request: pb.CreateDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateDatasetResponse:
        spec = request.dataset
        name = validate_dataset_name(spec.name)
        source = parse_source(spec.source)
        replicas = validate_replicas(spec.replicas)
        record = self._store.create_dataset(name, source.uri, replicas)
        log.info("Dataset created from %s", source.uri, extra={"dataset": name})
        self._reconciler.trigger()
        return pb.CreateDatasetResponse(dataset=self._to_pb(record))

    @grpc_errors
    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetDatasetResponse:
        record = self._store.get_dataset(validate_dataset_name(request.name))
        return pb.GetDatasetResponse(dataset=self._to_pb(record))

    @grpc_errors
    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListDatasetsResponse:
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {request.page_size}")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = request.page_token
        if after:
            # The token is the last name of the previous page: opaque to clients, but checked.
            validate_dataset_name(after)
        records = self._store.list_datasets(after=after, limit=size + 1)
        more = len(records) > size
        records = records[:size]
        assignments, live = self._store.assignments(), self._reconciler.live_nodes()
        return pb.ListDatasetsResponse(
            datasets=[self._to_pb(r, assignments, live) for r in records],
            next_page_token=records[-1].name if more else "",
        )

    @grpc_errors
    async def UpdateDataset(
        self, request: pb.UpdateDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdateDatasetResponse:
        name = validate_dataset_name(request.dataset.name)
        paths = set(request.update_mask.paths)
        if paths != {"replicas"}:
            raise InvalidArgument(
                f"update_mask {sorted(paths)} is not supported: give exactly ['replicas']"
            )
        record = self._store.update_replicas(name, validate_replicas(request.dataset.replicas))
        log.info("Dataset scaled to %d replicas", record.replicas, extra={"dataset": name})
        self._reconciler.trigger()
        return pb.UpdateDatasetResponse(dataset=self._to_pb(record))

    @grpc_errors
    async def GetPlacement(
        self, request: pb.GetPlacementRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetPlacementResponse:
        record = self._store.get_dataset(validate_dataset_name(request.name))
        dataset = self._to_pb(record)
        return pb.GetPlacementResponse(
            ready_nodes=[
                r.node_name for r in dataset.status.replicas if r.state == pb.REPLICA_STATE_READY
            ],
            label_key=label_key(record.name),
            label_value=READY_VALUE,
            node_path=f"{self._settings.node_cache_dir.rstrip('/')}/datasets/{record.name}/current",
        )

    @grpc_errors
    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteDatasetResponse:
        name = validate_dataset_name(request.name)
        self._store.mark_deleting(name)
        log.info("Dataset marked for deletion", extra={"dataset": name})
        self._reconciler.trigger()
        return pb.DeleteDatasetResponse()

    async def RefreshDataset(
        self, request: pb.RefreshDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RefreshDatasetResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "RefreshDataset is not available yet")
        raise AssertionError("abort raises")

    async def WatchDatasets(
        self, request: pb.WatchDatasetsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchDatasetsResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "WatchDatasets is not available yet")
        yield pb.WatchDatasetsResponse()


class NodeService(pb_grpc.NodeServiceServicer):
    def __init__(self, store: Store, labeler: NodeLabeler, reconciler: Reconciler) -> None:
        self._store = store
        self._labeler = labeler
        self._reconciler = reconciler

    @grpc_errors
    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListNodesResponse:
        labels: Mapping[str, dict[str, str]] = await self._labeler.labelled_nodes()
        live = self._reconciler.live_nodes()
        agents = {a.node_name: a for a in self._store.list_agents()}
        nodes = []
        for name in sorted(agents.keys() | labels.keys()):
            agent = agents.get(name)
            nodes.append(
                pb.Node(
                    name=name,
                    agent_connected=name in live,
                    last_seen_time=_timestamp(agent.last_seen) if agent else None,
                    labels=labels.get(name, {}),
                    cache_capacity_bytes=agent.capacity_bytes if agent else 0,
                    cache_free_bytes=agent.free_bytes if agent else 0,
                )
            )
        return pb.ListNodesResponse(nodes=nodes)


def _validate_identity(identity: pb.AgentIdentity) -> tuple[str, str]:
    try:
        node = validate_node_name(identity.node_name)
    except InvalidInput as exc:
        raise InvalidArgument(f"agent node_name: {exc}") from exc
    cache_id = identity.cache_id
    if not cache_id or len(cache_id) > MAX_CACHE_ID_CHARS or not cache_id.isascii():
        raise InvalidArgument(
            f"agent cache_id must be 1-{MAX_CACHE_ID_CHARS} ASCII characters, got {cache_id!r}"
        )
    return node, cache_id


def _validate_report(report: pb.ReplicaReport) -> ReplicaReport:
    name = validate_dataset_name(report.dataset_name)
    state = _STATE_FROM_PB.get(report.state)
    if state is None:
        raise InvalidArgument(f"replica report for {name!r} has no valid state")
    counts = (report.files_done, report.bytes_done, report.files_total, report.bytes_total)
    if min(counts) < 0:
        raise InvalidArgument(f"replica report for {name!r} has negative counts")
    return ReplicaReport(
        dataset=name,
        node_name="",
        state=state,
        digest=report.digest[:200],
        files_done=report.files_done,
        bytes_done=report.bytes_done,
        files_total=report.files_total,
        bytes_total=report.bytes_total,
        message=report.message[:MAX_MESSAGE_CHARS],
        update_time=time.time(),
    )


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        store: Store,
        hub: DesiredStateHub,
        reconciler: Reconciler,
        settings: CoordinatorSettings,
    ) -> None:
        self._store = store
        self._hub = hub
        self._reconciler = reconciler
        self._settings = settings

    def _require_registered(self, node: str, cache_id: str) -> AgentRecord:
        agent = self._store.get_agent(node)
        if agent is None or agent.cache_id != cache_id:
            raise FailedPrecondition(
                f"agent for node {node!r} with cache id {cache_id!r} is not registered; "
                "call RegisterAgent first"
            )
        return agent

    @grpc_errors
    async def RegisterAgent(
        self, request: pb.RegisterAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterAgentResponse:
        node, cache_id = _validate_identity(request.agent)
        replaced = self._store.upsert_agent(
            AgentRecord(
                node_name=node,
                cache_id=cache_id,
                last_seen=time.time(),
                capacity_bytes=max(0, request.cache_capacity_bytes),
                free_bytes=max(0, request.cache_free_bytes),
            )
        )
        log.info(
            "Agent registered (cache %s%s)",
            cache_id,
            ", replacing a previous cache" if replaced else "",
            extra={"node": node},
        )
        self._reconciler.trigger()
        return pb.RegisterAgentResponse(lease_seconds=self._settings.lease_seconds)

    async def WatchDesiredState(
        self,
        request: pb.WatchDesiredStateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.WatchDesiredStateResponse]:
        try:
            node, cache_id = _validate_identity(request.agent)
            self._require_registered(node, cache_id)
        except CoordinatorError as exc:
            await context.abort(_status_of(exc), str(exc))
        generation, datasets = self._hub.snapshot(node)
        while True:
            yield pb.WatchDesiredStateResponse(
                generation=generation,
                datasets=[pb.DesiredDataset(name=d.name, source=d.source) for d in datasets],
            )
            generation, datasets = await self._hub.wait_newer(
                node, generation, self._settings.heartbeat_seconds
            )

    @grpc_errors
    async def ReportState(
        self, request: pb.ReportStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportStateResponse:
        node, cache_id = _validate_identity(request.agent)
        if len(request.replicas) > MAX_REPORTED_REPLICAS:
            raise InvalidArgument(
                f"report lists {len(request.replicas)} replicas; at most "
                f"{MAX_REPORTED_REPLICAS} are accepted"
            )
        reports = [_validate_report(r) for r in request.replicas]
        if len({r.dataset for r in reports}) != len(reports):
            raise InvalidArgument("report lists the same dataset more than once")
        agent = self._require_registered(node, cache_id)
        was_live = node in self._reconciler.live_nodes()
        earlier = self._store.reports(node=node)
        previous = {(r.dataset, r.state, r.digest) for r in earlier}
        done_before = {r.dataset: r.bytes_done for r in earlier}
        for report in reports:
            # Progress since the last report; a new copy starting again from zero adds nothing.
            delta = report.bytes_done - done_before.get(report.dataset, 0)
            if delta > 0 and report.state in (ReplicaState.FETCHING, ReplicaState.READY):
                metrics.FETCHED_BYTES.labels(report.dataset).inc(delta)
        self._store.upsert_agent(
            AgentRecord(
                node_name=node,
                cache_id=cache_id,
                last_seen=time.time(),
                capacity_bytes=max(0, request.cache_capacity_bytes) or agent.capacity_bytes,
                free_bytes=max(0, request.cache_free_bytes),
            )
        )
        self._store.replace_reports(node, reports)
        if not was_live or {(r.dataset, r.state, r.digest) for r in reports} != previous:
            self._reconciler.trigger()
        return pb.ReportStateResponse()

    async def PublishVersion(
        self,
        request_iterator: AsyncIterator[pb.PublishVersionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.PublishVersionResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "PublishVersion is not available yet")
        raise AssertionError("abort raises")

    async def GetVersionManifest(
        self, request: pb.GetVersionManifestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetVersionManifestResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "GetVersionManifest is not available yet"
        )
        raise AssertionError("abort raises")
