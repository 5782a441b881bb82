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

Where ISA-L is installed, CRC64/NVME (ISA-L's `crc64_rocksoft_refl`, the same polynomial,
reflection and inversion, reached through ctypes in the `isal` package's extension) and CRC32
come from it, and CRC64/NVME values are combined here in Python (`_Crc64Combiner`): awscrt,
whose import seeds a jitter-entropy RNG (about 60 ms of every agent start here), is then
imported only for CRC32C, a source stating CRC64/NVME, or without ISA-L.
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

_READBACK_BYTES = 8 * 1024 * 1024

Buffer = bytes | bytearray | memoryview
Crc = Callable[[Buffer, int], int]
Combine = Callable[[int, int, int], int]


def _crt() -> Any:
    from awscrt import checksums as crt

    return crt


class _Crc64Combiner:
    """CRC64/NVME of a concatenation from the CRCs of its parts (zlib's crc32_combine method,
    64 bits wide): crc(A+B) = crc(A) * x^(8 len(B)) mod P + crc(B), over GF(2), with P
    reflected. The powers of x are cached per length: a file's ranges share one length."""

    _POLY = 0x9A6C9329AC4BC9B5  # 0xAD93D23594C93659 reflected
    _X0 = 1 << 63  # x^0, reflected

    def __init__(self) -> None:
        # x^(2^n) mod P for n = 0..63.
        power, self._x2n = 1 << 62, []
        for _ in range(64):
            self._x2n.append(power)
            power = self._multiply(power, power)
        self._shifts: dict[int, int] = {}

    def _multiply(self, a: int, b: int) -> int:
        """a * b mod P (both reflected)."""
        m, product = self._X0, 0
        while m:
            if a & m:
                product ^= b
                if not a & (m - 1):
                    break
            m >>= 1
            b = (b >> 1) ^ self._POLY if b & 1 else b >> 1
        return product

    def _shift(self, length: int) -> int:
        """x^(8 length) mod P."""
        power = self._shifts.get(length)
        if power is None:
            power, n, k = self._X0, length, 3
            while n:
                if n & 1:
                    power = self._multiply(self._x2n[k & 63], power)
                n >>= 1
                k += 1
            if len(self._shifts) < 1024:
                self._shifts[length] = power
        return power

    def __call__(self, crc1: int, crc2: int, length2: int) -> int:
        return self._multiply(self._shift(length2), crc1) ^ crc2


def _isal_crc64() -> Crc | None:
    """ISA-L's CRC64/NVME through the `isal` package's extension module, or None."""
    try:
        import ctypes

        from isal import isal_zlib  # type: ignore[import-not-found, unused-ignore]

        function = ctypes.CDLL(isal_zlib.__file__).crc64_rocksoft_refl
    except (ImportError, OSError, AttributeError):
        return None
    function.restype = ctypes.c_uint64
    array = ctypes.c_char

    def crc64_isal(data: Buffer, previous: int = 0) -> int:
        seed = ctypes.c_uint64(previous)
        if isinstance(data, bytes):
            return int(function(seed, data, ctypes.c_uint64(len(data))))
        view = memoryview(data)
        if view.readonly:
            return int(function(seed, view.tobytes(), ctypes.c_uint64(view.nbytes)))
        buffer = (array * view.nbytes).from_buffer(view)
        return int(function(seed, buffer, ctypes.c_uint64(view.nbytes)))

    # Trust it only if it computes the catalogued check value of CRC-64/NVME.
    return crc64_isal if crc64_isal(b"123456789") == 0xAE8B14860A799888 else None


def _load() -> dict[str, tuple[Crc, Combine]]:
    algorithms: dict[str, tuple[Crc, Combine]] = {}
    crc64 = _isal_crc64()
    if crc64 is not None:
        algorithms["crc64nvme"] = (crc64, _Crc64Combiner())
    try:
        from isal.isal_zlib import (  # type: ignore[import-not-found, unused-ignore]
            crc32,
            crc32_combine,
        )
    except ImportError:  # pragma: no cover - the optional faster CRC32
        pass
    else:
        algorithms["crc32"] = (crc32, crc32_combine)
    return algorithms


_ALGORITHMS: dict[str, tuple[Crc, Combine]] = _load()


def _algorithm(name: str) -> tuple[Crc, Combine]:
    found = _ALGORITHMS.get(name)
    if found is None:
        crt = _crt()
        found = {
            "crc64nvme": (crt.crc64nvme, crt.combine_crc64nvme),
            "crc32c": (crt.crc32c, crt.combine_crc32c),
            "crc32": (crt.crc32, crt.combine_crc32),
        }[name]
        _ALGORITHMS[name] = found
    return found


_crc64 = _ALGORITHMS["crc64nvme"][0] if "crc64nvme" in _ALGORITHMS else None
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
    crc_of = _crc64 or _algorithm("crc64nvme")[0]
    return crc_of(data, previous)


def crc_function(algorithm: str) -> Crc:
    return _algorithm(algorithm)[0]


def crc(algorithm: str, data: Buffer, previous: int = 0) -> int:
    crc_of, _ = _algorithm(algorithm)
    return crc_of(data, previous)


def combine(algorithm: str, ranges: list[tuple[int, int]]) -> int:
    """Combines (crc, length) of consecutive ranges into the CRC of their concatenation."""
    _, join = _algorithm(algorithm)
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
            crcs[algorithm] = _algorithm(algorithm)[0](block, crcs[algorithm])
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
    crc_of, _ = _algorithm(algorithm)
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
