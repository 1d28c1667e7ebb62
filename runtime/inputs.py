"""Request tensors -> model inputs, driven by the base's spec (no base is named here).

A base takes either its model inputs (``spec.inputs``: e.g. ``input_ids`` + ``attention_mask``,
or ``images``) checked against their tensor specs, or one raw BYTES input the server
preprocesses with the base's own tokenizer or image processor (``text``, ``image_bytes``).
Every mismatch is an `InvalidRequest` naming the input (client-supplied names are clipped by
`errors.clip`); a text over its byte limits is a `RequestTooLarge` naming the limit, checked
before the tokenizer sees it. Rules that hold for every base: no input has an empty axis
(``input_ids`` of shape ``[1, 0]`` is refused), integer values lie in the spec's
``value_range`` (token ids within the vocabulary, masks in {0, 1}), a sequence is no longer than
the spec's ``max_dims`` (the model's position table), and each row of an ``attention_mask``
attends to at least one token.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any, Callable

import numpy as np
import torch

from wara_train.basespec import BaseSpec, TensorSpec

from .config import ServeConfig
from .errors import InvalidRequest, RequestTooLarge, clip

log = logging.getLogger("wara.serve")
MASK_INPUT = "attention_mask"  # an integer input of this name needs a 1 in every row
NUMPY_OF = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def input_specs(spec: BaseSpec) -> list[TensorSpec]:
    """What ModelMetadata reports: the raw input (if any), then the model inputs."""
    return ([spec.raw_spec] if spec.raw_spec else []) + list(spec.inputs)


class InputConverter:
    """Per base: checks request tensors and runs its preprocessing. Each thread that
    preprocesses gets its own tokenizer or image processor (they are not thread-safe), so a big
    request tokenized on one thread never holds up a small one on another."""

    def __init__(self, spec: BaseSpec, *, max_text_length: int, max_text_bytes: int = ServeConfig.max_text_bytes,
                 max_request_text_bytes: int = ServeConfig.max_request_text_bytes) -> None:
        self.spec = spec
        self.max_text_length = max_text_length
        self.max_text_bytes = max_text_bytes
        self.max_request_text_bytes = max_request_text_bytes
        self._local = threading.local()
        # Built at start-up: a base whose tokenizer or image processor is missing is refused
        # by `wara serve`, not by its first request; other threads build their own on first use.
        self._local.pre = spec.preprocessor(max_length=max_text_length) if spec.raw_input else None

    def _preprocessor(self) -> Callable:
        pre = getattr(self._local, "pre", None)
        if pre is None:
            pre = self._local.pre = self.spec.preprocessor(max_length=self.max_text_length)
        return pre

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        return self.convert(inputs)[0]

    @property
    def text_tokens(self) -> int:
        """The tokens a text is cut to: ``max_text_length``, or fewer where the model's
        position table is shorter."""
        return getattr(self._preprocessor(), "max_length", None) or self.max_text_length

    def convert(self, inputs: dict[str, np.ndarray]) -> tuple[tuple[torch.Tensor, ...], list[int]]:
        """(model inputs, rows whose text was cut to ``max_text_length`` tokens)."""
        for name, arr in inputs.items():
            if arr.ndim == 0 or arr.shape[0] == 0:
                raise InvalidRequest(f"input {clip(name)} has an empty batch (shape {list(arr.shape)})")
            if 0 in arr.shape:
                raise InvalidRequest(f"input {clip(name)} is empty (shape {list(arr.shape)})")
        raw = self.spec.raw_spec
        takes = " + ".join(f"{t.name!r} ({t.datatype})" for t in self.spec.inputs)
        alt = f"{raw.name!r} (BYTES) or " if raw is not None else ""
        unknown = sorted(set(inputs) - set(self.spec.input_names) - ({raw.name} if raw is not None else set()))
        if unknown:
            raise InvalidRequest(f"unknown inputs {_names(unknown)}: {self.spec.name} takes {alt}{takes}")
        if raw is not None and raw.name in inputs:
            extra = sorted(set(inputs) - {raw.name})
            if extra:
                raise InvalidRequest(f"send either {raw.name!r} or {' + '.join(self.spec.input_names)}, not both "
                                     f"({_names(extra)})")
            items = self._bytes(raw.name, inputs[raw.name])
            if self.spec.raw_input == "text":
                self._check_text_sizes(raw.name, items)
            return self._preprocess(items), list(getattr(self._preprocessor(), "truncated", None) or ())
        missing = [n for n in self.spec.input_names if n not in inputs]
        if missing:
            raise InvalidRequest(f"missing input {missing[0]!r}: {self.spec.name} takes {alt}{takes}")
        tensors = [_check(t, inputs[t.name]) for t in self.spec.inputs]
        batch = {a.shape[0] for a in tensors}
        if len(batch) > 1:
            raise InvalidRequest(f"inputs {list(self.spec.input_names)} differ in batch size: {sorted(batch)}")
        if len(tensors) > 1 and all(t.ndim == 2 for t in tensors) and len({t.shape for t in tensors}) > 1:
            raise InvalidRequest(f"inputs {list(self.spec.input_names)} differ in shape: {[list(t.shape) for t in tensors]}")
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in tensors), []

    # --- raw inputs -------------------------------------------------------------------------
    def _check_text_sizes(self, name: str, items: list[bytes]) -> None:
        """Texts within `max_text_bytes` each and `max_request_text_bytes` together (UTF-8 bytes),
        before any is decoded or tokenized."""
        total = 0
        for i, b in enumerate(items):
            if len(b) > self.max_text_bytes:
                raise RequestTooLarge(f"{name}[{i}] is {len(b)} bytes; max_text_bytes is {self.max_text_bytes}")
            total += len(b)
        if total > self.max_request_text_bytes:
            raise RequestTooLarge(f"{name} holds {total} bytes; max_request_text_bytes is {self.max_request_text_bytes}")

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
        pre = self._preprocessor()
        try:
            return tuple(pre(examples))
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
    if spec.name == MASK_INPUT and arr.dtype.kind in "iu" and arr.ndim >= 2:
        empty = ~arr.reshape(arr.shape[0], -1).any(axis=1)
        if empty.any():
            raise InvalidRequest(f"input {spec.name!r} row {int(np.argmax(empty))} is all zeros: every row must "
                                 "attend to at least one token")
    return arr


def _names(names: list[str], most: int = 4) -> str:
    """Client-supplied names for a message: a few, each clipped."""
    shown = ", ".join(clip(n) for n in names[:most])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > most else ''}]"


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
