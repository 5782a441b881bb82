"""The `datacache` CLI against a real coordinator process.

Agents are simulated over real gRPC (RegisterAgent/ReportState) so replica progress can be set
exactly; the watch command runs as a real process, in a pipe and on a pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
import yaml
from click.testing import CliRunner, Result

from datacache.cli import main
from datacache.cli_args import parse_replicas, parse_toleration
from datacache.cli_render import progress_lines
from datacache.cli_watch import WatchView, watch_events
from datacache.client import ClientSettings, sync_channel
from datacache.localcluster import LocalCluster, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from datacache.validation import InvalidInput
from tests.tlscerts import CertificateAuthority

TOKEN = "cli-token-0123456789abcdef"


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster") as cluster:
        yield cluster


def start(local: LocalCluster, *extra: str) -> str:
    return local.start_coordinator("--reconcile-interval-seconds=0.5", "--metrics-port=0", *extra)


def cli(local: LocalCluster, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        main, [f"--coordinator={local.coordinator_address}", *args], env=env, catch_exceptions=False
    )


def ok(local: LocalCluster, *args: str) -> str:
    result = cli(local, *args)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


class SimulatedAgent:
    """Registers a node and reports replica progress, as an agent would."""

    def __init__(self, local: LocalCluster, node: str) -> None:
        self.node = node
        self._identity = pb.AgentIdentity(node_name=node, cache_id=f"cache-{node}")
        self._local = local
        with local.channel() as channel:
            pb_grpc.AgentServiceStub(channel).RegisterAgent(
                pb.RegisterAgentRequest(
                    agent=self._identity, cache_capacity_bytes=1 << 40, cache_free_bytes=1 << 40
                ),
                timeout=10,
            )

    def report(self, *replicas: pb.ReplicaReport) -> None:
        with self._local.channel() as channel:
            pb_grpc.AgentServiceStub(channel).ReportState(
                pb.ReportStateRequest(
                    agent=self._identity,
                    replicas=list(replicas),
                    cache_capacity_bytes=1 << 40,
                    cache_free_bytes=1 << 40,
                ),
                timeout=10,
            )


def fetching(name: str, done: int, total: int, rate: float = 0.0) -> pb.ReplicaReport:
    return pb.ReplicaReport(
        dataset_name=name,
        state=pb.REPLICA_STATE_FETCHING,
        files_done=1,
        files_total=4,
        bytes_done=done,
        bytes_total=total,
        bytes_per_second=rate,
    )


# Pure parts -----------------------------------------------------------------------------------


def test_flag_parsing() -> None:
    assert parse_replicas("3") == (3, False)
    assert parse_replicas("all") == (0, True)
    for bad in ("0", "some", "10001"):
        with pytest.raises(InvalidInput, match="--replicas"):
            parse_replicas(bad)
    assert parse_toleration("gpu=a100:NoSchedule") == pb.Toleration(
        key="gpu", operator="Equal", value="a100", effect="NoSchedule"
    )
    assert parse_toleration("example.com/spot:NoExecute") == pb.Toleration(
        key="example.com/spot", operator="Exists", effect="NoExecute"
    )
    assert parse_toleration("dedicated") == pb.Toleration(key="dedicated", operator="Exists")
    with pytest.raises(InvalidInput, match="effect 'NoWay' is not one of"):
        parse_toleration("gpu=a:NoWay")
    with pytest.raises(InvalidInput, match="has no key"):
        parse_toleration("=a:NoSchedule")


def test_progress_view_shows_bars_bytes_and_throughput() -> None:
    view = WatchView()
    dataset = pb.Dataset(
        name="default/imgs",
        replicas=2,
        status=pb.DatasetStatus(
            phase="Replicating",
            ready_replicas=1,
            replicas=[
                pb.Replica(
                    node_name="node-1",
                    state=pb.REPLICA_STATE_FETCHING,
                    bytes_done=1 << 20,
                    bytes_total=4 << 20,
                ),
                pb.Replica(
                    node_name="node-2",
                    state=pb.REPLICA_STATE_READY,
                    bytes_done=4 << 20,
                    bytes_total=4 << 20,
                ),
            ],
        ),
    )
    added = pb.WatchDatasetsResponse(type=pb.WatchDatasetsResponse.EVENT_TYPE_ADDED)
    added.dataset.CopyFrom(dataset)
    assert view.apply(added, now=100.0)
    later = pb.WatchDatasetsResponse()
    later.CopyFrom(added)
    later.dataset.status.replicas[0].bytes_done = 3 << 20
    assert view.apply(later, now=102.0)  # 2 MiB in 2 s
    lines = progress_lines(view.datasets, view.rates)
    assert lines[0].startswith("default/imgs  Replicating  1/2 ready")
    assert "node-1" in lines[1] and "75.0%" in lines[1] and "3.0 MiB/4.0 MiB" in lines[1]
    assert "[" + "#" * 18 + "." * 6 + "]" in lines[1]
    assert lines[1].endswith("1.0 MiB/s")
    assert "node-2" in lines[2] and "100.0%" in lines[2]
    bookmark = pb.WatchDatasetsResponse(type=pb.WatchDatasetsResponse.EVENT_TYPE_BOOKMARK)
    assert not view.apply(bookmark, now=103.0)
    gone = pb.WatchDatasetsResponse(
        type=pb.WatchDatasetsResponse.EVENT_TYPE_DELETED, dataset=pb.Dataset(name="default/imgs")
    )
    assert view.apply(gone, now=104.0)
    assert progress_lines(view.datasets, view.rates) == ["(no datasets)"]


# Against a real coordinator ---------------------------------------------------------------------


def test_dataset_lifecycle_and_errors(local: LocalCluster) -> None:
    start(local)
    SimulatedAgent(local, "node-1")

    created = json.loads(
        ok(
            local,
            "dataset",
            "create",
            "team-a/imgs",
            "--source=s3://bucket/imgs/",
            "--replicas=all",
            "--node-selector=gpu=a100",
            "--node-selector=topology.kubernetes.io/zone=z1",
            "--toleration=gpu=true:NoSchedule",
            "--toleration=spot",
            "--pin",
            "--credentials-secret=s3-creds",
            "-o",
            "json",
        )
    )
    assert created["name"] == "team-a/imgs"
    assert created["allNodes"] is True
    assert created["nodeSelector"] == {"gpu": "a100", "topology.kubernetes.io/zone": "z1"}
    assert created["tolerations"] == [
        {"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists"},
    ]
    assert created["pin"] is True and created["credentialsSecret"] == "s3-creds"

    # A bare name means namespace "default".
    assert ok(local, "dataset", "create", "plain", "--source=s3://bucket/plain/").strip() == (
        "dataset default/plain created"
    )
    got = yaml.safe_load(ok(local, "dataset", "get", "default/plain", "-o", "yaml"))
    assert got["name"] == "default/plain" and got["replicas"] == 1
    table = ok(local, "dataset", "get", "plain")
    assert "default/plain" in table and "s3://bucket/plain/" in table
    listed = json.loads(ok(local, "dataset", "list", "-o", "json"))
    assert [d["name"] for d in listed] == ["default/plain", "team-a/imgs"]
    assert "team-a/imgs" in ok(local, "dataset", "list")

    # update sends only the fields given.
    updated = json.loads(
        ok(local, "dataset", "update", "team-a/imgs", "--replicas=2", "--no-pin", "-o", "json")
    )
    assert updated["replicas"] == 2 and not updated.get("allNodes") and not updated.get("pin")
    assert updated["nodeSelector"] == created["nodeSelector"]
    assert updated["credentialsSecret"] == "s3-creds"
    cleared = json.loads(
        ok(local, "dataset", "update", "team-a/imgs", "--clear-tolerations", "-o", "json")
    )
    assert "tolerations" not in cleared and cleared["replicas"] == 2

    before = json.loads(ok(local, "dataset", "get", "plain", "-o", "json")).get("revision", "0")
    refreshed = json.loads(ok(local, "dataset", "refresh", "plain", "-o", "json"))
    assert int(refreshed["revision"]) == int(before) + 1

    snippets = yaml.safe_load(ok(local, "dataset", "affinity", "team-a/imgs"))
    terms = snippets["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == (
        "dataset.datacache.io/team-a.imgs"
    )
    assert snippets["volumes"][0]["hostPath"]["path"].endswith("/datasets/team-a/imgs/current")
    assert snippets["volumeMounts"][0]["readOnly"] is True
    assert snippets["readyNodes"] == []
    preferred = json.loads(
        ok(local, "dataset", "affinity", "team-a/imgs", "--preferred", "-o", "json")
    )
    assert (
        preferred["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0][
            "preference"
        ]
        == terms["nodeSelectorTerms"][0]
    )

    nodes = json.loads(ok(local, "nodes", "-o", "json"))
    assert [n["name"] for n in nodes] == ["node-1"]

    # Errors: the server's message, a non-zero exit, no traceback.
    for args, code, text in [
        (["dataset", "create", "plain", "--source=s3://bucket/x/"], 1, "ALREADY_EXISTS"),
        (["dataset", "get", "missing"], 1, "NOT_FOUND"),
        (["dataset", "create", "bad", "--source=ftp://x/"], 1, "INVALID_ARGUMENT"),
        (["dataset", "get", "Bad_Name"], 2, "not a DNS-1123 subdomain"),
        (["dataset", "create", "x", "--source=s3://b/x/", "--replicas=many"], 2, "'all'"),
        (["dataset", "create", "x", "--source=s3://b/x/", "--toleration=a:Never"], 2, "effect"),
        (["dataset", "update", "plain"], 2, "nothing to update"),
    ]:
        result = cli(local, *args)
        assert result.exit_code == code, (args, result.output)
        assert text in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output + result.stderr

    updated = json.loads(ok(local, "dataset", "update", "plain", "--max-replicas=4", "-o", "json"))
    assert updated["maxReplicas"] == 4
    assert "(max 4)" in ok(local, "dataset", "get", "plain")
    assert ok(local, "dataset", "delete", "plain").strip() == "dataset default/plain deleted"
    wait_until(
        lambda: cli(local, "dataset", "get", "plain").exit_code == 1, 30, "plain to be deleted"
    )


def test_unreachable_coordinator_is_a_clear_error(local: LocalCluster) -> None:
    local.coordinator_address = "127.0.0.1:1"
    result = cli(local, "dataset", "list")
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.stderr and "--coordinator" in result.stderr


class LineReader:
    """Lines of a child's output, read in a thread so tests can wait with a bound."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Once the child has exited: the pipe is at its end."""
        self._thread.join(10)

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def until(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                event: dict[str, Any] = json.loads(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue
            if predicate(event):
                return event


def replica_of(event: dict[str, Any], node: str) -> dict[str, Any]:
    for replica in event.get("dataset", {}).get("status", {}).get("replicas", []):
        if replica["nodeName"] == node:
            return dict(replica)
    return {}


def test_watch_streams_progress_and_resumes_after_coordinator_restart(
    local: LocalCluster,
) -> None:
    start(local)
    agent = SimulatedAgent(local, "node-1")
    ok(local, "dataset", "create", "photos", "--source=s3://bucket/photos/")
    errors = local.workdir / "watch.err"
    with errors.open("w") as stderr:
        watch = subprocess.Popen(
            [
                "datacache",
                f"--coordinator={local.coordinator_address}",
                "dataset",
                "watch",
                "photos",
                "-o",
                "json",
                "--reconnect-timeout=60",
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert watch.stdout is not None
    events = LineReader(watch.stdout)
    try:
        first = events.until(lambda e: True, 30, "the first event")
        assert first["type"] == "EVENT_TYPE_ADDED" and first["dataset"]["name"] == "default/photos"

        agent.report(fetching("default/photos", 1000, 4000))
        events.until(
            lambda e: replica_of(e, "node-1").get("bytesDone") == "1000", 30, "progress 1000"
        )

        # A coordinator killed and restarted on the same port: the watch reconnects and
        # resumes after the last version it saw.
        local.coordinator.kill()
        start(local)
        agent = SimulatedAgent(local, "node-1")
        agent.report(fetching("default/photos", 3000, 4000))
        resumed = events.until(
            lambda e: replica_of(e, "node-1").get("bytesDone") == "3000", 60, "progress 3000"
        )
        assert resumed["dataset"]["name"] == "default/photos"
        assert watch.poll() is None, errors.read_text()
    finally:
        watch.terminate()
        watch.wait(10)
        events.join()
        watch.stdout.close()


def test_watch_on_a_terminal_draws_progress_bars_in_place(local: LocalCluster) -> None:
    start(local)
    agent = SimulatedAgent(local, "node-1")
    ok(local, "dataset", "create", "bars", "--source=s3://bucket/bars/")
    agent.report(fetching("default/bars", 1 << 20, 4 << 20, rate=2 << 20))
    primary, secondary = pty.openpty()
    watch = subprocess.Popen(
        [
            "datacache",
            f"--coordinator={local.coordinator_address}",
            "dataset",
            "watch",
            "--timeout=60",
        ],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(secondary)
    output = b""

    def read_until(needle: bytes, timeout: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while needle not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {needle!r} on the terminal; got {output[-2000:]!r}"
            ready, _, _ = select.select([primary], [], [], remaining)
            if ready:
                try:
                    output += os.read(primary, 65536)
                except OSError:  # The child closed the terminal.
                    assert needle in output, output[-2000:]

    try:
        read_until(b"25.0%", 30)
        assert b"[######" in output and b"1.0 MiB/4.0 MiB" in output and b"2.0 MiB/s" in output
        agent.report(fetching("default/bars", 3 << 20, 4 << 20, rate=2 << 20))
        read_until(b"75.0%", 30)
        # Redrawn in place: the cursor moves back up over the previous frame.
        assert b"\x1b[" in output and b"F\x1b[J" in output
    finally:
        watch.terminate()
        watch.wait(10)
        os.close(primary)


def test_cli_with_token_and_tls(local: LocalCluster, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    server = ca.issue("coordinator", server=True)
    client = ca.issue("datacache-cli")
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    start(
        local,
        f"--tls-cert-file={server.cert_file}",
        f"--tls-key-file={server.key_file}",
        f"--tls-client-ca-file={ca.cert_file}",
        f"--api-token-file={tokens}",
    )
    local.client = ClientSettings(tls_ca_file=ca.cert_file)
    tls = [
        f"--tls-ca-file={ca.cert_file}",
        f"--tls-cert-file={client.cert_file}",
        f"--tls-key-file={client.key_file}",
    ]
    missing = cli(local, *tls, "dataset", "list")
    assert missing.exit_code == 1
    assert "UNAUTHENTICATED" in missing.stderr and "--token-file" in missing.stderr
    assert "NAME" in ok(local, *tls, f"--token-file={tokens}", "dataset", "list")
    # The same through the environment.
    env = {
        "DATACACHE_TLS_CA_FILE": str(ca.cert_file),
        "DATACACHE_TLS_CERT_FILE": str(client.cert_file),
        "DATACACHE_TLS_KEY_FILE": str(client.key_file),
        "DATACACHE_TOKEN_FILE": str(tokens),
    }
    result = cli(local, "dataset", "create", "secure", "--source=s3://bucket/secure/", env=env)
    assert result.exit_code == 0, result.stderr
    # A token never goes in clear text to a non-loopback address.
    result = CliRunner().invoke(
        main, ["--coordinator=192.0.2.1:7400", f"--token-file={tokens}", "dataset", "list"]
    )
    assert result.exit_code == 1 and "refusing to send the API token" in result.stderr
    # Without a client certificate the TLS handshake fails.
    result = cli(local, f"--tls-ca-file={ca.cert_file}", f"--token-file={tokens}", "nodes")
    assert result.exit_code == 1 and "UNAVAILABLE" in result.stderr
    with pytest.raises(grpc.RpcError):
        local.list_nodes()


class ScriptedWatch(pb_grpc.DatasetServiceServicer):
    """WatchDatasets that drops the stream, then finds the version too old, then serves."""

    def __init__(self) -> None:
        self.requested: list[int] = []

    def WatchDatasets(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requested.append(request.resource_version)
        attempt = len(self.requested)
        kind = pb.WatchDatasetsResponse.EVENT_TYPE_ADDED
        if attempt == 1:
            yield pb.WatchDatasetsResponse(
                type=kind, dataset=pb.Dataset(name="default/a"), resource_version=5
            )
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped")
        elif attempt == 2:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "resource_version 5 is too old")
        else:
            yield pb.WatchDatasetsResponse(
                type=kind, dataset=pb.Dataset(name="default/b"), resource_version=9
            )
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "stop here")


def test_watch_resumes_from_last_version_and_restarts_when_too_old() -> None:
    servicer = ScriptedWatch()  # type: ignore[abstract]  # only the watch is scripted
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_DatasetServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    restarts: list[bool] = []
    seen: list[str] = []
    try:
        with sync_channel(ClientSettings(target=f"127.0.0.1:{port}")) as channel:
            events = watch_events(
                pb_grpc.DatasetServiceStub(channel),
                "",
                lambda: restarts.append(True),
                reconnect_timeout=30,
                sleep=lambda seconds: None,  # backoff only; nothing to wait for here
            )
            with pytest.raises(grpc.RpcError) as caught:
                for event in events:
                    seen.append(event.dataset.name)
    finally:
        server.stop(grace=None).wait(10)
    assert isinstance(caught.value, grpc.Call)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert servicer.requested == [0, 5, 0]
    assert restarts == [True]
    assert seen == ["default/a", "default/b"]
