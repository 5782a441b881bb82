"""The gRPC edge agents talk to: registration, desired state, reports and versions.

An agent is identified by node name, node UID (from the agent, or from the cluster's Node
object when the agent does not know it) and cache id. A new UID or cache id under a known name
is a new node: what the old one reported and was assigned is dropped (and its labels go on the
next pass); the same identity coming back keeps everything, so nothing valid is fetched again.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from coordinator import metrics
from coordinator.desired_sets import DesiredDataset
from coordinator.errors import CoordinatorError, FailedPrecondition, InvalidArgument
from coordinator.grpc_edge import ResourceExhausted, grpc_errors, status_of
from coordinator.model import AgentRecord, ManifestRow, ReplicaReport, ReplicaState
from coordinator.reconciler import DesiredStateHub, Reconciler
from coordinator.settings import CoordinatorSettings
from coordinator.spec import validate_labels
from coordinator.store import Store
from coordinator.views import STATE_FROM_PB
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from datacache.validation import (
    InvalidInput,
    validate_dataset_name,
    validate_node_name,
    validate_peer_address,
)
from datacache.versions import manifest_digest

log = logging.getLogger(__name__)

MAX_REPORTED_REPLICAS = 10_000
MAX_MESSAGE_CHARS = 2048
MAX_CACHE_ID_CHARS = 128
MAX_UID_CHARS = 128
MAX_MANIFEST_ENTRIES = 1_000_000
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_ENTRIES_PER_MESSAGE = 1000
MAX_PATH_BYTES = 4096
MAX_ETAG_CHARS = 1024
DEFAULT_MANIFEST_PAGE = 1000
MAX_MANIFEST_PAGE = 10_000
MAX_VERIFICATION_METHODS = 16
_VERSION = re.compile(r"sha256:[0-9a-f]{64}")
_CRC64 = re.compile(r"[0-9a-f]{16}")


def _validate_identity(identity: pb.AgentIdentity) -> tuple[str, str, str]:
    try:
        node = validate_node_name(identity.node_name)
    except InvalidInput as exc:
        raise InvalidArgument(f"agent node_name: {exc}") from exc
    cache_id = identity.cache_id
    if not cache_id or len(cache_id) > MAX_CACHE_ID_CHARS or not cache_id.isascii():
        raise InvalidArgument(
            f"agent cache_id must be 1-{MAX_CACHE_ID_CHARS} ASCII characters, got {cache_id!r}"
        )
    uid = identity.node_uid
    if len(uid) > MAX_UID_CHARS or not uid.isascii() or not uid.isprintable():
        raise InvalidArgument(
            f"agent node_uid must be at most {MAX_UID_CHARS} printable ASCII characters"
        )
    return node, cache_id, uid


def _validate_report(report: pb.ReplicaReport) -> ReplicaReport:
    name = validate_dataset_name(report.dataset_name)
    state = STATE_FROM_PB.get(report.state)
    if state is None:
        raise InvalidArgument(f"replica report for {name!r} has no valid state")
    counts = (
        report.files_done,
        report.bytes_done,
        report.files_total,
        report.bytes_total,
        report.revision,
        report.disk_bytes,
    )
    if min(counts) < 0 or report.bytes_per_second < 0:
        raise InvalidArgument(f"replica report for {name!r} has negative counts")
    methods = dict(report.verification.files_by_method)
    if len(methods) > MAX_VERIFICATION_METHODS or any(
        len(k) > 32 or v < 0 for k, v in methods.items()
    ):
        raise InvalidArgument(
            f"replica report for {name!r}: verification must list at most "
            f"{MAX_VERIFICATION_METHODS} methods (names up to 32 characters, counts >= 0)"
        )
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
        revision=report.revision,
        bytes_per_second=report.bytes_per_second,
        verification=methods,
        last_used_time=(
            report.last_used_time.ToNanoseconds() / 1e9 if report.HasField("last_used_time") else 0
        ),
        serving_version=report.serving_version[:200],
        disk_bytes=report.disk_bytes,
    )


def _news(report: ReplicaReport) -> tuple[Any, ...]:
    """What in a report a watcher or the reconciler cares about (not times or throughput)."""
    return (
        report.state,
        report.digest,
        report.revision,
        report.serving_version,
        report.files_done,
        report.bytes_done,
        report.files_total,
        report.bytes_total,
        report.message,
    )


def _placement_news(report: ReplicaReport) -> tuple[Any, ...]:
    return (report.state, report.digest, report.revision, report.serving_version)


def _entry(entry: pb.ManifestEntry, previous: str) -> ManifestRow:
    path = entry.path
    segments = path.split("/")
    if (
        not path
        or len(path.encode()) > MAX_PATH_BYTES
        or "\x00" in path
        or any(s in ("", ".", "..") for s in segments)
    ):
        raise InvalidArgument(
            f"manifest entry path {path[:200]!r} is not a relative path of at most "
            f"{MAX_PATH_BYTES} bytes without empty, '.' or '..' segments"
        )
    if path <= previous:
        raise InvalidArgument(
            f"manifest entries must be in strictly increasing path order: {path[:200]!r} "
            f"comes after {previous[:200]!r}"
        )
    if entry.size < 0 or len(entry.etag) > MAX_ETAG_CHARS:
        raise InvalidArgument(f"manifest entry {path[:200]!r} has a negative size or long ETag")
    if not _CRC64.fullmatch(entry.crc64nvme):
        raise InvalidArgument(
            f"manifest entry {path[:200]!r}: crc64nvme must be 16 lowercase hex digits, got "
            f"{entry.crc64nvme[:40]!r}"
        )
    return ManifestRow(path, entry.size, entry.etag, entry.crc64nvme)


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

    def _require_registered(self, node: str, cache_id: str, uid: str) -> AgentRecord:
        agent = self._store.get_agent(node)
        if (
            agent is None
            or agent.cache_id != cache_id
            or (uid and agent.node_uid and uid != agent.node_uid)
        ):
            raise FailedPrecondition(
                f"agent for node {node!r} with cache id {cache_id!r} is not registered; "
                "call RegisterAgent first"
            )
        return agent

    @grpc_errors
    async def RegisterAgent(
        self, request: pb.RegisterAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterAgentResponse:
        node, cache_id, uid = _validate_identity(request.agent)
        labels = validate_labels(request.node_labels, "node_labels")
        if request.peer_address:
            try:
                validate_peer_address(request.peer_address)
            except InvalidInput as exc:
                raise InvalidArgument(str(exc)) from exc
        uid = uid or self._reconciler.directory_uid(node)
        now = time.time()
        replaced = self._store.upsert_agent(
            AgentRecord(
                node_name=node,
                cache_id=cache_id,
                last_seen=now,
                capacity_bytes=max(0, request.cache_capacity_bytes),
                free_bytes=max(0, request.cache_free_bytes),
                node_uid=uid,
                node_labels=labels,
                agent_version=request.agent_version[:100],
            )
        )
        self._reconciler.seen(node)
        self._reconciler.set_peer_address(node, request.peer_address)
        log.info(
            "Agent registered (cache %s%s%s)",
            cache_id,
            f", node uid {uid}" if uid else "",
            ", replacing the previous node of this name: it starts empty" if replaced else "",
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
            node, cache_id, uid = _validate_identity(request.agent)
            self._require_registered(node, cache_id, uid)
        except CoordinatorError as exc:
            await context.abort(status_of(exc), str(exc))
        generation, datasets = self._hub.snapshot(node)
        while True:
            yield pb.WatchDesiredStateResponse(
                generation=generation, datasets=[_desired(d) for d in datasets]
            )
            generation, datasets = await self._hub.wait_newer(
                node, generation, self._settings.heartbeat_seconds
            )

    @grpc_errors
    async def ReportState(
        self, request: pb.ReportStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportStateResponse:
        node, cache_id, uid = _validate_identity(request.agent)
        if len(request.replicas) > MAX_REPORTED_REPLICAS:
            raise InvalidArgument(
                f"report lists {len(request.replicas)} replicas; at most "
                f"{MAX_REPORTED_REPLICAS} are accepted"
            )
        if request.pressure_bytes < 0:
            raise InvalidArgument(f"pressure_bytes must not be negative: {request.pressure_bytes}")
        reports = [_validate_report(r) for r in request.replicas]
        if len({r.dataset for r in reports}) != len(reports):
            raise InvalidArgument("report lists the same dataset more than once")
        agent = self._require_registered(node, cache_id, uid)
        was_live = self._reconciler.is_live(node)
        earlier = self._store.node_reports(node)  # a snapshot: the write below replaces it
        for report in reports:
            # Progress since the last report; a new copy starting again from zero adds nothing.
            before = earlier.get(report.dataset)
            delta = report.bytes_done - (before.bytes_done if before else 0)
            if delta > 0 and report.state in (ReplicaState.FETCHING, ReplicaState.READY):
                metrics.FETCHED_BYTES.labels(report.dataset).inc(delta)
        now = time.time()
        self._store.record_report(
            node,
            now,
            capacity_bytes=max(0, request.cache_capacity_bytes) or agent.capacity_bytes,
            free_bytes=max(0, request.cache_free_bytes),
            pressure_bytes=request.pressure_bytes,
            reports=reports,
        )
        self._reconciler.seen(node)
        now_by_name = {r.dataset: r for r in reports}
        changed = {
            d
            for d in earlier.keys() | now_by_name.keys()
            if (d not in earlier)
            or (d not in now_by_name)
            or _news(earlier[d]) != _news(now_by_name[d])
        }
        placement_changed = any(
            d not in earlier
            or d not in now_by_name
            or _placement_news(earlier[d]) != _placement_news(now_by_name[d])
            for d in changed
        )
        pressure_changed = (agent.pressure_bytes > 0) != (request.pressure_bytes > 0)
        if not was_live or placement_changed or pressure_changed:
            self._reconciler.trigger()
        elif changed:
            self._reconciler.refresh_status(changed)
        return pb.ReportStateResponse()

    @grpc_errors
    async def PublishVersion(
        self,
        request_iterator: AsyncIterator[pb.PublishVersionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.PublishVersionResponse:
        first: pb.PublishVersionRequest | None = None
        async for opening in request_iterator:
            first = opening
            break
        if first is None:
            raise InvalidArgument("PublishVersion stream is empty: send the agent and version")
        node, cache_id, uid = _validate_identity(first.agent)
        self._require_registered(node, cache_id, uid)
        name = validate_dataset_name(first.dataset_name)
        if first.revision <= 0:
            raise InvalidArgument(f"revision must be positive, got {first.revision}")
        if not _VERSION.fullmatch(first.version):
            raise InvalidArgument(
                f"version {first.version[:80]!r} is not 'sha256:' and 64 lowercase hex digits"
            )
        record = self._store.get_dataset(name)
        if record.deleting or record.revision != first.revision:
            raise FailedPrecondition(
                f"revision {first.revision} of dataset {name!r} is not current (current: "
                f"{record.revision}); fetch the current revision"
            )
        fixed = self._store.fixed_version(name, first.revision)
        if fixed is not None:
            return pb.PublishVersionResponse(version=fixed.version)

        entries: list[ManifestRow] = []
        total = 0
        previous = ""
        message: pb.PublishVersionRequest | None = first
        stream = request_iterator.__aiter__()
        while message is not None:
            if message is not first and (
                (message.dataset_name and message.dataset_name != first.dataset_name)
                or (message.revision and message.revision != first.revision)
                or (message.version and message.version != first.version)
            ):
                raise InvalidArgument(
                    "dataset_name, revision and version belong in the first message only"
                )
            if len(message.entries) > MAX_ENTRIES_PER_MESSAGE:
                raise InvalidArgument(
                    f"a PublishVersion message carries {len(message.entries)} entries; at most "
                    f"{MAX_ENTRIES_PER_MESSAGE} per message"
                )
            for raw in message.entries:
                row = _entry(raw, previous)
                previous = row.path
                entries.append(row)
                total += len(row.path) + len(row.etag) + 32
            if len(entries) > MAX_MANIFEST_ENTRIES or total > MAX_MANIFEST_BYTES:
                raise ResourceExhausted(
                    f"manifest exceeds {MAX_MANIFEST_ENTRIES} entries or {MAX_MANIFEST_BYTES} "
                    "bytes; split the dataset into smaller ones"
                )
            try:
                message = await stream.__anext__()
            except StopAsyncIteration:
                message = None

        digest = manifest_digest(entries)
        if digest != first.version:
            raise InvalidArgument(
                f"version {first.version} does not match its {len(entries)} entries (their "
                f"digest is {digest}); publish the manifest of the copy that has this version"
            )
        version, fixed_now = self._store.fix_version(name, first.revision, first.version, entries)
        if fixed_now:
            log.info(
                "Version %s fixed for revision %d (%d files, %d bytes)",
                version.version,
                version.revision,
                version.files,
                version.total_bytes,
                extra={"node": node, "dataset": name},
            )
            self._reconciler.trigger()
        return pb.PublishVersionResponse(version=version.version)

    @grpc_errors
    async def GetVersionManifest(
        self, request: pb.GetVersionManifestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetVersionManifestResponse:
        name = validate_dataset_name(request.dataset_name)
        if request.page_size < 0 or request.page_size > MAX_MANIFEST_PAGE:
            raise InvalidArgument(
                f"page_size must be 0 (default {DEFAULT_MANIFEST_PAGE}) to {MAX_MANIFEST_PAGE}, "
                f"got {request.page_size}"
            )
        size = request.page_size or DEFAULT_MANIFEST_PAGE
        start = 0
        if request.page_token:
            if not request.page_token.isdigit() or len(request.page_token) > 12:
                raise InvalidArgument(
                    "page_token is not one this server issued; start from an empty one"
                )
            start = int(request.page_token)
        self._store.get_dataset(name)
        version = self._store.find_version(name, request.version)
        if version is None:
            raise FailedPrecondition(
                f"dataset {name!r} has no fixed version {request.version[:80]!r} (any more); "
                "read the dataset's current version from the desired state"
            )
        rows = self._store.manifest_page(name, request.version, start, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return pb.GetVersionManifestResponse(
            entries=[
                pb.ManifestEntry(path=r.path, size=r.size, etag=r.etag, crc64nvme=r.crc64nvme)
                for _, r in rows
            ],
            next_page_token=str(rows[-1][0] + 1) if more else "",
        )


def _desired(d: DesiredDataset) -> pb.DesiredDataset:
    creds = d.credentials
    return pb.DesiredDataset(
        name=d.name,
        source=d.source,
        revision=d.revision,
        version=d.version,
        credentials=(
            pb.Credentials(
                access_key_id=creds.access_key_id,
                secret_access_key=creds.secret_access_key,
                session_token=creds.session_token,
            )
            if creds is not None
            else None
        ),
        peers=[pb.Peer(node_name=node, address=address) for node, address in d.peers],
    )
