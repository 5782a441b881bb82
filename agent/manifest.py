"""A dataset version's manifest: every file with its size, source ETag, digest and how it was
verified. The version's content digest is computed from the manifest, so two replicas with the
same digest hold byte-identical files.

The digest is the coordinator's too (it checks offered manifests and hands the fixed one to
other replicas), so both compute it with `datacache.versions.manifest_digest`;
tests/test_agent_manifest.py pins the algorithm."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from datacache.versions import manifest_digest

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
    """How the bytes were checked: a source checksum algorithm, a multipart upload's
    composite checksum ('<algorithm>-composite'), its ETag ('md5-multipart'),
    VERIFIED_MD5_ETAG, VERIFIED_MANIFEST or UNVERIFIED (see `agent.fetch`)."""


def content_digest(files: Sequence[FileEntry]) -> str:
    """'sha256:<hex>' over (path, size, CRC64) of every file, in path order: the shared
    `datacache.versions.manifest_digest`. The ETag and the verification method are not part of
    it: equal digests mean equal bytes."""
    return manifest_digest(files)


@dataclass(frozen=True)
class Manifest:
    dataset: str
    source: str
    digest: str
    files: tuple[FileEntry, ...]
    revision: int = 0
    """The dataset revision (the coordinator's counter of fresh listings) this copy belongs
    to; 0 when copied without a coordinator. Not part of the digest: an unchanged source
    gives the same version in every revision."""
    published_at: float = 0.0
    """When this copy was published, seconds since the epoch (0: unknown)."""

    @classmethod
    def build(
        cls, dataset: str, source: str, files: Sequence[FileEntry], revision: int = 0
    ) -> Manifest:
        ordered = tuple(sorted(files, key=lambda f: f.path))
        return cls(dataset, source, content_digest(ordered), ordered, revision)

    def with_revision(self, revision: int, published_at: float) -> Manifest:
        return replace(self, revision=revision, published_at=published_at)

    def verification(self) -> dict[str, int]:
        """How many files each verification method covered."""
        return dict(Counter(f.verified for f in self.files))

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
                "revision": self.revision,
                "published_at": self.published_at,
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
        manifest = cls(
            data["dataset"],
            data["source"],
            data["digest"],
            files,
            int(data.get("revision", 0)),
            float(data.get("published_at", 0.0)),
        )
        if content_digest(files) != manifest.digest:
            raise ValueError("manifest digest does not match its file list")
        return manifest
