"""A dataset version's manifest: every file with its size, source ETag, digest and how it was
verified. The version's content digest is computed from the manifest, so two replicas with the
same digest hold byte-identical files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

FORMAT = 2

# How a file's bytes were checked. Besides these, the name of a source checksum algorithm
# ("crc64nvme", "crc32c", "crc32") means the source's full-object checksum matched.
VERIFIED_MD5_ETAG = "md5-etag"
"""The object's ETag is the MD5 of its content (single-part upload) and matched."""
VERIFIED_MANIFEST = "manifest"
"""The file matched the dataset version's manifest (the first complete copy)."""
UNVERIFIED = "unverified"
"""Only the size matched: the source offered no checksum for this object."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    """Relative path inside the dataset ('/'-separated, equal to the key below the prefix)."""
    size: int
    """Bytes."""
    etag: str
    crc64nvme: str
    """CRC64/NVME of the content, 16 hex digits, computed while copying."""
    verified: str
    """How the bytes were checked: a source checksum algorithm, VERIFIED_MD5_ETAG,
    VERIFIED_MANIFEST or UNVERIFIED."""


def content_digest(files: Sequence[FileEntry]) -> str:
    """'sha256:<hex>' over (path, size, CRC64) of every file, in path order."""
    h = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.path):
        h.update(f"{entry.path}\x00{entry.size}\x00{entry.crc64nvme}\n".encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    dataset: str
    source: str
    digest: str
    files: tuple[FileEntry, ...]

    @classmethod
    def build(cls, dataset: str, source: str, files: Sequence[FileEntry]) -> Manifest:
        ordered = tuple(sorted(files, key=lambda f: f.path))
        return cls(dataset, source, content_digest(ordered), ordered)

    @property
    def version(self) -> str:
        """Directory name of this version: the first 16 hex digits of the digest."""
        return self.digest.removeprefix("sha256:")[:16]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "dataset": self.dataset,
                "source": self.source,
                "digest": self.digest,
                "files": [asdict(f) for f in self.files],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parses a manifest and checks its digest, raising ValueError when either fails."""
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}")
        files = tuple(FileEntry(**f) for f in data["files"])
        manifest = cls(data["dataset"], data["source"], data["digest"], files)
        if content_digest(files) != manifest.digest:
            raise ValueError("manifest digest does not match its file list")
        return manifest
