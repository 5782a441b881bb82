"""Where datasets come from. `SourceOpener.open` picks the implementation for a source URI:
s3:// (boto3), nfs:// (libnfs in user space, no mount) or file:// (a directory already
mounted on the node)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from agent.errors import SourceError
from agent.sources.base import READ_CHUNK_BYTES, ObjectInfo, Source
from agent.sources.local import LocalDirSource
from agent.sources.nfs import NfsSettings
from agent.sources.nfs import NfsSource as NfsObjectSource
from agent.sources.s3 import S3ObjectSource, S3Settings, s3_client
from datacache.validation import FileSource, InvalidInput, NfsSource, S3Source, parse_source

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["READ_CHUNK_BYTES", "NfsSettings", "ObjectInfo", "Source", "SourceOpener"]


class SourceOpener:
    """Opens sources by URI, sharing one S3 client (and its connection pool) between them."""

    def __init__(self, s3: S3Settings, nfs: NfsSettings | None = None) -> None:
        self._s3_settings = s3
        self._nfs_settings = nfs or NfsSettings()
        self._s3_client: S3Client | None = None
        self._lock = threading.Lock()

    def _s3(self) -> S3Client:
        with self._lock:
            if self._s3_client is None:
                self._s3_client = s3_client(self._s3_settings)
            return self._s3_client

    def open(self, uri: str) -> Source:
        try:
            location = parse_source(uri)
        except InvalidInput as exc:
            raise SourceError(str(exc)) from exc
        if isinstance(location, S3Source):
            return S3ObjectSource(self._s3(), location)
        if isinstance(location, NfsSource):
            return NfsObjectSource(location, self._nfs_settings)
        if isinstance(location, FileSource):
            return LocalDirSource(location.path)
        raise SourceError(f"unsupported source {uri!r}")
