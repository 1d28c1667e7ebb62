"""`Cluster`: what the gRPC edge needs of a `Service`, answered by the replicas of a Ray Serve
application (`deploy.start` brings it up).

The edge calls the same methods it calls on a `Service` (`start`, `describe`, `index`, `load`,
`unload`, `ready`, `drain`, `metrics`). Inference goes to one replica through the deployment
handle, with the adapter's name as the multiplexed model id; the others are broadcasts to every
replica, run on this object's own event loop thread (Ray's handle calls may not block an event
loop, and the edge's must never wait on Ray). The edge's handlers that would wait on Ray on its
event loop get their answers first, awaited (`edge.ClusterServicer`).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Coroutine

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from runtime.auth import OPEN, Tenant
from runtime.config import ServeConfig
from runtime.errors import Draining, InvalidRequest, ModelNotFound, Overloaded

from .messages import Failed, Op, Reply, ReplicaStatus, unwrap
from .metrics import ClusterMetrics

log = logging.getLogger("wara.serve")
STATUS_PERIOD_S = 0.5  # how often the edge asks every replica for its state
BROADCAST_TIMEOUT_S = 60.0  # a repository change or index that waits longer on a replica leaves it out
HANDLES = 4096  # per-adapter handles (multiplexed model id set) kept

# Answers awaited by an edge handler before it runs the single server's code (`edge.py`).
ANSWERS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("wara_cluster_answers", default=None)


class ReplicaUnavailable(Draining):
    """The replica serving a request stopped before it answered (it is being replaced): UNAVAILABLE,
    like a draining server; the client may send the request again."""


class RemotePending:
    """One request sent to a replica; the edge awaits ``future`` and calls `finish` or `fail`,
    as for `runtime.service.Pending`."""

    def __init__(self, response, future, timeout: float) -> None:
        self.response, self.future, self.timeout = response, future, timeout
        self.deadline = time.perf_counter() + timeout
        self.truncated: list[int] = []
        self.base = ""
        self.replica = ""

    @property
    def wait_s(self) -> float:
        """The deadline, plus the replica's own second for its batch and one for the hops."""
        return max(0.0, self.deadline - time.perf_counter()) + 2.0

    def fail(self, error: BaseException) -> None:
        self.response.cancel()  # best effort: a request nobody waits for need not run
        raise error

    def finish(self, reply: Reply | Failed) -> tuple[str, dict]:
        reply = unwrap(reply)
        self.truncated, self.base, self.replica = reply.truncated, reply.base, reply.replica
        return reply.version, reply.outputs


class Cluster:
    def __init__(self, config: ServeConfig, handle, repository, status: ReplicaStatus,
                 disconnect: Callable[[], None]) -> None:
        self.config = config
        self.handle = handle
        self.repository = repository
        self.disconnect = disconnect  # ends what `deploy.start` began of Ray
        self.target = config.ray.replicas
        self.engines = {b: SimpleNamespace(platform=p) for b, (p, _) in status.bases.items()}
        self.converters = {b: SimpleNamespace(text_tokens=t) for b, (_, t) in status.bases.items()}
        self.replicas: list[ReplicaStatus] = [status]
        self.metrics = ClusterMetrics(self)
        self.draining = False
        self._ready = False
        self._closing = False
        self._handles: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._handles_lock = threading.Lock()
        self._base_handle = handle.options(method_name="infer")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wara-ray", daemon=True)
        self._thread.start()
        self._repo_lock: asyncio.Lock | None = None
        self._watcher = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)

    # --- plumbing ---------------------------------------------------------------------------
    def _block(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def ask(self, key: tuple, make: Callable[[], Coroutine]) -> None:
        """Await ``make()`` on the cluster's loop and keep its result (or error) under ``key``
        for the calling task, where `_answer` finds it without waiting."""
        try:
            answer = (True, await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), self._loop)))
        except Exception as e:
            answer = (False, e)
        ANSWERS.set({**(ANSWERS.get() or {}), key: answer})

    @staticmethod
    def _prefetched(key: tuple) -> Any:
        """The answer `ask` kept under ``key`` for this task (its error raised), or None."""
        answers = ANSWERS.get()
        if answers is None or key not in answers:
            return None
        ok, value = answers[key]
        if ok:
            return value
        raise value

    def _answer(self, key: tuple, make: Callable[[], Coroutine]) -> Any:
        answers = ANSWERS.get()
        if answers is not None and key in answers:
            return self._prefetched(key)
        return self._block(make())  # not prefetched (a thread of the edge's pool, or start-up)

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
                log.warning("a replica did not answer %s: %s", method, str(r).splitlines()[0] if str(r) else type(r).__name__)
        if not answers:
            raise ReplicaUnavailable(f"no replica answered ({len(results)} running)")
        return answers

    def _handle_for(self, name: str):
        """The deployment handle for requests for ``name``: an adapter's carries its name as the
        multiplexed model id (Ray routes by it), a base's none."""
        if name in self.engines:
            return self._base_handle
        with self._handles_lock:
            handle = self._handles.get(name)
            if handle is None:
                handle = self._handles[name] = self.handle.options(method_name="infer", multiplexed_model_id=name)
                while len(self._handles) > HANDLES:
                    self._handles.popitem(last=False)
            else:
                self._handles.move_to_end(name)
        return handle

    # --- readiness --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Every replica the deployment asks for answers, is ready, and has applied the whole
        repository log (refreshed every `STATUS_PERIOD_S`); false for good once draining."""
        return self._ready and not self._closing

    @ready.setter
    def ready(self, value: bool) -> None:
        if not value:  # the edge's drain
            self._closing = True

    async def _watch(self) -> None:
        while not self._closing:
            try:
                head = await self.repository.last.remote()
                results = await self.handle.broadcast("status", head).results_async(timeout_s=10, return_exceptions=True)
                statuses = [r for r in results if isinstance(r, ReplicaStatus)]
                if statuses:
                    self.replicas = sorted(statuses, key=lambda s: s.replica)
                self._ready = len(statuses) >= self.target and all(s.ready and s.applied >= head for s in statuses)
            except Exception as e:  # the cluster is not ready while it cannot be asked
                log.debug("status: %s", e)
                self._ready = False
            await asyncio.sleep(STATUS_PERIOD_S)

    # --- inference --------------------------------------------------------------------------
    def needs_load(self, name: str, tenant: Tenant = OPEN) -> bool:
        """For ModelReady (`readiness_async`, prefetched): on disk and loaded on no replica.
        Elsewhere false: the replica that gets a request loads what it lacks."""
        readiness = self._prefetched(("ready", name))
        return readiness is not None and readiness[1]

    def loadable(self, name: str) -> bool:
        readiness = self._prefetched(("ready", name))
        return readiness is not None and readiness[2]

    def ensure_loaded(self, name: str, tenant: Tenant = OPEN) -> None:
        pass

    def start(self, name: str, inputs: dict, *, timeout: float | None = None, requested_version: str = "",
              tenant: Tenant = OPEN) -> RemotePending:
        """Send one request to the replica Ray routes it to; it is accepted once this returns."""
        wait = self.config.request_timeout_s if timeout is None else timeout
        response = self._handle_for(name).remote(name, inputs, wait, requested_version, tenant)
        future = asyncio.run_coroutine_threadsafe(self._reply(response), self._loop)
        return RemotePending(response, future, wait)

    @staticmethod
    async def _reply(response) -> Reply | Failed:
        try:
            return await response
        except (RayActorError, ActorUnavailableError):
            raise ReplicaUnavailable("the replica serving this request stopped before it answered "
                                     "(Ray is replacing it); send the request again") from None
        except BackPressureError:
            raise Overloaded("every replica is at its max_ongoing_requests; retry later") from None
        except RequestCancelledError:
            raise ReplicaUnavailable("the request was cancelled before a replica answered") from None

    # --- metadata and repository ------------------------------------------------------------
    def describe(self, name: str, tenant: Tenant = OPEN):
        readiness = self._prefetched(("ready", name))
        if readiness is not None:
            return unwrap(readiness[0])
        return self._answer(("describe", name), lambda: self.describe_async(name, tenant))

    async def describe_async(self, name: str, tenant: Tenant = OPEN, *, load: bool = False):
        """A replica's description of ``name`` where one serves it; else the first refusal.
        With ``load`` (ModelMetadata), an adapter on disk is loaded first on the replica its
        requests go to, as one server loads it."""
        if load and name not in self.engines:
            home = self.handle.options(method_name="describe", multiplexed_model_id=name)
            answer = await home.remote(name, tenant, True)
            if not isinstance(answer, Failed):
                return answer
        answers = await self._broadcast("describe", name, tenant)
        found = [a for a in answers if not isinstance(a, Failed)]
        return found[0] if found else unwrap(answers[0])

    async def readiness_async(self, name: str, tenant: Tenant = OPEN) -> tuple:
        """(description or refusal, on disk and loaded on no replica, sound on disk) over every
        replica, for the single server's ModelReady."""
        answers = await self._broadcast("readiness", name, tenant)
        found = [a for a, _, _ in answers if not isinstance(a, Failed)]
        on_disk = not found and all(d for _, d, _ in answers)
        return (found[0] if found else answers[0][0]), on_disk, on_disk and any(ok for _, _, ok in answers)

    def index(self) -> list[tuple[str, str, str, str]]:
        return self._answer(("index",), self.index_async)

    async def index_async(self) -> list[tuple[str, str, str, str]]:
        """One row per model over every replica: READY where any replica serves it (the reason
        says on how many), else the replicas' reasons."""
        per_replica = await self._broadcast("index")
        rows: dict[str, list[tuple[str, str, str, str]]] = {}
        for replica_rows in per_replica:
            for row in replica_rows:
                rows.setdefault(row[0], []).append(row)
        merged = []
        n = len(per_replica)
        for name, seen in rows.items():
            ready = [r for r in seen if r[2] == "READY"]
            if name in self.engines:
                merged.append(ready[0] if ready else seen[0])
            elif ready:
                merged.append((name, ready[0][1], "READY", f"{len(ready)} of {n} replicas: {ready[0][3]}"))
            else:
                merged.append((name, "", seen[0][2], "; ".join(dict.fromkeys(r[3] for r in seen))))
        return merged

    def load(self, name: str, files: dict[str, bytes] | None = None) -> None:
        """Load on every replica (from the shared root, or the files sent); blocking."""
        self._block(self._change(Op("load", name, files)))

    def unload(self, name: str) -> None:
        self._answer(("unload", name), lambda: self.unload_async(name))

    async def unload_async(self, name: str) -> None:
        """NOT_FOUND on every replica from now on, as for the single server: ModelNotFound where
        no replica has it loaded."""
        if name in self.engines:
            raise InvalidRequest(f"{name!r} is a base model; only adapters can be unloaded")
        if not any(await self._broadcast("holds", name)):
            raise ModelNotFound(f"no adapter {name!r} is loaded")
        await self._change(Op("unload", name))

    async def _change(self, op: Op) -> None:
        """Append ``op`` to the log and apply it on every replica. Refused everywhere: voided,
        and the first replica's error raised; refused on some: kept (those that took it serve
        it), and the error raised."""
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

    # --- metrics ----------------------------------------------------------------------------
    def replica_metrics(self) -> list[tuple[str, str]]:
        """(replica, Prometheus text) for every replica (blocking; the scrape's thread)."""
        if self.draining:
            return []
        return self._block(self._broadcast("metrics", timeout=10.0), timeout=15.0)

    # --- lifecycle --------------------------------------------------------------------------
    def drain(self) -> None:
        """Stop asking the replicas, delete the application (its replicas finish what they
        have), and stop Ray where this process started it."""
        self.draining = True
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
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
