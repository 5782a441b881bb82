"""The channel factory: retries, deadlines, message limits and where a token may go.

A real gRPC server on a loopback port stands in for the coordinator so each behaviour can be
provoked exactly (a method that fails N times, one that never answers).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from datacache.client import (
    ClientConfigError,
    ClientSettings,
    aio_channel,
    channel_credentials,
    is_loopback,
    sync_channel,
    target_host,
)
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

TOKEN = "client-token-0123456789"


class ScriptedDatasets(pb_grpc.DatasetServiceServicer):
    """Fails the first `failures[method]` calls of a method with UNAVAILABLE."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
            failing = self.failures.get(method, 0)
            if failing:
                self.failures[method] = failing - 1
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    def GetDataset(self, request: Any, context: grpc.ServicerContext) -> pb.GetDatasetResponse:
        self._enter("GetDataset", context)
        return pb.GetDatasetResponse(dataset=pb.Dataset(name=request.name))

    def CreateDataset(
        self, request: Any, context: grpc.ServicerContext
    ) -> pb.CreateDatasetResponse:
        self._enter("CreateDataset", context)
        return pb.CreateDatasetResponse(dataset=request.dataset)

    def RefreshDataset(
        self, request: Any, context: grpc.ServicerContext
    ) -> pb.RefreshDatasetResponse:
        self._enter("RefreshDataset", context)
        return pb.RefreshDatasetResponse()

    def ListDatasets(self, request: Any, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        self._enter("ListDatasets", context)
        # Over the 4 MiB limit when asked for a big page.
        size = 5 * 1024 * 1024 if request.page_size == 1000 else 10
        return pb.ListDatasetsResponse(datasets=[pb.Dataset(name="x", source="s" * size)])

    def GetPlacement(self, request: Any, context: grpc.ServicerContext) -> pb.GetPlacementResponse:
        self._enter("GetPlacement", context)
        # Never answers on its own: the client's default deadline must end the call.
        self.release.wait(30)
        return pb.GetPlacementResponse()

    def UpdateDataset(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def DeleteDataset(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def WatchDatasets(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")


@pytest.fixture
def server() -> Iterator[tuple[ScriptedDatasets, int]]:
    servicer = ScriptedDatasets()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DatasetServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield servicer, port
    finally:
        servicer.release.set()
        grpc_server.stop(grace=None).wait(10)


def test_idempotent_calls_are_retried_on_unavailable(
    server: tuple[ScriptedDatasets, int],
) -> None:
    servicer, port = server
    servicer.failures = {"GetDataset": 2, "CreateDataset": 1, "RefreshDataset": 1}
    with sync_channel(ClientSettings(target=f"127.0.0.1:{port}")) as channel:
        stub = pb_grpc.DatasetServiceStub(channel)
        assert stub.GetDataset(pb.GetDatasetRequest(name="a")).dataset.name == "a"
        assert servicer.calls["GetDataset"] == 3
        for call in (
            lambda: stub.CreateDataset(pb.CreateDatasetRequest(dataset=pb.Dataset(name="a"))),
            lambda: stub.RefreshDataset(pb.RefreshDatasetRequest(name="a")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert isinstance(caught.value, grpc.Call)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # Not retried: a second create or refresh would not be harmless.
        assert servicer.calls["CreateDataset"] == 1
        assert servicer.calls["RefreshDataset"] == 1


def test_reads_get_a_default_deadline(server: tuple[ScriptedDatasets, int]) -> None:
    _, port = server
    settings = ClientSettings(target=f"127.0.0.1:{port}", read_timeout_seconds=0.5)
    with sync_channel(settings) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.DatasetServiceStub(channel).GetPlacement(pb.GetPlacementRequest(name="a"))
        assert isinstance(caught.value, grpc.Call)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_responses_over_4_mib_are_refused(server: tuple[ScriptedDatasets, int]) -> None:
    _, port = server
    with sync_channel(ClientSettings(target=f"127.0.0.1:{port}")) as channel:
        stub = pb_grpc.DatasetServiceStub(channel)
        assert len(stub.ListDatasets(pb.ListDatasetsRequest()).datasets) == 1
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListDatasets(pb.ListDatasetsRequest(page_size=1000))
        assert isinstance(caught.value, grpc.Call)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_token_sent_in_plain_text_only_to_loopback(
    server: tuple[ScriptedDatasets, int], tmp_path: Path
) -> None:
    servicer, port = server
    token_file = tmp_path / "token"
    token_file.write_text(f"# the first token is used\n{TOKEN}\nsecond-token-0123456789\n")
    for target in (f"127.0.0.1:{port}", f"localhost:{port}"):
        with sync_channel(ClientSettings(target=target, token_file=token_file)) as channel:
            pb_grpc.DatasetServiceStub(channel).GetDataset(pb.GetDatasetRequest(name="a"))
        assert servicer.metadata[-1]["authorization"] == f"Bearer {TOKEN}"

    async def over_aio() -> None:
        async with aio_channel(
            ClientSettings(target=f"127.0.0.1:{port}", token_file=token_file)
        ) as channel:
            await pb_grpc.DatasetServiceStub(channel).GetDataset(pb.GetDatasetRequest(name="b"))

    asyncio.run(over_aio())
    assert servicer.metadata[-1]["authorization"] == f"Bearer {TOKEN}"

    for target in ("10.1.2.3:7400", "coordinator.example:7400", "dns:///coordinator:7400"):
        with pytest.raises(ClientConfigError, match="refusing to send the API token in clear"):
            sync_channel(ClientSettings(target=target, token_file=token_file))
    # Without a token, plain text anywhere is allowed (local mode).
    assert channel_credentials(ClientSettings(target="10.1.2.3:7400")) is None


def test_settings_errors_name_the_fix(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ClientConfigError, match="holds no token"):
        channel_credentials(ClientSettings(token_file=empty))
    with pytest.raises(ClientConfigError, match="cannot read the token file"):
        channel_credentials(ClientSettings(token_file=tmp_path / "missing"))
    with pytest.raises(ClientConfigError, match="give both --tls-cert-file and --tls-key-file"):
        channel_credentials(ClientSettings(tls_cert_file=empty))
    with pytest.raises(ClientConfigError, match="needs TLS: give --tls-ca-file"):
        channel_credentials(ClientSettings(tls_cert_file=empty, tls_key_file=empty))
    with pytest.raises(ClientConfigError, match="cannot read the TLS CA file"):
        channel_credentials(ClientSettings(tls_ca_file=tmp_path / "missing.crt"))


@pytest.mark.parametrize(
    ("target", "host", "loopback"),
    [
        ("127.0.0.1:7400", "127.0.0.1", True),
        ("localhost:7400", "localhost", True),
        ("[::1]:7400", "::1", True),
        ("ipv4:127.0.0.2:7400", "127.0.0.2", True),
        ("unix:/run/datacache.sock", "unix", True),
        ("dns:///coordinator.datacache:7400", "coordinator.datacache", False),
        ("10.0.0.1:7400", "10.0.0.1", False),
        ("[2001:db8::1]:7400", "2001:db8::1", False),
        ("coordinator", "coordinator", False),
    ],
)
def test_target_hosts(target: str, host: str, loopback: bool) -> None:
    assert target_host(target) == host
    assert is_loopback(host) is loopback
