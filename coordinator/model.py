"""Plain records the coordinator's layers pass to each other."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class ReplicaState(enum.StrEnum):
    PENDING = "Pending"
    FETCHING = "Fetching"
    READY = "Ready"
    FAILED = "Failed"
    EVICTING = "Evicting"


@dataclass(frozen=True)
class Toleration:
    """A Kubernetes toleration; matched against taints as the scheduler does."""

    key: str = ""
    operator: str = "Equal"
    """'Equal' or 'Exists'."""
    value: str = ""
    effect: str = ""
    """'NoSchedule', 'PreferNoSchedule', 'NoExecute', or '' for every effect."""


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    source: str
    replicas: int
    create_time: float
    """Unix time, seconds."""
    deleting: bool = False
    all_nodes: bool = False
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    pin: bool = False
    credentials_secret: str = ""
    revision: int = 1
    """Bumped by a refresh or a change of source; starts at 1."""
    resource_version: int = 0
    """The global change counter's value at this dataset's last spec or status change."""
    update_time: float = 0.0
    """Unix time of the last spec or status change, seconds."""
    max_replicas: int = 0
    """Demand may raise the replica count up to this; 0 (or <= replicas): fixed."""


@dataclass(frozen=True)
class DatasetSpec:
    """The changeable fields of a dataset (what Create and Update write)."""

    source: str
    replicas: int
    all_nodes: bool = False
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    pin: bool = False
    credentials_secret: str = ""
    max_replicas: int = 0


@dataclass(frozen=True)
class AgentRecord:
    node_name: str
    cache_id: str
    last_seen: float
    """Unix time of the last register or report, seconds."""
    capacity_bytes: int = 0
    free_bytes: int = 0
    node_uid: str = ""
    """Kubernetes Node UID, empty when unknown."""
    node_labels: Mapping[str, str] = field(default_factory=dict)
    """Labels the agent was given (local mode)."""
    pressure_bytes: int = 0
    """Room the agent lacks for its desired datasets, bytes."""
    agent_version: str = ""


@dataclass(frozen=True)
class ReplicaReport:
    """What an agent last said about one dataset on its node."""

    dataset: str
    node_name: str
    state: ReplicaState
    digest: str = ""
    files_done: int = 0
    bytes_done: int = 0
    files_total: int = 0
    bytes_total: int = 0
    message: str = ""
    update_time: float = 0.0
    revision: int = 0
    """The revision the state is about; 0 from agents that do not know revisions."""
    bytes_per_second: float = 0.0
    verification: Mapping[str, int] = field(default_factory=dict)
    """Files of a Ready copy by verification method."""
    last_used_time: float = 0.0
    """Unix time pods last read the copy, seconds; 0 when unknown."""
    serving_version: str = ""
    """An older Ready version still served while `revision` is fetched."""
    disk_bytes: int = 0
    """Bytes on disk for this dataset (all versions and staging)."""


@dataclass(frozen=True)
class VersionRecord:
    """The version fixed for one revision of a dataset: the first complete copy's manifest."""

    dataset: str
    revision: int
    version: str
    files: int
    total_bytes: int
    create_time: float


@dataclass(frozen=True)
class ManifestRow:
    path: str
    size: int
    etag: str
    crc64nvme: str


@dataclass(frozen=True)
class Change:
    """One entry of the change history WatchDatasets resumes from."""

    resource_version: int
    dataset: str
    kind: str
    """'ADDED', 'MODIFIED' or 'DELETED'."""
