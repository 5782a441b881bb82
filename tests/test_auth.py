"""Authentication of the coordinator's callers: mTLS for agents, bearer tokens for the API.

Real coordinator processes serving real TLS on loopback, with certificates made in the test.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.auth import (
    AuthConfigError,
    bearer_token,
    certificate_names,
    identity_mismatch,
    parse_tokens,
    token_accepted,
)
from datacache.client import ClientSettings
from datacache.localcluster import LocalCluster, wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.tlscerts import CertificateAuthority, Pair

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-fedcba9876543210"


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster") as cluster:
        yield cluster


def identity(node: str) -> pb.AgentIdentity:
    return pb.AgentIdentity(node_name=node, cache_id=f"cache-{node}")


def register(channel: grpc.Channel, node: str) -> pb.RegisterAgentResponse:
    response: pb.RegisterAgentResponse = pb_grpc.AgentServiceStub(channel).RegisterAgent(
        pb.RegisterAgentRequest(agent=identity(node), cache_capacity_bytes=1 << 30), timeout=10
    )
    return response


def rpc_error(call: object) -> grpc.RpcError:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(error, grpc.Call)
    return error.code()


def details_of(error: grpc.RpcError) -> str:
    assert isinstance(error, grpc.Call)
    return error.details() or ""


# Pure decisions ---------------------------------------------------------------------------------


def test_token_file_parsing_and_checks() -> None:
    assert parse_tokens(f"# rotation\n{TOKEN_A}\n\n  {TOKEN_B}  \n", "f") == (
        TOKEN_A.encode(),
        TOKEN_B.encode(),
    )
    with pytest.raises(AuthConfigError, match="no token"):
        parse_tokens("# nothing\n\n", "tokens.txt")
    with pytest.raises(AuthConfigError, match="line 1: a token must have at least 16"):
        parse_tokens("short\n", "tokens.txt")
    with pytest.raises(AuthConfigError, match="without spaces"):
        parse_tokens("has a space in the token\n", "tokens.txt")

    assert bearer_token([("authorization", f"Bearer {TOKEN_A}")]) == TOKEN_A.encode()
    assert bearer_token([("Authorization", f"bearer  {TOKEN_A}")]) == TOKEN_A.encode()
    assert bearer_token([("authorization", f"Basic {TOKEN_A}")]) is None
    assert bearer_token([("x-other", "Bearer x")]) is None
    assert bearer_token(None) is None

    valid = (TOKEN_A.encode(), TOKEN_B.encode())
    assert token_accepted(TOKEN_B.encode(), valid)
    assert not token_accepted(b"token-c-0000000000000000", valid)
    assert not token_accepted(TOKEN_A.encode()[:-1], valid)
    assert not token_accepted(None, valid)


def test_certificate_names_and_identity_decision() -> None:
    context = {
        "x509_common_name": [b"node-1"],
        "peer_dns": [b"node-1", b"node-1.example"],
        "peer_uri": [b"spiffe://x/node-9"],
    }
    assert certificate_names(context) == ["node-1", "node-1.example"]
    assert identity_mismatch("node-1", ["node-1"]) is None
    assert identity_mismatch("node-1.example", certificate_names(context)) is None
    why = identity_mismatch("node-2", ["node-1"])
    assert why is not None and "'node-2'" in why and "'node-1'" in why
    why = identity_mismatch("node-2", [])
    assert why is not None and "no client certificate" in why


# A real coordinator with mTLS and tokens --------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> tuple[CertificateAuthority, Pair]:
    ca = CertificateAuthority(tmp_path / "pki")
    return ca, ca.issue("datacache-coordinator", ("datacache-coordinator",), server=True)


def start_secure(
    local: LocalCluster, ca: CertificateAuthority, server: Pair, token_file: Path
) -> None:
    local.start_coordinator(
        f"--tls-cert-file={server.cert_file}",
        f"--tls-key-file={server.key_file}",
        f"--tls-client-ca-file={ca.cert_file}",
        f"--api-token-file={token_file}",
        "--metrics-port=0",
    )
    local.client = ClientSettings(tls_ca_file=ca.cert_file)


def test_mtls_agent_certificate_must_name_its_node(
    local: LocalCluster, pki: tuple[CertificateAuthority, Pair], tmp_path: Path
) -> None:
    ca, server = pki
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A}\n")
    start_secure(local, ca, server, tokens)
    node1 = ca.issue("node-1")
    by_san = ca.issue("agent-on-node-3", ("node-3",))

    def agent(pair: Pair) -> dict[str, Path]:
        return {"tls_cert_file": pair.cert_file, "tls_key_file": pair.key_file}

    # The right certificate: every AgentService call with an identity goes through.
    with local.channel(**agent(node1)) as channel:
        assert register(channel, "node-1").lease_seconds > 0
        stub = pb_grpc.AgentServiceStub(channel)
        stub.ReportState(pb.ReportStateRequest(agent=identity("node-1")), timeout=10)
        stream = stub.WatchDesiredState(
            pb.WatchDesiredStateRequest(agent=identity("node-1")), timeout=10
        )
        assert next(iter(stream)).generation >= 0
        stream.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs

        # The same certificate claiming another node: refused, naming both identities.
        error = rpc_error(lambda: register(channel, "node-2"))
        assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
        assert "'node-2'" in details_of(error) and "'node-1'" in details_of(error)
        error = rpc_error(
            lambda: next(
                iter(
                    stub.WatchDesiredState(
                        pb.WatchDesiredStateRequest(agent=identity("node-2")), timeout=10
                    )
                )
            )
        )
        assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
        # A client stream carries the identity in its first message.
        offer = iter(
            [
                pb.PublishVersionRequest(
                    agent=identity("node-2"), dataset_name="default/x", revision=1
                )
            ]
        )
        error = rpc_error(lambda: stub.PublishVersion(offer, timeout=10))
        assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
        offer = iter(
            [
                pb.PublishVersionRequest(
                    agent=identity("node-1"), dataset_name="default/x", revision=1
                )
            ]
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.PublishVersion(offer, timeout=10)
        assert code_of(caught.value) != grpc.StatusCode.PERMISSION_DENIED

        # Health and reflection need no token.
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="datacache.v1.AgentService"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for s in next(iter(listing)).list_services_response.service}
        assert "datacache.v1.DatasetService" in services

        # An agent certificate is not enough for the dataset API: it needs the token.
        error = rpc_error(
            lambda: pb_grpc.DatasetServiceStub(channel).ListDatasets(
                pb.ListDatasetsRequest(), timeout=10
            )
        )
        assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED

    # A DNS SAN names the node just as the CN does.
    with local.channel(**agent(by_san)) as channel:
        assert register(channel, "node-3").lease_seconds > 0
        error = rpc_error(lambda: register(channel, "agent-on-node-3x"))
        assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED

    # No client certificate, or one from another CA, or plain text: the TLS handshake itself
    # fails, for every service (health is used: it is not retried, so it fails at once).
    def health_check(channel: grpc.Channel) -> object:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )

    stranger = CertificateAuthority(tmp_path / "other-pki", name="other-ca").issue("node-1")
    for changes in ({}, agent(stranger), {"tls_ca_file": None}):
        with local.channel(**changes) as channel:
            error = rpc_error(lambda: health_check(channel))
            assert code_of(error) == grpc.StatusCode.UNAVAILABLE, changes

    # A client certificate plus the token: the whole API, also when the certificate is
    # checked for the Service name while dialling a loopback address (a port-forward).
    cli = ca.issue("datacache-cli")
    with local.channel(
        **agent(cli), token_file=tokens, tls_server_name="datacache-coordinator"
    ) as channel:
        nodes = pb_grpc.NodeServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=10)
        assert {n.name for n in nodes.nodes} == {"node-1", "node-3"}
    # A server certificate that does not name the server is refused by the client.
    with local.channel(**agent(cli), tls_server_name="elsewhere") as channel:
        assert code_of(rpc_error(lambda: health_check(channel))) == grpc.StatusCode.UNAVAILABLE

    log = local.coordinator.log_path.read_text()
    assert TOKEN_A not in log
    assert "agent claims node 'node-2'" in log


def test_bearer_tokens_missing_wrong_rotated(local: LocalCluster, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    # Given through the environment, as every flag can be.
    local.start_coordinator("--metrics-port=0", env={"DATACACHE_API_TOKEN_FILE": str(tokens)})

    def list_datasets(**changes: object) -> pb.ListDatasetsResponse:
        with local.channel(**changes) as channel:
            response: pb.ListDatasetsResponse = pb_grpc.DatasetServiceStub(channel).ListDatasets(
                pb.ListDatasetsRequest(), timeout=10
            )
            return response

    def token_file(token: str) -> Path:
        path = tmp_path / f"client-{token[:7]}"
        path.write_text(token + "\n")
        return path

    # Missing.
    error = rpc_error(list_datasets)
    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    assert "token was missing" in details_of(error)
    with local.channel() as channel:
        error = rpc_error(
            lambda: pb_grpc.NodeServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=10)
        )
        assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
        # AgentService does not take tokens (mTLS only), health stays open.
        assert register(channel, "node-1").lease_seconds > 0
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Wrong.
    error = rpc_error(lambda: list_datasets(token_file=token_file("token-x-0000000000000000")))
    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    assert "token was not valid" in details_of(error)
    # Either line of the file is valid.
    assert list(list_datasets(token_file=token_file(TOKEN_A)).datasets) == []
    assert list(list_datasets(token_file=token_file(TOKEN_B)).datasets) == []

    # Server streams are guarded the same way.
    def first_event(**changes: object) -> pb.WatchDatasetsResponse:
        with local.channel(**changes) as channel:
            stream = pb_grpc.DatasetServiceStub(channel).WatchDatasets(
                pb.WatchDatasetsRequest(), timeout=10
            )
            event: pb.WatchDatasetsResponse = next(iter(stream))
            return event

    with local.channel(token_file=token_file(TOKEN_A)) as channel:
        pb_grpc.DatasetServiceStub(channel).CreateDataset(
            pb.CreateDatasetRequest(
                dataset=pb.Dataset(name="d", source="s3://bucket/d/", replicas=1)
            ),
            timeout=10,
        )
    assert code_of(rpc_error(first_event)) == grpc.StatusCode.UNAUTHENTICATED
    assert first_event(token_file=token_file(TOKEN_B)).dataset.name == "default/d"

    # Rotation: a rewritten file takes effect without a restart.
    replacement = tmp_path / "tokens.new"
    replacement.write_text(f"{TOKEN_B}\ntoken-c-0123456789abcdef\n")
    replacement.replace(tokens)

    def rotated() -> bool:
        try:
            list_datasets(token_file=token_file(TOKEN_A))
        except grpc.RpcError as exc:
            return code_of(exc) == grpc.StatusCode.UNAUTHENTICATED
        return False

    wait_until(rotated, 15, "the old token to be refused after rotation")
    list_datasets(token_file=token_file("token-c-0123456789abcdef"))
    assert TOKEN_A not in local.coordinator.log_path.read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-client-ca-file={ca}"], "--tls-client-ca-file needs --tls-cert-file"),
        (["--tls-cert-file={cert}"], "give both --tls-cert-file and --tls-key-file"),
        (["--tls-cert-file={key}", "--tls-key-file={key}"], "is not PEM"),
        (["--tls-cert-file={cert}", "--tls-key-file={tmp}/missing.key"], "cannot read the TLS key"),
        (["--api-token-file={tmp}/empty"], "holds no token"),
    ],
)
def test_coordinator_refuses_unusable_security_settings(
    pki: tuple[CertificateAuthority, Pair], tmp_path: Path, flags: list[str], message: str
) -> None:
    ca, server = pki
    (tmp_path / "empty").write_text("# no tokens yet\n")
    values = {
        "ca": ca.cert_file,
        "cert": server.cert_file,
        "key": server.key_file,
        "tmp": tmp_path,
    }
    result = subprocess.run(
        [
            "datacache-coordinator",
            "--listen=127.0.0.1:0",
            f"--db-path={tmp_path / 'db.sqlite'}",
            "--metrics-port=0",
            *(f.format(**values) for f in flags),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_renewed_server_certificate_is_used_without_restart(
    local: LocalCluster, tmp_path: Path
) -> None:
    old_ca = CertificateAuthority(tmp_path / "old", name="old-ca")
    new_ca = CertificateAuthority(tmp_path / "new", name="new-ca")
    live = old_ca.issue("coordinator", server=True, file_name="live")
    local.start_coordinator(
        f"--tls-cert-file={live.cert_file}", f"--tls-key-file={live.key_file}", "--metrics-port=0"
    )

    def serves_for(ca: CertificateAuthority) -> bool:
        with local.channel(tls_ca_file=ca.cert_file) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
            except grpc.RpcError as exc:
                assert code_of(exc) == grpc.StatusCode.UNAVAILABLE
                return False
            return True

    assert serves_for(old_ca) and not serves_for(new_ca)
    # Renewed in place, as cert-manager does: new key and certificate under the same names.
    renewed = new_ca.issue("coordinator", server=True, file_name="renewed")
    live.key_file.write_bytes(renewed.key_file.read_bytes())
    live.cert_file.write_bytes(renewed.cert_file.read_bytes())
    wait_until(lambda: serves_for(new_ca), 15, "the renewed certificate to be served")
    assert not serves_for(old_ca)
