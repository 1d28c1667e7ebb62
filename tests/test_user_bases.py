"""The user's own models as bases (issue 10), as a user runs them: `wara train --base ...` on a
JSONL file or an image folder, `wara serve --base NAME=SOURCE` in its own process, tritonclient
in another, and `wara export`. Every answer is checked against an independent reference: the
plain transformers (or torch) model loaded by the test itself, with ``W0 + ΔW`` computed by
pywt merged in (tests/references.py).

Bases: a tiny BERT text classifier, a tiny ViT image classifier, a tiny GPT-2 (Conv1D layers)
as a feature extractor, a custom torch module through ``py:custom_base:tiny_vision_base``, and
the built-ins next to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tol

import tiny_models as tm
from references import merge_into

TESTS = Path(__file__).resolve().parent
CLIENT = TESTS / "clients" / "triton_client.py"
TEXTS = ["this movie was really great", "the food is awful and sad", "it was okay i guess", "hello world"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
RTOL, ATOL = tol(torch.float32)


def wara(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wara", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def wara_main(*args) -> int:
    """The CLI in this process (the same code path as the command, without a new interpreter)."""
    from wara.cli import main

    return main([str(a) for a in args])


# ------------------------------------------------------------------------------------------
# independent references: the plain model as transformers (or the factory) builds it


class References:
    def __init__(self, world: dict) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.w = world
        self.tok = {k: AutoTokenizer.from_pretrained(world[k]) for k in ("bert", "gpt2")}
        self.tok["gpt2"].pad_token = self.tok["gpt2"].eos_token
        from wara_train.bases import _minilm_dir

        self.tok["minilm"] = AutoTokenizer.from_pretrained(_minilm_dir())
        self.proc = AutoImageProcessor.from_pretrained(world["vit"])
        self.models: dict = {}

    def _text(self, kind: str, text: str) -> dict:
        enc = self.tok[kind]([text], truncation=True, max_length=128, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def model(self, name: str):
        """(callable text/image -> output row, output key) for a served model name."""
        if name in self.models:
            return self.models[name]
        from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification

        from wara_train.artifact import load_adapter

        w = self.w
        adapter = load_adapter(w["root"] / name) if name in w["adapters"] else None
        kind = w["adapters"].get(name, name)
        if kind == "bert":
            m = AutoModelForSequenceClassification.from_pretrained(w["bert"]).eval()
            if adapter:
                merge_into(m, adapter, prefix="model.")
                _load_head(m.classifier, adapter, "model.classifier")
            fn = lambda t: m(**self._text("bert", t)).logits[0]  # noqa: E731
            key = "logits"
        elif kind in ("gpt2", "minilm"):
            from wara_train.bases import _minilm_dir

            enc_model = AutoModel.from_pretrained(w["gpt2"] if kind == "gpt2" else _minilm_dir()).eval()
            head = None
            if adapter:
                merge_into(enc_model, adapter, prefix=("transformer." if kind == "gpt2" else "bert."))
                head = adapter.saved_modules["classifier"]

            def fn(t, kind=kind, enc_model=enc_model, head=head):
                batch = self._text(kind, t)
                h = enc_model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (h * mask).sum(1) / mask.sum(1)
                return F.linear(pooled, head["weight"], head["bias"])[0] if head else F.normalize(pooled, dim=-1)[0]

            key = "logits" if adapter else "embeddings"
        elif kind == "vit":
            m = AutoModelForImageClassification.from_pretrained(w["vit"]).eval()
            if adapter:
                merge_into(m, adapter, prefix="model.")
                _load_head(m.classifier, adapter, "model.classifier")
            fn = lambda path: m(pixel_values=self.proc(images=[_image(path)], return_tensors="pt")["pixel_values"]).logits[0]  # noqa: E731
            key = "logits"
        elif kind == "tiny":
            import custom_base

            m, _ = custom_base.tiny_vision_base()
            if adapter:
                saved = adapter.saved_modules["head"]
                m.head = torch.nn.Linear(16, saved["weight"].shape[0])
                merge_into(m, adapter)
                _load_head(m.head, adapter, "head")
            fn = lambda path: m(custom_base.ToTensor()([_image(path)])[0])[0]  # noqa: E731
            key = "logits"
        else:
            raise KeyError(name)
        self.models[name] = (fn, key)
        return self.models[name]

    def output(self, name: str, example) -> np.ndarray:
        fn, _ = self.model(name)
        with torch.no_grad():
            return fn(example).numpy()


def _load_head(linear: torch.nn.Linear, adapter, module: str) -> None:
    """The adapter's head into ``linear`` (resized in place when it has another label count)."""
    params = adapter.saved_modules[module]
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(params["weight"].clone())
        linear.bias = torch.nn.Parameter(params["bias"].clone())
        linear.out_features = params["weight"].shape[0]


def _image(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


# ------------------------------------------------------------------------------------------
# the world: models, data, adapters trained through the CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("user-bases")
    w = {"bert": tm.make_bert_classifier(base / "bert"), "vit": tm.make_vit_classifier(base / "vit"),
         "gpt2": tm.make_gpt2(base / "gpt2"), "other_bert": tm.make_bert_classifier(base / "other-bert", seed=7),
         "text": tm.write_text_jsonl(base / "text.jsonl"),
         "text2": tm.write_text_jsonl(base / "text2.jsonl", labels=("slow-ish", "fast-ish"), seed=1),
         "text_eval": tm.write_text_jsonl(base / "eval.jsonl", n=15, seed=3),
         "images": tm.write_image_folder(base / "images"), "root": base / "adapters"}
    common = ["--steps", "4", "--no-progress", "--rank", "2"]
    trained = {  # adapter -> (base kind, train args)
        "bert-own": ("bert", ["--base", f"hf:{w['bert']}", "--data", w["text"]]),
        "bert-new": ("bert", ["--base", f"hf:{w['bert']}@text-classification", "--data", w["text2"], "--wavelet", "db2"]),
        "gpt-a": ("gpt2", ["--base", f"hf:{w['gpt2']}", "--data", w["text"], "--eval-data", w["text_eval"],
                           "--levels", "2", "--wavelet", "db2"]),
        "vit-a": ("vit", ["--base", f"hf:{w['vit']}", "--data", w["images"]]),
        "tiny-a": ("tiny", ["--base", "py:custom_base:tiny_vision_base", "--data", w["images"]]),
        "other": ("other", ["--base", f"hf:{w['other_bert']}", "--data", w["text"]]),
    }
    sys.path.insert(0, str(TESTS))  # py:custom_base for the in-process CLI
    first = True
    for name, (_, args) in trained.items():
        out = w["root"] / name if name != "other" else base / "elsewhere" / name
        if first:  # once as a new process, exactly as a user runs it
            proc = wara("train", *args, "--out", out, *common)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "held-out accuracy" in proc.stdout and "vs untrained" in proc.stdout
            first = False
        else:
            assert wara_main("train", *args, "--out", out, *common) == 0
    from wara_train.synthetic import random_adapter

    random_adapter("minilm", w["root"] / "minilm-a", rank=2, seed=4)
    w["adapters"] = {name: kind for name, (kind, _) in trained.items() if name != "other"} | {"minilm-a": "minilm"}
    w["other"] = base / "elsewhere" / "other"
    w["png"] = sorted((w["images"] / "red").iterdir())[0], sorted((w["images"] / "blue").iterdir())[0]
    w["corrupt"] = tm.write_corrupt_image(base / "corrupt.png")
    return w


@pytest.fixture(scope="module")
def refs(world):
    return References(world)


def _serve(world, *extra: str):
    proc = subprocess.Popen(
        [sys.executable, "-m", "wara", "serve", "--port", "0", "--adapter-root", str(world["root"]),
         "--base", f"bert=hf:{world['bert']}", "--base", f"gpt=hf:{world['gpt2']}@feature-extraction",
         "--base", f"vit=hf:{world['vit']}", "--base", "tiny=py:custom_base:tiny_vision_base",
         "--base", "minilm", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    while time.time() - t0 < 300:
        line = proc.stdout.readline()
        if line.startswith("serving on"):
            return proc, int(line.strip().rsplit(":", 1)[1])
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()[-3000:]}")


def _phases(port: int, phases: list, tmp_path: Path) -> list:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"phases": phases}))
    proc = subprocess.run([sys.executable, str(CLIENT), "phases", str(port), str(plan)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["phases"]


def _infer_steps(world) -> list:
    steps = []
    for name in ["bert", "bert-own", "bert-new", "gpt", "gpt-a", "minilm", "minilm-a"]:
        steps += [{"op": "infer", "model": name, "inputs": {"text": [t]}, "example": t} for t in TEXTS]
    for name in ["vit-a", "tiny-a"]:
        steps += [{"op": "infer", "model": name, "inputs": {"image_files": [str(p)]}, "example": str(p)} for p in world["png"]]
    return steps


def _preprocessed_steps(world, refs) -> list:
    """`images` already preprocessed by the client (FP32), next to the server-side path."""
    steps = []
    for p in world["png"]:
        pixels = refs.proc(images=[_image(p)], return_tensors="np")["pixel_values"].astype(np.float32)
        steps.append({"op": "infer", "model": "vit-a", "inputs": {"images": pixels.tolist()}, "example": str(p)})
    return steps


def _check(refs, rec) -> None:
    assert rec["status"] == "OK", rec
    name = {"bert": "bert", "gpt": "gpt2", "minilm": "minilm"}.get(rec["model"], rec["model"])
    fn, key = refs.model(name)
    got = np.asarray(rec[key][0])
    np.testing.assert_allclose(got, refs.output(name, rec["example"]), rtol=RTOL, atol=ATOL, err_msg=rec["model"])


# ------------------------------------------------------------------------------------------
# tests


@pytest.mark.slow
def test_serve_user_bases_with_tritonclient(world, refs, tmp_path):
    proc, port = _serve(world)
    try:
        meta = [{"op": "metadata", "model": m} for m in ("bert", "bert-new", "gpt", "gpt-a", "vit", "vit-a", "tiny", "tiny-a")]
        bad = [{"op": "infer", "model": "vit-a", "inputs": {"image_files": [str(world["corrupt"])]}},
               {"op": "load", "model": "other", "dir": str(world["other"])},
               {"op": "infer", "model": "bert-own", "inputs": {"text": [TEXTS[0]]}, "example": TEXTS[0]}]
        churn = [{"op": "unload", "model": "gpt-a"}]
        after_unload = [{"op": "infer", "model": "gpt-a", "inputs": {"text": [TEXTS[0]]}},
                        {"op": "infer", "model": "gpt", "inputs": {"text": [TEXTS[0]]}, "example": TEXTS[0]},
                        {"op": "load", "model": "gpt-a"}]
        phases = _phases(port, [meta, _infer_steps(world) + _preprocessed_steps(world, refs), bad, churn, after_unload,
                                _infer_steps(world), [{"op": "index"}]], tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    meta = {r["model"]: r for r in phases[0]}
    assert all(r["status"] == "OK" for r in meta.values()), meta
    # ModelMetadata: each base's real specs, and the engine that serves it.
    assert meta["bert"]["inputs"] == [["text", "BYTES", [-1]], ["input_ids", "INT64", [-1, -1]], ["attention_mask", "INT64", [-1, -1]]]
    assert meta["bert"]["outputs"] == [["logits", "FP32", [-1, 3]], ["labels", "BYTES", [-1]]]
    assert meta["bert-new"]["outputs"] == [["logits", "FP32", [-1, 2]], ["labels", "BYTES", [-1]]]
    assert meta["gpt"]["outputs"] == [["embeddings", "FP32", [-1, 32]]]
    assert meta["vit"]["inputs"] == [["image_bytes", "BYTES", [-1]], ["images", "FP32", [-1, 3, 32, 32]]]
    for name, platform in (("bert", "wara_onnxruntime:bert"), ("gpt-a", "wara_onnxruntime:gpt"),
                           ("vit-a", "wara_onnxruntime:vit"), ("tiny-a", "wara_pytorch:tiny")):
        assert meta[name]["platform"] == platform, meta[name]
    for phase in (phases[1], phases[5]):  # every row its own adapter's answer, before and after the churn
        for rec in phase:
            _check(refs, rec)
    labelled = [r for r in phases[1] if r["model"] == "bert-new"]
    assert all(r["labels"][0] in ("slow-ish", "fast-ish") for r in labelled)
    corrupt, other, still = phases[2]
    assert corrupt["status"] == "StatusCode.INVALID_ARGUMENT" and "does not decode" in corrupt["message"]
    assert other["status"] == "StatusCode.FAILED_PRECONDITION", other
    assert "'other-bert'" in other["message"] and "bert:" in other["message"], other["message"]  # both bases named
    _check(refs, still)
    gone, base_still, reloaded = phases[4]
    assert gone["status"] == "StatusCode.NOT_FOUND" and reloaded["status"] == "OK"
    _check(refs, base_still)
    index = dict(phases[6][0]["models"])
    assert index["gpt-a"] == "READY" and "other" not in index


def test_mixed_batches_over_two_user_bases_and_a_builtin_in_process(world, refs, tmp_path):
    """In-process, PyTorch engines: concurrent requests of several adapters of two user bases and
    the built-in MiniLM; batches mix adapters, every row is its own adapter's answer, while
    another adapter is unloaded and loaded again and again (hot)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from runtime.config import ServeConfig
    from runtime.service import Service

    service = Service(ServeConfig(port=0, backend="torch", adapter_root=str(world["root"]), max_delay_ms=80.0, preload=True,
                                  auto_merge=False, bases=(f"bert=hf:{world['bert']}", f"gpt=hf:{world['gpt2']}", "minilm",
                                                          "tiny=py:custom_base:tiny_vision_base")))
    stop = threading.Event()
    churned = []

    def churn():
        while not stop.is_set():
            service.unload_now("bert-new")
            service.load_now("bert-new")
            churned.append(1)

    try:
        models = ("bert", "bert-own", "gpt", "gpt-a", "minilm", "minilm-a")
        # Models interleaved, so each base's batcher gets its adapters' requests side by side (in
        # model order, a slow minute once let every batch fill from one model before the next
        # model's requests arrived: no mixed batch to check).
        jobs = [(m, t) for t in TEXTS for m in models] * 3
        churner = threading.Thread(target=churn)
        churner.start()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda j: service.predict(j[0], {"text": np.array([j[1].encode()], dtype=object)}), jobs))
        stop.set()
        churner.join()
        assert churned, "the adapter was never reloaded during the traffic"
        for (model, text), (_, out) in zip(jobs, results):
            name = {"gpt": "gpt2"}.get(model, model)
            fn, key = refs.model(name)
            np.testing.assert_allclose(out[key][0], refs.output(name, text), rtol=RTOL, atol=ATOL, err_msg=model)
        for base in ("bert", "gpt"):  # Linear and Conv1D slot layers both ran mixed batches
            assert service.batchers[base].stats.mixed_batches >= 1, base
        _, out = service.predict("bert-new", {"text": np.array([TEXTS[1].encode()], dtype=object)})
        np.testing.assert_allclose(out["logits"][0], refs.output("bert-new", TEXTS[1]), rtol=RTOL, atol=ATOL)
        # An adapter without a head of its own answers (and is described) as its base does.
        from wara_train.artifact import load_adapter, save_adapter
        from wara_train.config import WaraConfig
        from wara_train.model import inject
        from wara_train.synthetic import randomize_factors

        spec = service.specs["gpt"]
        model = inject(spec.build(None), WaraConfig(rank=2, target_modules=spec.default_targets), seed=1)
        for i, layer in enumerate(m for m in model.modules() if hasattr(m, "wara_A")):
            randomize_factors(layer, i)
        save_adapter(model, tmp_path / "headless", base_model="gpt2")
        files = {f.name: f.read_bytes() for f in (tmp_path / "headless").iterdir()}
        service.load_now("headless", files)
        outputs = service.describe("headless").outputs
        assert [(o.name, o.shape) for o in outputs] == [("embeddings", (-1, 32))]
        _, out = service.predict("headless", {"text": np.array([TEXTS[0].encode()], dtype=object)})
        from transformers import AutoModel

        plain = merge_into(AutoModel.from_pretrained(world["gpt2"]).eval(), load_adapter(tmp_path / "headless"),
                           prefix="transformer.")
        batch = refs._text("gpt2", TEXTS[0])
        with torch.no_grad():
            h = plain(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        want = F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)[0].numpy()
        np.testing.assert_allclose(out["embeddings"][0], want, rtol=RTOL, atol=ATOL)
    finally:
        stop.set()
        service.drain()


def test_exports_of_trained_adapters_load_in_transformers_and_peft(world, refs, tmp_path):
    """`wara export merge` -> `from_pretrained`; `wara export lora` -> peft on the plain model;
    `wara export onnx --form multi` -> `wara export verify`. Each equals the pywt reference."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification

    from wara_train.artifact import load_adapter

    cases = {"bert-new": (AutoModelForSequenceClassification, world["bert"]),
             "gpt-a": (AutoModel, world["gpt2"]), "vit-a": (AutoModelForImageClassification, world["vit"])}
    for name, (auto, base_dir) in cases.items():
        adapter_dir = world["root"] / name
        kind = world["adapters"][name]
        example = TEXTS[0] if kind != "vit" else str(world["png"][0])
        want = refs.output(name, example)
        # --base is optional where the adapter records its source; given here as a user would.
        assert wara_main("export", "merge", "--adapter", adapter_dir, "--base", f"hf:{base_dir}", "--out", tmp_path / f"m-{name}") == 0
        assert wara_main("export", "lora", "--adapter", adapter_dir, "--out", tmp_path / f"l-{name}") == 0
        merged = auto.from_pretrained(tmp_path / f"m-{name}").eval()
        labels = load_adapter(adapter_dir).labels
        # A new head of another size: the plain model is loaded with that many labels first.
        plain = (auto.from_pretrained(base_dir, num_labels=len(labels), ignore_mismatched_sizes=True)
                 if auto is not AutoModel else auto.from_pretrained(base_dir))
        peft = PeftModel.from_pretrained(plain, str(tmp_path / f"l-{name}")).eval()
        with torch.no_grad():
            for model in (merged, peft):
                np.testing.assert_allclose(_run(model, kind, refs, example, tmp_path / f"m-{name}", load_adapter(adapter_dir)),
                                           want, rtol=RTOL, atol=ATOL, err_msg=f"{name} {type(model).__name__}")
        onnx = tmp_path / f"{name}.onnx"
        assert wara_main("export", "onnx", "--adapter", adapter_dir, "--form", "multi", "--out", onnx) == 0
        assert wara_main("export", "verify", "--adapter", adapter_dir, "--exported", onnx) == 0


def _run(model, kind, refs, example, merged_dir, adapter):
    if kind == "vit":
        return model(pixel_values=refs.proc(images=[_image(example)], return_tensors="pt")["pixel_values"]).logits[0].numpy()
    batch = refs._text("bert" if kind == "bert" else "gpt2", example)
    out = model(**batch)
    if kind == "bert":
        return out.logits[0].numpy()
    # A feature-extraction adapter's head sits on the mean-pooled features (wara_head.safetensors).
    from safetensors.torch import load_file

    head = load_file(str(merged_dir / "wara_head.safetensors"))
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return F.linear(pooled, head["weight"], head["bias"])[0].numpy()


# ------------------------------------------------------------------------------------------
# refusals: a clear error, and nothing changed


@pytest.mark.parametrize("case", ["missing-dir", "no-weights", "unknown-task", "no-adaptable-layer", "not-divisible",
                                  "corrupt-image", "wrong-data-kind"])
def test_train_refuses_bad_bases_and_data_and_writes_nothing(world, tmp_path, case):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text((world["bert"] / "config.json").read_text())
    bad_images = tmp_path / "bad-images"
    (bad_images / "red").mkdir(parents=True)
    (bad_images / "blue").mkdir()
    tm.write_corrupt_image(bad_images / "red" / "0.png")
    args, message = {
        "missing-dir": (["--base", f"hf:{tmp_path / 'nope'}", "--data", world["text"]], "no such directory"),
        "no-weights": (["--base", f"hf:{empty}", "--data", world["text"]], "no weights"),
        "unknown-task": (["--base", f"hf:{world['bert']}@summarization", "--data", world["text"]],
                         "unknown task 'summarization'.*feature-extraction, text-classification, image-classification"),
        "no-adaptable-layer": (["--base", "py:custom_base:no_adaptable_base", "--data", world["images"]],
                               "no adaptable layer"),
        "not-divisible": (["--base", f"hf:{world['bert']}", "--data", world["text"], "--levels", "6"],
                          "cannot take this adapter.*query.*divisible"),
        "corrupt-image": (["--base", f"hf:{world['vit']}", "--data", bad_images], "0.png: not a decodable image"),
        "wrong-data-kind": (["--base", f"hf:{world['vit']}", "--data", world["text"]], "takes image input"),
    }[case]
    out = tmp_path / "out"
    from wara_train.errors import WaraError

    with pytest.raises(WaraError, match=message):
        from wara_train.tasks import train_on_base

        kw = dict(zip(args[::2], args[1::2]))
        train_on_base(str(kw["--base"]), kw["--data"], out, levels=int(kw.get("--levels", 1)), steps=1, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("base,message", [
    ("x=hf:{tmp}/nope", "no such directory"), ("x=hf:{empty}", "no weights"),
    ("x=hf:{bert}@translation", "unknown task 'translation'"), ("x=py:custom_base:no_such_function", "no function"),
])
def test_serve_refuses_a_bad_base_before_serving(world, tmp_path, capsys, base, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((world["bert"] / "config.json").read_text())
    arg = base.format(tmp=tmp_path, empty=empty, bert=world["bert"])
    assert wara_main("serve", "--port", "0", "--base", arg) == 2
    err = capsys.readouterr().err
    assert err.startswith("wara serve: error:") and message in err, err


def test_train_cli_error_is_one_line_and_exit_2(world, tmp_path):
    proc = wara("train", "--base", f"hf:{tmp_path / 'nope'}", "--data", world["text"], "--out", tmp_path / "o")
    assert proc.returncode == 2 and proc.stderr.startswith("wara train: error: hf:") and "no such directory" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_export_refuses_an_adapter_of_another_base(world, tmp_path):
    assert wara_main("export", "merge", "--adapter", world["other"], "--base", f"hf:{world['bert']}", "--out", tmp_path / "m") == 2
    assert not (tmp_path / "m").exists()


def test_auto_backend_falls_back_to_pytorch_where_onnx_export_fails(caplog):
    """A base whose graph onnxruntime cannot take (a branch on the data) is served by PyTorch
    under `auto`, and says so; asking for onnxruntime explicitly is an error."""
    from runtime.config import ServeConfig
    from runtime.service import make_engine
    from wara_train.basespec import resolve_base

    sys.path.insert(0, str(TESTS))
    spec = resolve_base("py:custom_base:unexportable_base")
    assert spec.backends[0] == "onnxruntime"
    engine = make_engine(ServeConfig(port=0), spec)
    assert engine.platform == "wara_pytorch"
    assert "could not be built" in caplog.text and "serving it with PyTorch" in caplog.text
    with pytest.raises(Exception, match="export"):
        make_engine(ServeConfig(port=0, backend="onnxruntime"), spec)


def test_mixed_batch_on_convnext_channels_last_linears(tmp_path):
    """ConvNeXt's adapted layers are Linears on (B, H, W, C) maps: a mixed batch of two adapters
    and the base, each row equal to its own adapter's pywt-merged plain model."""
    from transformers import AutoModelForImageClassification

    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine
    from wara_train.basespec import resolve_base
    from wara_train.synthetic import random_adapter

    directory = tm.make_convnext_classifier(tmp_path / "convnext")
    spec = resolve_base(f"hf:{directory}")
    adapters = [random_adapter(spec, tmp_path / f"a{k}", rank=2, num_labels=3, seed=k) for k in (1, 2)]
    engine = TorchEngine(spec, device="cpu")
    tier = DeviceTier(engine)
    for k, a in enumerate(adapters, start=1):
        tier.write(k, prepare(engine, f"a{k}", a))
    (images,) = spec.sample(3, 0)
    rows = engine.forward((images,), [1, 0, 2])
    for i, k in enumerate([1, 0, 2]):
        plain = AutoModelForImageClassification.from_pretrained(directory).eval()
        if k:
            merge_into(plain, adapters[k - 1], prefix="model.")
            _load_head(plain.classifier, adapters[k - 1], "model.classifier")
        with torch.no_grad():
            want = plain(pixel_values=images[i : i + 1]).logits[0].numpy()
        np.testing.assert_allclose(rows[i]["logits"].numpy(), want, rtol=RTOL, atol=ATOL, err_msg=f"row {i}")
