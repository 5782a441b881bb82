"""Where datasets come from. `SourceOpener.open` picks the implementation for a source URI:
s3:// (plain HTTP with SigV4, `agent.sources.s3http`), nfs:// (libnfs in user space, no
mount) or file:// (a directory already mounted on the node).

Implementations are imported when first used: `datacache-agent fetch` of an S3 dataset never
loads libnfs bindings or boto3."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from agent.errors import SourceError
from agent.sources.base import READ_CHUNK_BYTES, ObjectInfo, Source
from agent.sources.nfs_settings import NfsSettings
from agent.sources.s3 import S3Settings
from datacache.validation import FileSource, InvalidInput, NfsSource, S3Source, parse_source

if TYPE_CHECKING:
    from agent.sources.s3http import CredentialChain

__all__ = ["READ_CHUNK_BYTES", "NfsSettings", "ObjectInfo", "Source", "SourceOpener"]


class SourceOpener:
    """Opens sources by URI, sharing one S3 credential chain (resolved once) between them."""

    def __init__(self, s3: S3Settings, nfs: NfsSettings | None = None) -> None:
        self._s3_settings = s3
        self._nfs_settings = nfs or NfsSettings()
        self._credentials: CredentialChain | None = None
        self._region: str | None = None
        self._lock = threading.Lock()

    def _s3(self) -> tuple[CredentialChain, str]:
        from agent.sources.s3http import CredentialChain, default_region

        with self._lock:
            if self._credentials is None or self._region is None:
                self._credentials = CredentialChain()
                self._region = default_region(self._s3_settings.region)
            return self._credentials, self._region

    def open(self, uri: str) -> Source:
        try:
            location = parse_source(uri)
        except InvalidInput as exc:
            raise SourceError(str(exc)) from exc
        if isinstance(location, S3Source):
            from agent.sources.s3http import S3HttpSource

            credentials, region = self._s3()
            return S3HttpSource(location, self._s3_settings, credentials, region)
        if isinstance(location, NfsSource):
            from agent.sources.nfs import NfsSource as NfsObjectSource

            return NfsObjectSource(location, self._nfs_settings)
        if isinstance(location, FileSource):
            from agent.sources.local import LocalDirSource

            return LocalDirSource(location.path)
        raise SourceError(f"unsupported source {uri!r}")
