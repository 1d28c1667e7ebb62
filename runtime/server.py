"""The gRPC edge: an asyncio KServe v2 servicer, health, reflection, authentication, admission
and drain. It only translates protobuf to `Service` calls and back; errors become status codes
in `runtime.errors.status_code`.

The edge runs `grpc.aio` on one event loop thread (`Server`), so an RPC costs a coroutine, not a
worker thread: there is no thread-pool ceiling behind which accepted requests wait, and every
accepted request is one the server has counted. In order, an inference RPC is:

1. decoded leniently (bytes that do not parse: INVALID_ARGUMENT, see `wire`);
2. refused with UNAVAILABLE once a drain has begun;
3. authenticated (`runtime.auth`: a bearer token or a client certificate maps to a tenant;
   UNAUTHENTICATED without one when tenants are configured);
4. admitted (`runtime.admission.Admission`): at most the tenant's ``max_queue`` and the server's ``max_inflight``
   requests and ``max_queued_mb`` bytes at once, else RESOURCE_EXHAUSTED at once;
5. checked and decoded (`wire.decode_inputs`), tokenized and queued for a batch: on the event
   loop for a small request, on one of ``decode_workers`` threads for a big one;
6. awaited, and encoded.

A drain (SIGTERM) refuses new requests and completes every admitted one within the grace period.
INTERNAL is kept for server bugs: its message carries an error id, the traceback goes to the
server log only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import threading
import time
import uuid
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wara_train.errors import WaraError

from .admission import Admission, Refused
from .auth import OPEN, Authenticator, PermissionDenied, Tenant, Unauthenticated, redact, require_admin
from .errors import DeadlineExceeded, InvalidRequest, ModelNotFound, clip, status_code, status_message
from .config import ServeConfig
from .kserve import inference_pb2 as pb
from .service import SERVER_NAME, SERVER_VERSION, Service
from .tls import ReloadableCredentials
from .wire import MAX_NAME, Undecodable, decode_inputs, decode_outputs, encode_outputs, lenient_deserializer

__all__ = ["Server", "create_server", "decode_inputs", "decode_outputs", "encode_outputs"]
log = logging.getLogger("wara.serve")


def outcome(error: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """(status, message) for an error raised while serving ``where``. A project error maps
    through `errors.status_code`; anything else is a server bug: INTERNAL with an error id that
    finds its traceback in the server log (the client never sees a traceback or a path)."""
    if isinstance(error, WaraError):
        return status_code(error), status_message(error)
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, where, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}; the server log has the details)"


def refusal_reason(error: BaseException) -> str:
    """The metric label of a refusal: the error's own ``reason`` where it has one (auth,
    admission), else its class name (a fixed set)."""
    return getattr(error, "reason", None) or type(error).__name__


def _model_name(name: str, *, load: bool = False) -> str:
    """A requested model name, refused before it reaches a message when no model could have it."""
    if len(name) > MAX_NAME:
        if load:
            raise InvalidRequest(f"invalid adapter name {clip(name)}: at most {MAX_NAME} characters")
        raise ModelNotFound(f"unknown model {clip(name)}: no model name is longer than {MAX_NAME} characters")
    return name


def _version(name: str, version: str) -> str:
    if len(version) > MAX_NAME:
        raise ModelNotFound(f"model {clip(name)} has no version {clip(version)}")
    return version


async def _result(future: concurrent.futures.Future, timeout: float) -> Any:
    """Await a batcher future without ever cancelling it (the batch sets its result later)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def done(f: concurrent.futures.Future) -> None:
        loop.call_soon_threadsafe(_copy, f, waiter)

    future.add_done_callback(done)
    return await asyncio.wait_for(asyncio.shield(waiter), timeout)


async def answer(pending) -> tuple[str, dict]:
    """(version, outputs) of an accepted request (`Service.start`), awaited off the batcher
    without cancelling it; its deadline and failures are counted by ``pending``."""
    try:
        rows = await _result(pending.future, pending.wait_s)
    except asyncio.TimeoutError:
        pending.fail(DeadlineExceeded(f"no answer within {pending.timeout:.1f}s"))
    except Exception as e:
        pending.fail(e)
    return pending.finish(rows)


def _copy(source: concurrent.futures.Future, target: asyncio.Future) -> None:
    if target.done():
        return
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


class ModelHealth(health.aio.HealthServicer):
    """grpc's health service, plus `forget`: an unloaded adapter's entry goes (NOT_FOUND, as for
    a name never loaded), so the table holds loaded models only."""

    async def forget(self, name: str) -> None:
        await self.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # wakes any watcher
        getattr(self, "_server_status", {}).pop(name, None)


class InferenceServicer:
    """The KServe v2 methods; each resolves its caller's tenant first (``open`` methods need
    none: liveness, readiness and the server's metadata carry no tenant's data)."""

    OPEN_METHODS = {"ServerLive", "ServerReady", "ServerMetadata"}

    def __init__(self, service: Service, health_servicer: ModelHealth, auth: Authenticator,
                 pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.service = service
        self.health = health_servicer
        self.auth = auth
        self.pool = pool
        self.admission = Admission(service.config, service.metrics.tenant_inflight)
        self.inline_bytes = service.config.inline_decode_kb << 10
        self.backoff = service.config.overload_backoff_ms / 1000.0

    # --- plumbing ---------------------------------------------------------------------------
    def _tenant(self, context) -> Tenant:
        if not self.auth.enabled:
            return OPEN
        return self.auth.identify(context.invocation_metadata() or (), context.auth_context() or {})

    def _refused(self, error: BaseException, method: str, context) -> None:
        """Count (and, for auth, log) a refusal; never log the credential."""
        reason = refusal_reason(error)
        self.service.metrics.refusals.labels(reason).inc()
        if isinstance(error, (Unauthenticated, PermissionDenied)):
            log.warning("refused %s from %s: %s (%s; metadata %s)", method, context.peer(), reason, error,
                        redact(context.invocation_metadata() or ()))

    def handler(self, method: str) -> Callable:
        fn = getattr(self, "_" + method)
        needs_tenant = method not in self.OPEN_METHODS

        async def handle(request, context):
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                tenant = self._tenant(context) if needs_tenant else OPEN
                return await fn(request, context, tenant)
            except Exception as e:  # never let one request take the server down
                if isinstance(e, WaraError):
                    self._refused(e, method, context)
                code, message = outcome(e, method)
                if isinstance(e, Refused) and self.backoff:
                    # Admission refusals are answered after a short pause (a coroutine that
                    # sleeps costs nothing), so a client that sends again at once cannot turn
                    # refusals into a busy loop that starves everyone else's requests.
                    await asyncio.sleep(self.backoff)
            await context.abort(code, message)

        handle.__name__ = method
        return handle

    def stream_handler(self) -> Callable:
        async def handle(request_iterator, context):
            try:
                tenant = self._tenant(context)
            except Exception as e:
                self._refused(e, "ModelStreamInfer", context)
                code, message = outcome(e, "ModelStreamInfer")
                await context.abort(code, message)
                return
            async for request in request_iterator:  # one bad request fails only its own response
                try:
                    if isinstance(request, Undecodable):
                        raise request.error()
                    response = pb.ModelStreamInferResponse(infer_response=await self._admitted_infer(request, context, tenant))
                except Exception as e:
                    if isinstance(e, WaraError):
                        self._refused(e, "ModelStreamInfer", context)
                    code, message = outcome(e, "ModelStreamInfer")
                    response = pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}")
                yield response

        return handle

    async def _set_health(self, name: str, serving: bool) -> None:
        if self.auth.enabled:  # per-adapter health would tell any caller which adapters exist
            return
        if serving:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        else:
            await self.health.forget(name)

    # --- methods ----------------------------------------------------------------------------
    async def _ServerLive(self, request, context, tenant):
        return pb.ServerLiveResponse(live=True)

    async def _ServerReady(self, request, context, tenant):
        return pb.ServerReadyResponse(ready=self.service.ready and not self.admission.closing)

    async def _ServerMetadata(self, request, context, tenant):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_repository"])

    async def _ModelReady(self, request, context, tenant):
        try:
            name = _model_name(request.name)
            if not request.version and self.service.needs_load(name, tenant):  # on disk: served on its first request
                return pb.ModelReadyResponse(ready=self.service.ready and self.service.loadable(name))
            _, versions, _, _ = self.service.describe(name, tenant)
        except WaraError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.service.ready and (not request.version or request.version in versions))

    async def _ModelMetadata(self, request, context, tenant):
        name = _model_name(request.name)
        if self.service.needs_load(name, tenant):  # its outputs depend on its head: load it, off the loop
            await asyncio.get_running_loop().run_in_executor(self.pool, self.service.ensure_loaded, name, tenant)
        base, versions, inputs, outputs = self.service.describe(name, tenant)
        resp = pb.ModelMetadataResponse(name=request.name, versions=versions,
                                        platform=f"{self.service.engines[base].platform}:{base}")
        for spec in inputs:
            resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in outputs:
            resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return resp

    async def _ModelInfer(self, request, context, tenant):
        return await self._admitted_infer(request, context, tenant)

    async def _admitted_infer(self, request, context, tenant: Tenant) -> pb.ModelInferResponse:
        nbytes = request.ByteSize()
        self.admission.admit(tenant, nbytes)
        try:
            return await self._infer(request, context, tenant, nbytes)
        finally:
            self.admission.release(tenant, nbytes)

    async def _infer(self, request, context, tenant: Tenant, nbytes: int) -> pb.ModelInferResponse:
        name = _model_name(request.model_name)
        requested = _version(name, request.model_version)
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining > 1e6:  # no client deadline: the server's default
            remaining = None
        config = self.service.config

        if self.service.needs_load(name, tenant):  # load it first, off the event loop (once for all)
            await asyncio.get_running_loop().run_in_executor(self.pool, self.service.ensure_loaded, name, tenant)

        def start():
            return self.service.start(name, decode_inputs(request, config), timeout=remaining,
                                      requested_version=requested, tenant=tenant)

        if nbytes <= self.inline_bytes:
            pending = start()
        else:  # big: decode and tokenize off the event loop, so small requests keep flowing
            pending = await asyncio.get_running_loop().run_in_executor(self.pool, start)
        version, outputs = await answer(pending)
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
        if pending.truncated:  # stated, not silent: which texts were cut, and to how many tokens
            resp.parameters["truncated_rows"].string_param = ",".join(map(str, pending.truncated))
            resp.parameters["max_text_length"].int64_param = self.service.converters[pending.base].text_tokens
        encode_outputs(resp, outputs, [o.name for o in request.outputs])
        return resp

    async def _RepositoryIndex(self, request, context, tenant):
        resp = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.service.index():
            if request.ready and state != "READY":
                continue
            if name not in self.service.engines and not tenant.may_use(name):
                continue
            resp.models.add(name=name, version=version, state=state, reason=reason)
        return resp

    async def _RepositoryModelLoad(self, request, context, tenant):
        require_admin(tenant)
        files = {}
        for key, param in request.parameters.items():
            if key.startswith("file:"):
                files[key[len("file:"):].lstrip("/")] = param.bytes_param
            elif key == "config" and param.string_param:
                files["adapter_config.json"] = param.string_param.encode()
        name = _model_name(request.model_name, load=True)
        # Reading, validating and folding take milliseconds to seconds: off the event loop.
        await asyncio.get_running_loop().run_in_executor(self.pool, lambda: self.service.load(name, files or None))
        await self._set_health(name, True)
        return pb.RepositoryModelLoadResponse()

    async def _RepositoryModelUnload(self, request, context, tenant):
        require_admin(tenant)
        name = _model_name(request.model_name)
        self.service.unload(name)
        await self._set_health(name, False)
        return pb.RepositoryModelUnloadResponse()


INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The inference service's handlers, built from its descriptor, with `lenient_deserializer`s
    so that bytes that do not parse reach the handler (as `Undecodable`)."""
    handlers = {}
    for method in INFERENCE_SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                servicer.stream_handler(), request_deserializer=lenient_deserializer(request_type),
                response_serializer=response_type.SerializeToString)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                servicer.handler(method.name), request_deserializer=lenient_deserializer(request_type),
                response_serializer=response_type.SerializeToString)
        else:  # pragma: no cover - the KServe v2 service has none
            raise TypeError(f"unsupported method kind: {method.name}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62: the faster registered path
        server.add_registered_method_handlers(INFERENCE_SERVICE.full_name, handlers)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Server:
    """A running server: the asyncio gRPC server on its own event-loop thread, and the serving
    core behind it (``service``). `create_server` builds and starts one."""

    servicer_class: type[InferenceServicer] = InferenceServicer  # the scale-out edge serves a subclass (runtime.ray_serve)

    def __init__(self, service: Service) -> None:
        self.service = service
        self.config = service.config
        self.auth = Authenticator(self.config.tenants)
        self.credentials = ReloadableCredentials(self.config.tls) if self.config.tls is not None else None
        self.pool = concurrent.futures.ThreadPoolExecutor(self.config.decode_workers, thread_name_prefix="wara-decode")
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._stopped = False
        self._thread = threading.Thread(target=self.loop.run_forever, name="wara-grpc", daemon=True)

    def start(self) -> int:
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        except BaseException:
            self._close_loop()
            raise
        self._warn_if_open()
        return self.port

    async def _start(self) -> int:
        config = self.config
        limit = config.max_message_mb << 20
        self.grpc_server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", config.max_streams_per_connection),
                     ("grpc.http.overload_protection", 0)])  # count streams as HTTP/2 does: excess waits at the client
        self.health = ModelHealth()
        self.servicer = self.servicer_class(self.service, self.health, self.auth, self.pool)
        add_inference_service(self.servicer, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        names = (INFERENCE_SERVICE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc_server)
        address = f"{config.host}:{config.port}"
        try:
            if self.credentials is not None:
                port = self.grpc_server.add_secure_port(address, self.credentials.server_credentials())
            else:
                port = self.grpc_server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise WaraError(f"could not bind {address}")
        await self.grpc_server.start()
        for name, _, state, _ in self.service.index():
            if state == "READY":
                await self.servicer._set_health(name, True)
        return port

    def _warn_if_open(self) -> None:
        config = self.config
        if is_loopback(config.host):
            return
        missing = [what for what, ok in (("TLS", self.credentials is not None), ("authentication", self.auth.enabled))
                   if not ok]
        if missing:
            log.warning("!" * 78)
            log.warning("SERVING ON %s:%d WITHOUT %s: any host that reaches this port can %s", config.host, self.port,
                        " OR ".join(missing).upper(),
                        "load, unload and query every adapter" if not self.auth.enabled else "read the traffic")
            log.warning("configure tls_cert/tls_key and [[serve.tenant]] tokens (`wara token`), or bind 127.0.0.1")
            log.warning("!" * 78)

    def reload_tls(self) -> bool:
        """Read the TLS files again (SIGHUP); new connections get the new certificate. A bad
        file keeps the old one (logged). False when nothing changed or there is no TLS."""
        return self.credentials.reload() if self.credentials is not None else False

    def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new requests (UNAVAILABLE), complete every admitted one within
        ``grace`` seconds, stop the batchers, then close the port. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        try:
            asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop).result()
        finally:
            self._close_loop()

    async def _stop(self, grace: float) -> None:
        t0 = time.monotonic()
        admission = self.servicer.admission
        admission.closing = True
        self.service.ready = False
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(admission.idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("drain: %d requests still in flight after the %.1fs grace period", admission.inflight, grace)
        await asyncio.get_running_loop().run_in_executor(None, self.service.drain)
        await self.grpc_server.stop(max(0.0, grace - (time.monotonic() - t0)))

    def _close_loop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.pool.shutdown(wait=False)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def create_server(config: ServeConfig, *, service: Service | None = None) -> tuple[Server, int]:
    """Build and start a server; ``port=0`` in the config picks a free port (for tests).
    Returns (server, bound port); ``server.service`` is the in-process core."""
    service = service or Service(config)
    server = Server(service)
    try:
        port = server.start()
    except BaseException:
        service.drain()
        raise
    return server, port
