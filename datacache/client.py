"""One way to dial the coordinator, for the CLI, controllers and the agent.

A channel built here carries:
- TLS when a CA file is given (`tls_ca_file`), optionally with a client certificate (mTLS);
- a bearer token (`token_file`) as call credentials: only over TLS, or in plain text to a
  loopback address (gRPC local credentials), never in clear text across a network;
- a retry service config: UNAVAILABLE is retried with exponential backoff for the idempotent
  methods (reads, updates, deletes, agent reports), never for CreateDataset, RefreshDataset or
  PublishVersion, whose repetition is not harmless;
- default deadlines per call kind (reads, writes, agent calls; streams have none), used when a
  call gives no `timeout`;
- keepalive pings so long watches notice a dead connection, and the server's 4 MiB message
  limit.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Matches the coordinator's limit in both directions."""

_DATASET = "datacache.v1.DatasetService"
_NODE = "datacache.v1.NodeService"
_AGENT = "datacache.v1.AgentService"

# (service, method, kind of call, retried on UNAVAILABLE)
_METHODS: tuple[tuple[str, str, str, bool], ...] = (
    (_DATASET, "GetDataset", "read", True),
    (_DATASET, "ListDatasets", "read", True),
    (_DATASET, "GetPlacement", "read", True),
    (_NODE, "ListNodes", "read", True),
    (_AGENT, "GetVersionManifest", "read", True),
    # A mask update sets values, a delete marks for deletion, a report replaces the node's
    # whole state, a registration upserts: each is harmless to repeat.
    (_DATASET, "UpdateDataset", "write", True),
    (_DATASET, "DeleteDataset", "write", True),
    (_AGENT, "RegisterAgent", "write", True),
    (_AGENT, "ReportState", "write", True),
    # A repeated create answers ALREADY_EXISTS for a dataset that was in fact created; a
    # repeated refresh starts a second revision.
    (_DATASET, "CreateDataset", "write", False),
    (_DATASET, "RefreshDataset", "write", False),
    (_AGENT, "PublishVersion", "write", False),
)

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(settings: ClientSettings) -> dict[str, Any]:
    """The gRPC service config: deadlines and retries per method (streams: neither)."""
    timeouts = {"read": settings.read_timeout_seconds, "write": settings.write_timeout_seconds}
    configs = []
    for kind, timeout in timeouts.items():
        for retried in (True, False):
            names = [
                {"service": s, "method": m} for s, m, k, r in _METHODS if k == kind and r == retried
            ]
            if not names:
                continue
            config: dict[str, Any] = {"name": names, "timeout": f"{timeout:.3f}s"}
            if retried:
                config["retryPolicy"] = RETRY_POLICY
            configs.append(config)
    return {"methodConfig": configs}


class ClientConfigError(ValueError):
    """The client settings cannot be used; the message names the setting and the fix."""


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the coordinator. Files are read when a channel is made."""

    target: str = "127.0.0.1:7400"
    """Coordinator address, host:port (or any gRPC target such as dns:///host:port)."""

    tls_ca_file: Path | None = None
    """PEM CA bundle that signed the coordinator's certificate; set: use TLS."""

    tls_cert_file: Path | None = None
    """PEM client certificate, for a coordinator that requires one (mTLS)."""

    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""

    tls_server_name: str | None = None
    """Name to verify the coordinator's certificate against, when the target is an address
    the certificate does not name (e.g. a port-forward to 127.0.0.1)."""

    token_file: Path | None = None
    """File whose first non-empty line is the bearer token for DatasetService and NodeService."""

    keepalive_seconds: float = 30.0
    """Ping an idle connection this often, seconds, so a dead peer is noticed."""

    read_timeout_seconds: float = 15.0
    """Default deadline of a read (get, list, placement, nodes, manifest pages), seconds."""

    write_timeout_seconds: float = 30.0
    """Default deadline of a change (create, update, delete, refresh, agent reports), seconds."""

    @property
    def tls(self) -> bool:
        return self.tls_ca_file is not None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def read_token(path: Path) -> str:
    """The first token of a token file (the same format the coordinator reads)."""
    for line in _read(path, "token file").decode(errors="replace").splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            if not token.isascii() or not token.isprintable() or " " in token:
                raise ClientConfigError(
                    f"token file {path}: the token must be printable ASCII without spaces"
                )
            return token
    raise ClientConfigError(f"token file {path} holds no token")


def target_host(target: str) -> str:
    """The host part of a gRPC target, or 'unix' for a Unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return "unix"
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :].split(",")[0]
            break
    if target.startswith("["):
        return target[1:].partition("]")[0]
    if target.count(":") > 1:
        return target  # A bare IPv6 address without a port.
    return target.rpartition(":")[0] if ":" in target else target


def is_loopback(host: str) -> bool:
    if host in ("localhost", "unix"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_options(settings: ClientSettings) -> list[tuple[str, Any]]:
    keepalive_ms = int(settings.keepalive_seconds * 1000)
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(settings))),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Pings only while a call is open (the server allows one every 10 s).
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    return options


def channel_credentials(settings: ClientSettings) -> grpc.ChannelCredentials | None:
    """Credentials for the channel; None means a plain insecure channel."""
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise ClientConfigError("give both --tls-cert-file and --tls-key-file, or neither")
    if settings.tls_cert_file is not None and not settings.tls:
        raise ClientConfigError(
            "a client certificate needs TLS: give --tls-ca-file (the CA of the coordinator's "
            "certificate) too"
        )
    token = read_token(settings.token_file) if settings.token_file is not None else None
    transport: grpc.ChannelCredentials | None
    if settings.tls_ca_file is not None:
        transport = grpc.ssl_channel_credentials(
            root_certificates=_read(settings.tls_ca_file, "TLS CA file"),
            private_key=(
                _read(settings.tls_key_file, "TLS key file") if settings.tls_key_file else None
            ),
            certificate_chain=(
                _read(settings.tls_cert_file, "TLS certificate file")
                if settings.tls_cert_file
                else None
            ),
        )
    elif token is not None:
        host = target_host(settings.target)
        if not is_loopback(host):
            raise ClientConfigError(
                f"refusing to send the API token in clear text to {host!r}: give --tls-ca-file "
                "(DATACACHE_TLS_CA_FILE) to use TLS, or reach the coordinator on a loopback "
                "address (e.g. through kubectl port-forward)"
            )
        # Local credentials vouch that the peer is on this machine, which lets gRPC attach call
        # credentials to a plain-text connection.
        kind = (
            grpc.LocalConnectionType.UDS if host == "unix" else grpc.LocalConnectionType.LOCAL_TCP
        )
        transport = grpc.local_channel_credentials(kind)
    else:
        return None
    if token is not None:
        return grpc.composite_channel_credentials(
            transport, grpc.access_token_call_credentials(token)
        )
    return transport


def sync_channel(settings: ClientSettings) -> grpc.Channel:
    """A blocking channel (the CLI). ClientConfigError if the settings cannot be used."""
    credentials = channel_credentials(settings)
    options = channel_options(settings)
    if credentials is None:
        return grpc.insecure_channel(settings.target, options=options)
    return grpc.secure_channel(settings.target, credentials, options=options)


def aio_channel(settings: ClientSettings) -> grpc.aio.Channel:
    """An asyncio channel (the agent, controllers). ClientConfigError as for sync_channel."""
    credentials = channel_credentials(settings)
    options = channel_options(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(settings.target, options=options)
    return grpc.aio.secure_channel(settings.target, credentials, options=options)
