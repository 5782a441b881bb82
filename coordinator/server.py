"""Assembles and runs the coordinator: store, labeler, reconciler and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import auth, metrics
from coordinator.cluster import (
    CredentialsProvider,
    DirectoryCredentialsProvider,
    EventSink,
    LogEventSink,
    NodeDirectory,
    NodeFacts,
)
from coordinator.collector import THAW_SECONDS, CollectorHold
from coordinator.demand_service import DemandScaler, DemandService, DemandTracker
from coordinator.labelers import LocalNodeLabeler, NodeLabeler
from coordinator.reconciler import DesiredStateHub, Reconciler
from coordinator.service import AgentService, DatasetService, NodeService
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from coordinator.watch import ChangeFeed
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # Generic only in the type stubs.
    _Interceptor = grpc.aio.ServerInterceptor

# Bounded messages: a misbehaving client cannot make the server buffer without limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICE_NAMES = [
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("DatasetService", "NodeService", "AgentService", "DemandService")
]


@dataclass
class ClusterParts:
    """What the coordinator talks to around it: Kubernetes adapters in a cluster, local
    stand-ins otherwise. `stoppers` end the adapters' threads on shutdown."""

    labeler: NodeLabeler
    events: EventSink
    credentials: CredentialsProvider | None
    apis: Any = None
    stoppers: list[Callable[[], None]] = field(default_factory=list)


def cluster_parts(
    settings: CoordinatorSettings, store: Store, directory: NodeDirectory
) -> ClusterParts:
    if settings.labeler != "kubernetes":
        local: CredentialsProvider | None = (
            DirectoryCredentialsProvider(settings.secrets_dir) if settings.secrets_dir else None
        )
        return ClusterParts(LocalNodeLabeler(store), LogEventSink(), local)
    # Imported here so local mode never needs the Kubernetes client or cluster credentials.
    from coordinator.k8s_events import EventSettings, KubernetesEventSink
    from coordinator.k8s_labeler import KubernetesApis, KubernetesNodeLabeler
    from coordinator.k8s_nodes import NodeWatch
    from coordinator.k8s_secrets import KubernetesCredentialsProvider, SecretSettings

    apis = KubernetesApis.connect(settings.kubeconfig)
    # A Node watch keeps `directory` current: placement reads labels, taints, cordons and UIDs.
    watch = NodeWatch(apis.core, directory)
    watch.start()
    events = KubernetesEventSink(
        apis.core,
        EventSettings(reporting_instance=_identity(settings)),
        node_uid=lambda node: (directory.get(node) or NodeFacts(node)).uid,
    )
    credentials = KubernetesCredentialsProvider(
        apis.core, SecretSettings(namespace=settings.namespace)
    )
    labeler = KubernetesNodeLabeler(apis.core, directory)
    return ClusterParts(labeler, events, credentials, apis, [watch.stop])


def _identity(settings: CoordinatorSettings) -> str:
    return settings.leader_election_identity or socket.gethostname()


class LeaderGate(_Interceptor):
    """While this coordinator is not the leader, the datacache services answer UNAVAILABLE so
    callers retry and reach the leader; health and reflection stay open (readiness does not
    depend on leadership)."""

    def __init__(self) -> None:
        self.leading = False

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if self.leading or handler is None or not method.startswith("/datacache.v1."):
            return handler
        return auth.rejecting(
            handler,
            grpc.StatusCode.UNAVAILABLE,
            "this coordinator is not the leader; retry",
            method,
        )


async def serve(settings: CoordinatorSettings, stop: asyncio.Event) -> None:
    """Runs until `stop` is set, then shuts down gracefully."""
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(
        settings.db_path,
        history_size=settings.watch_history_size,
        history_seconds=settings.watch_history_seconds,
        checkpoint_seconds=settings.wal_checkpoint_seconds,
    )
    store.extend_all_leases(time.time())
    hub = DesiredStateHub()
    directory = NodeDirectory()
    parts = cluster_parts(settings, store, directory)
    labeler = parts.labeler
    tracker = DemandTracker()
    scaler = DemandScaler(settings.demand_cooldown_seconds)
    reconciler = Reconciler(
        store,
        labeler,
        hub,
        settings,
        events=parts.events,
        credentials=parts.credentials,
        directory=directory,
        demand=(tracker, scaler),
        collector=CollectorHold(thaw_seconds=THAW_SECONDS),
    )
    feed = ChangeFeed(reconciler.render_name, settings.watch_queue_size)
    store.listeners.append(feed.publish)
    metrics.REGISTRY.register(metrics.StateCollector(settings.db_path, reconciler.live_nodes))
    if settings.metrics_port:
        prometheus_client.start_http_server(
            settings.metrics_port, settings.metrics_address, registry=metrics.REGISTRY
        )

    security = auth.server_security(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
        settings.api_token_file,
    )
    gate = LeaderGate()
    gate.leading = not (settings.leader_elect and parts.apis is not None)
    server = grpc.aio.server(
        interceptors=[gate, *security.interceptors],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Agents hold a stream open for hours; let them ping to keep NATs from dropping it.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # Every agent holds a WatchDesiredState stream. With the default pending-request
            # limits (1,000 soft, 3,000 hard) a grpc.aio server here stopped accepting any new
            # call after about 3,000 open streams (bench/coordinator.py, 5,000 agents).
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ],
    )
    pb_grpc.add_DatasetServiceServicer_to_server(
        DatasetService(store, reconciler, settings, feed), server
    )
    pb_grpc.add_NodeServiceServicer_to_server(NodeService(store, labeler, reconciler), server)
    pb_grpc.add_AgentServiceServicer_to_server(
        AgentService(store, hub, reconciler, settings), server
    )
    pb_grpc.add_DemandServiceServicer_to_server(
        DemandService(tracker, lambda name: _live_dataset(store, name), scaler.target), server
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*SERVICE_NAMES, reflection.SERVICE_NAME], server)

    if security.credentials is not None:
        port = server.add_secure_port(settings.listen, security.credentials)
    else:
        port = server.add_insecure_port(settings.listen)
    # In-process controllers (the Dataset controller) call the API like any client, over a
    # loopback-only port: the main port may be bound elsewhere or need client certificates.
    local_port = server.add_insecure_port("127.0.0.1:0") if settings.dataset_controller else 0
    await server.start()
    for name in SERVICE_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("Coordinator serving on port %d (labeler: %s)", port, settings.labeler)
    if settings.port_file is not None:
        tmp = settings.port_file.with_name(settings.port_file.name + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, settings.port_file)

    if settings.webhook_port:
        parts.stoppers.append(_start_webhook(settings, store))
    if settings.watch_pods and parts.apis is None:
        log.warning("--watch-pods needs --labeler=kubernetes; pods are not counted as demand")
    if settings.watch_pods and parts.apis is not None:
        from coordinator.k8s_pods import pod_watch

        pods = pod_watch(parts.apis.core, tracker)
        pods.start()
        parts.stoppers.append(pods.stop)

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    def start_leading() -> None:
        log.info("Leading: reconciling and serving the API")
        gate.leading = True
        tasks.append(asyncio.create_task(reconciler.run(), name="reconciler"))
        if settings.dataset_controller and parts.apis is not None:
            parts.stoppers.append(_start_dataset_controller(settings, parts.apis, local_port))

    def stop_leading() -> None:
        # Another coordinator may act from now on: stop at once and start again as a follower.
        log.warning("Lost the leader Lease; exiting")
        gate.leading = False
        stop.set()

    election = None
    if settings.leader_elect and parts.apis is not None:
        from coordinator.k8s_leader import LeaderElection

        election = LeaderElection(
            parts.apis.client,
            settings.namespace,
            settings.leader_election_name,
            _identity(settings),
        )

        def on_started() -> None:
            loop.call_soon_threadsafe(start_leading)

        def on_stopped() -> None:
            loop.call_soon_threadsafe(stop_leading)

        election.run_in_thread(on_started, on_stopped)
    else:
        start_leading()
    try:
        await stop.wait()
    finally:
        log.info("Coordinator shutting down")
        await health_servicer.enter_graceful_shutdown()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.stop(grace=2)
        if election is not None:
            await asyncio.to_thread(election.stop)
        for stopper in reversed(parts.stoppers):
            await asyncio.to_thread(stopper)
        store.close()


def _live_dataset(store: Store, name: str) -> bool:
    record = store.find_dataset(name)
    return record is not None and not record.deleting


def _start_webhook(settings: CoordinatorSettings, store: Store) -> Callable[[], None]:
    from coordinator.webhook import WebhookServer

    if settings.webhook_cert_file is None or settings.webhook_key_file is None:
        raise auth.AuthConfigError(
            "--webhook-port needs --webhook-cert-file and --webhook-key-file (the API server "
            "calls webhooks over HTTPS only)"
        )
    # The webhook answers from its own threads: each reads through its own connection.
    local = threading.local()

    def exists(name: str) -> bool:
        if not hasattr(local, "db"):
            local.db = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
        row = local.db.execute("SELECT deleting FROM datasets WHERE name = ?", (name,)).fetchone()
        return row is not None and not row[0]

    host = settings.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"  # noqa: S104
    webhook = WebhookServer(
        (host, settings.webhook_port),
        settings.webhook_cert_file,
        settings.webhook_key_file,
        exists,
        settings.node_cache_dir,
    )
    webhook.start()

    return webhook.stop


def _start_dataset_controller(
    settings: CoordinatorSettings, apis: Any, port: int
) -> Callable[[], None]:
    from coordinator.k8s_datasets import DatasetController
    from datacache.client import ClientSettings, sync_channel

    # The controller is a client of this coordinator's public API, like any other controller.
    channel = sync_channel(
        ClientSettings(target=f"127.0.0.1:{port}", token_file=settings.api_token_file)
    )
    controller = DatasetController(apis.custom, channel)
    controller.start()
    return controller.stop


def run(settings: CoordinatorSettings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
