"""`datacache-agent run` (the node daemon) and `datacache-agent fetch` (one copy, no
coordinator). Every option is also an environment variable, named on `--help`."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from agent.errors import AgentError
from agent.fetch import FetchSettings, Progress, fetch_into, plan
from agent.manifest import Manifest
from agent.peering import MAX_BATCH_FILES, PeerKeys, PeerSettings
from agent.sources import SourceOpener
from agent.sources.nfs_settings import NfsSettings
from agent.sources.s3 import S3Settings
from datacache import __version__, logs
from datacache.validation import (
    InvalidInput,
    parse_source,
    validate_node_name,
    validate_peer_address,
)

if TYPE_CHECKING:
    # `run` imports these when it starts: `fetch`, a one-shot copy whose start-up time is
    # part of every copy it makes, never loads gRPC, the index or the servers (~90 ms).
    from agent.health import HealthServer
    from agent.peerserver import Lookup, PeerServer
    from agent.runner import Agent
    from agent.settings import AgentSettings

_FETCH = FetchSettings()
F = TypeVar("F", bound=Callable[..., Any])


def _env(name: str) -> str:
    return f"DATACACHE_{name.split('/')[0].upper().replace('-', '_')}"


def option(name: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option whose environment variable is DATACACHE_<NAME>."""
    return click.option(f"--{name}", envvar=_env(name), show_envvar=True, **kwargs)


def transfer_options(fn: F) -> F:
    """Options shared by `run` and `fetch`: how bytes are moved."""
    decorators = [
        option(
            "s3-endpoint-url",
            default=None,
            help="S3-compatible endpoint (default: AWS, or AWS_ENDPOINT_URL_S3).",
        ),
        option("s3-region", default=None, help="Region for request signing."),
        option(
            "s3-read-timeout-seconds",
            type=click.FloatRange(1, 3600),
            default=60.0,
            help="Abandon and retry a read silent for this long (s).",
        ),
        option(
            "nfs-version",
            type=click.Choice(["3", "4"]),
            default="3",
            help="NFS protocol version for nfs:// sources.",
        ),
        option(
            "concurrency",
            type=click.IntRange(1, 256),
            default=_FETCH.concurrency,
            help="Parallel reads. Memory: concurrency x 1 MiB.",
        ),
        option(
            "part-bytes",
            type=click.IntRange(1 << 20, 1 << 30),
            default=_FETCH.part_bytes,
            help="Range size for large files (bytes).",
        ),
        option(
            "multipart-threshold-bytes",
            type=click.IntRange(1 << 20),
            default=_FETCH.multipart_threshold_bytes,
            help="Files larger than this are read as parallel ranges (bytes).",
        ),
        option(
            "fsync/--no-fsync",
            default=_FETCH.fsync,
            help="fsync every file and directory before publishing.",
        ),
        option(
            "fsync-concurrency",
            type=click.IntRange(1, 256),
            default=_FETCH.fsync_concurrency,
            help="fsyncs in flight at once, on threads apart from the reads.",
        ),
        option(
            "small-object-connections",
            type=click.IntRange(0, 1024),
            default=_FETCH.small_object_connections,
            help="S3: connections one thread keeps busy reading files up to 1 MiB "
            "(0: read them on the threads).",
        ),
        option(
            "drop-behind/--no-drop-behind",
            default=_FETCH.drop_behind,
            help="With fsync: write finished ranges to disk as the copy goes and drop them "
            "from the page cache (the copy then holds about concurrency x part size of it).",
        ),
        option(
            "log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
        ),
        option(
            "log-format",
            type=click.Choice(["auto", "json", "text"]),
            default="auto",
            help="auto: text on a terminal, JSON lines otherwise.",
        ),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


_PEER = PeerSettings()


def peer_options(fn: F) -> F:
    """Options of peer copying (`agent.peering`)."""
    decorators = [
        option(
            "peer-key-file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Shared cluster keys for peer copying, one per line; unset: no peer copying.",
        ),
        option(
            "peer-port",
            type=click.IntRange(0, 65535),
            default=_PEER.port,
            help="Serve Ready versions to other agents on this port (0: serve none).",
        ),
        option("peer-listen-address", default=_PEER.listen_address, help="Peer server address."),
        option(
            "peer-advertise-address",
            default=_PEER.advertise_address,
            help="host:port other agents dial (in a cluster: $(POD_IP):9403); unset: not "
            "advertised, so no agent reads from this one.",
        ),
        option(
            "peer-serve-bytes-per-second",
            type=click.FloatRange(1024 * 1024),
            default=_PEER.serve_bytes_per_second,
            help="Most bytes/s served to all peers together.",
        ),
        option(
            "peer-serve-max-connections",
            type=click.IntRange(1, 1024),
            default=_PEER.serve_max_connections,
            help="Most peer reads served at once (503 beyond).",
        ),
        option(
            "peer-stall-seconds",
            type=click.FloatRange(0.1, 600),
            default=_PEER.stall_seconds,
            help="Leave a peer silent for this long (s).",
        ),
        option(
            "peer-min-bytes-per-second",
            type=click.FloatRange(0),
            default=_PEER.min_bytes_per_second,
            help="Leave a peer slower than this over a read (bytes/s).",
        ),
        option(
            "peer-avoid-seconds",
            type=click.FloatRange(0),
            default=_PEER.avoid_seconds,
            help="How long a peer that sent wrong bytes is not asked (s); other failures: "
            "2 s, doubling up to this.",
        ),
        option(
            "peer-batch-files",
            type=click.IntRange(1, MAX_BATCH_FILES),
            default=_PEER.batch_files,
            help="Most small files asked of a peer in one request (1: one request per file).",
        ),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


def _peer_settings(kwargs: dict[str, Any]) -> PeerSettings:
    advertise = kwargs["peer_advertise_address"]
    if advertise:
        try:
            validate_peer_address(advertise)
        except InvalidInput as exc:
            raise click.BadParameter(str(exc), param_hint="--peer-advertise-address") from exc
    return PeerSettings(
        key_file=kwargs["peer_key_file"],
        port=kwargs["peer_port"],
        listen_address=kwargs["peer_listen_address"],
        advertise_address=advertise if kwargs["peer_port"] else "",
        serve_bytes_per_second=kwargs["peer_serve_bytes_per_second"],
        serve_max_connections=kwargs["peer_serve_max_connections"],
        stall_seconds=kwargs["peer_stall_seconds"],
        min_bytes_per_second=kwargs["peer_min_bytes_per_second"],
        avoid_seconds=kwargs["peer_avoid_seconds"],
        batch_files=kwargs["peer_batch_files"],
    )


def _fetch_settings(kwargs: dict[str, Any]) -> FetchSettings:
    return FetchSettings(
        concurrency=kwargs["concurrency"],
        part_bytes=kwargs["part_bytes"],
        multipart_threshold_bytes=kwargs["multipart_threshold_bytes"],
        fsync=kwargs["fsync"],
        fsync_concurrency=kwargs["fsync_concurrency"],
        small_object_connections=kwargs["small_object_connections"],
        drop_behind=kwargs["drop_behind"],
    )


def _s3_settings(kwargs: dict[str, Any]) -> S3Settings:
    return S3Settings(
        endpoint_url=kwargs["s3_endpoint_url"],
        region=kwargs["s3_region"],
        read_timeout_seconds=kwargs["s3_read_timeout_seconds"],
        max_connections=max(10, kwargs["concurrency"]),
    )


def _nfs_settings(kwargs: dict[str, Any]) -> NfsSettings:
    return NfsSettings(
        version=int(kwargs["nfs_version"]), max_connections=max(4, kwargs["concurrency"])
    )


def _node_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return validate_node_name(value)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc)) from exc


_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class NodeLabel(click.ParamType[tuple[str, str]]):
    """KEY=VALUE, a Kubernetes label; the environment variable holds several, comma-separated."""

    name = "KEY=VALUE"
    envvar_list_splitter = ","

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, label_value = str(value).strip().partition("=")
        prefix, slash, name = key.rpartition("/")
        if not sep:
            self.fail(f"{value!r} is not KEY=VALUE", param, ctx)
        if not _LABEL_NAME.fullmatch(name) or (
            slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))
        ):
            self.fail(
                f"{key!r} is not a Kubernetes label key: an optional DNS subdomain prefix and "
                "'/', then at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends",
                param,
                ctx,
            )
        if label_value and not _LABEL_NAME.fullmatch(label_value):
            self.fail(
                f"{label_value!r} (for {key}) is not a label value: at most 63 letters, digits, "
                "'-', '_' or '.', alphanumeric at both ends",
                param,
                ctx,
            )
        return key, label_value


@click.group(context_settings={"show_default": True})
@click.version_option(__version__, prog_name="datacache-agent")
def main() -> None:
    """The datacache node agent."""


@main.command()
@option(
    "node-name",
    required=True,
    callback=_node_name,
    help="This node's name (downward API spec.nodeName in a cluster).",
)
@option(
    "coordinator", default="datacache-coordinator:7400", help="Coordinator gRPC address host:port."
)
@option(
    "cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/datacache"),
    help="Cache root directory.",
)
@option(
    "report-interval-seconds",
    type=click.FloatRange(0.2, 600),
    default=5.0,
    help="Longest time between state reports (s).",
)
@option(
    "retry-base-seconds",
    type=click.FloatRange(0.1, 3600),
    default=5.0,
    help="First retry delay for a failed dataset (s), doubling.",
)
@option(
    "metrics-port",
    type=click.IntRange(0, 65535),
    default=9401,
    help="Serve Prometheus metrics on this port (0: no metrics endpoint).",
)
@option(
    "metrics-address",
    default="0.0.0.0",  # noqa: S104 - Prometheus scrapes the pod from outside
    help="Address for the metrics endpoint.",
)
@option(
    "scrub-interval-seconds",
    type=click.FloatRange(0),
    default=86400.0,
    help="Time between scrubs re-reading every Ready dataset (s); 0 disables them.",
)
@option(
    "scrub-bytes-per-second",
    type=click.FloatRange(1024),
    default=50 * 1024 * 1024,
    help="Scrub read rate (bytes/s).",
)
@option("node-uid", default="", help="This node's Kubernetes UID (part of the agent's identity).")
@click.option(
    "--node-label",
    "node_labels",
    envvar="DATACACHE_NODE_LABELS",
    show_envvar=True,
    multiple=True,
    type=NodeLabel(),
    help="A node label for the coordinator in local mode (repeatable; the environment "
    "variable takes a comma-separated list), e.g. topology.kubernetes.io/zone=a.",
)
@option(
    "cache-quota-bytes",
    type=click.IntRange(0),
    default=0,
    help="Most bytes the cache may hold; 0: the filesystem's size.",
)
@option(
    "health-port",
    type=click.IntRange(0, 65535),
    default=9402,
    help="Serve gRPC health (grpc.health.v1) on this port (0: off).",
)
@option(
    "health-address",
    default="0.0.0.0",  # noqa: S104 - the kubelet probes the pod from outside
    help="Address for the health service.",
)
@option(
    "tls-ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CA bundle (PEM) checking the coordinator's certificate; unset: plaintext.",
)
@option(
    "tls-cert-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Client certificate (PEM) naming this node, for mTLS.",
)
@option(
    "tls-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Private key (PEM) of --tls-cert-file.",
)
@option(
    "last-use-interval-seconds",
    type=click.FloatRange(0),
    default=60.0,
    help="Time between samplings of files' access times for last use (s); 0 disables it.",
)
@option(
    "tls-server-name",
    default=None,
    help="Name the coordinator's certificate must carry, when the address is not one it names.",
)
@peer_options
@transfer_options
def run(**kwargs: Any) -> None:
    """Run the agent for one node: register with the coordinator and keep its datasets."""
    logs.configure(kwargs["log_level"], kwargs["log_format"], node=kwargs["node_name"])
    from agent.settings import AgentSettings, TlsSettings
    from agent.store import CacheStore

    tls = TlsSettings(
        kwargs["tls_ca_file"],
        kwargs["tls_cert_file"],
        kwargs["tls_key_file"],
        kwargs["tls_server_name"],
    )
    import asyncio

    import prometheus_client

    from agent import metrics
    from agent.channel import TlsConfigError
    from agent.channel import check as check_tls
    from agent.credentials import DatasetSources
    from agent.index import CacheIndex
    from agent.runner import Agent

    try:
        check_tls(kwargs["coordinator"], tls)
    except TlsConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    settings = AgentSettings(
        node_name=kwargs["node_name"],
        node_uid=kwargs["node_uid"],
        node_labels=tuple(kwargs["node_labels"]),
        coordinator=kwargs["coordinator"],
        cache_quota_bytes=kwargs["cache_quota_bytes"],
        tls=tls,
        health_port=kwargs["health_port"],
        health_address=kwargs["health_address"],
        last_use_interval_seconds=kwargs["last_use_interval_seconds"],
        cache_dir=kwargs["cache_dir"],
        fetch=_fetch_settings(kwargs),
        s3=_s3_settings(kwargs),
        nfs=_nfs_settings(kwargs),
        report_interval_seconds=kwargs["report_interval_seconds"],
        retry_base_seconds=kwargs["retry_base_seconds"],
        scrub_interval_seconds=kwargs["scrub_interval_seconds"],
        scrub_bytes_per_second=kwargs["scrub_bytes_per_second"],
        peer=_peer_settings(kwargs),
    )
    peer_keys = None
    if settings.peer.key_file is not None and not settings.peer.key_file.exists():
        # An optional Secret that was never created: the agent works, from sources only.
        logging.getLogger("agent").error(
            "Peer copying is off: the peer key file %s does not exist (create the Secret "
            "datacache-peer-keys, see manifests/agent.yaml)",
            settings.peer.key_file,
        )
    elif settings.peer.key_file is not None:
        try:
            peer_keys = PeerKeys(settings.peer.key_file)
        except AgentError as exc:
            raise click.BadParameter(str(exc), param_hint="--peer-key-file") from exc
    sources = DatasetSources(SourceOpener(settings.s3, settings.nfs), settings.s3)
    if kwargs["metrics_port"]:
        prometheus_client.start_http_server(
            kwargs["metrics_port"], kwargs["metrics_address"], registry=metrics.REGISTRY
        )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        health = await _start_health(settings)
        store = CacheStore(settings.cache_dir)
        started: list[Agent] = []
        peers = _start_peer_server(
            settings.peer,
            peer_keys,
            lambda dataset, version: (
                started[0].served_version(dataset, version) if started else None
            ),
        )
        agent = Agent(
            settings,
            store,
            sources.open,
            CacheIndex.open(store.root),
            health,
            peer_keys,
            peer_address=settings.peer.advertise_address if peers is not None else "",
        )
        started.append(agent)
        try:
            await agent.run(stop)
        finally:
            if peers is not None:
                peers.stop()
            if health is not None:
                await health.stop()

    asyncio.run(serve())


def _start_peer_server(
    settings: PeerSettings, keys: PeerKeys | None, lookup: Lookup
) -> PeerServer | None:
    from agent.peerserver import PeerServer

    if keys is None or not settings.port:
        return None
    try:
        server = PeerServer(settings, keys, lookup)
    except OSError as exc:
        # Other agents then read from the source; this node's own copies are unaffected.
        logging.getLogger("agent").error(
            "Peer server not started on %s:%d (%s): set --peer-port to a free port",
            settings.listen_address,
            settings.port,
            exc.strerror,
        )
        return None
    server.start()
    return server


async def _start_health(settings: AgentSettings) -> HealthServer | None:
    if not settings.health_port:
        return None
    from agent.health import HealthServer

    health = HealthServer()
    try:
        await health.start(settings.health_address, settings.health_port)
    except RuntimeError as exc:
        # Probes then fail and say so; the node's data stays served either way.
        logging.getLogger("agent").error(
            "Health service not started on %s:%d (%s): set --health-port to a free port",
            settings.health_address,
            settings.health_port,
            exc,
        )
        return None
    return health


def _progress_printer(progress: Progress, done: threading.Event) -> threading.Thread:
    def show() -> None:
        while not done.wait(0.2):
            total = progress.bytes_total or 1
            width = 30
            filled = width * progress.bytes_done // total
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] "
                f"{progress.files_done}/{progress.files_total} files "
                f"{progress.bytes_done / 2**20:.0f}/{progress.bytes_total / 2**20:.0f} MiB"
            )
            sys.stderr.flush()
        sys.stderr.write("\n")

    thread = threading.Thread(target=show, daemon=True)
    thread.start()
    return thread


@main.command()
@click.argument("source")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@option(
    "manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the copy's manifest (JSON) here.",
)
@option(
    "progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
@transfer_options
def fetch(source: str, dest: Path, **kwargs: Any) -> None:
    """Copy the dataset at SOURCE into the new directory DEST, verified, without a coordinator.

    The copy is staged beside DEST and renamed into place only when every file is verified.
    """
    _skip_teardown.set()
    logs.configure(kwargs["log_level"], kwargs["log_format"])
    try:
        parse_source(source)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="SOURCE") from exc
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise click.BadParameter(f"{dest} exists and is not an empty directory", param_hint="DEST")
    settings = _fetch_settings(kwargs)
    progress, done, cancel = Progress(metrics=False), threading.Event(), threading.Event()
    show = kwargs["progress"] if kwargs["progress"] is not None else sys.stderr.isatty()
    staged = dest.parent / f".{dest.name}.partial-{os.urandom(4).hex()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged.mkdir()
    printer = _progress_printer(progress, done) if show else None
    started = time.monotonic()
    try:
        src = SourceOpener(_s3_settings(kwargs), _nfs_settings(kwargs)).open(source)
        files, refused = plan(list(src.list()))
        entries = fetch_into(src, files, staged, settings, progress, cancel)
        if dest.exists():
            dest.rmdir()
        staged.rename(dest)
        if settings.fsync:
            fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        done.set()
        if printer is not None:
            printer.join()
        shutil.rmtree(staged, ignore_errors=True)
    seconds = time.monotonic() - started
    manifest = Manifest.build("fetch", source, entries)
    if kwargs["manifest"] is not None:
        kwargs["manifest"].write_text(manifest.to_json())
    methods: dict[str, int] = {}
    for entry in entries:
        methods[entry.verified] = methods.get(entry.verified, 0) + 1
    summary = {
        "files": len(entries),
        "bytes": manifest.total_bytes,
        "seconds": round(seconds, 3),
        "mib_per_second": round(manifest.total_bytes / 2**20 / max(seconds, 1e-9), 1),
        "digest": manifest.digest,
        "verification": methods,
        "refused": [{"key": key, "reason": reason} for key, reason in refused],
    }
    click.echo(json.dumps(summary))
    if refused:
        sys.exit(2)


_skip_teardown = threading.Event()
"""Set by a command that leaves nothing for the interpreter's teardown to do."""


def entry() -> None:
    """The `datacache-agent` command: `main`, then, after `fetch`, an exit without the
    interpreter's teardown. By then the copy has closed its files, joined its threads and
    removed its staging; what is left is freeing every module and object, about 11 ms here,
    which a benchmarked one-shot copy of 0.7 s need not pay. Other commands exit normally."""
    try:
        main()
    except SystemExit as exc:
        if not _skip_teardown.is_set():
            raise
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # as at a normal exit: output that could not be written fails it
                code = code or 120
        os._exit(code or 0)


if __name__ == "__main__":
    entry()
