"""Capacity accounting: how much room the cache has, under the filesystem's free space and
the optional quota. Pure functions; the runner feeds them numbers from `statvfs` and the
index."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Room:
    capacity_bytes: int
    """What the cache may hold: the quota, or the filesystem's size without one."""
    free_bytes: int
    """What it may still take: the filesystem's free space, and no more than the quota
    leaves."""


def room(fs_total: int, fs_free: int, quota: int, used: int) -> Room:
    """`used` is what the cache holds now (published versions and staging), bytes. A quota
    of 0 means the whole filesystem."""
    if quota <= 0:
        return Room(capacity_bytes=fs_total, free_bytes=max(0, fs_free))
    return Room(capacity_bytes=quota, free_bytes=max(0, min(fs_free, quota - used)))


def missing_bytes(need: int, already_staged: int, free: int) -> int:
    """How many bytes short a copy of `need` bytes is, when `already_staged` of them are on
    disk from an interrupted attempt (they count in `free` already)."""
    return max(0, need - max(0, already_staged) - free)
