"""Malformed adapters (issue 11): each is refused through `Service.load` before any state
changes, with its error class and gRPC code, a message that names the adapter and never a server
path; `Service.index()` is unchanged and a good adapter still answers after each."""

from __future__ import annotations

from dataclasses import astuple
import json
import os
import resource
import shutil

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from runtime.config import ServeConfig
from runtime.errors import Overloaded, status_code
from wara_train.artifact import CONFIG_NAME, WEIGHTS_NAME, read_artifact_files
from wara_train.basespec import resolve_base
from wara_train.errors import AdapterError, IncompatibleAdapterError
from wara_train.synthetic import random_adapter

from tests.tiny_models import make_bert_classifier

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
BIG = 200 << 20


def _factor_keys(tensors):
    return sorted(k for k in tensors if ".wara_A." in k or ".wara_B." in k)


def _head_keys(tensors):
    return sorted(k for k in tensors if ".wara_" not in k)


def _cfg(**changes):
    def f(cfg):
        cfg.update(changes)
    return f


def _retype(dtype, which="factor"):
    def f(t):
        key = (_factor_keys(t) if which == "factor" else _head_keys(t))[0]
        x = t[key]
        t[key] = (x * 100).to(dtype) if dtype != torch.bool else (x > 0)
    return f


def _fill(value, which="factor", all_=False):
    def f(t):
        keys = _factor_keys(t) if which == "factor" else _head_keys(t)
        for key in keys if all_ else keys[:1]:
            t[key] = torch.full_like(t[key], value)
            if not all_:
                t[key].view(-1)[1:] = 0.0
    return f


def _reshape(t):
    key = _factor_keys(t)[0]
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])


def _drop(t):
    del t[_factor_keys(t)[0]]


def _extra(t):
    t["not.a.module.weight"] = torch.zeros(2, 2)


# name -> (config change, tensor change, raw weights change, error class, code)
CASES = {
    "factor-i8": (None, _retype(torch.int8), None, AdapterError, INVALID),
    "factor-i64": (None, _retype(torch.int64), None, AdapterError, INVALID),
    "factor-bool": (None, _retype(torch.bool), None, AdapterError, INVALID),
    "factor-u8": (None, _retype(torch.uint8), None, AdapterError, INVALID),
    "factor-f16-config-f32": (None, _retype(torch.float16), None, AdapterError, INVALID),
    "factor-f64-config-f32": (None, _retype(torch.float64), None, AdapterError, INVALID),
    "head-u8": (None, _retype(torch.uint8, "head"), None, AdapterError, INVALID),
    "head-i64": (None, _retype(torch.int64, "head"), None, AdapterError, INVALID),
    "factor-nan": (None, _fill(float("nan")), None, AdapterError, INVALID),
    "factor-inf": (None, _fill(float("inf")), None, AdapterError, INVALID),
    "head-nan": (None, _fill(float("nan"), "head"), None, AdapterError, INVALID),
    "head-1e38": (None, _fill(1e38, "head", all_=True), None, AdapterError, INVALID),
    "factors-1e38": (None, _fill(1e38, all_=True), None, AdapterError, INVALID),
    "alpha-1e30": (_cfg(alpha=1e30), None, None, AdapterError, INVALID),
    "alpha-1e300": (_cfg(alpha=1e300), None, None, AdapterError, INVALID),
    "alpha-inf": (_cfg(alpha=float("inf")), None, None, AdapterError, INVALID),
    "alpha-nan": (_cfg(alpha=float("nan")), None, None, AdapterError, INVALID),
    "alpha-string": (_cfg(alpha="8"), None, None, AdapterError, INVALID),
    "wrong-format-version": (_cfg(format_version=999), None, None, AdapterError, INVALID),
    "wrong-format": (_cfg(format="peft"), None, None, AdapterError, INVALID),
    "labels-not-strings": (_cfg(labels=[1, 2, 3, 4, 5]), None, None, AdapterError, INVALID),
    "labels-count": (_cfg(labels=["a"]), None, None, IncompatibleAdapterError, PRECONDITION),
    "unknown-dtype": (_cfg(dtype="int8"), None, None, AdapterError, INVALID),
    "dtype-f16-factors-f32": (_cfg(dtype="float16"), None, None, AdapterError, INVALID),
    "wrong-fingerprint": (_cfg(base_fingerprint="sha256:" + "0" * 64), None, None, IncompatibleAdapterError,
                          PRECONDITION),
    "wrong-target": (_cfg(target_modules=["nope.layer"]), None, None, AdapterError, INVALID),
    "wrong-shape": (None, _reshape, None, AdapterError, INVALID),
    "missing-tensor": (None, _drop, None, AdapterError, INVALID),
    "extra-tensor": (None, _extra, None, AdapterError, INVALID),
    "truncated": (None, None, lambda b: b[: len(b) // 2], AdapterError, INVALID),
    "trailing-bytes": (None, None, lambda b: b + b"\0" * 64, AdapterError, INVALID),
    "header-longer-than-file": (None, None, lambda b: (len(b) * 2).to_bytes(8, "little") + b[8:], AdapterError, INVALID),
    "header-over-limit": (None, None, lambda b: (1 << 40).to_bytes(8, "little") + b[8:], AdapterError, INVALID),
    "header-not-json": (None, None, lambda b: b[:8] + b"\xff" * (int.from_bytes(b[:8], "little")) + b[8 + int.from_bytes(b[:8], "little"):],
                        AdapterError, INVALID),
    "empty-weights": (None, None, lambda b: b"", AdapterError, INVALID),
}


def _header_size_lie(b: bytes) -> bytes:
    """A tensor whose declared shape disagrees with its byte range."""
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [d + 1 for d in header[key]["shape"]]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    return b[:8] + raw + b[8 + n:]


CASES["header-shape-lie"] = (None, None, _header_size_lie, AdapterError, INVALID)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from runtime.service import Service

    tmp = tmp_path_factory.mktemp("hardening")
    bert = make_bert_classifier(tmp / "bert")
    spec = resolve_base(f"hf:{bert}", name="b")
    root = tmp / "adapter_root"
    root.mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    random_adapter(spec, root / "good", rank=2, seed=1)
    good_cfg = (root / "good" / CONFIG_NAME).read_bytes()
    good_w = (root / "good" / WEIGHTS_NAME).read_bytes()

    for name, (cfg_fn, t_fn, raw_fn, _, _) in CASES.items():
        cfg = json.loads(good_cfg)
        if cfg_fn:
            cfg_fn(cfg)
        w = good_w
        if t_fn:
            tensors = dict(st_load(good_w))
            t_fn(tensors)
            w = st_save(tensors)
        if raw_fn:
            w = raw_fn(w)
        d = root / name
        d.mkdir()
        (d / CONFIG_NAME).write_text(json.dumps(cfg))
        (d / WEIGHTS_NAME).write_bytes(w)
    extra = {}
    # a 2 MB config; 200 MB weights and config files (sparse: refused by size or header, never read whole)
    d = root / "config-over-limit"
    d.mkdir()
    (d / CONFIG_NAME).write_text(json.dumps({**json.loads(good_cfg), "extra": {"pad": " " * (2 << 20)}}))
    (d / WEIGHTS_NAME).write_bytes(good_w)
    extra["config-over-limit"] = (AdapterError, INVALID)
    d = root / "weights-200mb"
    d.mkdir()
    (d / CONFIG_NAME).write_bytes(good_cfg)
    with open(d / WEIGHTS_NAME, "wb") as f:
        f.write(good_w[:8 + int.from_bytes(good_w[:8], "little")])
        f.truncate(BIG)
    extra["weights-200mb"] = (AdapterError, INVALID)
    d = root / "config-200mb"
    d.mkdir()
    with open(d / CONFIG_NAME, "wb") as f:
        f.truncate(BIG)
    (d / WEIGHTS_NAME).write_bytes(good_w)
    extra["config-200mb"] = (AdapterError, INVALID)
    d = root / "config-not-json"
    d.mkdir()
    (d / CONFIG_NAME).write_bytes(b"{not json")
    (d / WEIGHTS_NAME).write_bytes(good_w)
    extra["config-not-json"] = (AdapterError, INVALID)
    d = root / "missing-weights"
    d.mkdir()
    (d / CONFIG_NAME).write_bytes(good_cfg)
    extra["missing-weights"] = (AdapterError, INVALID)
    # symlinks out of the root: a whole directory, and one weights file
    shutil.copytree(root / "good", outside / "copy")
    os.symlink(outside / "copy", root / "symlinked-dir")
    extra["symlinked-dir"] = (AdapterError, INVALID)
    d = root / "symlinked-weights"
    d.mkdir()
    (d / CONFIG_NAME).write_bytes(good_cfg)
    os.symlink(outside / "copy" / WEIGHTS_NAME, d / WEIGHTS_NAME)
    extra["symlinked-weights"] = (AdapterError, INVALID)
    d = root / "symlinked-config"
    d.mkdir()
    os.symlink(outside / "copy" / CONFIG_NAME, d / CONFIG_NAME)
    (d / WEIGHTS_NAME).write_bytes(good_w)
    extra["symlinked-config"] = (AdapterError, INVALID)
    # a symlink that stays inside the root is fine
    os.symlink(root / "good", root / "alias")

    service = Service(ServeConfig(bases=(f"b=hf:{bert}",), backend="torch", port=0, adapter_root=str(root), preload=True,
                                  max_delay_ms=0.0, auto_merge=False))
    text = {"text": np.array([b"the movie is really good"], dtype=object)}
    _, out = service.predict("good", text)
    yield {"service": service, "root": root, "outside": outside, "tmp": tmp, "text": text,
           "good": out["logits"], "good_files": {CONFIG_NAME: good_cfg, WEIGHTS_NAME: good_w},
           "cases": {**{k: v[3:] for k, v in CASES.items()}, **extra}}
    service.drain()


def test_startup_loads_only_the_good_ones(world):
    loaded = {v.name for v in world["service"].repository.current.values()}
    assert loaded == {"good", "alias"}
    rows = {r.name: astuple(r) for r in world["service"].index_rows()}
    assert "symlinked-dir" not in rows  # resolves outside the root: not listed either
    assert rows["truncated"][2] == "UNAVAILABLE"


ALL = sorted(CASES) + ["config-over-limit", "weights-200mb", "config-200mb", "config-not-json",
                       "missing-weights", "symlinked-dir", "symlinked-weights", "symlinked-config"]


@pytest.mark.parametrize("name", ALL)
def test_malformed_adapter_is_refused(world, name):
    service, root = world["service"], world["root"]
    cls, code = world["cases"][name]
    before = service.index_rows()
    stats = dict(service.repository.stats)
    with pytest.raises(Exception) as info:
        service.load_now(name)
    e = info.value
    assert isinstance(e, cls), f"{name}: {type(e).__name__}: {e}"
    assert status_code(e) == code, f"{name}: {e}"
    msg = str(e)
    assert f"adapter {name!r}" in msg, msg
    for p in (str(root), str(root.resolve()), str(world["tmp"]), str(world["outside"])):
        assert p not in msg, msg
    assert service.index_rows() == before
    assert service.repository.stats == stats
    assert name not in service.repository.current
    _, out = service.predict("good", world["text"])
    np.testing.assert_allclose(out["logits"], world["good"], rtol=1e-5, atol=1e-6)


def _vm_rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.mark.parametrize("name", ["weights-200mb", "config-200mb"])
def test_big_file_is_refused_without_reading_it(world, name):
    service = world["service"]
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss0 = _vm_rss_kb()
    with pytest.raises(AdapterError):
        service.load_now(name)
    assert _vm_rss_kb() - rss0 < 50 << 10  # KB: far less than the 200 MB file
    # the peak did not jump by the file either (ru_maxrss is KB on Linux)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0 < 50 << 10


def test_refused_through_files_too(world):
    """The same checks hold for files sent in the request (RepositoryModelLoad)."""
    service = world["service"]
    before = service.index_rows()
    for name in ("factor-i8", "alpha-1e30", "truncated", "header-shape-lie"):
        files = {f: (world["root"] / name / f).read_bytes() for f in (CONFIG_NAME, WEIGHTS_NAME)}
        with pytest.raises(AdapterError) as info:
            service.load_now("sent-" + name, files)
        assert "adapter 'sent-" in str(info.value)
    assert service.index_rows() == before


def test_read_artifact_files_refuses_a_root_escape(world):
    with pytest.raises(AdapterError, match="outside the adapter root"):
        read_artifact_files(world["root"] / "symlinked-dir", source="adapter 'x'", root=world["root"])
    files = read_artifact_files(world["root"] / "alias", source="adapter 'alias'", root=world["root"])
    assert files == world["good_files"]


def test_adapter_cap(world):
    """A cap on loaded adapters in total: RESOURCE_EXHAUSTED for a new name when full; a reload
    of a loaded name still works; the registry is unchanged by the refusal."""
    service = world["service"]
    registry = service.repository
    old = registry.max_adapters
    registry.max_adapters = len(registry.current)
    try:
        before = service.index_rows()
        with pytest.raises(Overloaded) as info:
            service.load_now("one-more", world["good_files"])
        assert status_code(info.value) == EXHAUSTED
        assert "one-more" in str(info.value)
        assert service.index_rows() == before
        service.load_now("good")  # the same name: a new version, not a new adapter
        _, out = service.predict("good", world["text"])
        np.testing.assert_allclose(out["logits"], world["good"], rtol=1e-5, atol=1e-6)
    finally:
        registry.max_adapters = old


def test_refused_loads_give_their_memory_back(world):
    """Refusals after the fold (the most work a refused load does) do not accumulate memory."""
    service = world["service"]
    files = {f: (world["root"] / "alpha-1e30" / f).read_bytes() for f in (CONFIG_NAME, WEIGHTS_NAME)}
    for _ in range(5):
        with pytest.raises(AdapterError):
            service.load_now("churn", files)
    rss0 = _vm_rss_kb()
    for _ in range(50):
        with pytest.raises(AdapterError):
            service.load_now("churn", files)
    assert _vm_rss_kb() - rss0 < 20 << 10  # KB
    assert "churn" not in service.repository.current
