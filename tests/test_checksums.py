"""The CRCs the engine computes, against awscrt's (the reference implementation of S3's
checksums): ISA-L's CRC64/NVME and CRC32, the Python CRC64/NVME combination, and the awscrt
fallback used without ISA-L."""

from __future__ import annotations

import pytest
from awscrt import checksums as crt
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import checksums

PARTS = st.lists(st.binary(min_size=0, max_size=70_000), min_size=1, max_size=6)


def test_isal_provides_crc64nvme_and_crc32() -> None:
    # The `isal` package is a dependency: without it every CRC64 would come from awscrt.
    assert set(checksums._ALGORITHMS) >= {"crc64nvme", "crc32"}
    assert checksums.crc64(b"123456789") == 0xAE8B14860A799888  # CRC-64/NVME check value


@settings(max_examples=60, deadline=None)
@given(PARTS)
def test_crcs_and_their_combination_match_awscrt(parts: list[bytes]) -> None:
    whole = b"".join(parts)
    for algorithm, reference in (
        ("crc64nvme", crt.crc64nvme),
        ("crc32", crt.crc32),
        ("crc32c", crt.crc32c),
    ):
        ranges = [(checksums.crc(algorithm, part), len(part)) for part in parts]
        assert checksums.combine(algorithm, ranges) == reference(whole), algorithm
    # Chained over the parts, from every kind of buffer the engine passes.
    crc = 0
    for part in parts:
        crc = checksums.crc64(memoryview(bytearray(part)), crc)
    assert crc == crt.crc64nvme(whole)
    assert checksums.crc64(memoryview(whole)) == checksums.crc64(whole) == crt.crc64nvme(whole)


def test_combination_of_many_equal_ranges_and_large_lengths() -> None:
    combine = checksums._Crc64Combiner()
    part = bytes(range(256)) * 4096  # 1 MiB
    crc = crt.crc64nvme(part)
    total = crc
    for _ in range(15):
        total = combine(total, crc, len(part))
    assert total == crt.crc64nvme(part * 16)
    # Lengths beyond the cache (and over 4 GiB) go through the same arithmetic.
    assert combine(0, 0, 5 << 30) == crt.combine_crc64nvme(0, 0, 5 << 30)
    assert combine(crc, 7, (1 << 33) + 3) == crt.combine_crc64nvme(crc, 7, (1 << 33) + 3)


def test_without_isal_every_algorithm_comes_from_awscrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "_ALGORITHMS", {})
    monkeypatch.setattr(checksums, "_crc64", None)
    data = b"datacache" * 1000
    assert checksums.crc64(data) == crt.crc64nvme(data)
    assert checksums.crc("crc32", data) == crt.crc32(data)
    assert checksums.combine("crc64nvme", [(checksums.crc64(data), len(data))] * 2) == (
        crt.crc64nvme(data * 2)
    )
    assert checksums._ALGORITHMS["crc64nvme"][0] is crt.crc64nvme
