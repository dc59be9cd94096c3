"""The gated GELU kernel (Gemma's GeGLU) against float64 torch, tanh approximation and erf form, under
the Triton interpreter on CPU; and the layer's dispatch (torch off CUDA)."""

from __future__ import annotations

import pytest
import torch

from vllm_engine.layers import fused_ops
from vllm_engine.layers.activation import GeluAndMul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows,d", [(3, 40), (1, 2500)])  # a masked edge; two column blocks
def test_triton_gelu_and_mul_matches_float64(approximate, dtype, tol, rows, d):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 2 * d, generator=g) * 4).to(dtype)  # gates far into both tails
    x[0, :4] = torch.tensor([0.0, 1e-4, -30.0, 30.0])
    got = fused_ops.triton_gelu_and_mul(x.to(DEVICE), approximate).double().cpu()
    gate, up = x.double()[:, :d], x.double()[:, d:]
    want = torch.nn.functional.gelu(gate, approximate=approximate) * up
    assert ((got - want).abs() - tol * want.abs()).max().item() < tol


def test_layer_runs_torch_off_cuda():
    x = torch.randn(2, 8)
    torch.testing.assert_close(GeluAndMul("tanh")(x), torch.nn.functional.gelu(x[:, :4], approximate="tanh") * x[:, 4:])


COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_engine.layers.fused_ops import _gelu_and_mul_kernel as k
for tanh in (True, False):
    consts = dict(D=14336, BLOCK=2048, TANH=tanh, PDL=True)
    sig = {n: "constexpr" if n in consts else dict(X="*bf16", Y="*bf16", stride_x="i32", stride_y="i32")[n]
           for n in k.arg_names}
    out = triton.compile(ASTSource(k, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=4, num_stages=3))
    print("griddepcontrol.wait" in out.asm["ptx"])
"""


def test_the_kernel_compiles_for_sm90():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]
