"""The agent's Prometheus metrics (exposed on `--metrics-port`).

Names follow Prometheus conventions (base units, `_bytes_total`, `_seconds`) and are pinned by
tests/test_metrics.py: dashboards and alerts depend on them. Label values are bounded: source
types, verification methods and retry reasons are fixed sets, and datasets are created by
administrators, not by traffic.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

FETCHED_BYTES = Counter(
    "datacache_agent_fetched_bytes",
    "Bytes copied from sources into the cache (rate() gives throughput).",
    ["source", "dataset"],
    registry=REGISTRY,
)
FETCHED_FILES = Counter(
    "datacache_agent_fetched_files",
    "Files copied and verified.",
    ["source", "dataset"],
    registry=REGISTRY,
)
FETCHES_IN_FLIGHT = Gauge(
    "datacache_agent_fetches_in_flight",
    "Dataset copies in progress.",
    registry=REGISTRY,
)
FETCH_RETRIES = Counter(
    "datacache_agent_fetch_retries",
    "Reads retried, by reason: transport (reset, truncation, 5xx), checksum (bytes did not "
    "match the source's checksum), changed (object changed while being copied).",
    ["reason"],
    registry=REGISTRY,
)
CHECKSUM_FAILURES = Counter(
    "datacache_agent_checksum_failures",
    "Files whose copied bytes did not match the source's checksum or the version manifest.",
    registry=REGISTRY,
)
VERIFIED_FILES = Counter(
    "datacache_agent_verified_files",
    "Files copied, by how they were verified (a source checksum algorithm such as crc64nvme, "
    "a multipart composite checksum such as crc32c-composite, md5-multipart, md5-etag, "
    "manifest, or unverified).",
    ["method"],
    registry=REGISTRY,
)
FETCH_DURATION = Histogram(
    "datacache_agent_fetch_duration_seconds",
    "Time to copy a whole dataset, by outcome.",
    ["outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
    registry=REGISTRY,
)
CACHE_USED = Gauge(
    "datacache_agent_cache_used_bytes",
    "Bytes of published dataset versions in the cache.",
    registry=REGISTRY,
)
CACHE_CAPACITY = Gauge(
    "datacache_agent_cache_capacity_bytes",
    "What the cache may hold: its quota, or the size of the filesystem holding it.",
    registry=REGISTRY,
)
CACHE_FREE = Gauge(
    "datacache_agent_cache_free_bytes",
    "Bytes the cache may still take: free space on its filesystem, within the quota.",
    registry=REGISTRY,
)
EVICTIONS = Counter(
    "datacache_agent_evictions",
    "Datasets deleted from the cache because they were no longer desired.",
    registry=REGISTRY,
)
SCRUBBED_FILES = Counter(
    "datacache_agent_scrubbed_files",
    "Files re-read by the scrub, by result (ok, corrupt).",
    ["result"],
    registry=REGISTRY,
)
PEER_RECEIVED_BYTES = Counter(
    "datacache_agent_peer_received_bytes",
    "Bytes of dataset copies read from other agents (peers) instead of the source.",
    registry=REGISTRY,
)
PEER_ORIGIN_BYTES = Counter(
    "datacache_agent_peer_origin_bytes",
    "Bytes of copies that had peers but were read from the source: no peer could serve them, "
    "or a peer failed while serving them.",
    registry=REGISTRY,
)
PEER_FALLBACKS = Counter(
    "datacache_agent_peer_fallbacks",
    "Times a peer was left (and avoided for a while), by reason: gone (refused connection, "
    "reset), stalled (silent), slow, refused (an HTTP error, e.g. not Ready there), corrupt "
    "(its bytes failed verification against the version's manifest).",
    ["reason"],
    registry=REGISTRY,
)
PEER_SERVED_BYTES = Counter(
    "datacache_agent_peer_served_bytes",
    "Bytes this agent served to other agents.",
    registry=REGISTRY,
)
PEER_REQUESTS = Counter(
    "datacache_agent_peer_requests",
    "Peer reads this agent answered, by result: ok, aborted (the connection failed while "
    "sending), unauthorized, not_ready (the version or file is not Ready here), busy, "
    "bad_request.",
    ["result"],
    registry=REGISTRY,
)

for reason in ("gone", "stalled", "slow", "refused", "corrupt"):
    PEER_FALLBACKS.labels(reason)
for result in ("ok", "aborted", "unauthorized", "not_ready", "busy", "bad_request"):
    PEER_REQUESTS.labels(result)
for reason in ("transport", "checksum", "changed"):
    FETCH_RETRIES.labels(reason)
for result in ("ok", "corrupt"):
    SCRUBBED_FILES.labels(result)
for outcome in ("ready", "failed"):
    FETCH_DURATION.labels(outcome)
