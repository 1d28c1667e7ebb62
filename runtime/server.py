"""The gRPC edge: KServe v2 servicer, health, reflection. It only translates protobuf to
`Service` calls and back; errors become status codes in `runtime.errors.status_code`."""

from __future__ import annotations

import logging
import math
import struct
from concurrent import futures
from typing import Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wara_train.errors import WaraError

from .config import ServeConfig
from .errors import InvalidRequest, status_code
from .kserve import inference_pb2 as pb
from .kserve import inference_pb2_grpc as pb_grpc
from .service import SERVER_NAME, SERVER_VERSION, Service

log = logging.getLogger("wara.serve")

NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64}
MAX_ELEMENTS = 1 << 28  # per input tensor; the message size limit usually bites first
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """KServe raw BYTES: each element is a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise InvalidRequest(f"raw content of {name!r} is shorter than its {count} BYTES elements")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidRequest(f"raw content of {name!r}: element length {n} runs past the end")
        out.append(raw[pos : pos + n])
        pos += n
    if pos != len(raw):
        raise InvalidRequest(f"raw content of {name!r} has {len(raw) - pos} bytes after its {count} elements")
    return np.array(out, dtype=object)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Input tensors as numpy arrays, from raw contents or typed contents; every mismatch of
    datatype, shape and byte length is an InvalidRequest naming the input."""
    if not request.inputs:
        raise InvalidRequest("the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        if t.name in out:
            raise InvalidRequest(f"input {t.name!r} appears twice")
        shape = tuple(int(d) for d in t.shape)
        if not shape or any(d < 0 for d in shape):
            raise InvalidRequest(f"input {t.name!r} has an invalid shape {list(shape)}")
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise InvalidRequest(f"input {t.name!r} has {count} elements, more than the {MAX_ELEMENTS} allowed")
        if t.datatype != "BYTES" and t.datatype not in NUMPY:
            raise InvalidRequest(f"input {t.name!r} has unknown datatype {t.datatype!r}")
        if not raw and t.datatype not in CONTENTS:
            raise InvalidRequest(f"input {t.name!r}: {t.datatype} has no typed contents field; send it as raw_input_contents")
        if raw:
            if t.datatype == "BYTES":
                arr = _decode_bytes(raw[i], count, t.name)
            else:
                dtype = np.dtype(NUMPY[t.datatype]).newbyteorder("<")
                if len(raw[i]) != count * dtype.itemsize:
                    raise InvalidRequest(f"raw content of {t.name!r} is {len(raw[i])} bytes; shape {list(shape)} of "
                                         f"{t.datatype} needs {count * dtype.itemsize}")
                arr = np.frombuffer(raw[i], dtype=dtype).astype(NUMPY[t.datatype])
        else:
            values = getattr(t.contents, CONTENTS[t.datatype])
            if len(values) != count:
                raise InvalidRequest(f"input {t.name!r} has {len(values)} {t.datatype} values for shape {list(shape)}")
            try:
                arr = np.array(list(values), dtype=object if t.datatype == "BYTES" else NUMPY[t.datatype])
            except (OverflowError, ValueError):
                raise InvalidRequest(f"input {t.name!r}: values out of range for {t.datatype}") from None
        out[t.name] = arr.reshape(shape)
    return out


def encode_outputs(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray], wanted: list[str]) -> None:
    """Outputs as raw little-endian contents (what tritonclient reads)."""
    names = wanted or list(outputs)
    for name in names:
        if name not in outputs:
            raise InvalidRequest(f"unknown output {name!r}; this model produces {sorted(outputs)}")
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


def _guard(fn: Callable) -> Callable:
    """Run a handler; project errors become their status code, anything else INTERNAL."""

    def handler(self, request, context):
        try:
            return fn(self, request, context)
        except WaraError as e:
            context.abort(status_code(e), str(e))
        except Exception as e:  # never let one request take the server down
            log.exception("internal error in %s", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    handler.__name__ = fn.__name__
    return handler


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
            _, versions, _, _ = self.service.describe(request.name)
        except WaraError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.service.ready and (not request.version or request.version in versions))

    @_guard
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_repository"])

    @_guard
    def ModelMetadata(self, request, context):
        base, versions, inputs, outputs = self.service.describe(request.name)
        resp = pb.ModelMetadataResponse(name=request.name, versions=versions, platform=f"{self.service.engines[base].platform}:{base}")
        for spec in inputs:
            resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in outputs:
            resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return resp

    def _infer(self, request, context) -> pb.ModelInferResponse:
        inputs = decode_inputs(request)
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining > 1e6:  # no client deadline: the server's default
            remaining = None
        version, outputs = self.service.infer(request.model_name, inputs, timeout=remaining,
                                              requested_version=request.model_version)
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
        encode_outputs(resp, outputs, [o.name for o in request.outputs])
        return resp

    @_guard
    def ModelInfer(self, request, context):
        return self._infer(request, context)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self._infer(request, None))
            except WaraError as e:
                yield pb.ModelStreamInferResponse(error_message=f"{status_code(e).name}: {e}")
            except Exception as e:
                log.exception("internal error in ModelStreamInfer")
                yield pb.ModelStreamInferResponse(error_message=f"INTERNAL: {type(e).__name__}: {e}")

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
        self.service.load(request.model_name, files or None)
        self._set_health(request.model_name, True)
        return pb.RepositoryModelLoadResponse()

    @_guard
    def RepositoryModelUnload(self, request, context):
        self.service.unload(request.model_name)
        self._set_health(request.model_name, False)
        return pb.RepositoryModelUnloadResponse()


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
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    names = (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
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
