"""Build ``wara_kernels`` (CMakeLists.txt at the repository root) with CMake and Ninja.

    python -m runtime.native.build            # what `make test`, `make demo` and `make gpu-check` run

The first build configures ``build/native/<python>-torch<version>/`` (one directory per torch, so
a changed venv never links against a stale torch), later ones let Ninja rebuild only what a
changed source needs: a no-op build takes a fraction of a second. Builds are serialised by a
file lock. CUDA sources are built when torch is a CUDA build and CMake finds nvcc, for the
visible GPU's architecture (``nvidia-smi``; 9.0 if none answers).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = "libwara_kernels.so" if sys.platform != "darwin" else "libwara_kernels.dylib"


class BuildError(RuntimeError):
    """The native build could not run or failed; the message says why (with the log's tail)."""


def sources_present() -> bool:
    return (ROOT / "CMakeLists.txt").is_file() and (ROOT / "csrc").is_dir()


def build_dir() -> Path:
    """``$WARA_NATIVE_BUILD_DIR`` or ``build/native/<python>-torch<version>`` under the repository."""
    if os.environ.get("WARA_NATIVE_BUILD_DIR"):
        return Path(os.environ["WARA_NATIVE_BUILD_DIR"])
    import torch

    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")
    return ROOT / "build" / "native" / tag


def library_path(directory: Path | None = None) -> Path:
    return (directory or build_dir()) / LIBRARY


def _cuda_arch() -> str | None:
    """The first visible GPU's compute capability as CMake wants it ("90"), without touching CUDA
    in this process."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0].replace(".", "") if out and re.fullmatch(r"\d+\.\d+", out[0]) else None


def _tool(name: str) -> str:
    """cmake / ninja from PATH or next to this Python (pip's cmake and ninja packages)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise BuildError(f"{name} not found on PATH: install {name} (apt-get install {name}, or pip install {name})")
    return found


def _run(cmd: list[str], log, what: str) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode})")


def build(*, verbose: bool = False) -> Path:
    """Configure (first time) and build; return the library's path. Raises `BuildError`."""
    if not sources_present():
        raise BuildError(f"no native sources (CMakeLists.txt, csrc/) under {ROOT}")
    import torch
    import torch.utils

    cmake, ninja = _tool("cmake"), _tool("ninja")
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "build.log"
    t0 = time.perf_counter()
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(log_path, "w") as log:
                if not (directory / "build.ninja").is_file():
                    cuda = torch.version.cuda is not None
                    cmd = [cmake, "-S", str(ROOT), "-B", str(directory), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                           "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                           f"-DPython3_EXECUTABLE={sys.executable}", f"-DWARA_CUDA={'ON' if cuda else 'OFF'}"]
                    arch = _cuda_arch() if cuda else None
                    if arch:
                        cmd.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
                    _run(cmd, log, "cmake configure")
                _run([cmake, "--build", str(directory)], log, "cmake --build")
        except BuildError as e:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            raise BuildError(f"{e}; see {log_path}:\n{tail}") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    lib = library_path(directory)
    if not lib.is_file():
        raise BuildError(f"the build finished but {lib} is missing")
    if verbose:
        print(f"wara_kernels: {lib} ({time.perf_counter() - t0:.1f} s)")
    return lib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the native op library wara_kernels (CMake + Ninja).")
    p.add_argument("--check", action="store_true", help="also load the library and print its build info")
    args = p.parse_args(argv)
    try:
        lib = build(verbose=True)
    except BuildError as e:
        print(f"wara_kernels: build failed: {e}", file=sys.stderr)
        return 1
    if args.check:
        import torch

        torch.ops.load_library(str(lib))
        print(torch.ops.wara.build_info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
