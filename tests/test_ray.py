"""Ray Serve: the cluster's handling of a replica that stops under a request, against a scripted
deployment handle; and the cluster cases (tests/ray_cluster_cases.py) in a pytest process of
their own.

The cluster cases drive the cluster with tritonclient in-process, and tritonclient's generated
stubs register the same proto package (``inference.*``) as our runtime.kserve stubs in protobuf's
one default descriptor pool: once any earlier test of the suite has imported our edge, importing
tritonclient fails with "duplicate symbol 'inference.ServerLiveRequest'". A separate process keeps
both true to how users run them (the server in one process, tritonclient in another).
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CASES = Path(__file__).with_name("ray_cluster_cases.py")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed")
# Ray Serve's own config models use a pydantic idiom pydantic 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")


class Response:
    """A scripted `DeploymentResponse`: its outcome (raised when an exception) after ``delay`` s."""

    def __init__(self, outcome, delay: float = 0.0) -> None:
        self.outcome, self.delay, self.cancelled = outcome, delay, False

    def __await__(self):
        yield from asyncio.sleep(self.delay).__await__()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class Stream(Response):
    """A scripted streaming response: its items in turn (an exception raised where it stands)."""

    def __init__(self, *items) -> None:
        super().__init__(None)
        self.items = list(items)

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class Handle:
    """A scripted deployment handle: each ``remote`` call answers with the next of ``outcomes``."""

    def __init__(self, *outcomes) -> None:
        self.outcomes, self.calls, self.responses = list(outcomes), [], []

    def options(self, **_):
        return self

    def remote(self, *args):
        self.calls.append(args)
        outcome = self.outcomes.pop(0)
        self.responses.append(outcome if isinstance(outcome, Response) else Response(outcome))
        return self.responses[-1]

    def broadcast(self, *_):
        raise ConnectionError("no replicas here")  # the status watcher: not ready


@pytest.fixture
def make_cluster():
    from runtime.config import RayConfig, ServeConfig
    from runtime.ray_serve.cluster import Cluster
    from runtime.ray_serve.messages import ReplicaStatus

    made = []

    def make(*outcomes, timeout: float = 30.0):
        config = ServeConfig(bases=("b=hf:unused",), request_timeout_s=timeout, ray=RayConfig(replicas=2))
        repository = type("Log", (), {"last": Handle(*[ConnectionError()] * 1000)})()
        cluster = Cluster(config, Handle(*outcomes), repository, ReplicaStatus("r0", 1, "node", True, 0), lambda: None)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:  # its loop and watcher; `drain` would also ask Ray Serve to delete the application
        cluster._closing = True
        cluster._loop.call_soon_threadsafe(cluster._loop.stop)
        cluster._thread.join(timeout=5)


def _inputs():
    return {"text": np.array([b"hello"], dtype=object)}


def _retries(cluster) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(cluster.metrics.text().decode())
    return sum(s.value for f in families for s in f.samples if s.name == "wara_cluster_retries_total")


@needs_ray
def test_a_request_whose_replica_dies_is_answered_by_another(make_cluster):
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import RequestCancelledError

    from runtime.core import Answer, ServingCore

    answer = Answer("v1", {"logits": np.zeros((1, 2), np.float32)})
    assert isinstance(make_cluster(), ServingCore)  # the edge serves it as it serves a Service
    for gone in (ActorDiedError(), ActorUnavailableError("gone", b"0" * 16), RequestCancelledError("r")):
        cluster = make_cluster(gone, answer)
        assert cluster.predict("a0", _inputs()) == ("v1", answer.outputs)
        assert len(cluster.handle.calls) == 2 and _retries(cluster) == 1
        first, again = cluster.handle.calls
        assert first[0] == again[0] == "a0" and 0 < again[2] <= first[2] <= 30.0  # the same deadline


@needs_ray
def test_a_request_is_sent_again_once_only(make_cluster):
    import grpc
    from ray.exceptions import ActorDiedError

    from runtime.errors import status_code

    cluster = make_cluster(ActorDiedError(), ActorDiedError())
    with pytest.raises(Exception) as info:
        asyncio.run(cluster.infer("a0", _inputs()))  # awaited from another event loop, as the edge does
    assert status_code(info.value) == grpc.StatusCode.UNAVAILABLE, info.value
    assert len(cluster.handle.calls) == 2 and _retries(cluster) == 1


@needs_ray
def test_a_request_past_its_deadline_is_cancelled_not_sent_again(make_cluster):
    import grpc

    from runtime.errors import status_code

    slow = Response("never read", delay=30.0)
    cluster = make_cluster(slow)
    with pytest.raises(Exception) as info:
        cluster.predict("a0", _inputs(), timeout=0.05)  # waited for up to its deadline + REPLY_SLACK_S
    assert status_code(info.value) == grpc.StatusCode.DEADLINE_EXCEEDED and slow.cancelled
    assert len(cluster.handle.calls) == 1 and _retries(cluster) == 0


@needs_ray
def test_a_caller_that_goes_away_cancels_its_request(make_cluster):
    slow = Response("never read", delay=30.0)
    cluster = make_cluster(slow)

    async def caller() -> None:
        task = asyncio.ensure_future(cluster.infer("a0", _inputs()))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(caller())
    t0 = time.monotonic()
    while not slow.cancelled and time.monotonic() - t0 < 5:  # the cancellation crosses to the cluster's loop
        time.sleep(0.01)
    assert slow.cancelled and _retries(cluster) == 0


@needs_ray
def test_a_generation_is_sent_again_only_before_its_first_piece(make_cluster):
    import grpc
    from ray.exceptions import ActorDiedError

    from runtime.core import Piece
    from runtime.errors import status_code

    async def take(cluster, n: int | None = None) -> list[str]:
        pieces = cluster.generate("a0", "once upon", {"max_tokens": 2})
        try:
            return [p.text async for p in pieces] if n is None else [(await pieces.__anext__()).text for _ in range(n)]
        finally:
            await pieces.aclose()

    cluster = make_cluster(Stream(ActorDiedError()), Stream(Piece("a"), Piece(" time", finish_reason="length")))
    assert asyncio.run(take(cluster)) == ["a", " time"] and _retries(cluster) == 1

    cluster = make_cluster(Stream(Piece("a"), ActorDiedError()))
    with pytest.raises(Exception) as info:  # text went out: not sent again
        asyncio.run(take(cluster))
    assert status_code(info.value) == grpc.StatusCode.UNAVAILABLE and _retries(cluster) == 0

    endless = Stream(*[Piece("x")] * 100)
    cluster = make_cluster(endless)
    assert asyncio.run(take(cluster, 2)) == ["x", "x"]
    t0 = time.monotonic()
    while not endless.cancelled and time.monotonic() - t0 < 5:  # closing the iterator cancels it on the replica
        time.sleep(0.01)
    assert endless.cancelled


@pytest.mark.slow
def test_ray_cluster_cases_in_their_own_process():
    # -s: the cases' figures (requests sent, lost and sent again around the replica killed) reach this log
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-rs", str(CASES)],
                          capture_output=True, text=True, timeout=1200, cwd=CASES.parent.parent)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary  # every case ran (Ray is installed)
