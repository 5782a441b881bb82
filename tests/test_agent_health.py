"""The agent's health service: states, and a port in use is refused rather than shared."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.health import CACHE_SERVICE, HealthServer


async def _status(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(response.status)


def test_health_states_and_port_in_use() -> None:
    async def scenario() -> None:
        health = HealthServer()
        await health.start("127.0.0.1", 0)
        try:
            serving, not_serving = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            assert await _status(health.port, "") == not_serving
            assert await _status(health.port, CACHE_SERVICE) == not_serving
            await health.recovered()
            assert await _status(health.port, CACHE_SERVICE) == serving
            assert await _status(health.port, "") == not_serving
            await health.serving()
            assert await _status(health.port, "") == serving
            second = HealthServer()
            with pytest.raises(RuntimeError):
                await second.start("127.0.0.1", health.port)
        finally:
            await health.stop()

    asyncio.run(scenario())
