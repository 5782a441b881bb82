"""One dataset on this node: what the coordinator wants (`Want`), what the node holds or is
working on (`Replica`, with its report), and the pure decisions between them."""

from __future__ import annotations

import asyncio
import enum
import threading
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from agent import lastuse
from agent.credentials import DatasetCredentials
from agent.fetch import Progress
from agent.manifest import Manifest
from agent.sources.peer import Peer, valid_peers
from datacache.v1 import datacache_pb2 as pb


class Phase(enum.Enum):
    PENDING = "pending"
    FETCHING = "fetching"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


_STATES = {
    Phase.PENDING: pb.REPLICA_STATE_PENDING,
    Phase.FETCHING: pb.REPLICA_STATE_FETCHING,
    Phase.READY: pb.REPLICA_STATE_READY,
    Phase.FAILED: pb.REPLICA_STATE_FAILED,
    Phase.DELETING: pb.REPLICA_STATE_EVICTING,
}


@dataclass(frozen=True)
class Want:
    """What the coordinator wants this node to hold for one dataset."""

    source: str
    revision: int = 0
    version: str = ""
    """The revision's fixed version ("sha256:<hex>"), empty until a copy fixed it."""
    credentials: DatasetCredentials | None = None
    peers: tuple[Peer, ...] = ()
    """Agents holding a Ready copy of `version`, to copy from before the source."""

    @classmethod
    def from_pb(cls, message: pb.DesiredDataset) -> Want:
        return cls(
            message.source,
            message.revision,
            message.version,
            DatasetCredentials.from_pb(message),
            valid_peers([(p.node_name, p.address) for p in message.peers])
            if message.version
            else (),
        )


def needs_copy(held: Manifest | None, want: Want) -> bool:
    """Whether the published copy `held` cannot serve `want`: another source, another
    version than the fixed one, or an older revision whose version is not fixed yet."""
    if held is None or held.source != want.source:
        return True
    if want.version:
        return held.digest != want.version
    return held.revision < want.revision


def pressure(replicas: dict[str, Replica]) -> int:
    """Room the node lacks for the copies waiting for it, bytes."""
    return sum(r.missing_bytes for r in replicas.values() if r.phase is Phase.PENDING)


@dataclass
class Replica:
    """What this node holds, or is working on, for one dataset."""

    want: Want
    phase: Phase
    manifest: Manifest | None = None
    """The published copy on disk: the Ready one, or the older one served while a newer
    revision is copied."""
    revision: int = 0
    """The revision the phase is about."""
    progress: Progress = field(default_factory=Progress)
    message: str = ""
    failures: int = 0
    refused: int = 0
    """Object keys of the source that could not be copied (unsafe or colliding)."""
    retry_at: float = 0.0
    missing_bytes: int = 0
    """While PENDING: how many more bytes the copy needs than the cache has room for."""
    started: float = 0.0
    """When the running copy started (monotonic seconds)."""
    offered: bool = False
    """The Ready copy's manifest was offered as its revision's version (or need not be)."""
    last_used: float = 0.0
    """Seconds since the epoch; 0 until sampled."""
    task: asyncio.Task[None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def disk_bytes(self) -> int:
        held = self.manifest.total_bytes if self.manifest is not None else 0
        staged = self.progress.bytes_done if self.phase is Phase.FETCHING else 0
        return held + staged

    def report(self, name: str, now: float) -> pb.ReplicaReport:
        held = self.manifest
        report = pb.ReplicaReport(dataset_name=name, disk_bytes=self.disk_bytes())
        if held is not None:
            used = lastuse.newest([self.last_used], held.published_at)
            if used > 0:
                report.last_used_time.CopyFrom(_timestamp(used))
        if self.phase is Phase.READY and held is not None:
            files, nbytes = len(held.files), held.total_bytes
            report.state = pb.REPLICA_STATE_READY
            report.digest = held.digest
            report.revision = held.revision
            report.files_done = report.files_total = files
            report.bytes_done = report.bytes_total = nbytes
            report.verification.files_by_method.update(held.verification())
            if self.refused:
                report.message = f"{self.refused} unsafe object keys refused"
            return report
        p = self.progress
        report.state = _STATES[self.phase]
        report.revision = self.revision
        report.files_done, report.bytes_done = p.files_done, p.bytes_done
        report.files_total, report.bytes_total = p.files_total, p.bytes_total
        report.message = self.message
        if held is not None and self.phase is not Phase.DELETING:
            report.serving_version = held.digest
        if self.phase is Phase.FETCHING and self.started and now > self.started:
            report.bytes_per_second = p.bytes_done / (now - self.started)
        return report


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
