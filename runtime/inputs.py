"""Request tensors -> model inputs, driven by the base's spec (no base is named here).

A base takes either its model inputs (``spec.inputs``: e.g. ``input_ids`` + ``attention_mask``,
or ``images``) checked against their tensor specs, or one raw BYTES input the server
preprocesses with the base's own tokenizer or image processor (``text``, ``image_bytes``).
Every mismatch is an `InvalidRequest` naming the input.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any, Callable

import numpy as np
import torch

from wara_train.basespec import BaseSpec, TensorSpec

from .errors import InvalidRequest

log = logging.getLogger("wara.serve")
NUMPY_OF = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def input_specs(spec: BaseSpec) -> list[TensorSpec]:
    """What ModelMetadata reports: the raw input (if any), then the model inputs."""
    return ([spec.raw_spec] if spec.raw_spec else []) + list(spec.inputs)


class InputConverter:
    """Per base: checks request tensors and runs its preprocessing (built on first use, one
    call at a time: tokenizers are not thread-safe)."""

    def __init__(self, spec: BaseSpec, *, max_text_length: int) -> None:
        self.spec = spec
        self.max_text_length = max_text_length
        self._lock = threading.Lock()
        # Built at start-up: a base whose tokenizer or image processor is missing is refused
        # by `wara serve`, not by its first request.
        self._pre: Callable | None = spec.preprocessor(max_length=max_text_length) if spec.raw_input else None

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        for name, arr in inputs.items():
            if arr.ndim == 0 or arr.shape[0] == 0:
                raise InvalidRequest(f"input {name!r} has an empty batch (shape {list(arr.shape)})")
        raw = self.spec.raw_spec
        if raw is not None and raw.name in inputs:
            extra = sorted(set(inputs) - {raw.name})
            if extra:
                raise InvalidRequest(f"send either {raw.name!r} or {' + '.join(self.spec.input_names)}, not both ({extra})")
            return self._preprocess(self._bytes(raw.name, inputs[raw.name]))
        missing = [n for n in self.spec.input_names if n not in inputs]
        if missing:
            takes = " + ".join(f"{t.name!r} ({t.datatype})" for t in self.spec.inputs)
            alt = f"{raw.name!r} (BYTES) or " if raw is not None else ""
            raise InvalidRequest(f"missing input {missing[0]!r}: {self.spec.name} takes {alt}{takes}")
        extra = sorted(set(inputs) - set(self.spec.input_names))
        if extra:
            raise InvalidRequest(f"unknown inputs {extra}: {self.spec.name} takes {list(self.spec.input_names)}")
        tensors = [_check(t, inputs[t.name]) for t in self.spec.inputs]
        batch = {a.shape[0] for a in tensors}
        if len(batch) > 1:
            raise InvalidRequest(f"inputs {list(self.spec.input_names)} differ in batch size: {sorted(batch)}")
        if len(tensors) > 1 and all(t.ndim == 2 for t in tensors) and len({t.shape for t in tensors}) > 1:
            raise InvalidRequest(f"inputs {list(self.spec.input_names)} differ in shape: {[list(t.shape) for t in tensors]}")
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in tensors)

    # --- raw inputs -------------------------------------------------------------------------
    @staticmethod
    def _bytes(name: str, arr: np.ndarray) -> list[bytes]:
        if arr.dtype != object:
            raise InvalidRequest(f"input {name!r} must be BYTES")
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise InvalidRequest(f"input {name!r} must have shape [batch] or [batch, 1], got {list(arr.shape)}")
        return [b if isinstance(b, bytes) else str(b).encode() for b in arr]

    def _preprocess(self, items: list[bytes]) -> tuple[torch.Tensor, ...]:
        examples = [RAW_DECODERS[self.spec.raw_input](b, i) for i, b in enumerate(items)]
        with self._lock:
            try:
                return tuple(self._pre(examples))
            except Exception:  # the detail (which may name server paths) goes to the log only
                log.exception("preprocessing for base %s failed", self.spec.name)
                raise InvalidRequest(f"base {self.spec.name!r} could not preprocess this {self.spec.raw_input} input") from None


def _decode_text(data: bytes, index: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"text[{index}] is not valid UTF-8") from None


def _decode_image(data: bytes, index: int) -> Any:
    """PNG or JPEG bytes -> an RGB PIL image; anything else is refused by index."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("PNG", "JPEG"):
                raise InvalidRequest(f"image_bytes[{index}] is {im.format}, not PNG or JPEG")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidRequest(f"image_bytes[{index}] does not decode as a PNG or JPEG image") from None


RAW_DECODERS: dict[str, Callable[[bytes, int], Any]] = {"text": _decode_text, "image": _decode_image}


def _check(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    want = NUMPY_OF.get(spec.datatype)
    if want is None or arr.dtype != want:
        raise InvalidRequest(f"input {spec.name!r} must be {spec.datatype}, got {arr.dtype}")
    if arr.ndim != len(spec.shape):
        raise InvalidRequest(f"input {spec.name!r} must have shape {_shape(spec)}, got {list(arr.shape)}")
    for axis, (size, want_size) in enumerate(zip(arr.shape, spec.shape)):
        lo = spec.min_dims[axis] if spec.min_dims else None
        hi = spec.max_dims[axis] if spec.max_dims else None
        if (want_size >= 0 and size != want_size) or (lo is not None and size < lo) or (hi is not None and size > hi):
            raise InvalidRequest(f"input {spec.name!r} must have shape {_shape(spec)}, got {list(arr.shape)}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidRequest(f"input {spec.name!r} contains NaN or Inf")
    if spec.value_range is not None and arr.size:
        lo, hi = spec.value_range
        if arr.min() < lo or arr.max() >= hi:
            raise InvalidRequest(f"input {spec.name!r} values must lie in [{lo}, {hi})")
    return arr


def _shape(spec: TensorSpec) -> str:
    dims = []
    for axis, size in enumerate(spec.shape):
        lo = spec.min_dims[axis] if spec.min_dims else None
        hi = spec.max_dims[axis] if spec.max_dims else None
        if size >= 0:
            dims.append(str(size))
        elif lo is not None or hi is not None:
            dims.append(f"{lo or 1}..{hi or 'any'}")
        else:
            dims.append("any")
    return "[" + ", ".join(dims) + "]"
