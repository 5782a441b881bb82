"""Per-dataset S3 credentials (from a dataset's `credentials_secret`, passed down by the
coordinator) and opening a dataset's source with them.

Credentials belong to one dataset: they never enter the process environment or the shared
credential chain other datasets use. Their `repr` hides the secret and the token, and nothing
here logs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import SourceError
from agent.sources import Source, SourceOpener
from agent.sources.s3 import S3Settings
from agent.sources.s3http import CredentialChain, Credentials, S3HttpSource, default_region
from datacache.v1 import datacache_pb2 as pb
from datacache.validation import InvalidInput, S3Source, parse_source


@dataclass(frozen=True)
class DatasetCredentials:
    access_key_id: str
    secret_access_key: str
    session_token: str = ""

    def __repr__(self) -> str:
        return f"DatasetCredentials(access_key_id={self.access_key_id!r}, secret=***)"

    @classmethod
    def from_pb(cls, message: pb.DesiredDataset) -> DatasetCredentials | None:
        """The dataset's credentials, or None when it uses the agent's own chain."""
        if not message.HasField("credentials"):
            return None
        c = message.credentials
        if not c.access_key_id and not c.secret_access_key:
            return None
        return cls(c.access_key_id, c.secret_access_key, c.session_token)


class _FixedChain(CredentialChain):
    """A credential chain that always answers with one dataset's static credentials."""

    def __init__(self, credentials: DatasetCredentials) -> None:
        super().__init__()
        self._fixed = Credentials(
            credentials.access_key_id,
            credentials.secret_access_key,
            credentials.session_token or None,
        )

    def get(self) -> Credentials | None:
        return self._fixed

    def invalidate(self) -> None:
        """Static credentials cannot be renewed; the request fails with the server's error."""


class DatasetSources:
    """Opens a dataset's source: through the shared opener, or for an S3 dataset with its own
    credentials through a source holding exactly those."""

    def __init__(self, opener: SourceOpener, s3: S3Settings) -> None:
        self._opener = opener
        self._s3 = s3

    def open(self, uri: str, credentials: DatasetCredentials | None) -> Source:
        if credentials is None:
            return self._opener.open(uri)
        try:
            location = parse_source(uri)
        except InvalidInput as exc:
            raise SourceError(str(exc)) from exc
        if not isinstance(location, S3Source):
            raise SourceError(
                f"dataset credentials apply to s3:// sources only, not {uri!r}: remove "
                "credentials_secret from the dataset"
            )
        return S3HttpSource(
            location, self._s3, _FixedChain(credentials), default_region(self._s3.region)
        )
