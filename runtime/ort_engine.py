"""The onnxruntime engine: the exporter's ``multi`` graph with the slot factors bound as inputs.

It shares everything but the forward with `TorchEngine` (validation, folding, the slot tensors,
per-row heads). The graph's slot inputs are compact copies of those slot tensors cut to the
largest rank in use (the padding to ``max_rank`` would double the adapter FLOPs of a rank-16
adapter under the default max rank of 32), refreshed under the engine lock on every slot write.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from wara_train.basespec import BaseSpec
from wara_train.errors import ConfigError
from wara_train.layer import layer_shape

from .engine import TorchEngine
from .errors import InvalidRequest


class OrtEngine(TorchEngine):
    platform = "wara_onnxruntime"

    def __init__(self, base: BaseSpec | str, *, slots: int = 16, max_rank: int = 32, device: str | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        super().__init__(base, slots=slots, max_rank=max_rank, device="cpu")
        try:
            from exporter.onnx_export import INDEX_INPUT, export_multi_graph, model_io
            from exporter.slots import slot_feeds, slot_input_names
            from exporter.verify import ort_session
        except ImportError as e:
            raise ConfigError(f"the onnxruntime backend needs the 'export' and 'cpu' extras ({e})") from None
        self._index_input = INDEX_INPUT
        self._slot_feeds, self._slot_names = slot_feeds, slot_input_names
        self.io = model_io(self.spec)
        # Axes the graph takes at any size; every other axis must match the export sample.
        self._fixed = [[a for a in range(t.dim()) if a not in dyn] for t, dyn in zip(self.io.sample, self.io.dynamic)]
        shapes = {n: layer_shape(layer.base) for n, layer in self.layers.items()}
        self._tmp = tempfile.TemporaryDirectory(prefix="wara-ort-")
        path = export_multi_graph(self.model, list(self.layers), shapes, self.io, Path(self._tmp.name) / "multi.onnx")
        # No busy-waiting between runs: on a few cores the spinning workers starve the gRPC and
        # batcher threads (one pinned core: batch-1 request 12.0 -> 7.0 ms in-process).
        self.session = ort_session(str(path), providers=providers, spinning=False)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.slot_feeds: dict[str, np.ndarray] = {}
        self._rank_in_use = -1
        self._slot_written(0)
        missing = [n for n in self.input_names if n.startswith("wara.") and n not in self.slot_feeds]
        if missing:
            raise ConfigError(f"internal: the multi graph wants unknown slot inputs {missing[:3]}")
        self._check_against_torch()

    def _check_against_torch(self) -> None:
        """A graph that exported is not yet a graph that answers right (a baked-in shape, a
        decoder mask): compare it with the PyTorch forward on samples of several shapes (one
        token included) and refuse the engine if they differ."""
        rtol, atol = 1e-3, 1e-4
        slots = None
        for batch, seq in ((1, 1), (3, 5), (2, 17)):
            sample = self.spec.sample(batch, seq)
            slots = torch.zeros(batch, dtype=torch.long)
            with torch.no_grad():
                want = TorchEngine._features(self, sample, slots, [])
            got = self._features(sample, slots, [])
            if got.shape != want.shape or not torch.allclose(got, want.float(), rtol=rtol, atol=atol):
                err = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
                raise ConfigError(f"the onnxruntime graph of {self.base_model} disagrees with PyTorch at batch {batch}, "
                                  f"length {seq} (max abs error {err:.2e})")

    def _slot_written(self, index: int) -> None:
        """Keep the graph's slot inputs as compact copies cut to the largest rank in use, so the
        graph never multiplies by the zero padding up to ``max_rank`` (the rank axis is dynamic).
        A write copies one slot; only a new largest rank re-lays every slot out."""
        rank = max(1, max(max(layer.ranks) for layer in self.layers.values()))
        if rank != self._rank_in_use:
            self._rank_in_use = rank
            self.slot_feeds = self._slot_feeds({n: (layer.lora_A, layer.lora_B) for n, layer in self.layers.items()}, rank)
            return
        for name, layer in self.layers.items():
            a_name, b_name = self._slot_names(name)
            self.slot_feeds[a_name][index] = layer.lora_A[index, :rank].numpy()
            self.slot_feeds[b_name][index] = layer.lora_B[index, :, :rank].numpy()

    def _pad(self, t: torch.Tensor, dynamic: dict[int, str]) -> torch.Tensor:
        """Token inputs shorter than the graph's smallest length (torch.export specialises a
        length of 1, so the graph starts at 2) are right-padded with zeros: pad id 0 under a
        zero attention mask, which changes no real token's output."""
        if t.is_floating_point():
            return t
        for axis, name in dynamic.items():
            low = self.io.bounds.get(name, (1, None))[0]
            if axis > 0 and t.shape[axis] < low:
                pad = [0, 0] * (t.dim() - 1 - axis) + [0, low - t.shape[axis]]
                t = torch.nn.functional.pad(t, pad)
        return t

    def _features(self, inputs, slot_t, groups) -> torch.Tensor:
        for name, t, sample, fixed in zip(self.io.input_names, inputs, self.io.sample, self._fixed):
            if any(t.shape[a] != sample.shape[a] for a in fixed):
                want = ["any" if a not in fixed else sample.shape[a] for a in range(sample.dim())]
                raise InvalidRequest(f"the onnxruntime engine of {self.base_model} takes {name!r} of shape {want}, "
                                     f"got {list(t.shape)} (serve it with backend 'torch' for other sizes)")
        feeds = {n: self._pad(t, dyn).numpy() for n, t, dyn in zip(self.io.input_names, inputs, self.io.dynamic)}
        feeds[self._index_input] = slot_t.numpy().astype(np.int64)
        feeds.update(self.slot_feeds)
        return torch.from_numpy(self.session.run(None, feeds)[0])
