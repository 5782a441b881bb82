"""Assembles and runs the coordinator: store, labeler, reconciler and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import auth, metrics
from coordinator.cluster import DirectoryCredentialsProvider, LogEventSink, NodeDirectory
from coordinator.labelers import LocalNodeLabeler, NodeLabeler
from coordinator.reconciler import DesiredStateHub, Reconciler
from coordinator.service import AgentService, DatasetService, NodeService
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from coordinator.watch import ChangeFeed
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Bounded messages: a misbehaving client cannot make the server buffer without limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICE_NAMES = [
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("DatasetService", "NodeService", "AgentService")
]


def start_node_watch(settings: CoordinatorSettings, directory: NodeDirectory) -> Any:
    """In a cluster, a Node watch keeps `directory` current (placement reads node labels,
    taints, cordons and UIDs from it); in local mode agents' registrations stand in."""
    if settings.labeler != "kubernetes":
        return None
    from coordinator.k8s_labeler import core_api
    from coordinator.k8s_nodes import NodeWatch

    watch = NodeWatch(core_api(settings.kubeconfig), directory)
    watch.start()
    return watch


def make_labeler(settings: CoordinatorSettings, store: Store) -> NodeLabeler:
    if settings.labeler == "kubernetes":
        # Imported here so local mode never needs cluster credentials.
        from coordinator.k8s_labeler import KubernetesNodeLabeler, core_api

        return KubernetesNodeLabeler(core_api(settings.kubeconfig))
    return LocalNodeLabeler(store)


async def serve(settings: CoordinatorSettings, stop: asyncio.Event) -> None:
    """Runs until `stop` is set, then shuts down gracefully."""
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(
        settings.db_path,
        history_size=settings.watch_history_size,
        history_seconds=settings.watch_history_seconds,
    )
    store.extend_all_leases(time.time())
    labeler = make_labeler(settings, store)
    hub = DesiredStateHub()
    directory = NodeDirectory()
    node_watch = start_node_watch(settings, directory)
    reconciler = Reconciler(
        store,
        labeler,
        hub,
        settings,
        events=LogEventSink(),
        credentials=(
            DirectoryCredentialsProvider(settings.secrets_dir) if settings.secrets_dir else None
        ),
        directory=directory,
    )
    feed = ChangeFeed(reconciler.render_name, settings.watch_queue_size)
    store.listeners.append(feed.publish)
    metrics.REGISTRY.register(metrics.StateCollector(settings.db_path, settings.lease_seconds))
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
    server = grpc.aio.server(
        interceptors=security.interceptors,
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
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*SERVICE_NAMES, reflection.SERVICE_NAME], server)

    if security.credentials is not None:
        port = server.add_secure_port(settings.listen, security.credentials)
    else:
        port = server.add_insecure_port(settings.listen)
    await server.start()
    for name in SERVICE_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("Coordinator serving on port %d (labeler: %s)", port, settings.labeler)
    if settings.port_file is not None:
        tmp = settings.port_file.with_name(settings.port_file.name + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, settings.port_file)

    loop_task = asyncio.create_task(reconciler.run(), name="reconciler")
    try:
        await stop.wait()
    finally:
        log.info("Coordinator shutting down")
        await health_servicer.enter_graceful_shutdown()
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await server.stop(grace=2)
        if node_watch is not None:
            await asyncio.to_thread(node_watch.stop)
        store.close()


def run(settings: CoordinatorSettings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
