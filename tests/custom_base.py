"""A user's own torch module as a base (``py:custom_base:tiny_vision_base``), for the tests.

What a user writes: a factory returning the plain model and its `BaseSpec` (``build`` left
None: every build is a copy of this model). Pointwise convs carry the adapters; the 3x3 stem
cannot.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from wara_train.basespec import BaseSpec, TensorSpec

SIZE = 16
LABELS = ("a", "b", "c", "d")


class TinyVisionNet(nn.Module):
    def __init__(self, num_labels: int = len(LABELS)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 32, 1)
        self.project = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, num_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(images))
        h = h + self.project(torch.relu(self.expand(h)))
        return self.head(torch.relu(self.fc(h.mean(dim=(2, 3)))))


class ToTensor:
    """PIL images -> (B, 3, SIZE, SIZE) in [0, 1]."""

    def __call__(self, images: Sequence[Any]) -> tuple[torch.Tensor]:
        arrs = [np.asarray(im.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32) / 255.0 for im in images]
        return (torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous(),)


def _sample(batch: int, seq: int) -> tuple[torch.Tensor]:
    return (torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch)),)


def spec(model_build=None, **changes) -> BaseSpec:
    fields = dict(
        name="tinyvision", source="", task="custom", build=model_build,
        inputs=(TensorSpec("images", "FP32", (-1, 3, SIZE, SIZE)),), head="head", output="logits", labels=LABELS,
        sample=_sample, default_targets=("expand", "project", "fc"), raw_input="image",
        preprocessor=lambda max_length=None: ToTensor(), onnx_dynamic=({0: "batch"},), backends=("torch", "onnxruntime"),
        description="a tiny custom CNN (tests/custom_base.py)",
    )
    fields.update(changes)
    return BaseSpec(**fields)


def tiny_vision_base():
    torch.manual_seed(0)
    return TinyVisionNet().eval(), spec()


class NoAdaptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(images).mean(dim=(2, 3)))


def no_adaptable_base():
    """A model whose only Linear is its head: nothing for WaRA to adapt."""
    return NoAdaptable().eval(), spec(default_targets=None, labels=("a", "b"))


class DataDependent(TinyVisionNet):
    """The same net with a branch on the data: torch.export (hence ONNX export) refuses it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)
        return logits if float(images.mean()) > -10.0 else -logits


def unexportable_base():
    torch.manual_seed(0)
    return DataDependent().eval(), spec(backends=("onnxruntime", "torch"))
