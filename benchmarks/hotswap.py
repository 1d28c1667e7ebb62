"""Hot-swap cost: from adapter files to a servable adapter, in-process, over gRPC, and in peft.

MiniLM with random WaRA adapters (r=4, haar, J=1; folded rank 16). Two adapter contents
alternate, so every load or swap changes the answer, and every timed step is followed by a
check that the model now answers like that content (max abs error <= 1e-4):

* in-process (`TorchEngine` and its `DeviceTier`): `prepare` (`runtime.adapters.prepare`: validate, fold or
  pack own factors, bound-check), the slot write (`DeviceTier.write`; reported as ``write_slot``), both together
  ("load -> servable", target <= 5 ms p50), and `build_merged` (the merged path's re-merge);
* over gRPC (a real server): RepositoryModelLoad by name -> first ModelInfer answer, the same
  for a reload of the name with new content on disk, and RepositoryModelUnload;
* peft with the equivalent LoRA, exported with transformers module names and loaded onto
  ``AutoModel.from_pretrained`` of MiniLM's own directory (the task head, written beside the
  LoRA, read with it): `load_adapter` under a new name, and `hotswap_adapter` replacing the
  content of "default" in place.

    .venv/bin/python -m benchmarks.hotswap            # 30 repetitions of each
    .venv/bin/python -m benchmarks.hotswap --quick    # a tiny run (used by the tests)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from benchmarks.common import environment, percentile, write_json

if TYPE_CHECKING:
    from runtime.adapters import DeviceTier
    from wara_train.artifact import WaraAdapter
    from wara_train.basespec import BaseSpec

TEXT = "What is artificial intelligence and how do computers learn?"
NAME = "tenant"
SEEDS = (1, 2)  # the two adapter contents that alternate
ATOL = 1e-4
TARGET_MS = 5.0  # prepare (fold or pack) + slot write, p50


def stats(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(ms, 50), "min_ms": min(ms), "max_ms": max(ms)}


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(result, milliseconds); waits for queued GPU work so the time is the whole step's."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


class Checks:
    """Each check's worst error so far; a wrong answer stops the benchmark."""

    def __init__(self, refs: dict[int, np.ndarray]) -> None:
        self.refs = refs
        self.max_abs_error: dict[str, float] = {}

    def __call__(self, what: str, got: Any, seed: int) -> None:
        got = np.asarray(got, dtype=np.float32).reshape(-1)
        err = float(np.abs(got - self.refs[seed].reshape(-1)).max())
        self.max_abs_error[what] = max(err, self.max_abs_error.get(what, 0.0))
        if err > ATOL:
            raise SystemExit(f"{what}: answer off by {err:.2e} from adapter seed {seed} (> {ATOL})")
        other = next(s for s in self.refs if s != seed)
        if np.abs(got - self.refs[other].reshape(-1)).max() <= 100 * ATOL:
            raise SystemExit(f"{what}: the answer did not change from the other adapter's")


def in_process(tier: DeviceTier, adapters: dict[int, WaraAdapter], inputs: tuple[torch.Tensor, ...], n: int,
               check: Checks) -> dict:
    from runtime.adapters import prepare

    engine = tier.engine
    times: dict[str, list[float]] = {"prepare": [], "write_slot": [], "load_to_servable": [], "build_merged": []}
    for i in range(n):
        seed = SEEDS[i % 2]
        folded, t_prepare = timed(prepare, engine, NAME, adapters[seed])
        _, t_slot = timed(tier.write, 1, folded)
        check("in_process_slot", engine.forward(inputs, [1])[0]["logits"], seed)
        merged, t_merge = timed(engine.build_merged, folded.factors)
        check("in_process_merged", engine.forward_merged(merged, folded.head, inputs)[0]["logits"], seed)
        for key, t in zip(times, (t_prepare, t_slot, t_prepare + t_slot, t_merge)):
            times[key].append(t)
    return {k: stats(v) for k, v in times.items()}


def over_grpc(root: Path, staged: dict[int, Path], n: int, check: Checks) -> dict:
    import grpc

    from runtime.config import ServeConfig
    from runtime.kserve import inference_pb2 as pb
    from runtime.kserve import inference_pb2_grpc as pb_grpc
    from runtime.server import create_server, decode_outputs

    server, port = create_server(ServeConfig(port=0, bases=("minilm",), adapter_root=str(root), max_delay_ms=0.0,
                                             auto_merge=False))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    req = pb.ModelInferRequest(model_name=NAME)
    req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(TEXT.encode())
    text = {"text": np.array([TEXT.encode()], dtype=object)}

    def load_and_answer(seed: int, what: str) -> tuple[float, float]:
        shutil.copytree(staged[seed], root / NAME, dirs_exist_ok=True)  # new content on disk, untimed
        _, t_load = timed(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=NAME))
        response, t_first = timed(stub.ModelInfer, req)
        check(what, decode_outputs(response)["logits"], seed)
        check(f"{what}_in_process", server.service.predict(NAME, text)[1]["logits"], seed)
        return t_load, t_first

    times: dict[str, list[float]] = {k: [] for k in ("load", "first_answer", "load_to_first_answer", "unload",
                                                     "reload", "reload_first_answer", "reload_to_first_answer")}
    try:
        for i in range(n + 1):  # round 0 warms up (tokenizer, first slot write) and is not recorded
            t_load, t_first = load_and_answer(SEEDS[i % 2], "grpc_load")
            t_reload, t_refirst = load_and_answer(SEEDS[(i + 1) % 2], "grpc_reload")
            _, t_unload = timed(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=NAME))
            if i:
                for key, t in zip(times, (t_load, t_first, t_load + t_first, t_unload,
                                          t_reload, t_refirst, t_reload + t_refirst)):
                    times[key].append(t)
    finally:
        channel.close()
        server.stop(grace=1.0)
    return {k: stats(v) for k, v in times.items()}


def in_peft(spec: BaseSpec, loras: dict[int, Path], inputs: tuple[torch.Tensor, ...], n: int, check: Checks,
            device: torch.device) -> dict:
    """peft as the ecosystem runs it: the LoRA exported with transformers names
    (`exporter.lora.save_peft_lora` with the spec) on the base's own transformers model
    (``AutoModel.from_pretrained`` of its directory), served as the spec serves it. The task
    head on the pooled features is no part of a transformers model, so it is written beside the
    LoRA; loading an adapter reads it too, and swapping one copies it into the served head."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    from exporter.common import load_hf, read_head, served_from_hf

    heads = {s: read_head(lora) for s, lora in loras.items()}
    if any(h is None for h in heads.values()):
        raise SystemExit(f"the LoRA export of base {spec.name!r} wrote no task head beside it")
    hf = load_hf(spec, spec.hf.path)
    model = PeftModel.from_pretrained(hf, str(loras[SEEDS[0]]), adapter_name="default")  # injects into hf
    served = served_from_hf(spec, hf, heads[SEEDS[0]]).to(device).eval()
    model.to(device).eval()

    def set_head(head: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for pname, value in head.items():
                getattr(served.classifier, pname).copy_(value)

    def answer() -> np.ndarray:
        # With the adapter's task head, peft's answer is logits like the engine's adapter rows:
        # the whole adapter is checked.
        with torch.no_grad():
            return served(*(t.to(device) for t in inputs)).cpu().numpy()

    def load(seed: int, name: str) -> dict[str, torch.Tensor]:
        model.load_adapter(str(loras[seed]), adapter_name=name)
        return read_head(loras[seed])

    check("peft_from_pretrained", answer(), SEEDS[0])
    times: dict[str, list[float]] = {"load_adapter": [], "hotswap_adapter": []}
    for i in range(n):
        seed, name = SEEDS[(i + 1) % 2], f"new{i}"
        head, t = timed(load, seed, name)
        times["load_adapter"].append(t)
        model.set_adapter(name)
        set_head(head)
        check("peft_load_adapter", answer(), seed)
        model.set_adapter("default")  # untimed: one resident adapter each time, like the server
        set_head(heads[SEEDS[0]])
        model.delete_adapter(name)

    def swap(seed: int) -> None:  # new content for "default" in place: factors and head
        hotswap_adapter(model, str(loras[seed]), adapter_name="default", torch_device=device.type)
        set_head(read_head(loras[seed]))

    for i in range(n):  # "default" holds SEEDS[0]: swap in the other content, then back, ...
        seed = SEEDS[(i + 1) % 2]
        _, t = timed(swap, seed)
        times["hotswap_adapter"].append(t)
        check("peft_hotswap_adapter", answer(), seed)
    return {k: stats(v) for k, v in times.items()}


def run(n: int, workdir: Path) -> dict:
    from exporter.common import base_for
    from exporter.lora import save_peft_lora
    from exporter.verify import reference_model
    from runtime.adapters import DeviceTier, prepare
    from runtime.config import ServeConfig
    from runtime.engine import TorchEngine
    from wara_train.bases import MiniLMTokenizer, get_base
    from wara_train.synthetic import random_adapter

    spec = get_base("minilm")
    staged = {s: workdir / "wara" / str(s) for s in SEEDS}
    adapters = {s: random_adapter(spec, staged[s], rank=4, levels=1, wavelet="haar", seed=s) for s in SEEDS}
    enc = MiniLMTokenizer(max_length=ServeConfig().max_text_length)([TEXT])  # as the server tokenizes
    inputs = (enc["input_ids"], enc["attention_mask"])
    base = base_for(adapters[SEEDS[0]], spec)
    loras = {s: save_peft_lora(adapters[s], workdir / "lora" / str(s), spec=spec, base=base) for s in SEEDS}
    with torch.no_grad():
        check = Checks({s: reference_model(adapters[s], base)(*inputs).numpy() for s in SEEDS})
    engine = TorchEngine(spec)
    tier = DeviceTier(engine)  # the one tier of this engine: it owns the page allocation
    answers = {}
    for s in SEEDS:  # the engine against the explicit wavelet path (exporter.verify); also a warm-up
        tier.write(1, prepare(engine, NAME, adapters[s]))  # (the first prepare hashes the base once)
        answers[s] = engine.forward(inputs, [1])[0]["logits"].numpy()
        check("engine_vs_wavelet_reference", answers[s], s)
    check.refs = answers  # from here on every answer must equal the engine's for that content
    root = workdir / "root"
    root.mkdir()
    results = {"in_process": in_process(tier, adapters, inputs, n, check),
               "grpc": over_grpc(root, staged, n, check)}
    results["peft"] = in_peft(spec, loras, inputs, n, check, engine.device)
    p50 = results["in_process"]["load_to_servable"]["p50_ms"]
    return {"benchmark": "hotswap", **environment(), "repeats": n, "device": str(engine.device),
            "torch_threads": torch.get_num_threads(),
            "model": "minilm + WaRA r=4 haar J=1 (random; folded LoRA rank 16)", "input": "one text, batch 1",
            "results": results, "target": {"load_to_servable_p50_ms": TARGET_MS, "met": p50 <= TARGET_MS},
            "verification": {"atol": ATOL, "max_abs_error": check.max_abs_error, "passed": True}}


def main(argv: list[str] | None = None) -> int:
    environment()  # read at the start: the commit and machine this run measures
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/hotswap.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(2 if args.quick else args.repeats, Path(tmp))
    write_json(args.out, report)
    print(f"{'step':<38} {'p50 ms':>9} {'min ms':>9} {'max ms':>9}")
    for group, rows in report["results"].items():
        for step, s in rows.items():
            print(f"{group + ' ' + step:<38} {s['p50_ms']:9.2f} {s['min_ms']:9.2f} {s['max_ms']:9.2f}")
    p50, met = report["results"]["in_process"]["load_to_servable"]["p50_ms"], report["target"]["met"]
    print(f"prepare + slot write p50 {p50:.2f} ms (target <= {TARGET_MS} ms: {'met' if met else 'missed'}); "
          f"every answer checked to {ATOL} ({args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
