"""Errors raised inside the coordinator. Only `service` maps them to gRPC status codes.

    CoordinatorError
     +-- InvalidArgument      bad input from a client          -> INVALID_ARGUMENT
     +-- NotFound             no such dataset or node          -> NOT_FOUND
     +-- AlreadyExists        name already taken               -> ALREADY_EXISTS
     +-- FailedPrecondition   valid request, wrong moment      -> FAILED_PRECONDITION
     +-- LabelerError         node labels could not be written -> UNAVAILABLE
          +-- NodeMissing     the Node object does not exist

Transport errors (Kubernetes API, SQLite) are chained as `__cause__`.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error the coordinator raises on purpose."""


class InvalidArgument(CoordinatorError):
    pass


class NotFound(CoordinatorError):
    pass


class AlreadyExists(CoordinatorError):
    pass


class FailedPrecondition(CoordinatorError):
    pass


class LabelerError(CoordinatorError):
    pass


class NodeMissing(LabelerError):
    pass
