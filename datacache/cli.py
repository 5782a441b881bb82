"""`datacache`: the user command line. Talks to the coordinator's gRPC API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import grpc
import yaml
from google.protobuf import field_mask_pb2
from google.protobuf.json_format import MessageToDict

from datacache import __version__
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

_TIMEOUT_SECONDS = 15.0
_STATE_NAMES = {
    pb.REPLICA_STATE_PENDING: "Pending",
    pb.REPLICA_STATE_FETCHING: "Fetching",
    pb.REPLICA_STATE_READY: "Ready",
    pb.REPLICA_STATE_FAILED: "Failed",
    pb.REPLICA_STATE_EVICTING: "Evicting",
}
T = TypeVar("T")


def state_name(state: pb.ReplicaState.ValueType) -> str:
    return _STATE_NAMES.get(state, "Unknown")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def replica_rows(dataset: pb.Dataset) -> list[list[str]]:
    rows = []
    for r in dataset.status.replicas:
        if r.state == pb.REPLICA_STATE_FETCHING and r.bytes_total:
            progress = (
                f"{r.files_done}/{r.files_total} files, {100 * r.bytes_done // r.bytes_total}%"
            )
        elif r.state == pb.REPLICA_STATE_READY:
            progress = f"{r.files_total} files, {human_bytes(r.bytes_total)}"
        else:
            progress = r.message[:60]
        digest = r.digest.removeprefix("sha256:")[:12]
        rows.append([r.node_name, state_name(r.state), progress, digest])
    return rows


def render_dataset(dataset: pb.Dataset) -> str:
    head = (
        f"Name:      {dataset.name}\n"
        f"Source:    {dataset.source}\n"
        f"Replicas:  {dataset.status.ready_replicas}/{dataset.replicas} ready\n"
    )
    return head + "\n" + table(["NODE", "STATE", "PROGRESS", "DIGEST"], replica_rows(dataset))


def render_nodes(nodes: list[pb.Node]) -> str:
    rows = [
        [
            n.name,
            "yes" if n.agent_connected else "no",
            human_bytes(n.cache_free_bytes) if n.cache_capacity_bytes else "-",
            ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-",
        ]
        for n in nodes
    ]
    return table(["NODE", "AGENT", "CACHE FREE", "LABELS"], rows)


class Client:
    def __init__(self, address: str) -> None:
        self.address = address

    @contextmanager
    def _channel(self) -> Iterator[grpc.Channel]:
        with grpc.insecure_channel(self.address) as channel:
            yield channel

    def call(self, stub_type: Callable[[grpc.Channel], Any], method: str, request: Any) -> Any:
        with self._channel() as channel:
            stub = stub_type(channel)
            return getattr(stub, method)(request, timeout=_TIMEOUT_SECONDS)


def _fail_on_rpc_error(fn: Callable[..., T]) -> Callable[..., T]:
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
            if code == grpc.StatusCode.UNAVAILABLE:
                details += (
                    " (is the coordinator running? see --coordinator / DATACACHE_COORDINATOR)"
                )
            click.echo(f"error: {code.name if code else 'RPC'}: {details}", err=True)
            sys.exit(1)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _dump(data: Any, fmt: str) -> str:
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False).rstrip()
    return json.dumps(data, indent=2)


def _output(obj: Any, fmt: str, render: Callable[[], str]) -> None:
    if fmt in ("json", "yaml"):
        click.echo(_dump(MessageToDict(obj), fmt))
    else:
        click.echo(render())


@click.group(context_settings={"auto_envvar_prefix": "DATACACHE", "show_default": True})
@click.version_option(__version__, prog_name="datacache")
@click.option(
    "--coordinator",
    default="127.0.0.1:7400",
    show_envvar=True,
    help="Coordinator gRPC address host:port.",
)
@click.pass_context
def main(ctx: click.Context, coordinator: str) -> None:
    """Manage datasets cached on Kubernetes nodes."""
    ctx.obj = Client(coordinator)


@main.group()
def dataset() -> None:
    """Create, inspect and delete datasets."""


_output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table"
)


@dataset.command("create")
@click.argument("name")
@click.option("--source", required=True, help="s3://bucket/prefix/")
@click.option("--replicas", type=int, default=1, help="Nodes that should hold a copy.")
@_output_option
@click.pass_obj
@_fail_on_rpc_error
def dataset_create(client: Client, name: str, source: str, replicas: int, output: str) -> None:
    """Create dataset NAME from a source prefix."""
    request = pb.CreateDatasetRequest(
        dataset=pb.Dataset(name=name, source=source, replicas=replicas)
    )
    response = client.call(pb_grpc.DatasetServiceStub, "CreateDataset", request)
    _output(response.dataset, output, lambda: f"dataset {name} created")


@dataset.command("get")
@click.argument("name")
@_output_option
@click.pass_obj
@_fail_on_rpc_error
def dataset_get(client: Client, name: str, output: str) -> None:
    """Show dataset NAME with its per-node replica state."""
    response = client.call(
        pb_grpc.DatasetServiceStub, "GetDataset", pb.GetDatasetRequest(name=name)
    )
    _output(response.dataset, output, lambda: render_dataset(response.dataset))


@dataset.command("list")
@_output_option
@click.pass_obj
@_fail_on_rpc_error
def dataset_list(client: Client, output: str) -> None:
    """List datasets."""
    datasets: list[pb.Dataset] = []
    token = ""
    while True:
        response = client.call(
            pb_grpc.DatasetServiceStub,
            "ListDatasets",
            pb.ListDatasetsRequest(page_size=500, page_token=token),
        )
        datasets.extend(response.datasets)
        token = response.next_page_token
        if not token:
            break
    if output in ("json", "yaml"):
        click.echo(_dump([MessageToDict(d) for d in datasets], output))
        return
    rows = [
        [
            d.name,
            d.source,
            f"{d.status.ready_replicas}/{d.replicas}",
            " ".join(f"{r.node_name}:{state_name(r.state)}" for r in d.status.replicas) or "-",
        ]
        for d in datasets
    ]
    click.echo(table(["NAME", "SOURCE", "READY", "NODES"], rows))


@dataset.command("update")
@click.argument("name")
@click.option("--replicas", type=int, required=True, help="Nodes that should hold a copy.")
@_output_option
@click.pass_obj
@_fail_on_rpc_error
def dataset_update(client: Client, name: str, replicas: int, output: str) -> None:
    """Change how many nodes hold dataset NAME."""
    request = pb.UpdateDatasetRequest(
        dataset=pb.Dataset(name=name, replicas=replicas),
        update_mask=field_mask_pb2.FieldMask(paths=["replicas"]),
    )
    response = client.call(pb_grpc.DatasetServiceStub, "UpdateDataset", request)
    _output(response.dataset, output, lambda: render_dataset(response.dataset))


def pod_snippets(placement: pb.GetPlacementResponse, name: str, preferred: bool) -> dict[str, Any]:
    """Pod spec fragments that put a pod on a node holding the dataset and mount it read-only."""
    term = {
        "matchExpressions": [
            {"key": placement.label_key, "operator": "In", "values": [placement.label_value]}
        ]
    }
    node_affinity: dict[str, Any] = (
        {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": term}]}
        if preferred
        else {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    )
    volume = f"dataset-{name}"[:63].rstrip("-.")
    return {
        "affinity": {"nodeAffinity": node_affinity},
        "volumes": [
            {"name": volume, "hostPath": {"path": placement.node_path, "type": "Directory"}}
        ],
        "volumeMounts": [{"name": volume, "mountPath": f"/datasets/{name}", "readOnly": True}],
        "readyNodes": list(placement.ready_nodes),
    }


@dataset.command("affinity")
@click.argument("name")
@click.option("--preferred", is_flag=True, help="Prefer, rather than require, such nodes.")
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml")
@click.pass_obj
@_fail_on_rpc_error
def dataset_affinity(client: Client, name: str, preferred: bool, output: str) -> None:
    """Print pod spec snippets (node affinity, read-only volume) to read dataset NAME."""
    placement = client.call(
        pb_grpc.DatasetServiceStub, "GetPlacement", pb.GetPlacementRequest(name=name)
    )
    click.echo(_dump(pod_snippets(placement, name, preferred), output))


@dataset.command("delete")
@click.argument("name")
@click.pass_obj
@_fail_on_rpc_error
def dataset_delete(client: Client, name: str) -> None:
    """Delete dataset NAME: labels go first, then every node deletes its copy."""
    client.call(pb_grpc.DatasetServiceStub, "DeleteDataset", pb.DeleteDatasetRequest(name=name))
    click.echo(f"dataset {name} deleted")


@main.command("nodes")
@click.pass_obj
@_fail_on_rpc_error
def nodes(client: Client) -> None:
    """List nodes, their agents and the labels datacache set on them."""
    response = client.call(pb_grpc.NodeServiceStub, "ListNodes", pb.ListNodesRequest())
    click.echo(render_nodes(list(response.nodes)))


@main.command("demo")
@click.option("--nodes", "node_count", type=click.IntRange(1, 10), default=3)
@click.option("--replicas", type=click.IntRange(1, 10), default=2)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep processes' data and logs here (default: a temporary directory).",
)
@click.option("--timeout", type=float, default=300.0, help="Give up after this long (s).")
def demo(node_count: int, replicas: int, workdir: str | None, timeout: float) -> None:
    """Run a local cluster: S3 server, coordinator and agents replicating a sample dataset."""
    from datacache.demo import run_demo

    sys.exit(run_demo(node_count, replicas, workdir, timeout))


if __name__ == "__main__":
    main()
