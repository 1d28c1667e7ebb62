"""Runtime errors and the one place that maps every project error to a gRPC status code."""

from __future__ import annotations

import grpc

from wara_train.errors import AdapterError, ConfigError, IncompatibleAdapterError, WaraError


class InvalidRequest(WaraError, ValueError):
    """A malformed inference request: wrong datatype, shape, missing input, bad raw bytes."""


class ModelNotFound(WaraError, LookupError):
    """No base model or adapter of that name (never a silent fallback to the base)."""


class Overloaded(WaraError):
    """The queue or a budget is full; retry later."""


class Draining(WaraError):
    """The server is shutting down and takes no new requests."""


class DeadlineExceeded(WaraError):
    """The request's deadline passed before its batch ran."""


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error: the only mapping in the project."""
    if isinstance(error, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, IncompatibleAdapterError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, (InvalidRequest, AdapterError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, Draining):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL
