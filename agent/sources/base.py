"""The narrow `Source` interface the transfer engine reads through.

A source lists the objects under a dataset's root and reads byte ranges of one object, pinned
to the version it listed (an S3 ETag, an NFS/local file's size and mtime): if the object
changed since, the read fails with `SourceChanged` instead of mixing bytes of two versions.
Every implementation passes the same conformance suite (tests/test_sources.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from agent.checksums import CompositeChecksum, ObjectChecksum

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


@dataclass(frozen=True)
class PartLayout:
    """How a multipart upload was cut: `count` parts of `part_size` bytes, the last one
    shorter or equal."""

    part_size: int
    count: int

    def parts(self, size: int) -> list[tuple[int, int]]:
        """(offset, length) of every part of an object of `size` bytes."""
        return [
            (i * self.part_size, min(self.part_size, size - i * self.part_size))
            for i in range(self.count)
        ]


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


@dataclass(frozen=True)
class ObjectFacts:
    """What the source says about an object's current version (an S3 HEAD)."""

    size: int
    etag: str
    checksum: ObjectChecksum | None
    """Full-object checksum."""
    composite: CompositeChecksum | None
    """Checksum of the part checksums of a multipart upload."""


class RangeBody(Protocol):
    """A read in progress (`BufferedSource.open_range`)."""

    checksum: ObjectChecksum | None
    """The full-object checksum the source stated with a whole-object read; None for ranges
    and when it stated none."""

    def readinto(self, view: memoryview) -> int:
        """Fills `view`; fewer bytes only at the end of the range, 0 after it."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LentRangeBody(RangeBody, Protocol):
    """A range body that can also lend its own buffer instead of filling the caller's: one
    copy fewer per byte (NFS, whose library holds each reply in a buffer of its own)."""

    def read_lent(self, limit: int, consume: Callable[[memoryview], None]) -> int:
        """Reads the next bytes (at most `limit`, fewer only at the end of the range, 0 after
        it) and calls `consume` once with them. The view is valid only during that call;
        what `consume` raises is raised here, and the range must then be read again."""
        ...


@runtime_checkable
class StreamingSource(Protocol):
    """A source the engine reads into its own reused buffers (`RangeBody.readinto`): no
    bytes object per chunk, one copy fewer (S3, NFS)."""

    def open_range(self, obj: ObjectInfo, offset: int, length: int) -> RangeBody:
        """Bytes [offset, offset+length) of `obj` as it was listed. Raises `SourceChanged` if
        the object changed, here or from `readinto`."""
        ...


def read_chunks(body: RangeBody, length: int) -> Iterator[bytes]:
    """`Source.read_range` on top of a streaming source's `open_range` body: its bytes in
    chunks of at most `READ_CHUNK_BYTES`; closes the body."""
    try:
        view = memoryview(bytearray(min(READ_CHUNK_BYTES, length)))
        while n := body.readinto(view):
            yield bytes(view[:n])
    finally:
        body.close()


@runtime_checkable
class BufferedSource(StreamingSource, ChecksummedSource, Protocol):
    """A streaming source that states checksums as it answers and can describe multipart
    uploads (the S3 fast path)."""

    def head(self, key: str, etag: str | None) -> ObjectFacts:
        """The object's metadata, If-Match `etag` when given (`SourceChanged` otherwise)."""
        ...

    def part_layout(self, obj: ObjectInfo) -> PartLayout | None:
        """How `obj`'s multipart upload was cut, when the source can tell."""
        ...


@runtime_checkable
class RoutedSource(Protocol):
    """A source that reads each unit from one of several servers (peers, then the origin),
    and learns from verification which of them sent wrong bytes."""

    def distrust(self, obj: ObjectInfo) -> None:
        """The copy of `obj` failed verification: the servers of its units become suspects
        and its next reads go to the origin."""
        ...

    def blame(self, obj: ObjectInfo, offset: int) -> None:
        """The bytes first served for the unit of `obj` at `offset` were wrong: whoever
        served them is avoided (and counted)."""
        ...


class BatchBody(Protocol):
    """Whole objects' bytes back to back, in the order asked (`BatchSource.open_batch`)."""

    def readinto(self, view: memoryview) -> int:
        """Fills `view` with the next bytes, never past the end of the current object, so each
        object is complete when its last byte is returned; 0 after the last object. Raises
        `SourceError` when the batch failed: the objects not yet complete must be read again
        one by one."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class BatchSource(Protocol):
    """A source that can send several whole small objects in one request (peers: one
    request and one signature each side for up to 64 files). Optional: the engine reads
    objects one by one from sources without it, and from this one whenever it declines."""

    def batch_limits(self) -> tuple[int, int]:
        """Most objects and most bytes (their sizes together) one batch may ask for."""
        ...

    def open_batch(self, objs: Sequence[ObjectInfo]) -> BatchBody | None:
        """The bytes of `objs` (each at least 1 byte, within `batch_limits`), or None when no
        server will send them together now: then read them one by one."""
        ...


class ObjectReceiver(Protocol):
    """Takes the bodies a `MultiGetSource` delivers, identified by their index in the
    request. Calls for one object come in order: `begin`, `write`s, then `end`; or `failed`
    at any point (after which nothing more comes for it)."""

    def begin(self, index: int, checksum: ObjectChecksum | None) -> None:
        """The body of object `index` starts; `checksum` is the full-object checksum its
        response stated."""
        ...

    def write(self, index: int, data: memoryview) -> None:
        """The next bytes of object `index` (valid only during the call)."""
        ...

    def end(self, index: int) -> None:
        """Object `index` was delivered whole."""
        ...

    def failed(self, index: int, reason: str, attempted: bool = True) -> None:
        """Object `index` was not delivered (whatever part of it was written is void): it must
        be read again by the engine's other paths, which retry, restart and report.
        `attempted` is False for an object whose request was never sent."""
        ...


@runtime_checkable
class MultiGetSource(Protocol):
    """A source that reads many whole small objects at once from one thread (S3 over
    non-blocking connections). Optional, and a first try only: what it does not deliver is
    read again one by one."""

    def get_many(
        self,
        objs: Sequence[ObjectInfo],
        receiver: ObjectReceiver,
        connections: int,
        cancel: threading.Event,
    ) -> None:
        """Reads `objs` whole over up to `connections` connections, handing each body to
        `receiver`. Returns once every object was delivered or reported `failed`. Exceptions
        raised by `receiver` stop it and propagate."""
        ...
