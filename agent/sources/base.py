"""The narrow `Source` interface the transfer engine reads through.

A source lists the objects under a dataset's root and reads byte ranges of one object, pinned
to the version it listed (an S3 ETag, an NFS/local file's size and mtime): if the object
changed since, the read fails with `SourceChanged` instead of mixing bytes of two versions.
Every implementation passes the same conformance suite (tests/test_sources.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from agent.checksums import ObjectChecksum

# Each ranged read is consumed in chunks this large, so memory per in-flight read is bounded
# by it whatever the range size.
READ_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Key relative to the dataset prefix."""
    size: int
    """Bytes."""
    etag: str
    """Opaque version tag, compared with If-Match on every read."""


class Source(Protocol):
    def list(self) -> Iterator[ObjectInfo]:
        """Every object under the dataset prefix, in key order."""
        ...

    def read_range(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        """Bytes [offset, offset+length) of `obj` as it was listed, in chunks of at most
        `READ_CHUNK_BYTES`. Raises `SourceChanged` if the object changed."""
        ...


@runtime_checkable
class ChecksummedSource(Source, Protocol):
    """A source that can state full-object checksums and re-read an object's metadata."""

    def checksum(self, obj: ObjectInfo) -> ObjectChecksum | None:
        """The checksum the source stores for `obj` as listed, or None. Raises
        `SourceChanged` if the object changed."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """The object's current metadata (after a `SourceChanged`)."""
        ...
