"""What travels between the edge process and the replicas (pickled by Ray): plain data only
(these, and `runtime.core`'s `Answer`, `ModelInfo`, `IndexRow` and `Piece`).

A replica never lets an exception cross the boundary: Ray would wrap it in a `RayTaskError` whose
text carries the replica's traceback. It returns a `Failed` instead, and the edge raises the
project error it names, so the status code and message are those of the single server."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from runtime.errors import InternalError
from wara_train.errors import WaraError

log = logging.getLogger("wara.serve")


@dataclass(frozen=True)
class Op:
    """One repository change: load ``name`` (from the adapter root, or from ``files``) or
    unload it. ``seq`` is its place in the cluster's order (`repository.RepositoryLog`)."""

    kind: Literal["load", "unload"]
    name: str
    files: dict[str, bytes] | None = None
    seq: int = 0


@dataclass(frozen=True)
class Failed:
    """A project error raised in a replica, as its class and message."""

    kind: type
    message: str
    replica: str = ""

    def error(self) -> BaseException:
        """The error to raise at the edge (the class's own constructor where it takes a message)."""
        try:
            return self.kind(self.message)
        except TypeError:  # a class whose constructor takes more than a message
            error = self.kind.__new__(self.kind)
            error.args = (self.message,)
            return error


def failed(error: BaseException, replica: str) -> Failed:
    """`Failed` for an error raised in a replica; anything but a project error is a bug: its
    traceback goes to the replica's log under an error id, which the message names (INTERNAL)."""
    if isinstance(error, WaraError):
        return Failed(type(error), str(error), replica)
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in replica %s", error_id, replica, exc_info=error)
    return Failed(InternalError, f"replica {replica}: internal error {error_id} (its log has the details)", replica)


@dataclass(frozen=True)
class ReplicaStatus:
    """A replica's answer to the edge's periodic status call."""

    replica: str
    pid: int
    node: str
    ready: bool
    applied: int  # the last repository op (`Op.seq`) it has applied


@dataclass(frozen=True)
class Outcome:
    """The result of one repository op on one replica: ``version`` (a load's), ``had`` (an
    unload found it loaded), or the error that refused it."""

    had: bool = False
    version: str = ""
    error: Failed | None = None


def unwrap(value: Any) -> Any:
    """``value``, or the error a `Failed` names, raised."""
    if isinstance(value, Failed):
        raise value.error()
    return value
