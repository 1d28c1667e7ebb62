"""Runs the Ray Serve cluster tests (tests/ray_cluster_cases.py) in a pytest process of their own.

They drive the cluster with tritonclient in-process, and tritonclient's generated stubs register
the same proto package (``inference.*``) as our runtime.kserve stubs in protobuf's one default
descriptor pool: once any earlier test of the suite has imported our edge, importing tritonclient
fails with "duplicate symbol 'inference.ServerLiveRequest'". A separate process keeps both true to
how users run them (the server in one process, tritonclient in another).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("ray_cluster_cases.py")


@pytest.mark.slow
def test_ray_cluster_cases_in_their_own_process():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(CASES)],
                          capture_output=True, text=True, timeout=1200, cwd=CASES.parent.parent)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary  # every case ran (Ray is installed)
