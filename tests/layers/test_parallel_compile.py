"""layers/parallel_compile: Triton variants compiled side by side on a thread pool, for real (for
sm_90, with triton's bundled ptxas, through a stand-in driver: no GPU needed), in a subprocess
without the interpreter."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHILD = """
import json, os, sys, threading, torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

class Sm90Driver:  # what JITFunction.run asks the driver (warm-ups only: nothing launches)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(Sm90Driver())
from vllm_engine.layers import triton_linear as TL
from vllm_engine.layers.parallel_compile import compile_ahead

kernel = TL._gemv_kernel_impl
cache = kernel.device_caches[0][0]
compiled_on = []  # the thread of every compile
real_compile = kernel.compile
def spy(*a, **kw):
    compiled_on.append(threading.current_thread().name)
    return real_compile(*a, **kw)
kernel.compile = spy

x, w = torch.randn(2, 256), torch.randn(96, 256)
if sys.argv[1] == "picker":  # decide(): every tile config compiled ahead, then timed (here: a stand-in timer)
    timed = []
    picker = TL.LinearPicker(timer=lambda fn, flush: timed.append(len(cache)) or 1.0)
    candidates = picker.candidates(2)
    choice, times = picker.decide((2, 96, 256), candidates, x, w, None)
    print(json.dumps(dict(threads=compiled_on, cached=len(cache), configs=len(TL.GEMV_CONFIGS), timed=timed,
                          names=sorted(times) == sorted(candidates))))
elif sys.argv[1] == "inside":  # decide() inside a caller's compile_ahead: compiles queued, nothing timed
    timed = []
    picker = TL.LinearPicker(timer=lambda fn, flush: timed.append(1) or 1.0)
    with compile_ahead(workers=2):
        result = picker.decide((2, 96, 256), picker.candidates(2), x, w, None)
    print(json.dumps(dict(threads=compiled_on, configs=len(TL.GEMV_CONFIGS), timed=timed, result=result,
                          decisions=len(picker.decisions), done=[type(v).__name__ for v in cache.values()])))
else:
    configs = TL.GEMV_CONFIGS[:3]
    with compile_ahead(workers=2) as ahead:
        for c in configs:
            TL.triton_gemv(x, w, config=c)
        TL.triton_add_norm_gemv(x, x.clone(), torch.ones(256), 1e-6, w, config=configs[0])
    done = [type(v).__name__ for v in cache.values()]
    before = len(compiled_on)
    for c in configs:  # what a real launch asks for: every variant is there already
        kernel.warmup(x, w, w, torch.empty(2, 96), x, x, x, 96, 256, 256, 256, 96, 256, 256, 0.0, grid=(1,),
                      M=2, BLOCK_M=2, HAS_BIAS=False, BLOCK_N=c[0], BLOCK_K=c[1], ADD_NORM=False, SILU_MUL=False,
                      PDL=False, PREFETCH=False, num_warps=c[2], num_stages=c[3])
    print(json.dumps(dict(ahead=ahead, threads=compiled_on, done=done, recompiled=len(compiled_on) - before)))
"""


def _run(mode: str, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_variants_compile_on_the_pool_and_launches_find_them(tmp_path):
    """Inside compile_ahead the launches only queue compiles, which run on the pool's threads; at the
    exit every variant is a compiled kernel in the kernel's cache, under the key a real launch with
    the same arguments looks up (warming those up compiles nothing more)."""
    out = _run("ahead", tmp_path)
    assert out["ahead"] is True
    assert len(out["threads"]) == 4 and all(t.startswith("triton-compile") for t in out["threads"]), out
    assert out["done"] == ["CompiledKernel"] * 4
    assert out["recompiled"] == 0


def test_the_picker_compiles_every_tile_config_before_timing(tmp_path):
    """LinearPicker.decide compiles all of our GEMV's tile configs on the pool before it times the
    first candidate (so each is timed without its compile, and the compiles overlap)."""
    out = _run("picker", tmp_path)
    assert len(out["threads"]) == out["configs"] and all(t.startswith("triton-compile") for t in out["threads"])
    assert out["timed"] == [out["configs"]] * (out["configs"] + 1)  # cuBLAS and each config, all compiled
    assert out["names"]


def test_the_picker_inside_compile_ahead_only_queues_compiles(tmp_path):
    """Inside a caller's compile_ahead (the graph capture's compile pass) nothing runs, so decide()
    must not time: it queues every tile config's compile and decides nothing (returns None)."""
    out = _run("inside", tmp_path)
    assert out["result"] is None and out["decisions"] == 0 and out["timed"] == []
    assert len(out["threads"]) == out["configs"] and all(t.startswith("triton-compile") for t in out["threads"])
    assert out["done"] == ["CompiledKernel"] * out["configs"]
