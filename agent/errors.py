"""Errors raised inside the agent.

AgentError
 +-- UnsafeKey          an object key cannot be mapped to a path beneath the cache
 +-- SourceError        the source failed (transport errors chained as __cause__)
 |    +-- SourceChanged an object changed while it was being copied (412 on If-Match)
 +-- VerificationError  copied bytes do not match the source's checksum
 +-- FetchCancelled     the dataset stopped being desired while it was being copied
 +-- StoreError         the local cache is unusable (corrupt layout, no space, ...)
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
