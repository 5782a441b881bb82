"""`datacache`: the user command line. Talks to the coordinator's gRPC API.

Every flag is also an environment variable: global flags are `DATACACHE_<FLAG>` (e.g.
`DATACACHE_COORDINATOR`, `DATACACHE_TOKEN_FILE`), a command's flags
`DATACACHE_<GROUP>_<COMMAND>_<FLAG>` (click's convention). Errors print the server's message
and exit non-zero (1 for a failed call, 2 for a bad argument), without a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf import field_mask_pb2

from datacache import __version__
from datacache.cli_args import SpecFlags
from datacache.cli_render import (
    dump,
    event_line,
    render_dataset,
    render_list,
    render_nodes,
    to_dict,
)
from datacache.cli_watch import WatchView, run_lines, run_live, watch_events
from datacache.client import ClientConfigError, ClientSettings, sync_channel
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from datacache.validation import InvalidInput, validate_dataset_name

F = TypeVar("F", bound=Callable[..., Any])
_HINTS = {
    grpc.StatusCode.UNAVAILABLE: (
        " (is the coordinator running and reachable? see --coordinator / DATACACHE_COORDINATOR)"
    ),
    grpc.StatusCode.UNAUTHENTICATED: " (see --token-file / DATACACHE_TOKEN_FILE)",
}


class Client:
    """Stubs on one channel, made on first use and closed when the command ends."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._channel: grpc.Channel | None = None

    def _open(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = sync_channel(self.settings)
        return self._channel

    @property
    def datasets(self) -> pb_grpc.DatasetServiceStub:
        return pb_grpc.DatasetServiceStub(self._open())

    @property
    def nodes(self) -> pb_grpc.NodeServiceStub:
        return pb_grpc.NodeServiceStub(self._open())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class _Group(click.Group):
    """Turns call failures into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
            hint = _HINTS.get(code, "") if code is not None else ""
            click.echo(f"error: {code.name if code else 'RPC'}: {details}{hint}", err=True)
            sys.exit(1)
        except ClientConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except InvalidInput as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


def _dataset_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_dataset_name(value)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc)) from exc


_path = click.Path(dir_okay=False, path_type=Path)


@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "DATACACHE"})
@click.version_option(__version__, prog_name="datacache")
@click.option(
    "--coordinator",
    default="127.0.0.1:7400",
    show_default=True,
    show_envvar=True,
    help="Coordinator gRPC address host:port.",
)
@click.option(
    "--token-file",
    type=_path,
    show_envvar=True,
    help="File holding the API bearer token (first line); sent only over TLS or to loopback.",
)
@click.option(
    "--tls-ca-file", type=_path, show_envvar=True, help="Use TLS; PEM CA of the coordinator."
)
@click.option(
    "--tls-cert-file",
    type=_path,
    show_envvar=True,
    help="PEM client certificate, if the coordinator requires one.",
)
@click.option("--tls-key-file", type=_path, show_envvar=True, help="PEM key of --tls-cert-file.")
@click.option(
    "--tls-server-name",
    show_envvar=True,
    help="Verify the coordinator's certificate for this name (e.g. behind a port-forward).",
)
@click.pass_context
def main(
    ctx: click.Context,
    coordinator: str,
    token_file: Path | None,
    tls_ca_file: Path | None,
    tls_cert_file: Path | None,
    tls_key_file: Path | None,
    tls_server_name: str | None,
) -> None:
    """Manage datasets cached on Kubernetes nodes."""
    client = Client(
        ClientSettings(
            target=coordinator,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            tls_server_name=tls_server_name,
            token_file=token_file,
        )
    )
    ctx.obj = client
    ctx.call_on_close(client.close)


@main.group()
def dataset() -> None:
    """Create, inspect, change, refresh, watch and delete datasets.

    NAME is "<namespace>/<name>" or "<name>" (namespace "default")."""


_output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    show_envvar=True,
)
_name_argument = click.argument("name", callback=_dataset_name)


def _spec_options(create: bool) -> Callable[[F], F]:
    """The dataset spec flags shared by create and update."""

    def decorate(fn: F) -> F:
        options = [
            click.option(
                "--source",
                required=create,
                show_envvar=True,
                help="s3://bucket/prefix/, nfs://server/export/dir/ or file:///dir/.",
            ),
            click.option(
                "--replicas",
                default="1" if create else None,
                show_default=create,
                show_envvar=True,
                help="Nodes that should hold a copy: a number, or 'all' (every matching node).",
            ),
            click.option(
                "--node-selector",
                multiple=True,
                metavar="KEY=VALUE",
                help="Only nodes with this label (repeatable).",
            ),
            click.option(
                "--toleration",
                "tolerations",
                multiple=True,
                metavar="KEY[=VALUE][:EFFECT]",
                help="Tolerate a taint, kubectl taint syntax (repeatable).",
            ),
            click.option(
                "--pin/--no-pin",
                default=None,
                help="A pinned dataset's last Ready replica is never evicted for room.",
            ),
            click.option(
                "--credentials-secret",
                default=None,
                show_envvar=True,
                help="Secret holding the source's AWS credentials ('' clears).",
            ),
            click.option(
                "--max-replicas",
                type=click.IntRange(0, 10_000),
                default=None,
                help="Demand (trial pods, SetDemand) may raise replicas up to this (0: fixed).",
            ),
        ]
        if not create:
            options += [
                click.option("--clear-node-selector", is_flag=True, help="Remove the selector."),
                click.option("--clear-tolerations", is_flag=True, help="Remove all tolerations."),
            ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _echo_dataset(dataset: pb.Dataset, output: str, summary: str | None = None) -> None:
    if output in ("json", "yaml"):
        click.echo(dump(to_dict(dataset), output))
    else:
        click.echo(summary if summary is not None else render_dataset(dataset))


@dataset.command("create")
@_name_argument
@_spec_options(create=True)
@_output_option
@click.pass_obj
def dataset_create(
    client: Client,
    name: str,
    source: str,
    replicas: str,
    node_selector: tuple[str, ...],
    tolerations: tuple[str, ...],
    pin: bool | None,
    credentials_secret: str | None,
    max_replicas: int | None,
    output: str,
) -> None:
    """Create dataset NAME from a source."""
    spec = pb.Dataset(name=name)
    SpecFlags(
        source=source,
        replicas=replicas,
        node_selector=node_selector,
        tolerations=tolerations,
        pin=pin,
        credentials_secret=credentials_secret,
        max_replicas=max_replicas,
    ).apply(spec)
    response = client.datasets.CreateDataset(pb.CreateDatasetRequest(dataset=spec))
    _echo_dataset(response.dataset, output, f"dataset {response.dataset.name} created")


@dataset.command("update")
@_name_argument
@_spec_options(create=False)
@_output_option
@click.pass_context
def dataset_update(
    ctx: click.Context,
    name: str,
    source: str | None,
    replicas: str | None,
    node_selector: tuple[str, ...],
    tolerations: tuple[str, ...],
    pin: bool | None,
    credentials_secret: str | None,
    max_replicas: int | None,
    clear_node_selector: bool,
    clear_tolerations: bool,
    output: str,
) -> None:
    """Change the fields of dataset NAME given as flags (and only those)."""
    if node_selector and clear_node_selector:
        raise click.UsageError("give --node-selector or --clear-node-selector, not both")
    if tolerations and clear_tolerations:
        raise click.UsageError("give --toleration or --clear-tolerations, not both")
    flags = SpecFlags(
        source=source,
        replicas=replicas,
        node_selector=node_selector if node_selector or clear_node_selector else None,
        tolerations=tolerations if tolerations or clear_tolerations else None,
        pin=pin,
        credentials_secret=credentials_secret,
        max_replicas=max_replicas,
    )
    spec = pb.Dataset(name=name)
    paths = flags.apply(spec)
    if not paths:
        raise click.UsageError(
            "nothing to update: give at least one of --source, --replicas, --node-selector, "
            "--clear-node-selector, --toleration, --clear-tolerations, --pin/--no-pin, "
            "--credentials-secret, --max-replicas"
        )
    client: Client = ctx.obj
    response = client.datasets.UpdateDataset(
        pb.UpdateDatasetRequest(dataset=spec, update_mask=field_mask_pb2.FieldMask(paths=paths))
    )
    _echo_dataset(response.dataset, output)


@dataset.command("get")
@_name_argument
@_output_option
@click.pass_obj
def dataset_get(client: Client, name: str, output: str) -> None:
    """Show dataset NAME with its per-node replica state."""
    response = client.datasets.GetDataset(pb.GetDatasetRequest(name=name))
    _echo_dataset(response.dataset, output)


@dataset.command("list")
@_output_option
@click.pass_obj
def dataset_list(client: Client, output: str) -> None:
    """List datasets (every page)."""
    datasets: list[pb.Dataset] = []
    token = ""
    while True:
        response = client.datasets.ListDatasets(
            pb.ListDatasetsRequest(page_size=500, page_token=token)
        )
        datasets.extend(response.datasets)
        token = response.next_page_token
        if not token:
            break
    if output in ("json", "yaml"):
        click.echo(dump([to_dict(d) for d in datasets], output))
    else:
        click.echo(render_list(datasets))


@dataset.command("delete")
@_name_argument
@click.pass_obj
def dataset_delete(client: Client, name: str) -> None:
    """Delete dataset NAME: labels go first, then every node deletes its copy."""
    client.datasets.DeleteDataset(pb.DeleteDatasetRequest(name=name))
    click.echo(f"dataset {name} deleted")


@dataset.command("refresh")
@_name_argument
@_output_option
@click.pass_obj
def dataset_refresh(client: Client, name: str, output: str) -> None:
    """Fetch a new revision of dataset NAME; the old version serves until the new is Ready."""
    response = client.datasets.RefreshDataset(pb.RefreshDatasetRequest(name=name))
    _echo_dataset(
        response.dataset,
        output,
        f"dataset {response.dataset.name} refreshing: revision {response.dataset.revision}",
    )


@dataset.command("watch")
@click.argument("name", required=False, callback=_dataset_name)
@_output_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    show_envvar=True,
    help="Stop after this many seconds (0: until interrupted).",
)
@click.option(
    "--reconnect-timeout",
    type=click.FloatRange(min=0),
    default=60,
    show_default=True,
    show_envvar=True,
    help="Give up after the coordinator is unreachable this long (s).",
)
@click.pass_obj
def dataset_watch(
    client: Client, name: str | None, output: str, timeout: float, reconnect_timeout: float
) -> None:
    """Stream changes of dataset NAME, or of all datasets.

    On a terminal (with -o table) shows live per-node progress bars; otherwise prints one line
    (or one JSON object) per change."""
    view = WatchView()

    def restarted() -> None:
        view.reset()
        click.echo("watch: resuming from the current state (history too old)", err=True)

    events = watch_events(
        client.datasets,
        name or "",
        restarted,
        reconnect_timeout,
        deadline=time.monotonic() + timeout if timeout else None,
    )
    try:
        if output == "table" and sys.stdout.isatty():
            run_live(events, view, sys.stdout)
        elif output == "table":
            run_lines(events, lambda e: click.echo(event_line(e)))
        elif output == "json":
            run_lines(events, lambda e: click.echo(json.dumps(to_dict(e))))
        else:
            run_lines(events, lambda e: click.echo("---\n" + dump(to_dict(e), "yaml")))
    except KeyboardInterrupt:
        pass


def pod_snippets(placement: pb.GetPlacementResponse, name: str, preferred: bool) -> dict[str, Any]:
    """Pod spec fragments that put a pod on a node holding the dataset and mount it read-only:
    the coordinator's, or built from its label and path when it sends none."""
    term = {
        "matchExpressions": [
            {"key": placement.label_key, "operator": "In", "values": [placement.label_value]}
        ]
    }
    affinity: dict[str, Any] = (
        to_dict(placement.affinity)
        if placement.affinity.fields
        else {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
            }
        }
    )
    if preferred:
        required = affinity.get("nodeAffinity", {}).pop(
            "requiredDuringSchedulingIgnoredDuringExecution", None
        )
        terms = required["nodeSelectorTerms"] if required else [term]
        affinity.setdefault("nodeAffinity", {})[
            "preferredDuringSchedulingIgnoredDuringExecution"
        ] = [{"weight": 100, "preference": t} for t in terms]
    volume_name = "dataset-" + name.replace("/", "-").replace(".", "-")
    volume_name = volume_name[:63].rstrip("-")
    volume = (
        to_dict(placement.volume)
        if placement.volume.fields
        else {
            "name": volume_name,
            "hostPath": {"path": placement.node_path, "type": "Directory"},
        }
    )
    mount = (
        to_dict(placement.volume_mount)
        if placement.volume_mount.fields
        else {"name": volume_name, "mountPath": f"/datasets/{name}", "readOnly": True}
    )
    snippets: dict[str, Any] = {
        "affinity": affinity,
        "volumes": [volume],
        "volumeMounts": [mount],
        "readyNodes": list(placement.ready_nodes),
    }
    if placement.version:
        snippets["version"] = placement.version
    return snippets


@dataset.command("affinity")
@_name_argument
@click.option("--preferred", is_flag=True, help="Prefer, rather than require, such nodes.")
@click.option(
    "-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)
@click.pass_obj
def dataset_affinity(client: Client, name: str, preferred: bool, output: str) -> None:
    """Print pod spec snippets (node affinity, read-only volume and mount) for dataset NAME."""
    placement = client.datasets.GetPlacement(pb.GetPlacementRequest(name=name))
    click.echo(dump(pod_snippets(placement, name, preferred), output))


@main.command("nodes")
@_output_option
@click.pass_obj
def nodes(client: Client, output: str) -> None:
    """List nodes, their agents and the labels datacache set on them."""
    response = client.nodes.ListNodes(pb.ListNodesRequest())
    if output in ("json", "yaml"):
        click.echo(dump([to_dict(n) for n in response.nodes], output))
    else:
        click.echo(render_nodes(list(response.nodes)))


@main.command("demo")
@click.option("--nodes", "node_count", type=click.IntRange(1, 10), default=3, show_default=True)
@click.option("--replicas", type=click.IntRange(1, 10), default=2, show_default=True)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep processes' data and logs here (default: a temporary directory).",
)
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="Give up after this long (s)."
)
def demo(node_count: int, replicas: int, workdir: str | None, timeout: float) -> None:
    """Run a local cluster: S3 server, coordinator and agents replicating a sample dataset."""
    from datacache.demo import run_demo

    sys.exit(run_demo(node_count, replicas, workdir, timeout))


if __name__ == "__main__":
    main()
