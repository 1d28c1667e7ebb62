"""The onnxruntime engine: the exporter's ``multi`` graph with the slot factors bound as inputs.

It shares everything but the forward with `TorchEngine` (validation, folding, the page pool,
per-row heads). The graph takes slot stacks (S, R, n) and (S, m, R) and gathers each row's
slot itself. A batch of one adapter binds that adapter's pool views as they are, without a copy.
Mixed batches bind *resident stacks*: one (rows, R, n) / (m, R) pair per layer, kept up to date
as slots are written (row s holds slot s, R the largest resident rank), so a batch copies
nothing. Where that padding would cost too much (the resident ranks differ widely, or the stacks
would outgrow twice the device pool), a mixed batch copies its own adapters' factors into
stacks at its largest rank instead.
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

from .engine import DEFAULT_DEVICE_BUDGET_MB, TorchEngine
from .errors import InternalError, InvalidRequest


class OrtEngine(TorchEngine):
    platform = "wara_onnxruntime"

    def __init__(self, base: BaseSpec | str, *, device_budget_mb: float = DEFAULT_DEVICE_BUDGET_MB, max_rank: int = 128,
                 device: str | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        # The multi graph takes folded factors as inputs: its slots never hold own factors.
        super().__init__(base, device_budget_mb=device_budget_mb, max_rank=max_rank, device="cpu", slot_form="folded")
        try:
            from exporter.onnx_export import INDEX_INPUT, export_multi_graph, model_io
            from exporter.slots import slot_input_names
            from exporter.verify import ort_session
        except ImportError as e:
            raise ConfigError(f"the onnxruntime backend needs the 'export' and 'cpu' extras ({e})") from None
        self._index_input = INDEX_INPUT
        self._slot_names = slot_input_names
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
        # A batch without adapter rows binds one all-zero slot of rank 1.
        self._base_feeds = self._stack_feeds([], 1)
        self._resident: dict[str, np.ndarray] = {}  # input name -> resident stack (see the module)
        self._resident_rank = 0
        missing = [n for n in self.input_names if n.startswith("wara.") and n not in self._base_feeds]
        if missing:
            raise InternalError(f"the multi graph wants unknown slot inputs {missing[:3]}")
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

    def _stack_feeds(self, slots: list[int], rank: int) -> dict[str, np.ndarray]:
        """Slot stacks for a batch: slot 0 zeros, slot i+1 = ``slots[i]``'s factors, at ``rank``."""
        feeds = self._stacks(len(slots) + 1, rank)
        for i, s in enumerate(slots, start=1):
            self._fill_row(feeds, i, s, zeroed=True)
        return feeds

    def _stacks(self, rows: int, rank: int) -> dict[str, np.ndarray]:
        """All-zero stacks of ``rows`` slots at ``rank``, one (A, B) pair per adapted layer."""
        feeds = {}
        for name, layer in self.layers.items():
            a_name, b_name = self._slot_names(name)
            feeds[a_name] = np.zeros((rows, rank, layer.n), dtype=np.float32)
            feeds[b_name] = np.zeros((rows, layer.m, rank), dtype=np.float32)
        return feeds

    def _fill_row(self, feeds: dict[str, np.ndarray], row: int, slot: int, *, zeroed: bool = False) -> None:
        """Row ``row`` of ``feeds``: slot ``slot``'s factors zero-padded to the stacks' rank
        (all zeros if the slot holds nothing; ``zeroed``: the row is all zeros already)."""
        held = slot in self.slot_pages
        for name, layer in self.layers.items():
            a_name, b_name = self._slot_names(name)
            a, b = feeds[a_name], feeds[b_name]
            if not zeroed:
                a[row], b[row] = 0.0, 0.0
            f = layer.factors(slot) if held else None
            if f is not None:
                a[row, : f[0].shape[0]] = f[0].numpy()
                b[row, :, : f[1].shape[1]] = f[1].numpy()

    def _batch_feeds(self, slot_t: torch.Tensor, groups: list[tuple[int, torch.Tensor]]) -> tuple[dict, np.ndarray]:
        """(slot feeds, per-row index into them) for one batch."""
        if not groups:
            return self._base_feeds, np.zeros(slot_t.shape[0], dtype=np.int64)
        if len(groups) == 1 and groups[0][1].numel() == slot_t.shape[0]:  # one adapter: its pool views, no copy
            slot = groups[0][0]
            feeds = {}
            for name, layer in self.layers.items():
                a_name, b_name = self._slot_names(name)
                f = layer.factors(slot)
                if f is None:
                    feeds[a_name], feeds[b_name] = self._base_feeds[a_name], self._base_feeds[b_name]
                else:
                    feeds[a_name], feeds[b_name] = f[0].numpy()[None], f[1].numpy()[None]
            return feeds, np.zeros(slot_t.shape[0], dtype=np.int64)
        slots = [s for s, _ in groups]
        rank = max(1, max(self.slot_pages[s] for s in slots))
        index = np.zeros(slot_t.shape[0], dtype=np.int64)
        if self._resident and rank * 2 >= self._resident_rank:  # the resident stacks, row s = slot s
            for s, rows in groups:
                index[rows.numpy()] = s
            return self._resident, index
        for i, (_, rows) in enumerate(groups, start=1):
            index[rows.numpy()] = i
        return self._stack_feeds(slots, rank), index

    def _slot_written(self, slot: int) -> None:
        """Keep the resident stacks in step with the pool (under the engine's lock): write the
        slot's row, or rebuild the stacks (rows doubled, or the rank raised) when it does not
        fit; drop them while they would take more than twice the pool."""
        runs = self.slot_pages
        top = max(runs, default=0) + 1
        rank = max(runs.values(), default=0)
        rows = next(iter(self._resident.values())).shape[0] if self._resident else 0
        if self._resident and top <= rows and rank <= self._resident_rank:
            self._fill_row(self._resident, slot, slot)  # row s = slot s
            return
        rows, rank = rows if top <= rows else max(top, 2 * rows), max(rank, self._resident_rank)
        self._resident, self._resident_rank = {}, 0
        if not runs or rows * rank > 2 * self.pages:  # mixed batches copy their own adapters instead
            return
        self._resident, self._resident_rank = self._stacks(rows, rank), rank
        for s in runs:
            self._fill_row(self._resident, s, s, zeroed=True)

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
        slot_feeds, feeds[self._index_input] = self._batch_feeds(slot_t, groups)
        feeds.update(slot_feeds)
        return torch.from_numpy(self.session.run(None, feeds)[0])
