"""The gRPC edge: an asyncio KServe v2 servicer, health, reflection, authentication, admission
and drain. It only translates protobuf to calls of the serving core (`runtime.core.ServingCore`: a
`Service`, or a Ray `Cluster`) and back; errors become status codes in
`runtime.errors.status_code`.

The edge runs `grpc.aio` on one event loop thread (`Server`), so an RPC costs a coroutine, not a
worker thread: there is no thread-pool ceiling behind which accepted requests wait, and every
accepted request is one the server has counted. In order, an inference RPC is:

0. screened from its metadata before its body is read (`runtime.grpc_auth.AuthInterceptor`):
   a missing or unknown token is UNAUTHENTICATED, a tenant's token on load/unload
   PERMISSION_DENIED, and the request's bytes are never read;
1. decoded leniently (bytes that do not parse: INVALID_ARGUMENT, see `wire`);
2. refused with UNAVAILABLE once a drain has begun;
3. authenticated (`runtime.auth`: a bearer token or a client certificate maps to a tenant;
   UNAUTHENTICATED without one when tenants are configured);
4. admitted (`runtime.admission.Admission`): at most the tenant's ``max_queue`` and the server's ``max_inflight``
   requests and ``max_queued_mb`` bytes at once, else RESOURCE_EXHAUSTED at once;
5. checked and decoded (`wire.decode_inputs`): on the event loop for a small request, on one of
   ``decode_workers`` threads for a big one;
6. handed to the core (`ServingCore.infer`), awaited, and encoded.

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
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wara_train.errors import WaraError

from .admission import Admission, Refused
from .auth import OPEN, Authenticator, PermissionDenied, Tenant, Unauthenticated, require_admin
from .core import EXTENSIONS, SERVER_NAME, SERVER_VERSION, ServingCore
from .service import Service
from .errors import InvalidRequest, ModelNotFound, clip, status_code, status_message
from .config import ServeConfig
from .grpc_auth import AuthInterceptor
from .kserve import inference_pb2 as pb
from .tls import ReloadableCredentials
from .wire import MAX_NAME, Undecodable, decode_inputs, decode_outputs, encode_outputs, lenient_deserializer

__all__ = ["Server", "create_server", "decode_inputs", "decode_outputs", "encode_outputs"]
log = logging.getLogger("wara.serve")


def outcome(error: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """(status, message) for an error raised while serving ``where``. A project error maps
    through `errors.status_code`; anything else is a server bug: INTERNAL with an error id that
    finds its traceback in the server log (the client never sees a traceback or a path)."""
    if isinstance(error, WaraError) and status_code(error) != grpc.StatusCode.INTERNAL:
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

    def __init__(self, service: ServingCore, health_servicer: ModelHealth, auth: Authenticator,
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
        """Count a refusal and, for auth, log it through ``auth.refusals`` (metadata keys only,
        never a value; a bounded number of lines). The auth interceptor reports here too."""
        reason = refusal_reason(error)
        self.service.metrics.refusals.labels(reason).inc()
        if isinstance(error, (Unauthenticated, PermissionDenied)):
            self.auth.refusals.refused(method, context.peer(), reason, error, context.invocation_metadata() or ())

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
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS))

    async def _ModelReady(self, request, context, tenant):
        try:
            name = _model_name(request.name)
            ready = await self.service.model_ready(name, _version(name, request.version), tenant=tenant)
        except WaraError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=ready and not self.admission.closing)

    async def _ModelMetadata(self, request, context, tenant):
        info = await self.service.metadata(_model_name(request.name), tenant=tenant)
        resp = pb.ModelMetadataResponse(name=request.name, versions=info.versions, platform=info.platform)
        for spec in info.inputs:
            resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in info.outputs:
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
        if nbytes <= self.inline_bytes:
            inputs = decode_inputs(request, self.service.config)
        else:  # big: decode off the event loop, so small requests keep flowing
            inputs = await asyncio.get_running_loop().run_in_executor(self.pool, decode_inputs, request,
                                                                      self.service.config)
        answer = await self.service.infer(name, inputs, tenant=tenant, timeout=remaining, version=requested)
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version=answer.version, id=request.id)
        if answer.truncated:  # stated, not silent: which texts were cut, and to how many tokens
            resp.parameters["truncated_rows"].string_param = ",".join(map(str, answer.truncated))
            resp.parameters["max_text_length"].int64_param = answer.text_tokens
        encode_outputs(resp, answer.outputs, [o.name for o in request.outputs])
        return resp

    async def _RepositoryIndex(self, request, context, tenant):
        resp = pb.RepositoryIndexResponse()
        for row in await self.service.index(tenant=tenant, ready_only=request.ready):
            resp.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return resp

    async def _RepositoryModelLoad(self, request, context, tenant):
        require_admin(tenant)  # before the files are looked at
        files = {}
        for key, param in request.parameters.items():
            if key.startswith("file:"):
                files[key[len("file:"):].lstrip("/")] = param.bytes_param
            elif key == "config" and param.string_param:
                files["adapter_config.json"] = param.string_param.encode()
        name = _model_name(request.model_name, load=True)
        await self.service.load(name, files or None, tenant=tenant)
        await self._set_health(name, True)
        return pb.RepositoryModelLoadResponse()

    async def _RepositoryModelUnload(self, request, context, tenant):
        name = _model_name(request.model_name)
        await self.service.unload(name, tenant=tenant)
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


    def __init__(self, service: ServingCore) -> None:
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
        interceptor = AuthInterceptor(  # refuses a call without a valid credential before its body is read
            self.auth, INFERENCE_SERVICE.full_name, open_methods=InferenceServicer.OPEN_METHODS,
            admin_methods=("RepositoryModelLoad", "RepositoryModelUnload"),
            certificates=config.tls is not None and config.tls.client_auth,
            refused=lambda error, method, context: self.servicer._refused(error, method, context))
        self.grpc_server = grpc.aio.server(
            interceptors=(interceptor,),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", config.max_streams_per_connection),
                     ("grpc.http.overload_protection", 0)])  # count streams as HTTP/2 does: excess waits at the client
        self.health = ModelHealth()
        self.servicer = InferenceServicer(self.service, self.health, self.auth, self.pool)
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
        for row in await self.service.index(ready_only=True):
            await self.servicer._set_health(row.name, True)
        return port

    def _warn_if_open(self) -> None:
        """Warn, in a banner in the log, of a port that is open beyond this host unprotected: the
        gRPC port off loopback without TLS or without tenants, and the Prometheus port
        (``metrics_port``) whenever ``metrics_host`` is not loopback, since /metrics has no
        authentication and no TLS and its labels name every tenant and loaded adapter (and which
        adapters are running or waiting now)."""
        config = self.config
        if config.metrics_port is not None and not is_loopback(config.metrics_host):
            log.warning("!" * 78)
            log.warning("METRICS ON %s:%d WITHOUT AUTHENTICATION OR TLS: any host that reaches this port reads the "
                        "name of every tenant and loaded adapter, and their traffic", config.metrics_host,
                        config.metrics_port)
            log.warning("keep metrics_host = \"127.0.0.1\" and scrape from this host (or through a proxy that "
                        "authenticates), or firewall the port to the scraper")
            log.warning("!" * 78)
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


def create_server(config: ServeConfig, *, service: ServingCore | None = None) -> tuple[Server, int]:
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
