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

from wara_train.errors import ConfigError

from .engine import TorchEngine
from .errors import InvalidRequest


class OrtEngine(TorchEngine):
    platform = "wara_onnxruntime"

    def __init__(self, base_model: str, *, slots: int = 16, max_rank: int = 32, device: str | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        super().__init__(base_model, slots=slots, max_rank=max_rank, device="cpu")
        try:
            from exporter.onnx_export import INDEX_INPUT, export_multi_graph, model_io
            from exporter.verify import ort_session
        except ImportError as e:
            raise ConfigError(f"the onnxruntime backend needs the 'export' and 'cpu' extras ({e})") from None
        self._index_input = INDEX_INPUT
        self.io = model_io(base_model)
        shapes = {n: (layer.base.weight.shape[0], layer.base.weight.shape[1]) for n, layer in self.layers.items()}
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

    def _slot_written(self, index: int) -> None:
        """Keep the graph's slot inputs as compact copies cut to the largest rank in use, so the
        graph never multiplies by the zero padding up to ``max_rank`` (the rank axis is dynamic).
        A write copies one slot; only a new largest rank re-lays every slot out."""
        rank = max(1, max(max(layer.ranks) for layer in self.layers.values()))
        if rank != self._rank_in_use:
            self._rank_in_use = rank
            for name, layer in self.layers.items():
                self.slot_feeds[f"wara.{name}.lora_A"] = np.ascontiguousarray(layer.lora_A[:, :rank].numpy())
                self.slot_feeds[f"wara.{name}.lora_B"] = np.ascontiguousarray(layer.lora_B[:, :, :rank].numpy())
            return
        for name, layer in self.layers.items():
            self.slot_feeds[f"wara.{name}.lora_A"][index] = layer.lora_A[index, :rank].numpy()
            self.slot_feeds[f"wara.{name}.lora_B"][index] = layer.lora_B[index, :, :rank].numpy()

    def _features(self, inputs, slot_t, groups) -> torch.Tensor:
        if self.base_model != "minilm" and tuple(inputs[0].shape[1:]) != tuple(self.io.sample[0].shape[1:]):
            raise InvalidRequest(f"the onnxruntime backend of {self.base_model} takes images of shape "
                                 f"{list(self.io.sample[0].shape[1:])}, got {list(inputs[0].shape[1:])}")
        feeds = {n: t.numpy() for n, t in zip(self.io.input_names, inputs)}
        feeds[self._index_input] = slot_t.numpy().astype(np.int64)
        feeds.update(self.slot_feeds)
        return torch.from_numpy(self.session.run(None, feeds)[0])
