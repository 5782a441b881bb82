"""Checksums: what the source says an object's content is, and computing ours to compare.

Each copied file gets a CRC64/NVME (computed per range while the bytes arrive, then combined,
so no second pass over the file is needed); it is the per-file digest in the manifest. A
source may also state a full-object checksum (S3 `ChecksumCRC64NVME`, `ChecksumCRC32C`,
`ChecksumCRC32`), computed the same way in its algorithm, or, for a multipart upload, a
composite one (the checksum of the parts' checksums, `...-N`), or an ETag that is an MD5 (of
the object, or of the parts' MD5s for a multipart upload).

Speeds on the benchmark machine (one core, 1 MiB buffers): awscrt CRC64/NVME and CRC32C about
15 GB/s, awscrt CRC32 only 1.4 GB/s; ISA-L's CRC32 (the `isal` package, used when installed)
15 GB/s; MD5 0.57 GB/s and SHA-256 0.37 GB/s, which is why neither is used unless the source
states nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from awscrt import checksums as crt

try:
    from isal.isal_zlib import crc32 as _crc32  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - the optional faster CRC32
    _crc32 = crt.crc32

_READBACK_BYTES = 8 * 1024 * 1024

Buffer = bytes | bytearray | memoryview
Crc = Callable[[Buffer, int], int]
Combine = Callable[[int, int, int], int]
_ALGORITHMS: dict[str, tuple[Crc, Combine]] = {
    "crc64nvme": (crt.crc64nvme, crt.combine_crc64nvme),
    "crc32c": (crt.crc32c, crt.combine_crc32c),
    "crc32": (_crc32, crt.combine_crc32),
}
WIDTH = {"crc64nvme": 8, "crc32c": 4, "crc32": 4}
"""Bytes of each algorithm's value (as S3 encodes it, big-endian)."""
_S3_HEADERS = (
    ("x-amz-checksum-crc64nvme", "crc64nvme"),
    ("x-amz-checksum-crc32c", "crc32c"),
    ("x-amz-checksum-crc32", "crc32"),
)
# Preference when a source states several.
_S3_FIELDS = (
    ("ChecksumCRC64NVME", "crc64nvme"),
    ("ChecksumCRC32C", "crc32c"),
    ("ChecksumCRC32", "crc32"),
)


def crc64(data: Buffer, previous: int = 0) -> int:
    crc: int = crt.crc64nvme(data, previous)
    return crc


def crc_function(algorithm: str) -> Crc:
    return _ALGORITHMS[algorithm][0]


def crc(algorithm: str, data: Buffer, previous: int = 0) -> int:
    crc_of, _ = _ALGORITHMS[algorithm]
    return crc_of(data, previous)


def combine(algorithm: str, ranges: list[tuple[int, int]]) -> int:
    """Combines (crc, length) of consecutive ranges into the CRC of their concatenation."""
    _, join = _ALGORITHMS[algorithm]
    total = 0
    for i, (crc, length) in enumerate(ranges):
        total = crc if i == 0 else join(total, crc, length)
    return total


@dataclass(frozen=True)
class ObjectChecksum:
    """A checksum the source states for a whole object."""

    algorithm: str
    """'crc64nvme', 'crc32c' or 'crc32'."""
    value: int


@dataclass(frozen=True)
class CompositeChecksum:
    """The checksum of a multipart upload's part checksums: `algorithm` over the concatenated
    big-endian checksums of the `parts` parts."""

    algorithm: str
    value: int
    parts: int

    def matches(self, part_crcs: list[int]) -> bool:
        width = WIDTH[self.algorithm]
        joined = b"".join(c.to_bytes(width, "big") for c in part_crcs)
        return len(part_crcs) == self.parts and crc(self.algorithm, joined) == self.value


def _decode(encoded: str) -> int | None:
    try:
        return int.from_bytes(binascii.a2b_base64(encoded, strict_mode=True), "big")
    except (ValueError, binascii.Error):
        return None


def from_s3_headers(
    headers: Mapping[str, str], multipart: bool
) -> tuple[ObjectChecksum | None, CompositeChecksum | None]:
    """The full-object and the composite checksum in a GET or HEAD response's headers
    (lower-case names). A value ending in `-N` is composite; so is any value when
    `x-amz-checksum-type` says COMPOSITE. For a multipart upload (`multipart`: its ETag ends in
    `-N`) a value counts as full-object only when the type says FULL_OBJECT: moto answers a
    HEAD with the composite value stripped of its `-N` and no type."""
    kind = headers.get("x-amz-checksum-type", "").upper()
    if multipart and kind not in ("FULL_OBJECT", "COMPOSITE"):
        kind = "UNKNOWN"
    full: ObjectChecksum | None = None
    composite: CompositeChecksum | None = None
    for name, algorithm in _S3_HEADERS:
        encoded = headers.get(name)
        if not encoded:
            continue
        value, _, parts = encoded.partition("-")
        decoded = _decode(value)
        if decoded is None:
            continue
        if parts:
            if parts.isdigit() and composite is None:
                composite = CompositeChecksum(algorithm, decoded, int(parts))
        elif kind in ("", "FULL_OBJECT") and full is None:
            full = ObjectChecksum(algorithm, decoded)
    return full, composite


MULTIPART_ETAG = re.compile(r'"?[0-9a-fA-F]{32}-(\d+)"?')
MD5_ETAG = re.compile(r'"?([0-9a-fA-F]{32})"?')


def md5_multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives a multipart upload: MD5 of the parts' binary MD5s, '-', parts."""
    joined = hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(part_md5s)}"


def read_back(
    fd: int, offset: int, length: int, algorithms: tuple[str, ...], md5: bool
) -> tuple[dict[str, int], bytes | None]:
    """CRCs (and optionally the MD5) of bytes [offset, offset+length) of a written file."""
    crcs = dict.fromkeys(algorithms, 0)
    digest = hashlib.md5(usedforsecurity=False) if md5 else None
    end = offset + length
    while offset < end:
        block = os.pread(fd, min(_READBACK_BYTES, end - offset), offset)
        if not block:
            break
        for algorithm in algorithms:
            crcs[algorithm] = _ALGORITHMS[algorithm][0](block, crcs[algorithm])
        if digest is not None:
            digest.update(block)
        offset += len(block)
    return crcs, (digest.digest() if digest is not None else None)


def from_s3_response(response: Mapping[str, Any]) -> ObjectChecksum | None:
    """The full-object checksum in a GetObject/HeadObject response, if any. Composite
    checksums of multipart uploads (`...-N`) describe parts, not the object, and are ignored."""
    if response.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    for field, algorithm in _S3_FIELDS:
        encoded = response.get(field)
        if not encoded or "-" in encoded:
            continue
        try:
            value = int.from_bytes(base64.b64decode(encoded, validate=True), "big")
        except ValueError:
            continue
        return ObjectChecksum(algorithm, value)
    return None


def file_crc(fd: int, size: int, algorithm: str) -> int:
    """The CRC of a written file, read back through the page cache."""
    crc_of, _ = _ALGORITHMS[algorithm]
    crc, offset = 0, 0
    while offset < size:
        block = os.pread(fd, min(_READBACK_BYTES, size - offset), offset)
        if not block:
            break
        crc = crc_of(block, crc)
        offset += len(block)
    return crc


def file_md5(fd: int, size: int) -> str:
    md5, offset = hashlib.md5(usedforsecurity=False), 0
    while offset < size:
        block = os.pread(fd, min(_READBACK_BYTES, size - offset), offset)
        if not block:
            break
        md5.update(block)
        offset += len(block)
    return md5.hexdigest()
