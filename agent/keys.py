"""Mapping object keys to relative paths, treating every key as hostile.

A key (relative to the dataset prefix) becomes a path only if every '/'-separated component is
a plain name: not empty, not '.' or '..', no NUL, at most 255 bytes in UTF-8, and the whole
path at most 4096 bytes. Keys ending in '/' are directory markers and are skipped. A listing in
which one key is both a file and a directory prefix of another (`a/b` and `a/b/c`) is rejected
as a whole: there is no faithful copy of it on a POSIX disk.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.errors import UnsafeKey

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096


def is_directory_marker(key: str) -> bool:
    return key.endswith("/")


def key_to_parts(key: str) -> tuple[str, ...]:
    """Splits a key into path components, or raises `UnsafeKey` naming what is wrong."""
    if not key:
        raise UnsafeKey("empty object key")
    if "\x00" in key:
        raise UnsafeKey(f"object key {key!r} contains a NUL byte")
    if key.startswith("/"):
        raise UnsafeKey(f"object key {key!r} is absolute")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafeKey(f"object key {key[:60]!r}... is longer than {MAX_PATH_BYTES} bytes")
    parts = tuple(key.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafeKey(f"object key {key!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise UnsafeKey(
                f"object key {key[:60]!r} has a component longer than {MAX_COMPONENT_BYTES} bytes"
            )
    return parts


def find_collisions(paths: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """Paths that cannot be created beside the others, with the reason: a file path that is
    also a directory of another path, or a repeated path (the repeat is refused)."""
    seen: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    refused: dict[tuple[str, ...], str] = {}
    for parts in paths:
        if parts in seen:
            refused[parts] = "appears twice in the listing"
        seen.add(parts)
        dirs.update(parts[:i] for i in range(1, len(parts)))
    for parts in seen & dirs:
        refused[parts] = "is both a file and a directory prefix of other keys"
    return refused
