"""Adapter affinity: which replica a request for an adapter goes to.

Ray Serve's default router sends a multiplexed request to a replica that holds its model id, but
it learns who holds what from the replicas, a push every 0.1 s away: until then a new adapter's
requests are spread over the replicas with the fewest models, so each of them loads it (measured
here: back-to-back requests for one new adapter alternated between two replicas, and kept
alternating once both held it). This router makes the choice deterministic from the first
request, with rendezvous hashing of the adapter name over the replica ids:

    order(adapter) = replicas holding the adapter, then the others; each group by
                     hash(adapter, replica id), highest first

and it offers only the first one for `SPILL_AFTER_S` (a replica whose queue length does not come
back in Ray's 0.1 s probe deadline, on a busy machine, is waited for rather than passed over),
then every one in that order, so the first with room (fewer than ``max_ongoing_requests``) takes
the request. An adapter therefore stays on one replica while that replica keeps up; a hot one
spills over to the next replica in its order (which loads it and then holds it too); a replica
that dies takes no adapters of the others with it, and its own go to their next replica in
order. A request for a base model (no multiplexed id) goes to the less loaded of two random
replicas, as with Ray's default router.
"""

from __future__ import annotations

import hashlib
import random
import time

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

SPILL_AFTER_S = 0.5  # how long a request waits for room on its adapter's first replica before trying the next


def rendezvous(adapter: str, replica: str) -> int:
    """The weight of ``replica`` for ``adapter`` (highest wins): a stable hash of both."""
    return int.from_bytes(hashlib.blake2b(f"{adapter}\0{replica}".encode(), digest_size=8).digest(), "big")


def preference(adapter: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """``replicas`` in the order a request for ``adapter`` tries them."""
    return sorted(replicas, key=lambda r: (adapter not in r.multiplexed_model_ids,
                                           -rendezvous(adapter, r.replica_id.unique_id)))


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: wait, do not spin
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not adapter:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        order = preference(adapter, candidate_replicas)
        if time.time() - pending_request.created_at < SPILL_AFTER_S:
            order = order[:1]
        return [[r] for r in order]
