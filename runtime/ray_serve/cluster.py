"""`Cluster`: the serving core (`runtime.core.ServingCore`) answered by the replicas of a Ray
Serve application (`deploy.start` brings it up), so the single server's gRPC edge serves it
unchanged.

Inference and generation go to one replica through the deployment handle, with the adapter's
name as the multiplexed model id (`router.AdapterAffinityRouter` picks the replica); metadata of
an adapter goes to that same replica, which loads it first. Readiness and the index are
broadcasts to every replica, merged; loads and unloads are ops of the repository log, applied on
every replica (`_change`). Every Ray call runs on this object's own event loop thread and the
caller's loop awaits it (`asyncio.wrap_future`), so a front door never waits on Ray on its loop;
the synchronous `predict` blocks on the same calls, for in-process callers.

An inference request is idempotent: when the replica serving it stops before it answers (Ray
is replacing it), it is sent once more, to another replica, within its deadline (`_infer`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Mapping, TypeVar

import numpy as np
import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from runtime.auth import OPEN, Tenant, require_admin
from runtime.config import ServeConfig
from runtime.core import Answer, IndexRow, ModelInfo, Piece
from runtime.errors import DeadlineExceeded, Draining, InvalidRequest, ModelNotFound, Overloaded

from .messages import Failed, Op, ReplicaStatus, unwrap
from .metrics import ClusterMetrics

log = logging.getLogger("wara.serve")
T = TypeVar("T")
STATUS_PERIOD_S = 0.5  # how often the edge asks every replica for its state
BROADCAST_TIMEOUT_S = 60.0  # a repository change or index that waits longer on a replica leaves it out
HANDLES = 4096  # per-adapter handles (multiplexed model id set) kept
REPLY_SLACK_S = 2.0  # past a request's deadline: the replica's own second for its batch, and one for the hops
RETRIES = 1  # times a request whose replica stopped before answering is sent again


class ReplicaUnavailable(Draining):
    """No replica answered: for inference, the one serving the request stopped before it
    answered and so did the one it was sent to again (or its deadline left no time to).
    UNAVAILABLE, like a draining server: the client may send it again."""


class ReplicaGone(Exception):
    """The replica a request was sent to stopped before it answered (internal: `_infer` sends
    the request again, or raises `ReplicaUnavailable`)."""


class Cluster:
    """`runtime.core.ServingCore` over the replicas (see the module docstring)."""

    def __init__(self, config: ServeConfig, handle, repository, status: ReplicaStatus,
                 disconnect: Callable[[], None]) -> None:
        self.config = config
        self.handle = handle
        self.repository = repository
        self.disconnect = disconnect  # ends what `deploy.start` began of Ray
        self.target = config.ray.replicas
        self.bases = frozenset(e.name for e in config.bases)
        self.replicas: list[ReplicaStatus] = [status]
        self.metrics = ClusterMetrics(self)
        self._ready = False
        self._closing = False  # drain began: not ready, and the watcher stops
        self._stopped = False  # drain ended: this object's loop is gone
        self._handles: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._handles_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wara-ray", daemon=True)
        self._thread.start()
        self._repo_lock: asyncio.Lock | None = None
        self._watcher = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)

    # --- plumbing ---------------------------------------------------------------------------
    def _submit(self, coro: Coroutine[Any, Any, T]):
        if self._stopped:
            coro.close()
            raise Draining("the cluster has stopped and takes no requests")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro`` run on this object's loop, awaited from the caller's (cancelling the caller
        cancels it)."""
        return await asyncio.wrap_future(self._submit(coro))

    def _block(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """``coro`` run on this object's loop, waited for from a thread with no event loop."""
        return self._submit(coro).result(timeout)

    async def _broadcast(self, method: str, *args, timeout: float = BROADCAST_TIMEOUT_S) -> list:
        """Every running replica's answer to ``method(*args)``; a replica that fails or stops
        meanwhile is left out. ReplicaUnavailable when none answers."""
        try:
            results = await self.handle.broadcast(method, *args).results_async(timeout_s=timeout,
                                                                               return_exceptions=True)
        except TimeoutError:
            raise ReplicaUnavailable(f"a replica did not answer {method} within {timeout:.0f}s") from None
        answers = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException):
                why = str(r).splitlines()[0] if str(r) else type(r).__name__
                log.warning("a replica did not answer %s: %s", method, why)
        if not answers:
            raise ReplicaUnavailable(f"no replica answered ({len(results)} running)")
        return answers

    def _handle_for(self, method: str, name: str):
        """The deployment handle for ``method`` on ``name``: an adapter's carries its name as
        the multiplexed model id (Ray routes by it), a base's none."""
        key = (method, "" if name in self.bases else name)
        with self._handles_lock:
            handle = self._handles.get(key)
            if handle is None:
                options = {"multiplexed_model_id": key[1]} if key[1] else {}
                handle = self._handles[key] = self.handle.options(method_name=method, **options)
                while len(self._handles) > HANDLES:
                    self._handles.popitem(last=False)
            else:
                self._handles.move_to_end(key)
        return handle

    @staticmethod
    async def _reply(response, wait_s: float, awaitable: Awaitable[T] | None = None) -> T:
        """``response`` (or ``awaitable``, its next item) awaited for at most ``wait_s``; the
        replica going away is `ReplicaGone`, and an answer nobody awaits any more is cancelled."""
        try:
            return await asyncio.wait_for(response if awaitable is None else awaitable, wait_s)
        except asyncio.TimeoutError:
            response.cancel()  # best effort: a request nobody waits for need not run
            raise
        except (RayActorError, ActorUnavailableError, RequestCancelledError):
            # This object cancels only responses it no longer awaits: a cancelled one here is
            # the replica's task cancelled under it, as the replica stopped.
            raise ReplicaGone() from None
        except BackPressureError:
            raise Overloaded("every replica is at its max_ongoing_requests; retry later") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and getattr(task, "cancelling", lambda: 1)() == 0:
                raise ReplicaGone() from None  # Ray's (the replica's task was cancelled), not ours
            response.cancel()  # ours: the caller went away
            raise

    # --- readiness --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Every replica the deployment asks for answers, is ready, and has applied the whole
        repository log (refreshed every `STATUS_PERIOD_S`); false for good once draining."""
        return self._ready and not self._closing

    async def _watch(self) -> None:
        while not self._closing:
            try:
                head = await self.repository.last.remote()
                results = await self.handle.broadcast("status", head).results_async(timeout_s=10,
                                                                                    return_exceptions=True)
                statuses = [r for r in results if isinstance(r, ReplicaStatus)]
                if statuses:
                    self.replicas = sorted(statuses, key=lambda s: s.replica)
                self._ready = len(statuses) >= self.target and all(s.ready and s.applied >= head for s in statuses)
            except Exception as e:  # the cluster is not ready while it cannot be asked
                log.debug("status: %s", e)
                self._ready = False
            await asyncio.sleep(STATUS_PERIOD_S)

    async def model_ready(self, name: str, version: str = "", *, tenant: Tenant = OPEN) -> bool:
        """Ready where any replica serves ``name`` (at ``version``) or would load it on its first
        request; never while the cluster is not ready."""
        if not self.ready:
            return False
        return any(await self._on_loop(self._broadcast("model_ready", name, version, tenant)))

    # --- inference --------------------------------------------------------------------------
    async def infer(self, name: str, inputs: Mapping[str, np.ndarray], *, tenant: Tenant = OPEN,
                    timeout: float | None = None, version: str = "") -> Answer:
        return await self._on_loop(self._infer(name, dict(inputs), tenant, timeout, version))

    def predict(self, name: str, inputs: Mapping[str, np.ndarray], *, tenant: Tenant = OPEN,
                timeout: float | None = None, version: str = "") -> tuple[str, dict[str, np.ndarray]]:
        """`infer` for a caller with no event loop (tests, benchmarks): (version, outputs)."""
        answer = self._block(self._infer(name, dict(inputs), tenant, timeout, version))
        return answer.version, answer.outputs

    async def _infer(self, name: str, inputs: dict, tenant: Tenant, timeout: float | None, version: str) -> Answer:
        """One request on the replica Ray routes it to; sent again, `RETRIES` times, when that
        replica stops before it answers (Ray no longer routes to a replica that died) and time
        is left before the deadline."""
        wait = self.config.request_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        handle = self._handle_for("infer", name)
        for attempt in range(RETRIES + 1):
            left = max(0.0, deadline - time.monotonic())
            try:
                response = handle.remote(name, inputs, left, version, tenant)
                return unwrap(await self._reply(response, left + REPLY_SLACK_S))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"no answer within {wait:.1f}s") from None
            except ReplicaGone:
                if attempt == RETRIES or time.monotonic() >= deadline:
                    raise ReplicaUnavailable(f"the replica serving this request stopped before it answered "
                                             f"({attempt + 1} tried; Ray replaces them); send it again") from None
                self.metrics.retries.inc()
                log.warning("a replica stopped before answering a request for %s: sent to another", name)
        raise AssertionError("unreachable")  # pragma: no cover

    async def generate(self, name: str, prompt: str, params: Mapping[str, Any], *,
                       tenant: Tenant = OPEN) -> AsyncIterator[Piece]:
        """The pieces of one generation, streamed from the replica Ray routes it to. Sent again
        (once) when that replica stops before the first piece; once pieces went out, its
        stopping ends the stream with ReplicaUnavailable. Closing the iterator cancels it there."""
        handle = self._handle_for("generate", name).options(stream=True)
        stream, first = None, True
        try:
            for attempt in range(RETRIES + 1):
                stream = await self._on_loop(self._start_stream(handle, name, prompt, dict(params), tenant))
                try:
                    while True:
                        piece = await self._on_loop(self._next_piece(stream))
                        if piece is None:
                            return
                        first = False
                        yield piece
                except ReplicaGone:
                    if not first or attempt == RETRIES:
                        raise ReplicaUnavailable("the replica generating this text stopped before it "
                                                 "finished") from None
                    self.metrics.retries.inc()
        finally:
            if stream is not None and not self._stopped:
                self._loop.call_soon_threadsafe(stream.cancel)

    @staticmethod
    async def _start_stream(handle, *args):
        return handle.remote(*args)  # on this object's loop, as every Ray call

    async def _next_piece(self, stream) -> Piece | None:
        """The stream's next piece (None at its end); a replica's error raised."""
        try:
            item = await self._reply(stream, self.config.request_timeout_s + REPLY_SLACK_S, stream.__anext__())
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no text within {self.config.request_timeout_s:.1f}s") from None
        return unwrap(item)

    # --- metadata and repository ------------------------------------------------------------
    async def metadata(self, name: str, *, tenant: Tenant = OPEN) -> ModelInfo:
        return await self._on_loop(self._metadata(name, tenant))

    async def _metadata(self, name: str, tenant: Tenant) -> ModelInfo:
        """The description of the replica that serves ``name``'s requests, which loads an
        adapter on disk first (its outputs depend on its head); where it refuses, any replica's
        that has it loaded, else the first refusal."""
        try:
            home = self._handle_for("metadata", name).remote(name, tenant, True)
            answer = await self._reply(home, BROADCAST_TIMEOUT_S)
        except (ReplicaGone, asyncio.TimeoutError):
            answer = None
        if answer is not None and not isinstance(answer, Failed):
            return answer
        answers = await self._broadcast("metadata", name, tenant, False)
        found = [a for a in answers if not isinstance(a, Failed)]
        return found[0] if found else unwrap(answer if answer is not None else answers[0])

    async def index(self, *, tenant: Tenant = OPEN, ready_only: bool = False) -> list[IndexRow]:
        return await self._on_loop(self._index(tenant, ready_only))

    async def _index(self, tenant: Tenant, ready_only: bool) -> list[IndexRow]:
        """One row per model over every replica: READY where any replica serves it (the reason
        says on how many), else the replicas' reasons."""
        per_replica = await self._broadcast("index", tenant)
        rows: dict[str, list[IndexRow]] = {}
        for replica_rows in per_replica:
            for row in replica_rows:
                rows.setdefault(row.name, []).append(row)
        merged = []
        n = len(per_replica)
        for name, seen in rows.items():
            ready = [r for r in seen if r.state == "READY"]
            if name in self.bases:
                merged.append(ready[0] if ready else seen[0])
            elif ready:
                reason = f"{len(ready)} of {n} replicas: {ready[0].reason}"
                merged.append(IndexRow(name, ready[0].version, "READY", reason))
            else:
                merged.append(IndexRow(name, "", seen[0].state, "; ".join(dict.fromkeys(r.reason for r in seen))))
        return [r for r in merged if r.state == "READY"] if ready_only else merged

    async def load(self, name: str, files: dict[str, bytes] | None = None, *, tenant: Tenant = OPEN) -> str:
        """Load on every replica (from the shared root, or the files sent); the version."""
        require_admin(tenant)
        return await self._on_loop(self._change(Op("load", name, files)))

    async def unload(self, name: str, *, tenant: Tenant = OPEN) -> None:
        """NOT_FOUND on every replica from now on, as on one server: ModelNotFound where no
        replica has it loaded."""
        require_admin(tenant)
        await self._on_loop(self._unload(name))

    async def _unload(self, name: str) -> None:
        if name in self.bases:
            raise InvalidRequest(f"{name!r} is a base model; only adapters can be unloaded")
        if not any(await self._broadcast("holds", name)):
            raise ModelNotFound(f"no adapter {name!r} is loaded")
        await self._change(Op("unload", name))

    async def _change(self, op: Op) -> str:
        """Append ``op`` to the log and apply it on every replica; a load's version. Refused
        everywhere: voided, and the first replica's error raised; refused on some: kept (those
        that took it serve it), and the error raised."""
        if self._repo_lock is None:
            self._repo_lock = asyncio.Lock()
        async with self._repo_lock:  # one change at a time: every replica applies them in one order
            seq = await self.repository.append.remote(op)
            outcomes = [o for o in await self._broadcast("sync", seq) if o is not None]
            errors = [o.error for o in outcomes if o.error is not None]
            if outcomes and len(errors) == len(outcomes):
                await self.repository.void.remote(seq)
                raise errors[0].error()
            await self.repository.confirm.remote(seq)
            if errors:
                e = errors[0]
                raise Failed(e.kind, f"{op.kind} of {op.name!r} failed on {len(errors)} of {len(outcomes)} replicas "
                                     f"(replica {e.replica}: {e.message})").error()
            return next((o.version for o in outcomes if o.version), "")

    # --- metrics ----------------------------------------------------------------------------
    def replica_metrics(self) -> list[tuple[str, str]]:
        """(replica, Prometheus text) for every replica (blocking; the scrape's thread)."""
        if self._closing:
            return []
        return self._block(self._broadcast("metrics", timeout=10.0), timeout=15.0)

    # --- lifecycle --------------------------------------------------------------------------
    def drain(self) -> None:
        """Stop asking the replicas, delete the application (its replicas finish what they
        have), and stop Ray where this process started it. The edge calls it once every request
        it admitted is answered."""
        if self._stopped:
            return
        self._closing = True
        try:
            self._watcher.result(timeout=15)
        except Exception:
            pass
        try:
            serve.delete(self.config.ray.app_name)
        except Exception as e:
            log.warning("deleting the Ray Serve application: %s", e)
        try:
            ray.kill(self.repository)
        except Exception:
            pass
        self.disconnect()
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
