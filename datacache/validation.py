"""Validation of external input shared by every component: dataset names and source URIs.

Errors are `InvalidInput` with a message that names the offending value, what is wrong with it
and what to do instead; servers map it to gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_DATASET_NAME_LENGTH = 253
MAX_NAMESPACE_LENGTH = 63
DEFAULT_NAMESPACE = "default"
# Kubernetes DNS-1123 subdomain: dataset names end up in label keys and CR names.
_DATASET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Kubernetes DNS-1123 label: namespaces (no dots, so "<namespace>.<name>" is unambiguous).
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# S3 bucket naming rules (virtual-host safe subset): 3-63 lowercase letters, digits, '.', '-'.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_REPLICAS = 10_000
MAX_PREFIX_BYTES = 1024


class InvalidInput(ValueError):
    """An external input was rejected; the message says what and how to fix it."""


@dataclass(frozen=True)
class S3Source:
    """A parsed `s3://bucket/prefix` source. `prefix` is '' or ends with '/'."""

    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def validate_dataset_name(name: str) -> str:
    """Checks a dataset reference, "<namespace>/<name>" or "<name>" (namespace "default"), and
    returns its canonical form "<namespace>/<name>"."""
    namespace, _, short = name.rpartition("/")
    if "/" in namespace:
        raise InvalidInput(
            f"dataset name {name!r} has more than one '/': write it as <namespace>/<name>"
        )
    if name.startswith("/") or (namespace == "" and "/" in name):
        raise InvalidInput(f"dataset name {name!r} has an empty namespace before '/'")
    namespace = validate_namespace(namespace) if namespace else DEFAULT_NAMESPACE
    return f"{namespace}/{_validate_short_name(short)}"


def split_dataset_name(name: str) -> tuple[str, str]:
    """(namespace, name) of a canonical dataset name."""
    namespace, _, short = validate_dataset_name(name).partition("/")
    return namespace, short


def validate_namespace(namespace: str) -> str:
    if len(namespace) > MAX_NAMESPACE_LENGTH or not _NAMESPACE.fullmatch(namespace):
        raise InvalidInput(
            f"namespace {namespace[:80]!r} is not a DNS-1123 label: use at most "
            f"{MAX_NAMESPACE_LENGTH} lowercase letters, digits and '-', starting and ending with "
            "a letter or digit"
        )
    return namespace


def validate_node_name(name: str) -> str:
    """Kubernetes node names are DNS-1123 subdomains."""
    if not name or len(name) > MAX_DATASET_NAME_LENGTH or not _DATASET_NAME.fullmatch(name):
        raise InvalidInput(
            f"node name {name[:80]!r} is not a DNS-1123 subdomain: use at most "
            f"{MAX_DATASET_NAME_LENGTH} lowercase letters, digits, '-' and '.'"
        )
    return name


_PEER_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]")


def validate_peer_address(address: str) -> tuple[str, int]:
    """An agent's peer server address, 'host:port' (an IPv6 host in brackets); returns the
    host (without brackets) and the port."""
    host, sep, port = address.rpartition(":")
    if not sep or not _PEER_HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(
            f"peer address {address[:80]!r} is not host:port (e.g. 10.0.3.7:9403 or [fd00::7]:9403)"
        )
    return host.strip("[]"), int(port)


def _validate_short_name(name: str) -> str:
    if not name:
        raise InvalidInput("dataset name is empty: use lowercase letters, digits, '-' and '.'")
    if len(name) > MAX_DATASET_NAME_LENGTH:
        raise InvalidInput(
            f"dataset name {name[:40]!r}... is {len(name)} characters long; "
            f"the limit is {MAX_DATASET_NAME_LENGTH}"
        )
    if not _DATASET_NAME.fullmatch(name):
        raise InvalidInput(
            f"dataset name {name!r} is not a DNS-1123 subdomain: use lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit (e.g. 'imagenet-2012')"
        )
    return name


def validate_replicas(replicas: int) -> int:
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidInput(f"replicas must be between 1 and {MAX_REPLICAS}, got {replicas}")
    return replicas


@dataclass(frozen=True)
class FileSource:
    """A parsed `file:///absolute/dir` source: a directory already mounted on every node."""

    path: str
    """Absolute, normalised, ending with '/'."""

    @property
    def uri(self) -> str:
        return f"file://{self.path}"


@dataclass(frozen=True)
class NfsSource:
    """A parsed `nfs://server[:port]/export/path` source, read in user space (no mount)."""

    server: str
    port: int | None
    path: str
    """Absolute path on the server (export and directory below it), ending with '/'."""

    @property
    def uri(self) -> str:
        netloc = f"{self.server}:{self.port}" if self.port else self.server
        return f"nfs://{netloc}{self.path}"


SourceLocation = S3Source | FileSource | NfsSource
SUPPORTED_SOURCES = "s3://bucket/prefix/, nfs://server/export/dir/ or file:///mounted/dir/"
_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def _clean_path(uri: str, path: str) -> str:
    """Checks an absolute directory path: no empty, '.' or '..' segments; returns it with a
    trailing '/'."""
    if not path.startswith("/"):
        raise InvalidInput(f"source {uri!r}: the path must be absolute")
    if len(path.encode()) > MAX_PREFIX_BYTES:
        raise InvalidInput(f"source {uri!r}: path is longer than {MAX_PREFIX_BYTES} bytes")
    segments = path.strip("/").split("/") if path.strip("/") else []
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidInput(
            f"source {uri!r}: path has an empty, '.' or '..' segment; write it as /dir/subdir/"
        )
    return "/" + "".join(f"{s}/" for s in segments)


def parse_source(uri: str) -> SourceLocation:
    """Parses a dataset source URI: s3://, nfs:// or file://."""
    if not uri:
        raise InvalidInput(f"source is empty: give an URI like {SUPPORTED_SOURCES}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in uri):
        raise InvalidInput(f"source {uri!r} contains control characters")
    parts = urlsplit(uri)
    if parts.scheme not in ("s3", "nfs", "file"):
        raise InvalidInput(
            f"source {uri!r} has scheme {parts.scheme or '(none)'!r}; "
            f"supported: {SUPPORTED_SOURCES}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidInput(f"source {uri!r} must not carry a query, fragment or user")
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"source {uri!r}: invalid port") from exc
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput(f"source {uri!r}: file:// URIs take no host (file:///dir/)")
        return FileSource(_clean_path(uri, parts.path))
    if parts.scheme == "nfs":
        host = parts.hostname or ""
        if parts.path in ("", "/"):
            raise InvalidInput(f"source {uri!r}: give the export path, nfs://server/export/")
        if not _HOST.fullmatch(parts.netloc.rsplit(":", 1)[0] if port else parts.netloc):
            raise InvalidInput(f"source {uri!r}: {host!r} is not a valid NFS server name")
        return NfsSource(host, port, _clean_path(uri, parts.path))
    if port:
        raise InvalidInput(f"source {uri!r}: S3 URIs take no port (set the endpoint instead)")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidInput(
            f"source {uri!r}: bucket {bucket!r} is not a valid S3 bucket name "
            "(3-63 lowercase letters, digits, '.' and '-')"
        )
    prefix = parts.path.lstrip("/")
    if len(prefix.encode()) > MAX_PREFIX_BYTES:
        raise InvalidInput(f"source {uri!r}: prefix is longer than {MAX_PREFIX_BYTES} bytes")
    segments = prefix.rstrip("/").split("/") if prefix else []
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidInput(
            f"source {uri!r}: prefix has an empty, '.' or '..' segment; "
            "write it as s3://bucket/dir/subdir/"
        )
    if prefix and not prefix.endswith("/"):
        # A dataset is a directory-like prefix; "s3://b/data" would also match "data2/...".
        prefix += "/"
    return S3Source(bucket=bucket, prefix=prefix)
