"""`datacache-coordinator`: every flag is also an environment variable DATACACHE_<FLAG>."""

from __future__ import annotations

from pathlib import Path

import click

from coordinator.auth import AuthConfigError
from coordinator.server import run
from coordinator.settings import CoordinatorSettings
from datacache import __version__, logs

_DEFAULTS = CoordinatorSettings()


@click.command(context_settings={"auto_envvar_prefix": "DATACACHE", "show_default": True})
@click.version_option(__version__, prog_name="datacache-coordinator")
@click.option(
    "--listen",
    default=_DEFAULTS.listen,
    show_envvar=True,
    help="gRPC listen address host:port (port 0: any free port).",
)
@click.option(
    "--db-path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=_DEFAULTS.db_path,
    show_envvar=True,
    help="SQLite database file.",
)
@click.option(
    "--labeler",
    type=click.Choice(["local", "kubernetes"]),
    default=_DEFAULTS.labeler,
    show_envvar=True,
    help="Where node labels go: the local store, or Kubernetes Node objects.",
)
@click.option(
    "--kubeconfig",
    default=None,
    show_envvar=True,
    help="Kubeconfig for --labeler=kubernetes (default: in-cluster config).",
)
@click.option(
    "--lease-seconds",
    type=click.IntRange(3, 3600),
    default=_DEFAULTS.lease_seconds,
    show_envvar=True,
    help="Agent lease: silence longer than this means gone (s).",
)
@click.option(
    "--reconcile-interval-seconds",
    type=click.FloatRange(0.1, 600),
    default=_DEFAULTS.reconcile_interval_seconds,
    show_envvar=True,
    help="Longest time between reconcile passes (s).",
)
@click.option(
    "--node-cache-dir",
    default=_DEFAULTS.node_cache_dir,
    show_envvar=True,
    help="The agents' cache directory on the nodes (for placement answers).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=_DEFAULTS.metrics_port,
    show_envvar=True,
    help="Serve Prometheus metrics on this port (0: no metrics endpoint).",
)
@click.option(
    "--metrics-address",
    default=_DEFAULTS.metrics_address,
    show_envvar=True,
    help="Address for the metrics endpoint.",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="Write the bound gRPC port here once serving.",
)
@click.option(
    "--secrets-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="Local mode: credentials Secrets as <dir>/<secret>/AWS_ACCESS_KEY_ID etc.",
)
@click.option(
    "--eviction-cooldown-seconds",
    type=click.FloatRange(0, 86400),
    default=_DEFAULTS.eviction_cooldown_seconds,
    show_envvar=True,
    help="A dataset evicted from a node is not placed back there for this long (s).",
)
@click.option(
    "--watch-queue-size",
    type=click.IntRange(1, 1_000_000),
    default=_DEFAULTS.watch_queue_size,
    show_envvar=True,
    help="Datasets with unsent changes per WatchDatasets client before it is cut off.",
)
@click.option(
    "--watch-history-size",
    type=click.IntRange(1, 10_000_000),
    default=_DEFAULTS.watch_history_size,
    show_envvar=True,
    help="Dataset changes kept for watches to resume from.",
)
@click.option(
    "--watch-history-seconds",
    type=click.FloatRange(1, 7 * 86400),
    default=_DEFAULTS.watch_history_seconds,
    show_envvar=True,
    help="Longest time a dataset change is kept for watches to resume from (s).",
)
@click.option(
    "--tls-cert-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="Serve TLS with this PEM certificate (chain); unset: plaintext.",
)
@click.option(
    "--tls-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="PEM private key of --tls-cert-file.",
)
@click.option(
    "--tls-client-ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="Require client certificates signed by this PEM CA; an agent's must name its node.",
)
@click.option(
    "--api-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="Bearer tokens (one per line) required on DatasetService and NodeService.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_envvar=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    default="auto",
    show_envvar=True,
    help="auto: text on a terminal, JSON lines otherwise.",
)
def main(
    listen: str,
    db_path: Path,
    labeler: str,
    kubeconfig: str | None,
    lease_seconds: int,
    reconcile_interval_seconds: float,
    node_cache_dir: str,
    metrics_port: int,
    metrics_address: str,
    port_file: Path | None,
    secrets_dir: Path | None,
    eviction_cooldown_seconds: float,
    watch_queue_size: int,
    watch_history_size: int,
    watch_history_seconds: float,
    tls_cert_file: Path | None,
    tls_key_file: Path | None,
    tls_client_ca_file: Path | None,
    api_token_file: Path | None,
    log_level: str,
    log_format: logs.LogFormat,
) -> None:
    """Run the datacache coordinator."""
    logs.configure(log_level, log_format)
    settings = CoordinatorSettings(
        listen=listen,
        db_path=db_path,
        labeler="kubernetes" if labeler == "kubernetes" else "local",
        kubeconfig=kubeconfig,
        lease_seconds=lease_seconds,
        reconcile_interval_seconds=reconcile_interval_seconds,
        node_cache_dir=node_cache_dir,
        metrics_port=metrics_port,
        metrics_address=metrics_address,
        port_file=port_file,
        secrets_dir=secrets_dir,
        eviction_cooldown_seconds=eviction_cooldown_seconds,
        watch_queue_size=watch_queue_size,
        watch_history_size=watch_history_size,
        watch_history_seconds=watch_history_seconds,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        tls_client_ca_file=tls_client_ca_file,
        api_token_file=api_token_file,
    )
    try:
        run(settings)
    except AuthConfigError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
