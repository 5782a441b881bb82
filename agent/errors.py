"""Errors raised inside the agent.

AgentError
 +-- UnsafeKey          an object key cannot be mapped to a path beneath the cache
 +-- SourceError        the source failed (transport errors chained as __cause__)
 |    +-- SourceChanged an object changed while it was being copied (412 on If-Match)
 +-- VerificationError  copied bytes do not match the source's checksum
 +-- FetchCancelled     the dataset stopped being desired while it was being copied
 +-- VersionMismatch    the source no longer holds the version fixed for this revision
 +-- VersionUnavailable the fixed version's manifest could not be read from the coordinator
 +-- StoreError         the local cache is unusable (corrupt layout, no space, ...)
      +-- DiskFull      ENOSPC while writing
      +-- NeedRoom      a copy would not fit: `missing_bytes` more are needed
      +-- CacheIndexError the local SQLite index cannot be used (it is rebuilt from disk)
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class UnsafeKey(AgentError):
    pass


class SourceError(AgentError):
    pass


class SourceChanged(SourceError):
    pass


class VerificationError(AgentError):
    pass


class FetchCancelled(AgentError):
    pass


class StoreError(AgentError):
    pass


class DiskFull(StoreError):
    pass


class NeedRoom(StoreError):
    def __init__(self, missing_bytes: int) -> None:
        super().__init__(f"waiting for {missing_bytes} bytes of room")
        self.missing_bytes = missing_bytes


class VersionMismatch(AgentError):
    pass


class VersionUnavailable(AgentError):
    pass


class CacheIndexError(StoreError):
    pass
