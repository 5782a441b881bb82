"""One version across replicas: the pure checks between a fixed version's manifest (from the
coordinator), the source's listing and a finished copy, and the messages that offer a copy's
manifest as the version of its revision."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from agent.errors import VersionMismatch, VersionUnavailable
from agent.fetch import PlannedFile
from agent.manifest import VERIFIED_MANIFEST, FileEntry, Manifest, content_digest
from datacache.v1 import datacache_pb2 as pb

PUBLISH_BATCH = 1000
"""Manifest entries per PublishVersion message (the API's limit)."""

_CRC = re.compile(r"[0-9a-f]{16}")


def _changed(source: str, path: str, version: str) -> VersionMismatch:
    return VersionMismatch(
        f"source object {source.rstrip('/')}/{path} changed since version {version} was fixed; "
        "refresh the dataset"
    )


def expected_entries(entries: Iterable[pb.ManifestEntry], version: str) -> dict[str, FileEntry]:
    """The fixed manifest by path, checked against its digest."""
    out: dict[str, FileEntry] = {}
    for e in entries:
        if e.size < 0 or not _CRC.fullmatch(e.crc64nvme) or not e.path or e.path in out:
            raise VersionUnavailable(f"the coordinator's manifest of {version} has a bad entry")
        out[e.path] = FileEntry(e.path, e.size, e.etag, e.crc64nvme, VERIFIED_MANIFEST)
    if content_digest(list(out.values())) != version:
        raise VersionUnavailable(
            f"the coordinator's manifest does not match version {version}; it is retried"
        )
    return out


def select(
    files: list[PlannedFile], expected: Mapping[str, FileEntry], version: str, source: str
) -> list[PlannedFile]:
    """The listed files that make up the fixed version, or VersionMismatch naming the first
    object that is gone or differs in size or ETag. Objects added since are not copied."""
    listed = {"/".join(p.parts): p for p in files}
    chosen = []
    for path in sorted(expected):
        entry, planned = expected[path], listed.get(path)
        if planned is None or planned.obj.size != entry.size:
            raise _changed(source, path, version)
        if entry.etag and planned.obj.etag != entry.etag:
            raise _changed(source, path, version)
        chosen.append(planned)
    return chosen


def check_copy(
    entries: Iterable[FileEntry], expected: Mapping[str, FileEntry], version: str, source: str
) -> None:
    """Every copied file has the fixed version's size and CRC64, whatever else verified it."""
    for entry in sorted(entries, key=lambda e: e.path):
        want = expected.get(entry.path)
        if want is None or (want.size, want.crc64nvme) != (entry.size, entry.crc64nvme):
            raise _changed(source, entry.path, version)


def offer(
    manifest: Manifest, agent: pb.AgentIdentity, batch: int = PUBLISH_BATCH
) -> Iterator[pb.PublishVersionRequest]:
    """The PublishVersion stream of a copy: entries in path order, `batch` per message; the
    first message names the agent, dataset, revision and version."""
    files = sorted(manifest.files, key=lambda f: f.path)
    for start in range(0, max(1, len(files)), batch):
        entries = [
            pb.ManifestEntry(path=f.path, size=f.size, etag=f.etag, crc64nvme=f.crc64nvme)
            for f in files[start : start + batch]
        ]
        if start == 0:
            yield pb.PublishVersionRequest(
                agent=agent,
                dataset_name=manifest.dataset,
                revision=manifest.revision,
                version=manifest.digest,
                entries=entries,
            )
        else:
            yield pb.PublishVersionRequest(entries=entries)
