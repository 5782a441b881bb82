"""The gRPC edge for users and controllers: DatasetService and NodeService validate requests,
call the store and reconciler, and map errors to status codes (`coordinator.grpc_edge`).
AgentService lives in `coordinator.agent_service`."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf.struct_pb2 import Struct

from coordinator.agent_service import AgentService
from coordinator.errors import CoordinatorError, InvalidArgument
from coordinator.grpc_edge import OutOfRange, grpc_errors, status_of
from coordinator.labelers import NodeLabeler
from coordinator.labels import READY_VALUE, label_key
from coordinator.model import Change
from coordinator.placement import ZONE_LABEL
from coordinator.reconciler import Reconciler
from coordinator.settings import CoordinatorSettings
from coordinator.spec import spec_from_create, spec_from_update
from coordinator.store import Store
from coordinator.views import timestamp
from coordinator.watch import EVENT_TYPES, ChangeFeed, Overflowed
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from datacache.validation import InvalidInput, split_dataset_name, validate_dataset_name

__all__ = ["AgentService", "DatasetService", "NodeService"]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_BOOKMARK = pb.WatchDatasetsResponse.EVENT_TYPE_BOOKMARK


def _struct(value: Mapping[str, Any]) -> Struct:
    out = Struct()
    out.update(value)
    return out


def volume_name(dataset: str) -> str:
    """A DNS-1123 label naming the pod volume of a dataset (hashed when too long)."""
    flat = "dataset-" + dataset.replace("/", "-").replace(".", "-")
    if len(flat) <= 63:
        return flat
    digest = hashlib.sha256(dataset.encode()).hexdigest()[:8]
    return f"{flat[:54].rstrip('-')}-{digest}"


def placement_snippets(
    dataset: str, node_cache_dir: str
) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(node_path, affinity, volume, volume_mount) for a pod reading `dataset`."""
    namespace, name = split_dataset_name(dataset)
    node_path = f"{node_cache_dir.rstrip('/')}/datasets/{namespace}/{name}/current"
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": label_key(dataset), "operator": "In", "values": [READY_VALUE]}
                        ]
                    }
                ]
            }
        }
    }
    volume = {
        "name": volume_name(dataset),
        "hostPath": {"path": node_path, "type": "Directory"},
    }
    mount = {
        "name": volume_name(dataset),
        "mountPath": f"/datasets/{namespace}/{name}",
        "readOnly": True,
    }
    return node_path, affinity, volume, mount


class DatasetService(pb_grpc.DatasetServiceServicer):
    def __init__(
        self,
        store: Store,
        reconciler: Reconciler,
        settings: CoordinatorSettings,
        feed: ChangeFeed | None = None,
    ) -> None:
        self._store = store
        self._reconciler = reconciler
        self._settings = settings
        if feed is None:
            feed = ChangeFeed(reconciler.render_name, settings.watch_queue_size)
            store.listeners.append(feed.publish)
        self._feed = feed

    def _to_pb(self, name: str) -> pb.Dataset:
        return self._reconciler.render(self._store.get_dataset(name))

    @grpc_errors
    async def CreateDataset(
        self, request: pb.CreateDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateDatasetResponse:
        name = validate_dataset_name(request.dataset.name)
        spec = spec_from_create(request.dataset)
        record = self._store.create_dataset(name, spec)
        log.info("Dataset created from %s", spec.source, extra={"dataset": name})
        self._reconciler.trigger()
        return pb.CreateDatasetResponse(dataset=self._reconciler.render(record))

    @grpc_errors
    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetDatasetResponse:
        return pb.GetDatasetResponse(dataset=self._to_pb(validate_dataset_name(request.name)))

    @grpc_errors
    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListDatasetsResponse:
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {request.page_size}")
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size {request.page_size} is above the maximum {MAX_PAGE_SIZE}"
            )
        size = request.page_size or DEFAULT_PAGE_SIZE
        after = request.page_token
        if after:
            # The token is the last name of the previous page: opaque to clients, but checked.
            try:
                validate_dataset_name(after)
            except InvalidInput as exc:
                raise InvalidArgument(
                    f"page_token is not one this server issued ({exc}); start from an empty one"
                ) from exc
        records = self._store.list_datasets(after=after, limit=size + 1)
        more = len(records) > size
        records = records[:size]
        assignments, live = self._store.assignments(), self._reconciler.live_nodes()
        return pb.ListDatasetsResponse(
            datasets=[
                self._reconciler.render(r, assignments.get(r.name, frozenset()), live)
                for r in records
            ],
            next_page_token=records[-1].name if more else "",
        )

    @grpc_errors
    async def UpdateDataset(
        self, request: pb.UpdateDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdateDatasetResponse:
        name = validate_dataset_name(request.dataset.name)
        record = self._store.get_dataset(name)
        spec, new_revision = spec_from_update(record, request.dataset, request.update_mask.paths)
        record = self._store.update_dataset(name, spec, new_revision)
        log.info(
            "Dataset updated: %s%s",
            sorted(request.update_mask.paths),
            f"; revision {record.revision}" if new_revision else "",
            extra={"dataset": name},
        )
        self._reconciler.trigger()
        return pb.UpdateDatasetResponse(dataset=self._reconciler.render(record))

    @grpc_errors
    async def RefreshDataset(
        self, request: pb.RefreshDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RefreshDatasetResponse:
        name = validate_dataset_name(request.name)
        record = self._store.refresh_dataset(name)
        log.info("Dataset refresh: revision %d", record.revision, extra={"dataset": name})
        self._reconciler.trigger()
        return pb.RefreshDatasetResponse(dataset=self._reconciler.render(record))

    @grpc_errors
    async def GetPlacement(
        self, request: pb.GetPlacementRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetPlacementResponse:
        dataset = self._to_pb(validate_dataset_name(request.name))
        node_path, affinity, volume, mount = placement_snippets(
            dataset.name, self._settings.node_cache_dir
        )
        return pb.GetPlacementResponse(
            ready_nodes=[
                r.node_name for r in dataset.status.replicas if r.state == pb.REPLICA_STATE_READY
            ],
            label_key=label_key(dataset.name),
            label_value=READY_VALUE,
            node_path=node_path,
            affinity=_struct(affinity),
            volume=_struct(volume),
            volume_mount=_struct(mount),
            version=dataset.status.version,
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

    def _resume(self, name: str, resource_version: int) -> list[pb.WatchDatasetsResponse]:
        """The events after `resource_version`, one per dataset (its latest state)."""
        floor, latest = self._store.history_floor(), self._store.resource_version()
        if resource_version < floor:
            raise OutOfRange(
                f"resource_version {resource_version} is older than the history kept (from "
                f"{floor}); watch again from resource_version 0"
            )
        if resource_version > latest:
            raise OutOfRange(
                f"resource_version {resource_version} is newer than any change ({latest}); "
                "watch again from resource_version 0"
            )
        last: dict[str, Change] = {}
        added: set[str] = set()
        for change in self._store.changes_since(resource_version):
            if name and change.dataset != name:
                continue
            last[change.dataset] = change
            if change.kind == "ADDED":
                added.add(change.dataset)
        events = []
        for change in sorted(last.values(), key=lambda c: c.resource_version):
            if change.kind != "DELETED" and change.dataset in added:
                change = Change(change.resource_version, change.dataset, "ADDED")
            event = self._feed.event(change)
            if event is not None:
                events.append(event)
        return events

    async def WatchDatasets(
        self, request: pb.WatchDatasetsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchDatasetsResponse]:
        try:
            name = validate_dataset_name(request.name) if request.name else ""
            if request.resource_version < 0:
                raise InvalidArgument(
                    f"resource_version must not be negative, got {request.resource_version}"
                )
        except (InvalidInput, CoordinatorError) as exc:
            await context.abort(status_of(exc), str(exc))
        # Subscribe before reading the current state, so no change falls in between.
        sub = self._feed.subscribe(name)
        try:
            sent = self._store.resource_version()
            if request.resource_version == 0:
                records = (
                    [r for r in [self._store.find_dataset(name)] if r is not None]
                    if name
                    else self._store.list_datasets()
                )
                initial = [
                    pb.WatchDatasetsResponse(
                        type=EVENT_TYPES["ADDED"],
                        dataset=self._reconciler.render(r),
                        resource_version=r.resource_version,
                    )
                    for r in records
                ]
            else:
                try:
                    initial = self._resume(name, request.resource_version)
                except CoordinatorError as exc:
                    await context.abort(status_of(exc), str(exc))
            for event in initial:
                yield event
            while True:
                try:
                    change = await sub.next(self._settings.heartbeat_seconds)
                except Overflowed:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this watch fell more than {self._settings.watch_queue_size} datasets "
                        f"behind; watch again from resource_version {sent} to resume",
                    )
                if change is None:
                    yield pb.WatchDatasetsResponse(
                        type=_BOOKMARK, resource_version=self._store.resource_version()
                    )
                    continue
                if change.resource_version <= sent:
                    continue  # already in the initial state
                news = self._feed.event(change)
                if news is None:
                    continue
                sent = change.resource_version
                yield news
        finally:
            self._feed.unsubscribe(sub)


class NodeService(pb_grpc.NodeServiceServicer):
    def __init__(self, store: Store, labeler: NodeLabeler, reconciler: Reconciler) -> None:
        self._store = store
        self._labeler = labeler
        self._reconciler = reconciler

    @grpc_errors
    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListNodesResponse:
        labels: Mapping[str, Mapping[str, str]] = await self._labeler.labelled_nodes()
        live = self._reconciler.live_nodes()
        agents = {a.node_name: a for a in self._store.list_agents()}
        facts = self._reconciler.node_facts()
        nodes = []
        for name in sorted(agents.keys() | labels.keys()):
            agent = agents.get(name)
            fact = facts.get(name)
            node_labels = dict(fact.labels) if fact else dict(agent.node_labels if agent else {})
            nodes.append(
                pb.Node(
                    name=name,
                    agent_connected=name in live,
                    last_seen_time=timestamp(agent.last_seen) if agent else None,
                    labels=labels.get(name, {}),
                    cache_capacity_bytes=agent.capacity_bytes if agent else 0,
                    cache_free_bytes=agent.free_bytes if agent else 0,
                    uid=(fact.uid if fact and fact.uid else (agent.node_uid if agent else "")),
                    zone=node_labels.get(ZONE_LABEL, ""),
                    unschedulable=bool(fact and fact.unschedulable),
                )
            )
        return pb.ListNodesResponse(nodes=nodes)
