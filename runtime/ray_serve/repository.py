"""The cluster's repository log: every load and unload made through the edge, in one order.

A broadcast reaches the replicas that are running when it is sent; a replica that Ray starts
later (a replacement, a scale-up) would miss it, and serve an unloaded adapter again from the
root or lack one sent with its files. So each change is first appended here, and a replica
applies the log, in order and once per op, when it starts and whenever the edge tells it the
log has grown (`replica.WaraReplica.sync`). The log keeps, per adapter name, the last confirmed
op and any op still pending after it, which is all a new replica needs.
"""

from __future__ import annotations

from dataclasses import replace

from .messages import Op


class RepositoryLog:
    """Run as a named Ray actor (`actor_name`) owned by the edge process (it goes with it)."""

    def __init__(self) -> None:
        self.head = 0
        self.ops: dict[int, Op] = {}  # seq -> op, in seq order

    def append(self, op: Op) -> int:
        """Give ``op`` the next place in the order; returns its seq."""
        self.head += 1
        self.ops[self.head] = replace(op, seq=self.head)
        return self.head

    def confirm(self, seq: int) -> None:
        """Op ``seq`` took effect: earlier ops for its name are superseded."""
        op = self.ops.get(seq)
        if op is not None:
            for s in [s for s, o in self.ops.items() if o.name == op.name and s < seq]:
                del self.ops[s]

    def void(self, seq: int) -> None:
        """Op ``seq`` failed on every replica: it changed nothing, and nobody replays it."""
        self.ops.pop(seq, None)

    def since(self, seq: int) -> tuple[int, list[Op]]:
        """(head, the ops after ``seq`` in order)."""
        return self.head, [o for s, o in self.ops.items() if s > seq]

    def last(self) -> int:
        return self.head


def actor_name(app_name: str) -> str:
    return f"wara-repository-{app_name}"
