"""Lean imports (STYLE.md 11): the core does not pull training-only or optional dependencies."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
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
    mods = _loaded_after("import wara_train.tasks, wara_train.trainer, wara_train.hf, wara_train.basespec")
    assert not [m for m in mods if m.split(".")[0] in ("exporter", "runtime", "wara")]
    for package, forbidden in (("wara_train", ("exporter", "runtime", "wara")), ("exporter", ("runtime", "wara"))):
        for f in (ROOT / package).rglob("*.py"):
            text = f.read_text()
            for name in forbidden:
                assert not imports(text, name), f"{f} imports {name}"
    named = [f"{f}:{i}" for package in ("runtime", "exporter") for f in (ROOT / package).rglob("*.py")
             for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(r'"minilm"|"effnet-lite0"', line)]
    assert not named, named


# ------------------------------------------------------------------------------------------
# structure: no import cycles, no long files (STYLE.md 1 and 12)

PACKAGES = ("wara_train", "exporter", "runtime", "wara", "benchmarks")
GENERATED = ("runtime.kserve",)  # generated gRPC stubs
MAX_LINES = 450


def module_files(root: pathlib.Path, packages=PACKAGES, generated=GENERATED) -> dict[str, pathlib.Path]:
    """Dotted module name -> file for every .py file of ``packages`` under ``root``, generated
    stubs left out; a package is named by its ``__init__.py``."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if not any(name == g or name.startswith(g + ".") for g in generated):
                files[name] = path
    return files


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(files: dict[str, pathlib.Path], generated=GENERATED) -> dict[str, set[str]]:
    """Module -> the modules of ``files`` it imports, from every ``import`` / ``from ... import``
    anywhere in its source (functions and ``if TYPE_CHECKING:`` included), relative imports
    resolved. ``from m import n`` reaches ``m.n`` when that is a module, else ``m``; importing a
    module also runs its packages' ``__init__``, an edge wherever the importer is not inside that
    package already (a submodule importing its own package's ``__init__`` by name is an edge)."""
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    source = ".".join(p for p in (base, node.module) if p)
                else:
                    source = node.module
                targets += [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source
                            for alias in node.names]
        edges = set()
        for target in targets:
            if any(target == g or target.startswith(g + ".") for g in generated):
                continue
            while target and target not in files:  # ``import m.x`` with x not a module: m
                target = target.rpartition(".")[0]
            if target:
                edges.add(target)
                edges |= {p for p in _parents(target) if p in files and p not in _parents(module) + [module]}
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]], limit: int = 50) -> list[list[str]]:
    """Elementary cycles of ``graph`` (each as ``[a, b, ..., a]``, starting at its smallest
    name), at most ``limit`` of them."""
    cycles: list[list[str]] = []

    def walk(start: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if len(cycles) >= limit:
                return
            if nxt == start:
                cycles.append(path + [start])
            elif nxt > start and nxt not in path:
                walk(start, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def test_the_import_graph_sees_every_form(tmp_path):
    for name, text in {
        "p/__init__.py": "from .a import A\n",
        "p/a.py": "A = 1\ndef f():\n    from . import b\n",
        "p/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.c import C\n",
        "p/c.py": "import p.a as a\nfrom p import A\nimport os, p.sub.d\n",
        "p/sub/__init__.py": "",
        "p/sub/d.py": "from ..a import A\nfrom .. import b\nfrom p.sub import e\n",
        "p/sub/e.py": "from p.gen.x import y\n",
        "p/gen/x.py": "from p import c\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    files = module_files(tmp_path, packages=("p",), generated=("p.gen",))
    assert "p.gen.x" not in files
    graph = import_graph(files, generated=("p.gen",))
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p", "p.a", "p.sub", "p.sub.d"},
                     "p.sub": set(), "p.sub.d": {"p.a", "p.b", "p.sub.e"}, "p.sub.e": set()}
    assert find_cycles(graph) == [["p", "p.a", "p.b", "p.c", "p"], ["p.a", "p.b", "p.c", "p.a"],
                                  ["p.a", "p.b", "p.c", "p.sub.d", "p.a"], ["p.b", "p.c", "p.sub.d", "p.b"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph(module_files(ROOT)))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_file_over_450_lines():
    long = {str(path.relative_to(ROOT)): n for path in module_files(ROOT).values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: " + ", ".join(f"{f} ({n})" for f, n in sorted(long.items()))
