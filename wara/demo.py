"""`wara demo`: the product end to end on the built-in models, offline.

1. Train the demo tenants' adapters unless cached (MiniLM topics, MiniLM language-ID,
   EfficientNet-Lite0 digits).
2. Start `wara serve` on localhost with them, and send a mixed stream of requests for every
   tenant (and the base) over gRPC from several threads at once.
3. Print each tenant's answers, a merged-vs-unmerged latency table, and stop the server.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

TENANTS = {  # adapter name -> (task, epochs)
    "topics": ("minilm-topics", 4),
    "langid": ("minilm-langid", 2),
    "digits": ("effnet-digits", 2),
}
QUESTIONS = {
    "topics": ["What is artificial intelligence?", "Who is your favourite football player?",
               "How much money do you make?", "Tell me a joke about computers"],
    "langid": ["Where is the train station?", "¿Dónde está la estación de tren?", "Où est la gare ?",
               "Wo ist der Bahnhof?", "Dov'è la stazione dei treni?"],
}


def _train_missing(root: Path, steps: int | None) -> None:
    from wara_train.artifact import load_adapter
    from wara_train.errors import AdapterError
    from wara_train.tasks import train_task

    for name, (task, epochs) in TENANTS.items():
        out = root / name
        try:
            adapter = load_adapter(out)
            if adapter.extra.get("task") == task and (steps is not None or "steps" in adapter.extra):
                print(f"[cached] {name}: {task}, held-out accuracy {adapter.extra.get('heldout_accuracy', float('nan')):.1%}")
                continue
        except AdapterError:
            pass
        print(f"[train] {name}: {task} ...")
        train_task(task, out, epochs=epochs, steps=steps, progress=True)


def _start_server(root: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "wara", "serve", "--port", "0", "--adapter-root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 180:
        line = proc.stdout.readline()
        if line.startswith("serving on"):
            return proc, int(line.strip().rsplit(":", 1)[1])
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")


def _digit_images(n: int) -> tuple[np.ndarray, list[int]]:
    from sklearn.datasets import load_digits

    from wara_train.tasks import digits_to_tensor

    d = load_digits()
    idx = list(range(0, 1797, 1797 // n))[:n]
    return digits_to_tensor([d.images[i] for i in idx]).numpy(), [int(d.target[i]) for i in idx]


def _mixed_stream(port: int) -> dict[str, list[tuple[str, str, float]]]:
    """Every tenant's requests, sent from 8 threads at once so batches mix adapters."""
    import grpc

    from runtime.kserve import inference_pb2 as pb
    from runtime.kserve import inference_pb2_grpc as pb_grpc
    from runtime.server import decode_outputs

    images, truth = _digit_images(6)
    jobs = [(t, q, None) for t, qs in QUESTIONS.items() for q in qs]
    jobs += [("minilm", q, None) for q in QUESTIONS["topics"][:2]]
    jobs += [("digits", f"digit image (true label {y})", images[i : i + 1]) for i, y in enumerate(truth)]
    answers: dict[str, list[tuple[str, str, float]]] = {}
    lock = threading.Lock()

    def run(chunk):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model, shown, image in chunk:
            req = pb.ModelInferRequest(model_name=model)
            if image is None:
                req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(shown.encode())
            else:
                req.inputs.add(name="images", datatype="FP32", shape=list(image.shape))
                req.raw_input_contents.append(image.astype("<f4").tobytes())
            t0 = time.perf_counter()
            out = decode_outputs(stub.ModelInfer(req, timeout=60))
            ms = (time.perf_counter() - t0) * 1e3
            if "labels" in out:
                answer = out["labels"][0].decode()
            else:
                answer = f"embedding, |e| = {np.linalg.norm(out['embeddings'][0]):.3f}"
            with lock:
                answers.setdefault(model, []).append((shown, answer, ms))
        channel.close()

    threads = [threading.Thread(target=run, args=(jobs[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def _latency_table(root: Path) -> str:
    """In-process, batch 1 and 8: the base, the merged copy and the served (unmerged, slot)
    path, interleaved; each checked against the reference first."""
    import torch

    from exporter.common import load_with_base
    from exporter.merge import merged_model
    from exporter.verify import reference_model
    from wara_train.bases import MiniLMTokenizer

    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine

    adapter, _, base = load_with_base(root / "topics")
    merged = merged_model(base, [(adapter, 1.0)]).eval()
    engine = TorchEngine("minilm", device="cpu")
    DeviceTier(engine).write(1, prepare(engine, "topics", adapter))
    tok = MiniLMTokenizer(64)
    rows = ["What is artificial intelligence and how do computers learn?"] * 8
    lines = ["| batch | base ms | merged ms (x base) | unmerged, served ms (x base) |", "| --- | --- | --- | --- |"]
    with torch.no_grad():
        for batch in (1, 8):
            enc = tok(rows[:batch])
            ids, mask = enc["input_ids"], enc["attention_mask"]
            want = reference_model(adapter, base)(ids, mask)
            served = torch.stack([r["logits"] for r in engine.forward((ids, mask), [1] * batch)])
            assert (served - want).abs().max() < 1e-4 and (merged(ids, mask) - want).abs().max() < 1e-4
            runs = {"base": lambda: base(ids, mask), "merged": lambda: merged(ids, mask),
                    "unmerged": lambda: engine.forward((ids, mask), [1] * batch)}
            times = {k: [] for k in runs}
            for _ in range(3):
                for f in runs.values():
                    f()
            for _ in range(15):
                for k, f in runs.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            lines.append(f"| {batch} | {med['base']:.1f} | {med['merged']:.1f} ({med['merged'] / med['base']:.2f}) | "
                         f"{med['unmerged']:.1f} ({med['unmerged'] / med['base']:.2f}) |")
    return "\n".join(lines)


def run_demo(root: Path, *, steps: int | None = None) -> int:
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    print("WaRA serve demo: three tenants' adapters on two base models, served over gRPC (offline)\n")
    _train_missing(root, steps)
    print("\nstarting `wara serve` ...")
    server, port = _start_server(root)
    try:
        print(f"server on 127.0.0.1:{port}; sending a mixed stream from 8 client threads\n")
        t1 = time.perf_counter()
        answers = _mixed_stream(port)
        wall = time.perf_counter() - t1
        for model, rows in answers.items():
            print(f"  [{model}]")
            for shown, answer, ms in rows:
                print(f"    {shown[:52]:<52} -> {answer:<28} {ms:6.1f} ms")
        n = sum(len(v) for v in answers.values())
        print(f"\n  {n} requests in {wall:.2f}s over {len(answers)} models\n")
    finally:
        server.terminate()
        code = server.wait(timeout=60)
        print(f"server stopped (exit {code})")
    print("\nmerged vs unmerged latency, MiniLM topics adapter, in-process on this machine (median of 15):")
    print(_latency_table(root))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s")
    return 0
