"""Plain records the coordinator's layers pass to each other."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReplicaState(enum.StrEnum):
    PENDING = "Pending"
    FETCHING = "Fetching"
    READY = "Ready"
    FAILED = "Failed"
    EVICTING = "Evicting"


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    source: str
    replicas: int
    create_time: float
    """Unix time, seconds."""
    deleting: bool = False


@dataclass(frozen=True)
class AgentRecord:
    node_name: str
    cache_id: str
    last_seen: float
    """Unix time of the last register or report, seconds."""
    capacity_bytes: int = 0
    free_bytes: int = 0


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
