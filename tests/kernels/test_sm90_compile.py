"""Every Triton kernel of the GPU path compiles for an H100 (sm_90) at real model shapes, checked on
any machine with Triton's bundled ptxas (tests/kernels/sm90_compile.py). The interpreter tests check
what the kernels compute; this checks that the GPU compiler accepts them and that they fit on an SM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _has_ptxas() -> bool:
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()
    except Exception:
        return False


@pytest.mark.skipif(not _has_ptxas(), reason="triton with its NVIDIA backend (ptxas) is not installed")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "0 failures" in r.stdout
    assert r.stdout.count("\nok ") + r.stdout.startswith("ok ") >= 30, r.stdout
