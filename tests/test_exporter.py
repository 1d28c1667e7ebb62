"""Exporter invariance: every exported form == the PyTorch unmerged model (STYLE.md 5)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from exporter.common import base_for, load_with_base, resolve_adapter_base
from exporter.lora import save_peft_lora
from exporter.merge import merged_model, merged_state_dict
from exporter.onnx_export import export_onnx, model_io
from exporter.verify import ort_session, pack_slots, reference_model, verify_onnx
from helpers import assert_close, tol
from wara_train.artifact import load_adapter, save_adapter
from wara_train.bases import build_base
from wara_train.config import WaraConfig
from wara_train.errors import ConfigError, IncompatibleAdapterError
from wara_train.synthetic import randomize_factors as randomize
from wara_train.synthetic import random_adapter
from wara_train.model import inject, wara_layers

F32 = torch.float32  # every form is checked at float32's tolerance (helpers.TOLERANCES)
ATOL = tol(F32)[1]  # what verify_onnx, which checks absolute error only, is given
MODELS = ["minilm", "effnet-lite0"]
ADAPTERS = [("haar", 1), ("db2", 2)]
NUM_LABELS = 5


def pywt_reference(adapter, spec, inputs) -> torch.Tensor:
    """What ``adapter`` answers, from ``W0 + ΔW(pywt)`` (`references.merge_into`) written into a
    fresh plain model, independent of our transforms and merge: for a transformers base the
    transformers model itself, mean-pooled and through the adapter's head by hand; for any other,
    a fresh build of the base module with the adapter's saved modules."""
    import torch.nn.functional as F

    from references import merge_into

    head = adapter.saved_modules.get(spec.head)
    with torch.no_grad():
        if spec.hf is None:
            model = merge_into(spec.build(int(head["weight"].shape[0]) if head else None), adapter)
            for name, params in adapter.saved_modules.items():
                model.get_submodule(name).load_state_dict(params)
            return model.eval()(*inputs)
        import transformers

        assert spec.task == "feature-extraction", spec.task
        model = transformers.AutoModel.from_pretrained(spec.hf.path, local_files_only=True).eval()
        merge_into(model, adapter, prefix=spec.hf.prefix + ".")
        ids, mask = inputs
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1) if head is None else F.linear(pooled, head["weight"], head.get("bias"))


def run_multi(path, adapters, base, io, rows) -> torch.Tensor:
    """A ``multi`` graph run in onnxruntime on ``io.sample``, row b on slot ``rows[b] + 1``
    (-1: the base)."""
    sess = ort_session(str(path))
    feeds = {n: t.numpy() for n, t in zip(io.input_names, io.sample)}
    feeds.update(pack_slots([i.name for i in sess.get_inputs()], adapters, base))
    feeds["adapter_index"] = np.asarray([r + 1 for r in rows], dtype=np.int64)
    return torch.from_numpy(sess.run(None, feeds)[0])


def make_adapter(base_name: str, wavelet: str, levels: int, out, seed: int = 0):
    return random_adapter(base_name, out, wavelet=wavelet, levels=levels, rank=2, num_labels=NUM_LABELS, seed=seed)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Adapters for both models and both wavelet settings, their bases and one export cache."""
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for base_name in MODELS:
        for k, (wavelet, levels) in enumerate(ADAPTERS):
            adapter = make_adapter(base_name, wavelet, levels, root / f"{base_name}-{wavelet}", seed=k + 1)
            made[(base_name, wavelet)] = (adapter, base_for(adapter))
    return root, made, {}


@pytest.mark.slow
@pytest.mark.parametrize("base_name", MODELS)
@pytest.mark.parametrize("wavelet,levels", ADAPTERS)
@pytest.mark.parametrize("form", ["merged", "unmerged"])
def test_onnx_single_adapter_forms_match_pytorch(exports, base_name, wavelet, levels, form):
    root, made, cache = exports
    adapter, base = made[(base_name, wavelet)]
    path = export_onnx(adapter, base, form, root / f"{base_name}-{wavelet}-{form}.onnx", log=lambda s: None, _cache=cache)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 20
    functions = {f.name for f in model.functions if f.domain == "wara"}
    ops = {n.op_type for n in model.graph.node if n.domain == "wara"}
    if form == "unmerged":
        assert ops and ops <= {"WaraDWT1D", "WaraIDWT1D"} and ops == functions
    else:
        assert not ops and not functions
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and (base_name != "minilm" or dims[1] == "seq")
    # A batch and sequence length different from the export sample: the axes are dynamic.
    result = verify_onnx(str(path), [adapter], base, io=model_io(base_name, batch=3, seq=24), atol=ATOL)
    assert result.provider == "CPUExecutionProvider"
    assert result.ok, str(result)


@pytest.mark.slow
@pytest.mark.parametrize("base_name", MODELS)
def test_onnx_multi_serves_a_heterogeneous_batch(exports, base_name):
    """One graph, slot factors as inputs: rows of two adapters (folded ranks 8 and 14, padded)
    and of the base in one batch, each equal to its own PyTorch model."""
    root, made, cache = exports
    a1, base = made[(base_name, "haar")]
    a2, _ = made[(base_name, "db2")]
    path = export_onnx(a1, base, "multi", root / f"{base_name}-multi.onnx", log=lambda s: None, _cache=cache)
    rows = [0, 1, -1, 1, 0]
    io = model_io(base_name, batch=len(rows), seq=20)
    result = verify_onnx(str(path), [a1, a2], base, io=io, rows=rows, atol=ATOL)
    assert result.provider == "CPUExecutionProvider"
    assert result.ok, str(result)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    # The adapters' rows against the independent pywt reference.
    got = run_multi(path, [a1, a2], base, io, rows)
    spec = resolve_adapter_base(a1)
    for k, adapter in enumerate((a1, a2)):
        picked = [r for r, row in enumerate(rows) if row == k]
        want = pywt_reference(adapter, spec, tuple(t[picked] for t in io.sample))
        assert_close(got[picked, : want.shape[1]], want, dtype=F32)


@pytest.mark.slow
@pytest.mark.parametrize("base_name", MODELS)
@pytest.mark.parametrize("wavelet,levels", ADAPTERS)
def test_folded_lora_reproduces_outputs_through_peft(exports, tmp_path, base_name, wavelet, levels):
    from peft import PeftModel

    _, made, _ = exports
    adapter, base = made[(base_name, wavelet)]
    out = save_peft_lora(adapter, tmp_path / "lora", base=base)  # no spec: our module's names
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == (3 * levels + 1) * 2 and cfg["lora_alpha"] == cfg["r"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    io = model_io(base_name, batch=3, seq=24)
    with torch.no_grad():
        want = reference_model(adapter, base)(*io.sample)
        got = peft_model(*io.sample)
    assert_close(got, want, dtype=F32)


@pytest.mark.slow
@pytest.mark.parametrize("base_name", MODELS)
def test_merge_matches_unmerged_and_leaves_base_bit_identical(exports, base_name):
    _, made, _ = exports
    adapter, base = made[(base_name, "db2")]
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    io = model_io(base_name, batch=3, seq=24)
    for _ in range(3):  # repeated merges never drift: each starts from the pristine base
        merged = merged_model(base, [(adapter, 1.0)]).eval()
    assert all(torch.equal(pristine[k], v) for k, v in base.state_dict().items())
    with torch.no_grad():
        assert_close(merged(*io.sample), reference_model(adapter, base)(*io.sample), dtype=F32)
    # Parameter names are the base model's own.
    assert set(merged_state_dict(base, [(adapter, 1.0)])) == set(base.state_dict())


def test_blend_is_the_weighted_sum_of_deltas(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    adapters = []
    for k in range(2):
        model = copy.deepcopy(net)
        inject(model, WaraConfig(rank=2, target_modules=("0",)), seed=k)
        randomize(wara_layers(model)["0"], k)
        save_adapter(model, tmp_path / str(k), base_model="toy")
        adapters.append((load_adapter(tmp_path / str(k)), wara_layers(model)["0"].delta_weight()))
    state = merged_state_dict(net, [(adapters[0][0], 0.25), (adapters[1][0], 0.75)])
    want = net[0].weight + 0.25 * adapters[0][1] + 0.75 * adapters[1][1]
    assert torch.allclose(state["0.weight"], want, atol=1e-6)
    bf16 = merged_state_dict(net, [(adapters[0][0], 1.0)], dtype=torch.bfloat16)
    assert bf16["0.weight"].dtype == torch.bfloat16
    other = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with pytest.raises(IncompatibleAdapterError, match="fingerprint"):
        merged_state_dict(other, [(adapters[0][0], 1.0)])


def test_ort_session_asserts_the_provider(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    sess = ort_session(str(path))
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    np.testing.assert_array_equal(sess.run(None, {"x": np.array([-1.0, 2.0], dtype=np.float32)})[0], [0.0, 2.0])
    # onnxruntime only warns and falls back to CPU for a provider it lacks; we refuse instead.
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="runs on CPUExecutionProvider, not the requested"):
        ort_session(str(path), providers=("NoSuchExecutionProvider",))


def test_tensorrt_absent_gives_an_error_naming_the_extra():
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from exporter.tensorrt import build_engine

        with pytest.raises(ConfigError, match="'tensorrt' extra"):
            build_engine("model.onnx", "model.plan")
    else:
        pytest.skip("tensorrt is installed: the engine build test below covers it")


@pytest.mark.slow
def test_tensorrt_engine_builds(exports, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on these CPU machines (DESIGN.md 6)")
    from exporter.tensorrt import build_engine

    root, made, cache = exports
    adapter, base = made[("minilm", "haar")]
    path = export_onnx(adapter, base, "unmerged", tmp_path / "u.onnx", log=lambda s: None, _cache=cache)
    assert build_engine(path, tmp_path / "u.plan", precision="fp16", log=lambda s: None).stat().st_size > 0


@pytest.mark.slow
def test_cli_export_and_verify(exports, tmp_path):
    root, _, _ = exports
    adapter_dir = root / "effnet-lite0-db2"

    def wara(*args):
        return subprocess.run([sys.executable, "-m", "wara", "export", *args], capture_output=True, text=True)

    proc = wara("onnx", "--adapter", str(adapter_dir), "--form", "unmerged", "--out", str(tmp_path / "u.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "splicing" in proc.stdout
    proc = wara("verify", "--adapter", str(adapter_dir), "--exported", str(tmp_path / "u.onnx"))
    assert proc.returncode == 0 and "unmerged: max abs error" in proc.stdout and "OK" in proc.stdout, proc.stdout + proc.stderr
    proc = wara("merge", "--adapter", str(adapter_dir), "--out", str(tmp_path / "m"), "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    proc = wara("verify", "--adapter", str(adapter_dir), "--exported", str(tmp_path / "m"))
    assert proc.returncode == 1 and "FAILED" in proc.stdout  # bf16 weights are past 1e-4: non-zero exit
    proc = wara("verify", "--adapter", str(adapter_dir), "--exported", str(tmp_path / "m"), "--atol", "10")
    assert proc.returncode == 0, proc.stdout  # bf16 rounding is large on random inputs, but bounded
    proc = wara("merge", "--adapter", str(adapter_dir), "--weight", "0.5", "--weight", "0.5", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "2 --weight values for 1 --adapter" in proc.stderr


def test_export_refuses_a_wrong_base(tmp_path):
    adapter = make_adapter("effnet-lite0", "haar", 1, tmp_path / "a")
    other = build_base("effnet-lite0", num_labels=NUM_LABELS)
    with torch.no_grad():
        other._blocks[1]._expand_conv.weight.add_(0.01)
    with pytest.raises(IncompatibleAdapterError, match="a different or modified base"):
        merged_state_dict(other, [(adapter, 1.0)])


@pytest.mark.slow
def test_target_order_in_the_artifact_does_not_matter(exports, tmp_path):
    """A hand-edited artifact listing its targets out of model order still exports right: probe
    outputs are matched to layers by name, not by the order the model ran them."""
    root, made, _ = exports
    src = root / "effnet-lite0-haar"
    shutil.copytree(src, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["target_modules"] = list(reversed(cfg["target_modules"]))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = load_adapter(tmp_path / "a")
    base = made[("effnet-lite0", "haar")][1]
    path = export_onnx(adapter, base, "unmerged", tmp_path / "u.onnx", log=lambda s: None)
    result = verify_onnx(str(path), [adapter], base, io=model_io("effnet-lite0", batch=2), atol=ATOL)
    assert result.ok, str(result)


# ------------------------------------------------------------------------------------------
# the slot packer (exporter.slots): against a per-adapter loop


def test_slots_stack_pads_ranks_and_zero_fills_missing_layers():
    from exporter.slots import head_feeds, slot_feeds, slot_input_names, stack_folded

    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (6, 4), "b": (8, 8)}
    folded = [{"a": (torch.randn(2, 4, generator=gen), torch.randn(6, 2, generator=gen))},
              {"a": (torch.randn(3, 4, generator=gen), torch.randn(6, 3, generator=gen)),
               "b": (torch.randn(1, 8, generator=gen), torch.randn(8, 1, generator=gen))}]
    stacked = stack_folded(folded, shapes)
    a, b = stacked["a"]
    assert a.shape == (3, 3, 4) and b.shape == (3, 6, 3) and not a[0].any() and not b[0].any()
    x = torch.randn(5, 4, generator=gen)
    for i, f in enumerate(folded, start=1):  # padding adds nothing: each slot is its own LoRA
        la, lb = f["a"]
        torch.testing.assert_close((x @ a[i].T) @ b[i].T, (x @ la.T) @ lb.T)
    assert not stacked["b"][0][1].any() and stacked["b"][0].shape == (3, 1, 8)  # adapter 0 lacks b
    feeds = slot_feeds(stacked, rank=2)
    name_a, name_b = slot_input_names("a")
    assert feeds[name_a].shape == (3, 2, 4) and feeds[name_b].shape == (3, 6, 2)
    assert feeds[name_a].dtype == np.float32 and feeds[name_a].flags["C_CONTIGUOUS"]
    assert slot_feeds(stacked, rank=8)[name_a].shape == (3, 3, 4)  # never wider than the stack
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        slot_feeds(stacked, rank=0)
    with pytest.raises(ConfigError, match="the layer is"):
        stack_folded([{"a": (torch.zeros(2, 5), torch.zeros(6, 2))}], shapes)
    own = {"weight": torch.ones(2, 4), "bias": torch.ones(2)}
    heads = head_feeds("head", own, [{"weight": torch.full((3, 4), 2.0), "bias": torch.full((3,), 2.0)}, None])
    w, bias = heads["wara.head.weight"], heads["wara.head.bias"]
    assert w.shape == (3, 3, 4) and bias.shape == (3, 3)
    assert (w[0, :2] == 1).all() and not w[0, 2].any() and (w[1] == 2).all() and (w[2, :2] == 1).all()


# ------------------------------------------------------------------------------------------
# a py:module:function base (tests/custom_base.py): exports in our module's own layout

CUSTOM = "py:custom_base:tiny_vision_base"


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    from wara_train.basespec import resolve_base

    spec = resolve_base(CUSTOM)
    model = spec.build(None)
    inject(model, WaraConfig(rank=2, alpha=4.0, wavelet="db2", levels=1, target_modules=spec.default_targets,
                             modules_to_save=(spec.head,)), seed=0)
    for i, layer in enumerate(wara_layers(model).values()):
        randomize(layer, 10 + i)
    with torch.no_grad():
        model.get_submodule(spec.head).bias.add_(0.5)
    out = tmp_path_factory.mktemp("custom") / "adapter"
    save_adapter(model, out, base_model=spec.name, labels=list(spec.labels), base_source=spec.source)
    adapter = load_adapter(out)
    return out, adapter, spec, base_for(adapter, spec)  # a py: base is never resolved on the artifact's word


def test_custom_base_merge_and_lora(custom, tmp_path):
    from peft import PeftModel

    from exporter.merge import INFO_FILE, load_merged, save_merged
    from exporter.verify import verify_exported

    adapter_dir, adapter, spec, base = custom
    io = model_io(spec, batch=3)
    want = pywt_reference(adapter, spec, io.sample)
    with torch.no_grad():
        out = save_merged(base, [(adapter, 1.0)], tmp_path / "merged", spec=spec)
        assert json.loads((out / INFO_FILE).read_text())["layout"] == "module"
        with pytest.raises(ConfigError, match=f"pass --base {CUSTOM}"):  # the provenance names code
            load_merged(out)
        assert_close(load_merged(out, spec)(*io.sample), want, dtype=F32)
        lora = save_peft_lora(adapter, tmp_path / "lora", spec=spec, base=base)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(lora)).eval()
        assert_close(peft_model(*io.sample), want, dtype=F32)
    assert verify_exported(adapter_dir, out, source=CUSTOM).ok and verify_exported(adapter_dir, lora, source=CUSTOM).ok


def test_custom_base_onnx_multi(custom, tmp_path):
    adapter_dir, adapter, spec, base = custom
    path = export_onnx(adapter, base, "multi", tmp_path / "multi.onnx", spec=spec, log=lambda s: None)
    rows = [0, -1, 0, 0]
    result = verify_onnx(str(path), [adapter], base, spec=spec, rows=rows, atol=ATOL)
    assert result.ok, str(result)
    io = model_io(spec, batch=len(rows))
    got = run_multi(path, [adapter], base, io, rows)
    want = pywt_reference(adapter, spec, io.sample)  # merge_into on a fresh factory model
    assert_close(got[[0, 2, 3]], want[[0, 2, 3]], dtype=F32)
    with torch.no_grad():
        assert_close(got[[1]], spec.build(None)(*io.sample)[[1]], dtype=F32)  # the base row


def test_a_factory_source_recorded_in_an_adapter_is_not_imported(custom, tmp_path, monkeypatch):
    """An artifact is data: its recorded ``py:`` base is code, run only when asked for (--base)."""
    adapter_dir, _, _, _ = custom
    marker = tmp_path / "imported"
    (tmp_path / "wara_recorded_factory.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom custom_base import tiny_vision_base as make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    copied = tmp_path / "adapter"
    shutil.copytree(adapter_dir, copied)
    cfg = json.loads((copied / "adapter_config.json").read_text())
    source = cfg["base_source"] = "py:wara_recorded_factory:make"
    (copied / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = load_adapter(copied)
    with pytest.raises(ConfigError, match=f"factory base '{source}'.*pass --base {source}"):
        resolve_adapter_base(adapter)
    with pytest.raises(ConfigError, match=f"pass --base {source}"):
        load_with_base(copied)
    assert not marker.exists() and "wara_recorded_factory" not in sys.modules
    _, spec, base = load_with_base(copied, source)  # asked for: imported, and the fingerprint fits
    assert marker.exists() and spec.source == source and base is not None
