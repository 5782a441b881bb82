"""Settings of `nfs://` sources, apart from their implementation (`agent.sources.nfs`), which
defines the libnfs bindings when imported: settings are needed by every command, the bindings
only by copies from NFS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NfsSettings:
    version: int = 3
    """NFS protocol version: 3 or 4."""
    max_connections: int = 16
    """Contexts (TCP connections) per source; at least the engine's concurrency to read at
    full parallelism."""
    timeout_seconds: int = 30
    """Timeout of each NFS call, whole seconds (libnfs's granularity)."""
    idle_seconds: float = 120.0
    """A context idle longer than this is replaced before use: servers close idle
    connections (nfs-ganesha after 300 s by default)."""
    acquire_timeout_seconds: float = 300.0
    """Longest wait for a free context when every one is busy."""
