"""The agent's gRPC health service (`grpc.health.v1`), probed by the DaemonSet.

Two services:
- "" (what a probe asks by default): NOT_SERVING until the cache is recovered and the
  coordinator was reached at least once; then SERVING for good: a coordinator that goes away
  later does not make the node's data unusable, so it must not get the agent restarted.
- `CACHE_SERVICE`: SERVING once the cache is recovered, whatever the coordinator does. For a
  liveness probe that must not restart agents while the coordinator is unreachable at start.
"""

from __future__ import annotations

import logging
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

CACHE_SERVICE = "datacache.agent.Cache"


class HealthServer:
    def __init__(self) -> None:
        self._server: grpc.aio.Server | None = None
        self._servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0

    async def start(self, address: str, port: int) -> None:
        """Listens on address:port (port 0 picks a free one, see `port`). RuntimeError when
        the port is taken."""
        if port and not _bindable(address, port):
            # Checked here: gRPC would print its own non-JSON error line to stderr.
            raise RuntimeError(f"{address}:{port} is in use")
        # No SO_REUSEPORT: a second agent on the same port must fail, not answer for the first.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        self.port = server.add_insecure_port(f"{address}:{port}")
        for service in ("", CACHE_SERVICE):
            await self._servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server

    async def recovered(self) -> None:
        await self._servicer.set(CACHE_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def serving(self) -> None:
        """The cache is recovered and the coordinator was reached."""
        await self._servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        if self._server is not None:
            await self._servicer.enter_graceful_shutdown()
            await self._server.stop(1.0)
            self._server = None


def _bindable(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port held only by TIME_WAIT connections of an earlier agent is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True
