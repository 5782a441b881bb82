"""How the CLI shows API objects: tables, per-node progress bars and one-line events.

Pure functions from messages to text, so they can be tested without a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from google.protobuf.json_format import MessageToDict

from datacache.v1 import datacache_pb2 as pb

_STATE_NAMES = {
    pb.REPLICA_STATE_PENDING: "Pending",
    pb.REPLICA_STATE_FETCHING: "Fetching",
    pb.REPLICA_STATE_READY: "Ready",
    pb.REPLICA_STATE_FAILED: "Failed",
    pb.REPLICA_STATE_EVICTING: "Evicting",
}
EVENT_NAMES = {
    pb.WatchDatasetsResponse.EVENT_TYPE_ADDED: "ADDED",
    pb.WatchDatasetsResponse.EVENT_TYPE_MODIFIED: "MODIFIED",
    pb.WatchDatasetsResponse.EVENT_TYPE_DELETED: "DELETED",
    pb.WatchDatasetsResponse.EVENT_TYPE_BOOKMARK: "BOOKMARK",
}
BAR_WIDTH = 24


def state_name(state: pb.ReplicaState.ValueType) -> str:
    return _STATE_NAMES.get(state, "Unknown")


def human_bytes(n: float) -> str:
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


def dump(data: Any, fmt: str) -> str:
    """JSON (indented) or YAML text of plain data."""
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False).rstrip()
    return json.dumps(data, indent=2)


def to_dict(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = MessageToDict(message)
    return data


def desired(dataset: pb.Dataset) -> str:
    return "all" if dataset.all_nodes else str(dataset.replicas)


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
    lines = [
        f"Name:        {dataset.name}",
        f"Source:      {dataset.source}",
        f"Replicas:    {dataset.status.ready_replicas}/{desired(dataset)} ready",
    ]
    if dataset.status.phase:
        lines.append(f"Phase:       {dataset.status.phase}")
    if dataset.revision:
        lines.append(f"Revision:    {dataset.revision}")
    if dataset.status.version:
        lines.append(f"Version:     {dataset.status.version}")
    if dataset.node_selector:
        selector = ",".join(f"{k}={v}" for k, v in sorted(dataset.node_selector.items()))
        lines.append(f"Selector:    {selector}")
    if dataset.tolerations:
        lines.append(f"Tolerations: {', '.join(toleration_text(t) for t in dataset.tolerations)}")
    if dataset.max_replicas > dataset.replicas and not dataset.all_nodes:
        lines.append(
            f"Demand:      {dataset.status.demand} trials, target "
            f"{dataset.status.target_replicas} (max {dataset.max_replicas})"
        )
    if dataset.pin:
        lines.append("Pinned:      yes")
    if dataset.credentials_secret:
        lines.append(f"Credentials: secret {dataset.credentials_secret}")
    head = "\n".join(lines) + "\n"
    return head + "\n" + table(["NODE", "STATE", "PROGRESS", "DIGEST"], replica_rows(dataset))


def toleration_text(t: pb.Toleration) -> str:
    text = t.key + (f"={t.value}" if t.operator != "Exists" and t.value else "")
    return text + (f":{t.effect}" if t.effect else "")


def render_list(datasets: Sequence[pb.Dataset]) -> str:
    rows = [
        [
            d.name,
            d.source,
            f"{d.status.ready_replicas}/{desired(d)}",
            d.status.phase or "-",
            " ".join(f"{r.node_name}:{state_name(r.state)}" for r in d.status.replicas) or "-",
        ]
        for d in datasets
    ]
    return table(["NAME", "SOURCE", "READY", "PHASE", "NODES"], rows)


def render_nodes(nodes: Sequence[pb.Node]) -> str:
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


def event_line(event: pb.WatchDatasetsResponse) -> str:
    """One line per watch event, for pipes and logs."""
    d = event.dataset
    kind = EVENT_NAMES.get(event.type, "UNKNOWN")
    if event.type == pb.WatchDatasetsResponse.EVENT_TYPE_DELETED:
        return f"{kind} {d.name} rv={event.resource_version}"
    replicas = " ".join(
        f"{r.node_name}:{state_name(r.state)}"
        + (
            f"({100 * r.bytes_done // r.bytes_total}%)"
            if r.state == pb.REPLICA_STATE_FETCHING and r.bytes_total
            else ""
        )
        for r in d.status.replicas
    )
    return (
        f"{kind} {d.name} rv={event.resource_version} phase={d.status.phase or '-'} "
        f"ready={d.status.ready_replicas}/{desired(d)}" + (f" {replicas}" if replicas else "")
    )


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_lines(
    datasets: Mapping[str, pb.Dataset], rates: Mapping[tuple[str, str], float]
) -> list[str]:
    """The live view of `watch` on a terminal: per dataset a header, per node a progress bar
    with bytes done of total and throughput (`rates`: bytes/s by (dataset, node))."""
    lines: list[str] = []
    for name in sorted(datasets):
        d = datasets[name]
        lines.append(
            f"{d.name}  {d.status.phase or '-'}  {d.status.ready_replicas}/{desired(d)} ready"
            + (f"  revision {d.revision}" if d.revision else "")
        )
        if not d.status.replicas:
            lines.append("  (no replicas placed)")
        for r in d.status.replicas:
            state = state_name(r.state)
            if r.state == pb.REPLICA_STATE_READY:
                fraction = 1.0
            elif r.bytes_total:
                fraction = r.bytes_done / r.bytes_total
            else:
                fraction = 0.0
            detail = (
                f"{human_bytes(r.bytes_done)}/{human_bytes(r.bytes_total)}"
                if r.bytes_total
                else "-"
            )
            rate = rates.get((d.name, r.node_name), 0.0)
            speed = f"{human_bytes(rate)}/s" if r.state == pb.REPLICA_STATE_FETCHING else ""
            message = f"  {r.message[:50]}" if r.message else ""
            lines.append(
                f"  {r.node_name:<20} {state:<9}{bar(fraction)} {100 * fraction:5.1f}%  "
                f"{detail:<23} {speed}{message}".rstrip()
            )
    return lines or ["(no datasets)"]
