"""Assembles and runs the coordinator: store, labeler, reconciler and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import metrics
from coordinator.labelers import LocalNodeLabeler, NodeLabeler
from coordinator.reconciler import DesiredStateHub, Reconciler
from coordinator.service import AgentService, DatasetService, NodeService
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Bounded messages: a misbehaving client cannot make the server buffer without limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICE_NAMES = [
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("DatasetService", "NodeService", "AgentService")
]


def make_labeler(settings: CoordinatorSettings, store: Store) -> NodeLabeler:
    if settings.labeler == "kubernetes":
        # Imported here so local mode never needs cluster credentials.
        from coordinator.k8s_labeler import KubernetesNodeLabeler, core_api

        return KubernetesNodeLabeler(core_api(settings.kubeconfig))
    return LocalNodeLabeler(store)


async def serve(settings: CoordinatorSettings, stop: asyncio.Event) -> None:
    """Runs until `stop` is set, then shuts down gracefully."""
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_path)
    store.extend_all_leases(time.time())
    labeler = make_labeler(settings, store)
    hub = DesiredStateHub()
    reconciler = Reconciler(store, labeler, hub, settings)
    metrics.REGISTRY.register(metrics.StateCollector(settings.db_path, settings.lease_seconds))
    if settings.metrics_port:
        prometheus_client.start_http_server(
            settings.metrics_port, settings.metrics_address, registry=metrics.REGISTRY
        )

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Agents hold a stream open for hours; let them ping to keep NATs from dropping it.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    pb_grpc.add_DatasetServiceServicer_to_server(
        DatasetService(store, reconciler, settings), server
    )
    pb_grpc.add_NodeServiceServicer_to_server(NodeService(store, labeler, reconciler), server)
    pb_grpc.add_AgentServiceServicer_to_server(
        AgentService(store, hub, reconciler, settings), server
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*SERVICE_NAMES, reflection.SERVICE_NAME], server)

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
        store.close()


def run(settings: CoordinatorSettings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
