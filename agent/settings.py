"""Agent settings. Every field is also a command-line flag and an environment variable
(`DATACACHE_<FIELD>`, upper case); see `agent.__main__`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.fetch import FetchSettings
from agent.sources.nfs import NfsSettings
from agent.sources.s3 import S3Settings


@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    """This node's name (in a cluster: `spec.nodeName` from the downward API)."""

    coordinator: str = "datacache-coordinator:7400"
    """Coordinator gRPC address, host:port."""

    cache_dir: Path = Path("/var/lib/datacache")
    """Cache root on the node's local disk."""

    fetch: FetchSettings = field(default_factory=FetchSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    nfs: NfsSettings = field(default_factory=NfsSettings)

    report_interval_seconds: float = 5.0
    """Longest time between two state reports, seconds (reports also go out on change).
    Capped at a third of the lease the coordinator hands out."""

    retry_base_seconds: float = 5.0
    """First delay before retrying a failed dataset, seconds; doubles up to
    `retry_max_seconds`."""

    retry_max_seconds: float = 300.0
    """Longest delay between retries of a failed dataset, seconds."""

    scrub_interval_seconds: float = 86400.0
    """Time between two scrubs of every Ready dataset, seconds; 0 disables scrubbing."""

    scrub_bytes_per_second: float = 50 * 1024 * 1024
    """Read rate of the scrub, bytes per second, so it never competes with pods' reads."""
