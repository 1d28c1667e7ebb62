"""The gRPC edge: KServe v2 servicer, health, reflection. It only translates protobuf to
`Service` calls and back; errors become status codes in `runtime.errors.status_code`.

Every request is checked here before anything request-sized is allocated (`decode_inputs`).
Bytes that do not parse as the method's request are INVALID_ARGUMENT: the inference service is
registered with lenient deserializers (grpc itself answers INTERNAL when a deserializer raises
or returns None). INTERNAL is kept for server bugs: its message carries an error id, and the
traceback goes to the server log only.
"""

from __future__ import annotations

import logging
import struct
import uuid
from concurrent import futures
from typing import Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wara_train.errors import WaraError

from .config import ServeConfig
from .errors import InvalidRequest, ModelNotFound, RequestTooLarge, clip, status_code, status_message
from .kserve import inference_pb2 as pb
from .kserve import inference_pb2_grpc as pb_grpc
from .service import SERVER_NAME, SERVER_VERSION, Service

log = logging.getLogger("wara.serve")

NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64}
MAX_INPUTS = 64  # tensors per request
MAX_RANK = 16  # axes per tensor
MAX_NAME = 128  # characters of a model name (bases and adapters) or version
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _decode_bytes(raw: bytes, count: int, name: str, max_element: int | None = None) -> np.ndarray:
    """KServe raw BYTES: each element is a 4-byte little-endian length, then the bytes. Every
    length is checked (against the content and ``max_element``) before its element is copied."""
    out, pos = [], 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise InvalidRequest(f"raw content of {clip(name)} is shorter than its {count} BYTES elements")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidRequest(f"raw content of {clip(name)}: element {i} length {n} runs past the end")
        if max_element is not None and n > max_element:
            raise RequestTooLarge(f"{clip(name)}[{i}] is {n} bytes; max_bytes_element_mb allows {max_element}")
        out.append(raw[pos : pos + n])
        pos += n
    if pos != len(raw):
        raise InvalidRequest(f"raw content of {clip(name)} has {len(raw) - pos} bytes after its {count} elements")
    arr = np.empty(count, dtype=object)  # np.array(list of bytes) would make a fixed-width S array
    arr[:] = out
    return arr


_DEFAULTS: ServeConfig | None = None


def _limits(config: ServeConfig | None) -> ServeConfig:
    global _DEFAULTS
    if config is not None:
        return config
    if _DEFAULTS is None:
        _DEFAULTS = ServeConfig()
    return _DEFAULTS


def _count(name: str, shape: list[int]) -> int:
    """Elements of ``shape`` (every axis positive; a Python int, so no product overflows)."""
    if not shape:
        raise InvalidRequest(f"input {clip(name)} has no shape (a scalar); inputs are [batch, ...] tensors")
    if len(shape) > MAX_RANK:
        raise InvalidRequest(f"input {clip(name)} has {len(shape)} axes; at most {MAX_RANK} are allowed")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input {clip(name)} has a negative axis in its shape {shape}")
    if 0 in shape:
        raise InvalidRequest(f"input {clip(name)} is empty (shape {shape})")
    count = 1
    for d in shape:
        count *= d
    return count


def decode_inputs(request: pb.ModelInferRequest, config: ServeConfig | None = None) -> dict[str, np.ndarray]:
    """Input tensors as numpy arrays, from raw contents or typed contents.

    Every tensor is checked before any array is built, in two steps. First it must be
    consistent: a known datatype, a shape of positive axes, and contents of exactly the size its
    shape and datatype need (so an absurd shape such as ``[2**62, 2**62]`` fails here, as no
    message can carry it); a mismatch is an InvalidRequest naming the input (INVALID_ARGUMENT).
    Then a consistent request must fit ``config``'s limits (the defaults without one), or it
    is a `RequestTooLarge` naming the limit (RESOURCE_EXHAUSTED): at most ``max_batch`` rows
    (axis 0 of every input; a larger batch is refused, not split: send it as several requests),
    ``max_request_elements`` elements and ``max_request_mb`` decoded bytes over all inputs, and
    ``max_bytes_elements`` BYTES elements of at most ``max_bytes_element_mb`` each. Text sizes
    are checked by the base's `InputConverter`."""
    config = _limits(config)
    if not request.inputs:
        raise InvalidRequest("the request has no inputs")
    if len(request.inputs) > MAX_INPUTS:
        raise InvalidRequest(f"the request has {len(request.inputs)} inputs; at most {MAX_INPUTS} are allowed")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    max_element = config.max_bytes_element_mb << 20
    plan: list[tuple[pb.ModelInferRequest.InferInputTensor, tuple[int, ...], int]] = []
    names: set[str] = set()
    for i, t in enumerate(request.inputs):  # 1: each tensor consistent
        if not t.name:
            raise InvalidRequest(f"input {i} has no name")
        if t.name in names:
            raise InvalidRequest(f"input {clip(t.name)} appears twice")
        names.add(t.name)
        if t.datatype != "BYTES" and t.datatype not in NUMPY:
            raise InvalidRequest(f"input {clip(t.name)} has unknown datatype {clip(t.datatype)}; valid: "
                                 f"{', '.join(['BYTES', *NUMPY])}")
        shape = [int(d) for d in t.shape]
        count = _count(t.name, shape)
        typed = [f.name for f, _ in t.contents.ListFields()]
        if raw:
            if typed:
                raise InvalidRequest(f"input {clip(t.name)} has typed contents ({', '.join(typed)}) although the "
                                     "request sends raw_input_contents; use one or the other")
            if t.datatype == "BYTES":
                if len(raw[i]) < 4 * count:  # each element needs its 4-byte length
                    raise InvalidRequest(f"raw content of {clip(t.name)} is shorter than its {count} BYTES elements")
            elif len(raw[i]) != count * np.dtype(NUMPY[t.datatype]).itemsize:
                raise InvalidRequest(f"raw content of {clip(t.name)} is {len(raw[i])} bytes; shape {shape} of "
                                     f"{t.datatype} needs {count * np.dtype(NUMPY[t.datatype]).itemsize}")
        elif t.datatype not in CONTENTS:
            raise InvalidRequest(f"input {clip(t.name)}: {t.datatype} has no typed contents field; send it as "
                                 "raw_input_contents")
        elif set(typed) - {CONTENTS[t.datatype]}:
            raise InvalidRequest(f"input {clip(t.name)} is {t.datatype} (contents.{CONTENTS[t.datatype]}) but sets "
                                 f"{', '.join(sorted(set(typed) - {CONTENTS[t.datatype]}))}")
        elif len(getattr(t.contents, CONTENTS[t.datatype])) != count:
            raise InvalidRequest(f"input {clip(t.name)} has {len(getattr(t.contents, CONTENTS[t.datatype]))} "
                                 f"{t.datatype} values for shape {shape}")
        plan.append((t, tuple(shape), count))
    elements = byte_elements = nbytes = 0
    for t, shape, count in plan:  # 2: the request within its limits
        if shape[0] > config.max_batch:
            raise RequestTooLarge(f"input {clip(t.name)} has {shape[0]} rows; max_batch is {config.max_batch} "
                                  "(send a larger batch as several requests)")
        elements += count
        if t.datatype == "BYTES":
            byte_elements += count
        else:
            nbytes += count * np.dtype(NUMPY[t.datatype]).itemsize
    if elements > config.max_request_elements:
        raise RequestTooLarge(f"the inputs hold {elements} elements; max_request_elements is {config.max_request_elements}")
    if byte_elements > config.max_bytes_elements:
        raise RequestTooLarge(f"the inputs hold {byte_elements} BYTES elements; max_bytes_elements is "
                              f"{config.max_bytes_elements}")
    if nbytes > config.max_request_mb << 20:
        raise RequestTooLarge(f"the inputs decode to {nbytes} bytes; max_request_mb is {config.max_request_mb}")
    out: dict[str, np.ndarray] = {}
    for i, (t, shape, count) in enumerate(plan):  # 3: the arrays
        if raw:
            if t.datatype == "BYTES":
                arr = _decode_bytes(raw[i], count, t.name, max_element)
            else:
                arr = np.frombuffer(raw[i], dtype=np.dtype(NUMPY[t.datatype]).newbyteorder("<")).astype(NUMPY[t.datatype])
        else:
            values = getattr(t.contents, CONTENTS[t.datatype])
            if t.datatype == "BYTES":
                for k, v in enumerate(values):
                    if len(v) > max_element:
                        raise RequestTooLarge(f"{clip(t.name)}[{k}] is {len(v)} bytes; max_bytes_element_mb allows "
                                              f"{max_element}")
                arr = np.empty(count, dtype=object)
                arr[:] = list(values)
            else:
                try:
                    arr = np.array(list(values), dtype=NUMPY[t.datatype])
                except (OverflowError, ValueError, TypeError):
                    raise InvalidRequest(f"input {clip(t.name)}: values out of range for {t.datatype}") from None
        out[t.name] = arr.reshape(shape)
    return out


def encode_outputs(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray], wanted: list[str]) -> None:
    """Outputs as raw little-endian contents (what tritonclient reads)."""
    if len(set(wanted)) != len(wanted):
        raise InvalidRequest("the request names an output twice")
    names = wanted or list(outputs)
    for name in names:
        if name not in outputs:
            raise InvalidRequest(f"unknown output {clip(name)}; this model produces {sorted(outputs)}")
        arr = outputs[name]
        if arr.dtype == object:
            datatype = "BYTES"
            raw = b"".join(struct.pack("<I", len(b)) + b for b in arr.reshape(-1))
        else:
            datatype = {np.dtype(v): k for k, v in NUMPY.items()}[arr.dtype]
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        response.raw_output_contents.append(raw)


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Client side: a response's raw outputs as numpy arrays."""
    out = {}
    for t, raw in zip(response.outputs, response.raw_output_contents):
        shape = tuple(t.shape)
        if t.datatype == "BYTES":
            out[t.name] = _decode_bytes(raw, int(np.prod(shape)), t.name).reshape(shape)
        else:
            out[t.name] = np.frombuffer(raw, dtype=np.dtype(NUMPY[t.datatype]).newbyteorder("<")).reshape(shape)
    return out


class Undecodable:
    """What a request deserializer returns for bytes that do not parse as its message (grpc
    answers INTERNAL when a deserializer raises or returns None, so it must return something);
    the handler refuses it with INVALID_ARGUMENT."""

    __slots__ = ("message", "reason")

    def __init__(self, message: str, reason: str) -> None:
        self.message = message
        self.reason = reason

    def error(self) -> InvalidRequest:
        return InvalidRequest(f"the request does not parse as {self.message}: {self.reason[:200]}")


def lenient_deserializer(message_type: type) -> Callable[[bytes], object]:
    """``message_type.FromString`` that returns an `Undecodable` instead of raising (bad wire
    format, invalid UTF-8 in a string field, nesting too deep)."""
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Undecodable(name, str(e) or "malformed protobuf")
        except Exception as e:  # anything the parser raises is about the bytes, not the server
            return Undecodable(name, type(e).__name__)

    return deserialize


def outcome(error: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """(status, message) for an error raised while serving ``where``. A project error maps
    through `errors.status_code`; anything else is a server bug: INTERNAL with an error id that
    finds its traceback in the server log (the client never sees a traceback or a path)."""
    if isinstance(error, WaraError):
        return status_code(error), status_message(error)
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, where, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}; the server log has the details)"


def _guard(fn: Callable) -> Callable:
    """Run a unary handler; an undecodable request is INVALID_ARGUMENT, errors map by `outcome`."""

    def handler(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return fn(self, request, context)
        except Exception as e:  # never let one request take the server down
            code, message = outcome(e, fn.__name__)
        context.abort(code, message)

    handler.__name__ = fn.__name__
    return handler


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


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service, health_servicer: health.HealthServicer) -> None:
        self.service = service
        self.health = health_servicer

    def _set_health(self, name: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(name, status)

    @_guard
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_guard
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready)

    @_guard
    def ModelReady(self, request, context):
        try:
            _, versions, _, _ = self.service.describe(_model_name(request.name))
        except WaraError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.service.ready and (not request.version or request.version in versions))

    @_guard
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_repository"])

    @_guard
    def ModelMetadata(self, request, context):
        base, versions, inputs, outputs = self.service.describe(_model_name(request.name))
        resp = pb.ModelMetadataResponse(name=request.name, versions=versions, platform=f"{self.service.engines[base].platform}:{base}")
        for spec in inputs:
            resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in outputs:
            resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return resp

    def _infer(self, request, context) -> pb.ModelInferResponse:
        if isinstance(request, Undecodable):
            raise request.error()
        name = _model_name(request.model_name)
        requested = _version(name, request.model_version)
        inputs = decode_inputs(request, self.service.config)
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining > 1e6:  # no client deadline: the server's default
            remaining = None
        version, outputs = self.service.infer(name, inputs, timeout=remaining, requested_version=requested)
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
        encode_outputs(resp, outputs, [o.name for o in request.outputs])
        return resp

    @_guard
    def ModelInfer(self, request, context):
        return self._infer(request, context)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            try:
                response = pb.ModelStreamInferResponse(infer_response=self._infer(request, None))
            except Exception as e:  # one bad request fails only its own response
                code, message = outcome(e, "ModelStreamInfer")
                response = pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}")
            yield response

    @_guard
    def RepositoryIndex(self, request, context):
        resp = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.service.index():
            if request.ready and state != "READY":
                continue
            resp.models.add(name=name, version=version, state=state, reason=reason)
        return resp

    @_guard
    def RepositoryModelLoad(self, request, context):
        files = {}
        for key, param in request.parameters.items():
            if key.startswith("file:"):
                files[key[len("file:"):].lstrip("/")] = param.bytes_param
            elif key == "config" and param.string_param:
                files["adapter_config.json"] = param.string_param.encode()
        self.service.load(_model_name(request.model_name, load=True), files or None)
        self._set_health(request.model_name, True)
        return pb.RepositoryModelLoadResponse()

    @_guard
    def RepositoryModelUnload(self, request, context):
        self.service.unload(_model_name(request.model_name))
        self._set_health(request.model_name, False)
        return pb.RepositoryModelUnloadResponse()


INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def add_inference_service(servicer: InferenceServicer, server: grpc.Server) -> None:
    """`add_GRPCInferenceServiceServicer_to_server`, built from the service descriptor, with
    `lenient_deserializer`s so that bytes that do not parse reach the handler (as `Undecodable`)."""
    handlers = {}
    for method in INFERENCE_SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=lenient_deserializer(request_type),
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62: the faster registered path
        server.add_registered_method_handlers(INFERENCE_SERVICE.full_name, handlers)


class Server:
    """A running server: the gRPC server and the serving core behind it."""

    def __init__(self, grpc_server: grpc.Server, service: Service) -> None:
        self.grpc_server = grpc_server
        self.service = service

    def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new requests, finish queued ones, then close (within ``grace`` s)."""
        self.service.drain()
        self.grpc_server.stop(grace).wait()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def create_server(config: ServeConfig, *, service: Service | None = None) -> tuple[Server, int]:
    """Build and start a server; ``port=0`` in the config picks a free port (for tests).
    Returns (server, bound port); ``server.service`` is the in-process core."""
    service = service or Service(config)
    limit = config.max_message_mb << 20
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="wara-grpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    health_servicer = health.HealthServicer()
    servicer = InferenceServicer(service, health_servicer)
    add_inference_service(servicer, grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    names = (INFERENCE_SERVICE.full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, grpc_server)
    port = grpc_server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        service.drain()
        raise WaraError(f"could not bind {config.host}:{config.port}")
    grpc_server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name, _, state, _ in service.index():
        if state == "READY":
            servicer._set_health(name, True)
    return Server(grpc_server, service), port
