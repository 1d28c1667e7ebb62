"""The wire format: KServe v2 protobuf tensors <-> numpy arrays, checked before anything
request-sized is allocated (`decode_inputs`), and lenient request deserializers (bytes that do
not parse reach the handler as an `Undecodable`, which it refuses with INVALID_ARGUMENT; grpc
itself answers INTERNAL when a deserializer raises or returns None)."""

from __future__ import annotations

import struct
from typing import Callable

import numpy as np
from google.protobuf.message import DecodeError

from .config import ServeConfig
from .errors import InvalidRequest, RequestTooLarge, clip
from .kserve import inference_pb2 as pb

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
