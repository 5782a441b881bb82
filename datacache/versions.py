"""The digest that names a dataset version, shared by the agent and the coordinator.

A version is the manifest of a complete copy; its digest is 'sha256:<hex>' over every file's
(path, size, CRC64/NVME) in path order. The agent computes it over the files it copied, the
coordinator checks it against the entries an agent publishes, so both must use this function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Protocol

DIGEST_PREFIX = "sha256:"


class ManifestLine(Protocol):
    """Anything with a file's path, size and CRC64/NVME (a manifest entry, a proto message)."""

    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def crc64nvme(self) -> str: ...


def manifest_digest(entries: Iterable[ManifestLine]) -> str:
    """'sha256:<hex>' over (path, size, CRC64) of every entry, in path order."""
    h = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.path):
        h.update(f"{entry.path}\x00{entry.size}\x00{entry.crc64nvme}\n".encode())
    return DIGEST_PREFIX + h.hexdigest()
