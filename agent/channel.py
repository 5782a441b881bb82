"""The agent's gRPC channel to the coordinator, through the shared channel factory
(`datacache.client`): plaintext in local mode; TLS when a CA is configured, with a client
certificate naming the node (the coordinator's mTLS checks that it names the node the agent
claims to be)."""

from __future__ import annotations

import grpc

from agent.errors import AgentError
from agent.settings import TlsSettings
from datacache.client import ClientConfigError, ClientSettings, aio_channel, channel_credentials


class TlsConfigError(AgentError):
    pass


def client_settings(coordinator: str, tls: TlsSettings) -> ClientSettings:
    return ClientSettings(
        target=coordinator,
        tls_ca_file=tls.ca_file,
        tls_cert_file=tls.cert_file,
        tls_key_file=tls.key_file,
        tls_server_name=tls.server_name,
    )


def check(coordinator: str, tls: TlsSettings) -> None:
    """Raises TlsConfigError when the files cannot make a channel (read at start, so a bad
    setting stops the agent at once instead of on every reconnect)."""
    try:
        channel_credentials(client_settings(coordinator, tls))
    except ClientConfigError as exc:
        raise TlsConfigError(str(exc)) from exc


def open_channel(coordinator: str, tls: TlsSettings) -> grpc.aio.Channel:
    try:
        return aio_channel(client_settings(coordinator, tls))
    except ClientConfigError as exc:
        raise TlsConfigError(str(exc)) from exc
