"""What every benchmark result records: the machine, the versions, the git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    versions = {}
    for pkg in ("torch", "onnxruntime", "onnx", "grpcio", "peft", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": versions,
        "git_commit": git_commit(),
    }
