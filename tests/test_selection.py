"""Backend and kernel choices (`runtime.selection`): the table over faked machines, and the
Triton kernels reached from serving. A real `TorchEngine` forward runs through `triton_lora`
(Triton's interpreter on the CPU where there is no GPU) and matches the pure-PyTorch kernel
`grouped_lora`, and the pywt float64 oracle (`references.merge_into`) for one adapter."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton_ops' kernels are decorated

from runtime import native  # noqa: E402
from runtime.kernels import KERNELS, grouped_lora, native_lora, triton_lora  # noqa: E402
from runtime.selection import ADAPTER_KERNELS, adapter_kernel, op_backend  # noqa: E402


class FakeStatus:
    """The native library's state as `runtime.native.load` reports it, recording which of its
    fields a rule read."""

    def __init__(self, native: bool, cuda: bool = False) -> None:
        self._fields = {"native": native, "cuda": cuda, "info": "wara_kernels fake cpu" + (" cuda" if cuda else ""),
                        "reason": None if native else "disabled by WARA_NATIVE=0"}
        self.read: list[str] = []

    def __getattr__(self, name: str):
        if name not in self._fields:
            raise AttributeError(name)
        self.read.append(name)
        return self._fields[name]


# device, native library loaded, with CUDA kernels, triton installed -> op backend, adapter kernel
MACHINES = [
    ("cpu", True, False, True, "native", native_lora),
    ("cpu", True, False, False, "native", native_lora),
    ("cpu", False, False, True, "torch", grouped_lora),  # Triton is for GPUs: never chosen on a CPU
    ("cpu", False, False, False, "torch", grouped_lora),
    ("cuda", True, True, True, "native", native_lora),
    ("cuda", True, True, False, "native", native_lora),
    ("cuda", True, False, True, "triton", triton_lora),  # a library built without a CUDA toolkit
    ("cuda", False, False, True, "triton", triton_lora),
    ("cuda", True, False, False, "torch", grouped_lora),
    ("cuda", False, False, False, "torch", grouped_lora),
    ("mps", True, False, True, "torch", grouped_lora),  # a device no fused op is built for
]


@pytest.mark.parametrize("device,loaded,cuda,triton,backend,kernel", MACHINES)
def test_the_selection_table(device, loaded, cuda, triton, backend, kernel):
    status = FakeStatus(loaded, cuda)
    assert op_backend(device, status, triton) == backend
    if device == "cpu":
        assert "cuda" not in status.read  # a CPU choice never asks about CUDA kernels
    name, what = adapter_kernel(torch.device(device), FakeStatus(loaded, cuda), triton)
    assert KERNELS[name] is kernel
    if backend == "native":
        assert what == f"native sgmv + wavelet_lowrank (wara_kernels fake cpu{' cuda' if cuda else ''})"
    else:
        why = "disabled by WARA_NATIVE=0" if not loaded else f"no native kernel for {device}"
        kind = "triton sgmv + wavelet_lowrank" if backend == "triton" else "pure PyTorch grouped_lora"
        assert what == f"{kind} ({why})"


def test_every_kernel_the_table_names_is_registered_and_only_the_native_one_calls_the_library_whole():
    assert {name for name, _ in ADAPTER_KERNELS.values()} == set(KERNELS)
    assert native_lora.reads_own_factors and triton_lora.reads_own_factors
    assert not getattr(grouped_lora, "reads_own_factors", False)
    assert getattr(triton_lora, "linear", None) is None and native_lora.linear is not None


def test_this_machine_serves_the_native_kernel_on_cpu():
    """`make test` builds the library: on this CPU the engine's kernel stays `native_lora`."""
    st = native.load()
    assert st.native, st.reason
    name, _ = adapter_kernel("cpu", st, native.triton_available())
    assert KERNELS[name] is native_lora


# ------------------------------------------------------------------------------------------
# The engine through the Triton kernel: compiled on a GPU, interpreted on the CPU otherwise.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASE = "py:custom_base:tiny_vision_base"  # pointwise convs (a strided (B, HW, C) input) and a Linear


class Recorder:
    """Stands in for an op implementation's function, counting its calls."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


class NoLibrary:
    """Stands where ``torch.ops.wara`` is: the Triton route must not reach the native library."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the Triton kernel reached torch.ops.wara.{name}")


def test_the_engine_serves_through_the_triton_kernel(tmp_path, monkeypatch):
    """Own-factor slots (haar J=1, db2 J=2) and a folded slot with base rows in one batch, then
    each form on every row: `triton_lora` answers as `grouped_lora` on the same adapters folded,
    and adapter 0's rows as the explicit model ``W0 + ΔW(pywt)`` in float64 (cast once)."""
    pytest.importorskip("triton", reason="`make test` installs triton")
    from references import merge_into
    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine
    from runtime.native import triton_ops
    from wara_train.basespec import resolve_base
    from wara_train.synthetic import random_adapter

    if DEVICE == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the oracle runs exact convs on the CPU
    spec = resolve_base(BASE)
    kinds = [dict(wavelet="haar", levels=1, rank=2), dict(wavelet="db2", levels=2, rank=2),
             dict(wavelet="haar", levels=1, rank=3)]
    adapters = [random_adapter(spec, tmp_path / f"a{i}", seed=i, num_labels=4, **k) for i, k in enumerate(kinds)]
    tri = TorchEngine(spec, device=DEVICE, kernel=triton_lora, slot_form="own")
    ref = TorchEngine(spec, device=DEVICE, kernel=grouped_lora)
    assert tri.kernel_name == "triton_lora" and tri.slot_form == "own" and ref.slot_form == "folded"
    assert all(layer.linear is None for layer in tri.layers.values())  # no whole-layer native call
    tri_tier, ref_tier = DeviceTier(tri), DeviceTier(ref)
    folded = [prepare(ref, f"a{i}", a) for i, a in enumerate(adapters)]
    own = [prepare(tri, f"a{i}", a) for i, a in enumerate(adapters[:2])]
    assert [f.form for f in own] == ["own", "own"] and {f.form for f in folded} == {"folded"}
    for slot, f in enumerate(folded, start=1):
        ref_tier.write(slot, f)
    tri_tier.write(1, own[0])
    tri_tier.write(2, own[1])
    tri_tier.write(3, folded[2])  # a folded slot next to own ones: sgmv and wavelet_lowrank in one layer

    calls = {op: Recorder(getattr(triton_ops, op)) for op in ("sgmv", "wavelet_lowrank")}
    for op, recorder in calls.items():
        monkeypatch.setattr(triton_ops, op, recorder)
    monkeypatch.setattr(torch.ops, "wara", NoLibrary(), raising=False)
    # 4 x 4 images (16 tokens each on the pointwise convs): the interpreter runs each program in numpy
    images = (torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)),)
    for slots in ([1, 0, 2, 3, 1], [2, 2, 2, 2, 2], [3, 0, 3, 3, 0]):
        got, want = tri.forward(images, slots), ref.forward(images, slots)
        for row, (g, w) in enumerate(zip(got, want)):
            assert g.keys() == w.keys(), (slots, row)
            for key in g:
                assert_close(g[key], w[key], msg=f"slots {slots} row {row} {key}")
    assert calls["sgmv"].calls > 0 and calls["wavelet_lowrank"].calls > 0
    monkeypatch.undo()  # the oracle below runs plain torch

    head = adapters[0].saved_modules[spec.head]
    model = merge_into(spec.build(int(head["weight"].shape[0])), adapters[0])
    for name, params in adapters[0].saved_modules.items():
        model.get_submodule(name).load_state_dict(params)
    with torch.no_grad():
        oracle = model.eval()(*images)
    got = tri.forward(images, [1, 0, 2, 3, 1])
    for row in (0, 4):
        assert_close(got[row]["logits"], oracle[row])
