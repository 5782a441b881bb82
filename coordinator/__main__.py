"""`datacache-coordinator`: every flag is also an environment variable DATACACHE_<FLAG>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    "--wal-checkpoint-seconds",
    type=click.FloatRange(0.05, 3600),
    default=_DEFAULTS.wal_checkpoint_seconds,
    show_envvar=True,
    help="Checkpoint the database's write-ahead log this often, off the request path (s).",
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
    "--namespace",
    default=_DEFAULTS.namespace,
    show_envvar=True,
    help="The coordinator's namespace (credentials Secrets, leader Lease).",
)
@click.option(
    "--leader-elect/--no-leader-elect",
    default=_DEFAULTS.leader_elect,
    show_envvar=True,
    help="Campaign for a Lease before acting (labeler=kubernetes).",
)
@click.option(
    "--leader-election-name",
    default=_DEFAULTS.leader_election_name,
    show_envvar=True,
    help="Name of the leader Lease.",
)
@click.option(
    "--leader-election-identity",
    default=None,
    show_envvar=True,
    help="This candidate's identity, e.g. the pod name (default: host name).",
)
@click.option(
    "--dataset-controller/--no-dataset-controller",
    default=_DEFAULTS.dataset_controller,
    show_envvar=True,
    help="Sync Dataset custom resources with the coordinator (labeler=kubernetes).",
)
@click.option(
    "--webhook-port",
    type=click.IntRange(0, 65535),
    default=_DEFAULTS.webhook_port,
    show_envvar=True,
    help="HTTPS port of the pod admission webhook (0: off).",
)
@click.option(
    "--webhook-cert-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="PEM certificate of the webhook.",
)
@click.option(
    "--webhook-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_envvar=True,
    help="PEM key of the webhook certificate.",
)
@click.option(
    "--demand-cooldown-seconds",
    type=click.FloatRange(0, 7 * 86400),
    default=_DEFAULTS.demand_cooldown_seconds,
    show_envvar=True,
    help="A replica count raised by demand falls only after this long without it (s).",
)
@click.option(
    "--watch-pods/--no-watch-pods",
    default=_DEFAULTS.watch_pods,
    show_envvar=True,
    help="Count annotated pending or running pods as demand (labeler=kubernetes).",
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
def main(log_level: str, log_format: logs.LogFormat, **options: Any) -> None:
    """Run the datacache coordinator."""
    logs.configure(log_level, log_format)
    settings = CoordinatorSettings(**options)
    try:
        run(settings)
    except AuthConfigError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
