"""`datacache-agent`: every flag is also an environment variable DATACACHE_<FLAG>."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from agent.fetch import FetchSettings
from agent.runner import Agent
from agent.settings import AgentSettings
from agent.sources import SourceOpener
from agent.sources.s3 import S3Settings
from agent.store import CacheStore
from datacache import __version__, logs
from datacache.validation import InvalidInput, validate_dataset_name

_FETCH = FetchSettings()


def _node_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return validate_dataset_name(value)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc).replace("dataset name", "node name")) from exc


@click.command(context_settings={"auto_envvar_prefix": "DATACACHE", "show_default": True})
@click.version_option(__version__, prog_name="datacache-agent")
@click.option(
    "--node-name",
    required=True,
    callback=_node_name,
    show_envvar=True,
    help="This node's name (downward API spec.nodeName in a cluster).",
)
@click.option(
    "--coordinator",
    default="datacache-coordinator:7400",
    show_envvar=True,
    help="Coordinator gRPC address host:port.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/datacache"),
    show_envvar=True,
    help="Cache root directory.",
)
@click.option(
    "--s3-endpoint-url",
    default=None,
    show_envvar=True,
    help="S3-compatible endpoint (default: AWS, or AWS_ENDPOINT_URL_S3).",
)
@click.option("--s3-region", default=None, show_envvar=True, help="Region for signing.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=_FETCH.concurrency,
    show_envvar=True,
    help="Parallel reads. Memory: concurrency x 1 MiB.",
)
@click.option(
    "--part-bytes",
    type=click.IntRange(1 << 20, 1 << 30),
    default=_FETCH.part_bytes,
    show_envvar=True,
    help="Range size for large files (bytes).",
)
@click.option(
    "--multipart-threshold-bytes",
    type=click.IntRange(1 << 20),
    default=_FETCH.multipart_threshold_bytes,
    show_envvar=True,
    help="Files larger than this are read as parallel ranges (bytes).",
)
@click.option(
    "--report-interval-seconds",
    type=click.FloatRange(0.2, 600),
    default=5.0,
    show_envvar=True,
    help="Longest time between state reports (s).",
)
@click.option(
    "--retry-base-seconds",
    type=click.FloatRange(0.1, 3600),
    default=5.0,
    show_envvar=True,
    help="First retry delay for a failed dataset (s), doubling.",
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
    node_name: str,
    coordinator: str,
    cache_dir: Path,
    s3_endpoint_url: str | None,
    s3_region: str | None,
    concurrency: int,
    part_bytes: int,
    multipart_threshold_bytes: int,
    report_interval_seconds: float,
    retry_base_seconds: float,
    log_level: str,
    log_format: logs.LogFormat,
) -> None:
    """Run the datacache agent for one node."""
    logs.configure(log_level, log_format, node=node_name)
    fetch = FetchSettings(
        concurrency=concurrency,
        part_bytes=part_bytes,
        multipart_threshold_bytes=multipart_threshold_bytes,
    )
    settings = AgentSettings(
        node_name=node_name,
        coordinator=coordinator,
        cache_dir=cache_dir,
        fetch=fetch,
        s3=S3Settings(
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            max_connections=max(10, concurrency),
        ),
        report_interval_seconds=report_interval_seconds,
        retry_base_seconds=retry_base_seconds,
    )
    opener = SourceOpener(settings.s3)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(settings, CacheStore(settings.cache_dir), opener.open)
        await agent.run(stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
