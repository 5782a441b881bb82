"""Agent settings. Every field is also a command-line flag and an environment variable
(`DATACACHE_<FIELD>`, upper case); see `agent.__main__`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.fetch import FetchSettings
from agent.peering import PeerSettings
from agent.sources.nfs_settings import NfsSettings
from agent.sources.s3 import S3Settings


@dataclass(frozen=True)
class TlsSettings:
    """TLS to the coordinator. No CA file: plaintext (local mode)."""

    ca_file: Path | None = None
    """PEM bundle of the CAs that sign the coordinator's certificate."""
    cert_file: Path | None = None
    """PEM client certificate naming this node (mTLS); with `key_file`."""
    key_file: Path | None = None
    """PEM private key of `cert_file`."""
    server_name: str | None = None
    """Name to check the coordinator's certificate against when the address is not one it
    names; None: the host of the address."""


@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    """This node's name (in a cluster: `spec.nodeName` from the downward API)."""

    node_uid: str = ""
    """Kubernetes Node UID (downward API cannot give it; empty when unknown)."""

    node_labels: tuple[tuple[str, str], ...] = ()
    """Node labels (key, value) sent to the coordinator in local mode, e.g. the zone."""

    coordinator: str = "datacache-coordinator:7400"
    """Coordinator gRPC address, host:port."""

    cache_dir: Path = Path("/var/lib/datacache")
    """Cache root on the node's local disk."""

    cache_quota_bytes: int = 0
    """Most bytes the cache may hold (published versions and staging); 0: the whole
    filesystem."""

    tls: TlsSettings = field(default_factory=TlsSettings)

    health_port: int = 9402
    """Port of the gRPC health service (kubelet probes); 0: none."""

    health_address: str = "0.0.0.0"  # noqa: S104 - probed by the kubelet from outside the pod
    """Address the health service listens on."""

    last_use_interval_seconds: float = 60.0
    """Time between two samplings of the files' access times, seconds; 0 disables it (last
    use is then the publish time)."""

    fetch: FetchSettings = field(default_factory=FetchSettings)
    peer: PeerSettings = field(default_factory=PeerSettings)
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
