"""Optional authentication of the coordinator's callers (off unless configured).

- TLS: the coordinator serves TLS with a certificate and key. With a client CA it also requires
  every caller to present a certificate signed by that CA (gRPC in Python cannot ask for a
  client certificate without requiring it), and an agent's certificate must name the node the
  agent claims to be (`AgentIdentity.node_name` equals the certificate's CN or one of its DNS
  SANs), or the call fails with PERMISSION_DENIED naming both.
- Bearer tokens: with a token file, DatasetService and NodeService require the metadata
  `authorization: Bearer <token>` matching one line of the file (several lines are several
  valid tokens, for rotation), else UNAUTHENTICATED. AgentService is authenticated by the
  client certificate only; health and reflection stay open to anyone who can connect.

Certificate, key, CA and token files are re-read when they change, so rotated Secrets take
effect without a restart. Nothing here ever logs a token.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from coordinator import metrics

log = logging.getLogger(__name__)

DATASET_SERVICE = "datacache.v1.DatasetService"
NODE_SERVICE = "datacache.v1.NodeService"
AGENT_SERVICE = "datacache.v1.AgentService"
TOKEN_SERVICES = frozenset({DATASET_SERVICE, NODE_SERVICE})
MIN_TOKEN_CHARS = 16
# A token file change shows up within this long, seconds; the stat is skipped in between.
TOKEN_RECHECK_SECONDS = 2.0


class AuthConfigError(ValueError):
    """A TLS or token setting cannot be used; the message names the file and the fix."""


# Pure decisions -------------------------------------------------------------------------------


def parse_tokens(text: str, source: str) -> tuple[bytes, ...]:
    """The valid tokens of a token file: one per non-empty line, '#' starts a comment line."""
    tokens = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.isascii() or not line.isprintable() or " " in line:
            raise AuthConfigError(
                f"{source} line {number}: a token must be printable ASCII without spaces"
            )
        if len(line) < MIN_TOKEN_CHARS:
            raise AuthConfigError(
                f"{source} line {number}: a token must have at least {MIN_TOKEN_CHARS} "
                "characters (e.g. `openssl rand -hex 32`)"
            )
        tokens.append(line.encode())
    if not tokens:
        raise AuthConfigError(f"{source} holds no token: write one token per line")
    return tuple(tokens)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the `authorization: Bearer <token>` metadata, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode()
    return None


def token_accepted(presented: bytes | None, valid: Sequence[bytes]) -> bool:
    """Constant-time comparison against every valid token (no early exit on a match)."""
    if presented is None:
        return False
    matches = [hmac.compare_digest(presented, token) for token in valid]
    return any(matches)


def certificate_names(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The names a verified client certificate vouches for: its CN and DNS SANs."""
    names = [
        v.decode(errors="replace")
        for key in ("x509_common_name", "peer_dns")
        for v in auth_context.get(key, [])
    ]
    return list(dict.fromkeys(names))


def identity_mismatch(claimed_node: str, names: Sequence[str]) -> str | None:
    """Why a caller claiming `claimed_node` may not act as it, or None if it may."""
    if not names:
        return (
            f"agent claims node {claimed_node!r} but presented no client certificate naming a "
            "node; configure the agent's TLS client certificate"
        )
    if claimed_node in names:
        return None
    return (
        f"agent claims node {claimed_node!r} but its client certificate names "
        f"{', '.join(repr(n) for n in names)}; issue the agent a certificate whose CN or DNS "
        "SAN is its node name"
    )


def split_method(full_method: str) -> tuple[str, str]:
    """('datacache.v1.DatasetService', 'GetDataset') from '/datacache.v1.DatasetService/...'."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


# Files ----------------------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def _stamp(paths: Iterable[Path | None]) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((-1, -1))
        else:
            stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class TokenFile:
    """The valid tokens, re-read when the file changes. A broken rewrite keeps the old ones."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp = _stamp([path])
        self._tokens = parse_tokens(
            _read(path, "API token file").decode(errors="replace"), str(path)
        )
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def tokens(self) -> tuple[bytes, ...]:
        now = time.monotonic()
        if now - self._checked < TOKEN_RECHECK_SECONDS:
            return self._tokens
        with self._lock:
            self._checked = now
            stamp = _stamp([self._path])
            if stamp != self._stamp:
                try:
                    text = _read(self._path, "API token file").decode(errors="replace")
                    self._tokens = parse_tokens(text, str(self._path))
                    log.info("API tokens reloaded from %s", self._path)
                except AuthConfigError as exc:
                    log.warning("Keeping the previous API tokens: %s", exc)
                self._stamp = stamp
        return self._tokens


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None

    def configuration(self) -> Any:
        cert = _read(self.cert_file, "TLS certificate")
        key = _read(self.key_file, "TLS key")
        for data, path, marker in (
            (cert, self.cert_file, b"-----BEGIN CERTIFICATE-----"),
            (key, self.key_file, b"PRIVATE KEY-----"),
        ):
            if marker not in data:
                raise AuthConfigError(f"{path} is not PEM (no {marker.decode()!r} block)")
        ca = None
        if self.client_ca_file is not None:
            ca = _read(self.client_ca_file, "TLS client CA")
            if b"-----BEGIN CERTIFICATE-----" not in ca:
                raise AuthConfigError(f"{self.client_ca_file} holds no PEM certificate")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def server_credentials(
    cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext. New connections pick up
    rotated files (cert-manager renews certificates in place)."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise AuthConfigError(
                "--tls-client-ca-file needs --tls-cert-file and --tls-key-file: client "
                "certificates are only checked over TLS"
            )
        return None
    if cert_file is None or key_file is None:
        raise AuthConfigError("give both --tls-cert-file and --tls-key-file, or neither")
    files = TlsFiles(cert_file, key_file, client_ca_file)
    initial = files.configuration()
    watched = (cert_file, key_file, client_ca_file)
    state = {"stamp": _stamp(watched)}

    def fetch() -> Any:
        # Called by gRPC before each handshake; None keeps the current configuration.
        stamp = _stamp(watched)
        if stamp == state["stamp"]:
            return None
        state["stamp"] = stamp
        try:
            config = files.configuration()
        except AuthConfigError as exc:
            log.warning("Keeping the previous TLS configuration: %s", exc)
            return None
        log.info("TLS certificate files changed; new connections use them")
        return config

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=client_ca_file is not None
    )


# The interceptor ------------------------------------------------------------------------------


Behavior = Callable[..., Any]
if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # Generic only in the type stubs.
    _Interceptor = grpc.aio.ServerInterceptor


def _replace_behavior(
    handler: grpc.RpcMethodHandler[Any, Any], wrap: Callable[[str, Behavior], Behavior]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of `handler` whose behaviour is wrapped, of the same streaming kind; `wrap` gets
    the kind ('unary_unary', 'unary_stream', 'stream_unary' or 'stream_stream')."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, make in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(
                wrap(attr, behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError("a method handler has one behaviour")


def rejecting(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str, method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    async def reject(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        metrics.GRPC_REQUESTS.labels(method, code.name).inc()
        await context.abort(code, message)

    async def reject_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await reject(request, context)
        yield  # pragma: no cover - abort raises

    def wrap(kind: str, behavior: Behavior) -> Behavior:
        return reject_stream if kind.endswith("_stream") else reject

    return _replace_behavior(handler, wrap)


def _claimed_node(request: Any) -> str | None:
    agent = getattr(request, "agent", None)
    if agent is None or not request.HasField("agent"):
        return None
    node: str = agent.node_name
    return node


class AuthInterceptor(_Interceptor):
    """Checks bearer tokens (DatasetService, NodeService) and that an agent's certificate
    names the node it claims (AgentService)."""

    def __init__(self, tokens: TokenFile | None, check_agent_certificates: bool) -> None:
        self._tokens = tokens
        self._check_agents = check_agent_certificates

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = split_method(handler_call_details.method)
        if service in TOKEN_SERVICES and self._tokens is not None:
            presented = bearer_token(handler_call_details.invocation_metadata)
            if not token_accepted(presented, self._tokens.tokens()):
                why = "missing" if presented is None else "not valid"
                log.warning("Refused %s: bearer token %s", method, why)
                message = (
                    f"{method} needs the metadata 'authorization: Bearer <token>' with a token "
                    f"from the coordinator's API token file; the token was {why} "
                    "(CLI: --token-file or DATACACHE_TOKEN_FILE)"
                )
                return rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, message, method)
        if service == AGENT_SERVICE and self._check_agents:
            return _replace_behavior(handler, lambda k, b: self._agent_check(k, b, method))
        return handler

    def _agent_check(self, kind: str, behavior: Behavior, method: str) -> Behavior:
        async def deny(
            context: grpc.aio.ServicerContext[Any, Any], node: str, message: str
        ) -> None:
            log.warning(
                "Refused %s: %s", method, message, extra={"node": node, "peer": context.peer()}
            )
            metrics.GRPC_REQUESTS.labels(method, "PERMISSION_DENIED").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        async def check(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            claimed = _claimed_node(request)
            if claimed is None:
                return  # No identity claimed (GetVersionManifest): the verified cert suffices.
            why = identity_mismatch(claimed, certificate_names(context.auth_context()))
            if why is not None:
                await deny(context, claimed, why)

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(request, context)
            return await behavior(request, context)

        async def server_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await check(request, context)
            async for response in behavior(request, context):
                yield response

        async def client_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            # The identity is in the first message; check it before the servicer sees any.
            iterator = aiter(requests)
            first = await anext(iterator, None)
            if first is not None:
                await check(first, context)

            async def replay() -> AsyncIterator[Any]:
                if first is not None:
                    yield first
                async for request in iterator:
                    yield request

            return await behavior(replay(), context)

        async def bidi(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            iterator = aiter(requests)
            first = await anext(iterator, None)
            if first is not None:
                await check(first, context)

            async def replay() -> AsyncIterator[Any]:
                if first is not None:
                    yield first
                async for request in iterator:
                    yield request

            async for response in behavior(replay(), context):
                yield response

        wrappers: dict[str, Behavior] = {
            "unary_unary": unary,
            "unary_stream": server_stream,
            "stream_unary": client_stream,
            "stream_stream": bidi,
        }
        return wrappers[kind]


@dataclass(frozen=True)
class ServerSecurity:
    """What serve() needs: port credentials (None: plaintext) and interceptors."""

    credentials: grpc.ServerCredentials | None
    interceptors: tuple[grpc.aio.ServerInterceptor[Any, Any], ...]


def server_security(
    cert_file: Path | None,
    key_file: Path | None,
    client_ca_file: Path | None,
    api_token_file: Path | None,
) -> ServerSecurity:
    """Reads and checks the configured files; AuthConfigError names what is wrong."""
    credentials = server_credentials(cert_file, key_file, client_ca_file)
    tokens = TokenFile(api_token_file) if api_token_file is not None else None
    if tokens is not None and credentials is None:
        log.warning(
            "API tokens are configured without TLS: they cross the network in clear text "
            "(clients only send them to loopback addresses); set --tls-cert-file/--tls-key-file"
        )
    if credentials is not None and client_ca_file is None:
        log.warning(
            "TLS without --tls-client-ca-file: AgentService accepts any caller that can connect"
        )
    interceptors: tuple[grpc.aio.ServerInterceptor[Any, Any], ...] = ()
    if tokens is not None or client_ca_file is not None:
        interceptors = (
            AuthInterceptor(tokens, check_agent_certificates=client_ca_file is not None),
        )
    return ServerSecurity(credentials, interceptors)
