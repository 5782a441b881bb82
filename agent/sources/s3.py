"""S3 (and S3-compatible) sources read with boto3, and the S3 settings.

The agent reads objects with `agent.sources.s3http` (plain HTTP, much less CPU per request);
this boto3 source stays as the reference implementation of the same conformance suite. boto3
is imported only when a client is made, so importing the settings costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.checksums import ObjectChecksum, from_s3_response
from agent.errors import SourceChanged, SourceError, VerificationError
from agent.sources.base import READ_CHUNK_BYTES, ObjectInfo
from datacache.validation import S3Source as S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    """S3 endpoint; None means AWS (or AWS_ENDPOINT_URL_S3 from the environment)."""
    region: str | None = None
    """Region for request signing; None uses the standard AWS configuration chain."""
    read_timeout_seconds: float = 60.0
    """A response silent this long is abandoned and the read retried, seconds."""
    max_connections: int = 32
    """Connection pool size; should be at least the engine's concurrency."""
    connect_timeout_seconds: float = 10.0
    """Giving up on opening a connection (it is then tried again), seconds."""
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    """'path' (https://endpoint/bucket/key: works with every S3-compatible server, SeaweedFS
    and moto need it), 'virtual' (https://bucket.endpoint/key) or 'auto' (virtual for AWS
    when the bucket name allows it, path otherwise)."""


def s3_client(settings: S3Settings) -> S3Client:
    """An S3 client using the standard credential chain (env, files, IRSA, instance role)."""
    import boto3
    import botocore.config

    config = botocore.config.Config(
        max_pool_connections=settings.max_connections,
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=10,
        read_timeout=settings.read_timeout_seconds,
        # Path-style works with every S3-compatible server; virtual-host style does not.
        s3={"addressing_style": settings.addressing_style},
    )
    client: S3Client = boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )
    return client


class S3ObjectSource:
    """Reads one S3 prefix. Whole-object reads ask for the stored checksum with the GET, and
    remember it for `checksum()`; objects read as ranges cost one HEAD there instead."""

    def __init__(self, client: S3Client, location: S3Location) -> None:
        self._client = client
        self._location = location
        self._checksums: dict[tuple[str, str], ObjectChecksum | None] = {}
        self._lock = threading.Lock()

    def _url(self, key: str) -> str:
        return f"s3://{self._location.bucket}/{self._location.prefix}{key}"

    def checksum(self, obj: ObjectInfo) -> ObjectChecksum | None:
        with self._lock:
            if (obj.key, obj.etag) in self._checksums:
                return self._checksums.pop((obj.key, obj.etag))
        return from_s3_response(self._head(obj.key, obj.etag))

    def stat(self, key: str) -> ObjectInfo:
        response = self._head(key, None)
        return ObjectInfo(key=key, size=int(response["ContentLength"]), etag=response["ETag"])

    def _head(self, key: str, etag: str | None) -> dict[str, Any]:
        import botocore.exceptions

        kwargs: dict[str, Any] = {"ChecksumMode": "ENABLED"}
        if etag is not None:
            kwargs["IfMatch"] = etag
        try:
            response: dict[str, Any] = dict(
                self._client.head_object(
                    Bucket=self._location.bucket, Key=self._location.prefix + key, **kwargs
                )
            )
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if code in ("PreconditionFailed", "412"):
                raise SourceChanged(f"{self._url(key)} changed while being copied") from exc
            raise SourceError(f"reading metadata of {self._url(key)}: {code}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise SourceError(f"reading metadata of {self._url(key)}: {exc}") from exc
        return response

    def list(self) -> Iterator[ObjectInfo]:
        import botocore.exceptions

        prefix = self._location.prefix
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self._location.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        key=item["Key"][len(prefix) :],
                        size=int(item["Size"]),
                        etag=item["ETag"],
                    )
        except botocore.exceptions.BotoCoreError as exc:
            raise SourceError(f"listing {self._location.uri} failed: {exc}") from exc
        except botocore.exceptions.ClientError as exc:
            raise SourceError(f"listing {self._location.uri} failed: {_error_code(exc)}") from exc

    def read_range(self, obj: ObjectInfo, offset: int, length: int) -> Iterator[bytes]:
        import botocore.exceptions

        if length <= 0:
            return
        key = self._location.prefix + obj.key
        whole = offset == 0 and length == obj.size
        kwargs: dict[str, Any] = (
            {"ChecksumMode": "ENABLED"}
            if whole
            else {"Range": f"bytes={offset}-{offset + length - 1}"}
        )
        try:
            response = self._client.get_object(
                Bucket=self._location.bucket, Key=key, IfMatch=obj.etag, **kwargs
            )
            if whole:
                with self._lock:
                    self._checksums[(obj.key, obj.etag)] = from_s3_response(response)
            received = 0
            for chunk in response["Body"].iter_chunks(READ_CHUNK_BYTES):
                received += len(chunk)
                yield chunk
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if code in ("PreconditionFailed", "412"):
                raise SourceChanged(
                    f"s3://{self._location.bucket}/{key} changed while being copied"
                ) from exc
            raise SourceError(f"reading s3://{self._location.bucket}/{key}: {code}") from exc
        except botocore.exceptions.FlexibleChecksumError as exc:
            # botocore checked the whole-object checksum itself and the bytes were wrong.
            raise VerificationError(
                f"s3://{self._location.bucket}/{key}: received bytes fail the stored checksum"
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise SourceError(f"reading s3://{self._location.bucket}/{key}: {exc}") from exc
        if received != length:
            raise SourceError(
                f"reading s3://{self._location.bucket}/{key}: got {received} of {length} bytes"
            )


def _error_code(exc: Any) -> str:
    error: Any = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
