"""Lean imports (STYLE.md 11): the core does not pull training-only or optional dependencies."""

from __future__ import annotations

import re
import subprocess
import sys

HEAVY = ["transformers", "sentence_transformers", "sklearn", "efficientnet_lite_pytorch", "yaml", "onnxruntime"]


def _loaded_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_core_import_is_lean():
    mods = _loaded_after(
        "import wara_train, wara_train.config, wara_train.wavelets, wara_train.delta, "
        "wara_train.layer, wara_train.model, wara_train.artifact, wara_train.bases"
    )
    assert not [m for m in HEAVY if m in mods]


def test_runtime_and_exporter_do_not_import_training():
    mods = _loaded_after("import runtime, exporter")
    assert "wara_train.trainer" not in mods and "wara_train.tasks" not in mods and "torch" not in mods


def test_server_import_does_not_load_training_or_cuda():
    code = ("import sys, runtime.server, runtime.service, runtime.engine, torch; "
            "print(torch.cuda.is_initialized(), ' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out[0] == "False"
    mods = set(out[1:])
    assert not {"wara_train.trainer", "wara_train.tasks", "wara_train.data", "transformers", "onnx"} & mods


def imports(text: str, package: str) -> bool:
    """Whether ``text`` imports the top-level ``package`` or anything in it (``import p``,
    ``import p.x``, ``import os, p``, ``from p import x``, ``from p.x import y``); ``p_other``
    is another package."""
    name = re.escape(package)
    pattern = (rf"^\s*(?:from\s+{name}(?![\w])"
               rf"|import\s+(?:[\w.]+(?:\s+as\s+\w+)?\s*,\s*)*{name}(?![\w]))")
    return re.search(pattern, text, re.M) is not None


def test_the_import_check_catches_every_form():
    for line in ("import wara", "import wara.cli", "from wara import cli", "from wara.cli import main",
                 "    import wara as w", "import os, wara", "import os as o, wara.cli", "from  wara import x"):
        assert imports(line, "wara"), line
    for line in ("import wara_train", "from wara_train import bases", "from wara_train.hf import hf_spec",
                 "import os, wara_train", "# import wara", "x = 'from wara import y'", "from .wara import x"):
        assert not imports(line, "wara"), line


def test_one_way_imports_and_no_base_named_outside_the_registry():
    """core <- training <- exporter <- runtime <- the wara CLI: the training package imports
    neither the exporter nor the runtime, and no module of runtime/ or exporter/ names a base."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    mods = _loaded_after("import wara_train.tasks, wara_train.trainer, wara_train.hf, wara_train.basespec")
    assert not [m for m in mods if m.split(".")[0] in ("exporter", "runtime", "wara")]
    for package, forbidden in (("wara_train", ("exporter", "runtime", "wara")), ("exporter", ("runtime", "wara"))):
        for f in (root / package).rglob("*.py"):
            text = f.read_text()
            for name in forbidden:
                assert not imports(text, name), f"{f} imports {name}"
    named = [f"{f}:{i}" for package in ("runtime", "exporter") for f in (root / package).rglob("*.py")
             for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(r'"minilm"|"effnet-lite0"', line)]
    assert not named, named
