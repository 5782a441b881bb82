"""Coordinator settings. Every field is also a command-line flag and an environment variable
(`DATACACHE_<FIELD>`, upper case); see `coordinator.__main__`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class CoordinatorSettings:
    listen: str = "0.0.0.0:7400"
    """gRPC listen address, host:port. Port 0 picks a free port (see `port_file`)."""

    db_path: Path = Path("/var/lib/datacache/coordinator.db")
    """SQLite database file. Small; rebuildable from agents' reports."""

    labeler: Literal["local", "kubernetes"] = "local"
    """Where node labels go: 'local' keeps them in the store (no cluster); 'kubernetes' patches
    Node objects."""

    kubeconfig: str | None = None
    """Kubeconfig file for labeler=kubernetes; unset means the in-cluster service account."""

    lease_seconds: int = 30
    """An agent that has not reported for this long is considered gone, seconds: its replicas
    are re-placed and its labels removed."""

    reconcile_interval_seconds: float = 5.0
    """Longest time between two reconcile passes, seconds (passes also run on every change)."""

    node_cache_dir: str = "/var/lib/datacache"
    """The agents' cache directory on the nodes, for the paths the placement query returns."""

    metrics_port: int = 9400
    """Port of the Prometheus metrics endpoint; 0 disables it."""

    metrics_address: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod from outside
    """Address of the Prometheus metrics endpoint."""

    port_file: Path | None = None
    """If set, the bound gRPC port is written here once the server is serving."""

    tls_cert_file: Path | None = None
    """PEM certificate (chain) the gRPC port serves TLS with; unset: plaintext. Re-read when it
    changes (see docs/security.md)."""

    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""

    tls_client_ca_file: Path | None = None
    """PEM CA bundle; if set, every caller must present a client certificate it signed, and an
    agent's certificate must name its node (CN or DNS SAN). Needs `tls_cert_file`."""

    api_token_file: Path | None = None
    """File of bearer tokens, one per line (several for rotation); if set, DatasetService and
    NodeService require `authorization: Bearer <token>`. Re-read when it changes."""

    secrets_dir: Path | None = None
    """Local mode: directory of credentials Secrets, `<dir>/<secret>/AWS_ACCESS_KEY_ID` etc.
    (the layout of mounted Secrets); unset: datasets naming a credentials_secret are blocked."""

    eviction_cooldown_seconds: float = 600.0
    """A dataset evicted from a node for room is not placed back there for this long, seconds."""

    watch_queue_size: int = 10_000
    """Datasets with changes not yet sent to one WatchDatasets client (only the latest change
    of each is kept); a client further behind is cut off with RESOURCE_EXHAUSTED and resumes
    from its last resource version, datasets."""

    watch_history_size: int = 10_000
    """Dataset changes kept for WatchDatasets to resume from, changes."""

    watch_history_seconds: float = 3600.0
    """Longest time a dataset change is kept for WatchDatasets to resume from, seconds."""

    wal_checkpoint_seconds: float = 1.0
    """How often the database's write-ahead log is checkpointed, by a thread of its own so no
    call waits for it, seconds. Disk: the WAL holds at most about this long's writes (at 500
    reports/s, a few MB)."""

    namespace: str = "datacache"
    """The coordinator's namespace: where credentials Secrets and the leader Lease live."""

    leader_elect: bool = False
    """Campaign for the Lease `leader_election_name` before acting (labeler=kubernetes only).
    A follower stays Ready but answers API calls with UNAVAILABLE; a leader that loses the
    Lease exits, to start again as a follower."""

    leader_election_name: str = "datacache-coordinator"
    """Name of the coordination.k8s.io Lease."""

    leader_election_identity: str | None = None
    """This candidate's identity (the pod name); unset: the host name."""

    dataset_controller: bool = False
    """Keep Dataset custom resources and the coordinator in sync (labeler=kubernetes only)."""

    webhook_port: int = 0
    """HTTPS port of the pod admission webhook; 0 disables it."""

    webhook_cert_file: Path | None = None
    """PEM certificate the webhook serves (re-read when it changes)."""

    webhook_key_file: Path | None = None
    """PEM private key of `webhook_cert_file`."""

    demand_cooldown_seconds: float = 600.0
    """A replica count raised by demand falls back only after demand has stayed below it for
    this long, seconds (a sweep's next wave finds its replicas still there)."""

    watch_pods: bool = False
    """Count pods annotated `datacache.io/dataset` (pending or running) as demand
    (labeler=kubernetes only; needs get/list/watch on pods)."""

    @property
    def heartbeat_seconds(self) -> float:
        """How often an idle desired-state stream is refreshed, seconds."""
        return max(1.0, self.lease_seconds / 3)
