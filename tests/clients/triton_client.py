"""A tritonclient user of our server, run in its own process (tritonclient registers the same
protobuf symbols as our stubs: never both in one process).

    python triton_client.py smoke PORT ADAPTER_DIR      -> one JSON object on stdout
    python triton_client.py load PORT PLAN_JSON         -> one JSON line per request
    python triton_client.py phases PORT PLAN_JSON       -> one JSON object: every step's result
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def text_input(texts):
    t = grpcclient.InferInput("text", [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object))
    return t


def result_row(r, name):
    out = {"version": r.get_response().model_version}
    for key in ("logits", "embeddings"):
        arr = r.as_numpy(key)
        if arr is not None:
            out[key] = arr.tolist()
    labels = r.as_numpy("labels")
    if labels is not None:
        out["labels"] = [b.decode() for b in labels]
    return out


def smoke(port: str, adapter_dir: str) -> None:
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    out = {"live": c.is_server_live(), "ready": c.is_server_ready(),
           "extensions": list(c.get_server_metadata().extensions)}
    md = c.get_model_metadata("topic-a")
    out["metadata"] = {"versions": list(md.versions), "inputs": [i.name for i in md.inputs],
                       "outputs": [o.name for o in md.outputs], "platform": md.platform}
    texts = ["what is artificial intelligence", "tell me a joke"]
    out["adapter"] = result_row(c.infer("topic-a", [text_input(texts)]), "topic-a")
    out["base"] = result_row(c.infer("minilm", [text_input(texts)]), "minilm")
    images = np.linspace(-1, 1, 2 * 3 * 64 * 64, dtype=np.float32).reshape(2, 3, 64, 64)
    im = grpcclient.InferInput("images", [2, 3, 64, 64], "FP32")
    im.set_data_from_numpy(images)
    out["vision"] = result_row(c.infer("digits", [im]), "digits")
    out["index_before"] = sorted((m.name, m.state) for m in c.get_model_repository_index().models)
    c.unload_model("topic-a")
    out["ready_after_unload"] = c.is_model_ready("topic-a")
    try:
        c.infer("topic-a", [text_input(texts)])
        out["after_unload"] = "answered"
    except InferenceServerException as e:
        out["after_unload"] = e.status()
    c.load_model("topic-a")  # by name, from the adapter root
    out["ready_after_load"] = c.is_model_ready("topic-a")
    cfg = open(f"{adapter_dir}/adapter_config.json").read()
    weights = open(f"{adapter_dir}/adapter_model.safetensors", "rb").read()
    c.load_model("sent-by-files", config=cfg, files={"file:adapter_model.safetensors": weights})
    out["by_files"] = result_row(c.infer("sent-by-files", [text_input(texts)]), "sent-by-files")
    out["index_after"] = sorted((m.name, m.state) for m in c.get_model_repository_index().models)
    print(json.dumps(out))


def load(port: str, plan_path: str) -> None:
    """Closed-loop clients: each thread sends its requests one after another."""
    plan = json.load(open(plan_path))
    lock = threading.Lock()
    deadline = time.time() + plan.get("max_seconds", 120)

    def worker(k, job):
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        for i in range(job["requests"]):
            if time.time() > deadline:
                break
            text = job["texts"][i % len(job["texts"])]
            rec = {"client": k, "i": i, "model": job["model"], "text": text}
            try:
                rec.update(result_row(c.infer(job["model"], [text_input([text])]), job["model"]))
                rec["status"] = "OK"
            except InferenceServerException as e:
                rec["status"] = e.status()
                rec["message"] = e.message()
            with lock:
                print(json.dumps(rec), flush=True)

    threads = [threading.Thread(target=worker, args=(k, job)) for k, job in enumerate(plan["clients"])]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"done": True, "seconds": time.perf_counter() - t0}), flush=True)


def _inputs(spec: dict) -> list:
    """A step's inputs: {"text": [...]} | {"image_files": [paths]} (sent as image_bytes) |
    {"images": nested list} (FP32) | {"image_bytes": [hex strings]}."""
    if "text" in spec:
        return [text_input(spec["text"])]
    if "image_files" in spec or "image_bytes" in spec:
        raw = [open(f, "rb").read() for f in spec["image_files"]] if "image_files" in spec else [bytes.fromhex(h) for h in spec["image_bytes"]]
        t = grpcclient.InferInput("image_bytes", [len(raw)], "BYTES")
        t.set_data_from_numpy(np.array(raw, dtype=object))
        return [t]
    arr = np.asarray(spec["images"], dtype=np.float32)
    t = grpcclient.InferInput("images", list(arr.shape), "FP32")
    t.set_data_from_numpy(arr)
    return [t]


def _step(c, step: dict) -> dict:
    op = step["op"]
    try:
        if op == "infer":
            return {**step, "status": "OK", **result_row(c.infer(step["model"], _inputs(step["inputs"])), step["model"])}
        if op == "metadata":
            md = c.get_model_metadata(step["model"])
            return {**step, "status": "OK", "platform": md.platform, "versions": list(md.versions),
                    "inputs": [[i.name, i.datatype, list(i.shape)] for i in md.inputs],
                    "outputs": [[o.name, o.datatype, list(o.shape)] for o in md.outputs]}
        if op == "load":
            if "dir" in step:
                c.load_model(step["model"], config=open(f"{step['dir']}/adapter_config.json").read(),
                             files={"file:adapter_model.safetensors": open(f"{step['dir']}/adapter_model.safetensors", "rb").read()})
            else:
                c.load_model(step["model"])
            return {**step, "status": "OK"}
        if op == "unload":
            c.unload_model(step["model"])
            return {**step, "status": "OK"}
        if op == "index":
            return {**step, "status": "OK", "models": sorted([m.name, m.state] for m in c.get_model_repository_index().models)}
        raise ValueError(f"unknown op {op!r}")
    except InferenceServerException as e:
        return {**step, "status": e.status(), "message": e.message()}


def phases(port: str, plan_path: str) -> None:
    """Phases run one after another; the steps of a phase run from up to 8 threads at once, so
    an infer phase's requests share batches."""
    plan = json.load(open(plan_path))
    results = []
    for steps in plan["phases"]:
        out: list = [None] * len(steps)

        def worker(k):
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            for i in range(k, len(steps), 8):
                out[i] = _step(c, steps[i])

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(min(8, len(steps)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.append(out)
    print(json.dumps({"phases": results}))


if __name__ == "__main__":
    {"smoke": smoke, "load": load, "phases": phases}[sys.argv[1]](*sys.argv[2:])
