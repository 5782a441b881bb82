"""The gRPC edge shared by the coordinator's services: coordinator errors become status codes
(with their actionable messages) and every unary call is counted."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from coordinator import metrics
from coordinator.errors import (
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    LabelerError,
    NotFound,
)
from datacache.validation import InvalidInput


class OutOfRange(CoordinatorError):
    """A resume point older than the history kept (or newer than any change)."""


class ResourceExhausted(CoordinatorError):
    """A client fell too far behind or sent more than the limits allow."""


_CODES: list[tuple[type[CoordinatorError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LabelerError, grpc.StatusCode.UNAVAILABLE),
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def grpc_errors(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Maps the coordinator's exceptions to gRPC status codes at the edge."""

    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Resp:
        code = grpc.StatusCode.INTERNAL
        try:
            response = await method(self, request, context)
            code = grpc.StatusCode.OK
            return response
        except (InvalidInput, CoordinatorError) as exc:
            code = status_of(exc)
            await context.abort(code, str(exc))
        finally:
            metrics.GRPC_REQUESTS.labels(name, code.name).inc()
        raise AssertionError("unreachable: abort() raises")

    return wrapper
