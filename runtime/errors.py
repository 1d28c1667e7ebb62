"""Every runtime error, and the one place that maps an error to a gRPC status code.

Client errors (the client can fix the request): InvalidRequest, RequestTooLarge, ModelNotFound,
Unauthenticated, PermissionDenied, and the artifact's AdapterError / ConfigError for what a
client sent. Server states: Overloaded, Draining, DeadlineExceeded, AdapterUnavailable (an
adapter the server can no longer read), IncompatibleAdapterError. InternalError is a broken
invariant: the client did nothing wrong, so it is never INVALID_ARGUMENT.
"""

from __future__ import annotations

import grpc

from typing import Literal

from wara_train.errors import AdapterError, ConfigError, IncompatibleAdapterError, WaraError

Reason = Literal["missing_credentials", "malformed_header", "unknown_token", "unknown_subject", "not_admin"]


class InvalidRequest(WaraError, ValueError):
    """A malformed inference request: wrong datatype, shape, missing input, bad raw bytes."""


class RequestTooLarge(InvalidRequest):
    """A well-formed request over a configured limit (rows, elements, bytes, text size); the
    message names the limit. RESOURCE_EXHAUSTED: it will not pass until it is made smaller."""


class ModelNotFound(WaraError, LookupError):
    """No base model or adapter of that name (never a silent fallback to the base)."""


class Overloaded(WaraError):
    """The queue or a budget is full; retry later."""


class Draining(WaraError):
    """The server is shutting down and takes no new requests."""


class DeadlineExceeded(WaraError):
    """The request's deadline passed before its batch ran."""


class AdapterUnavailable(WaraError):
    """A loaded adapter the server can no longer serve: its files under the adapter root changed
    or vanished since it was loaded (FAILED_PRECONDITION: an admin must load it again)."""


class InternalError(WaraError):
    """A broken invariant inside the server (INTERNAL): never the client's fault."""


class Unauthenticated(WaraError):
    """No valid credentials (UNAUTHENTICATED). ``reason`` is a metrics label; the message never
    holds a token or any part of one."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDenied(WaraError):
    """Valid credentials that do not allow this call (PERMISSION_DENIED); ``reason`` as above."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


CLIP = 64  # characters of a client-supplied string an error message may quote
MAX_MESSAGE = 1024  # characters of any status message


def clip(text: object, limit: int = CLIP) -> str:
    """``repr`` of a client-supplied string for an error message, cut to ``limit`` characters
    (with its full length) so a message never echoes an input whole."""
    if not isinstance(text, (str, bytes)):
        text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} {'bytes' if isinstance(text, bytes) else 'chars'})"


def status_message(error: BaseException) -> str:
    """The status message for a project error: its text, at most `MAX_MESSAGE` characters."""
    text = str(error)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error: the only mapping in the project (an HTTP edge derives its
    statuses from these codes)."""
    if isinstance(error, InternalError):
        return grpc.StatusCode.INTERNAL
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, RequestTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, (IncompatibleAdapterError, AdapterUnavailable)):
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
