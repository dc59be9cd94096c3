"""layers/parallel_compile: Triton variants recorded inside compile_ahead and compiled side by side
at its exit, on threads or in compile worker processes, for real (for sm_90, with triton's bundled
ptxas, through a stand-in driver: no GPU needed), in a subprocess without the interpreter."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHILD = """
import json, os, sys, threading, time, torch, triton
from pathlib import Path
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from vllm_engine.layers.parallel_compile import TargetDriver

SM90 = GPUTarget("cuda", 90, 32)
driver.set_active(TargetDriver(SM90))  # what JITFunction.run asks the driver (warm-ups only: nothing launches)
from vllm_engine.layers import parallel_compile as PC
from vllm_engine.layers import triton_linear as TL
from vllm_engine.layers.parallel_compile import compile_ahead

kernel = TL._gemv_kernel_impl
cache = kernel.device_caches[0][0]
compiled_on = []  # the thread of every compile in this process
real_compile = kernel.compile
def spy(*a, **kw):
    compiled_on.append(threading.current_thread().name)
    return real_compile(*a, **kw)
kernel.compile = spy
cache_files = lambda: sorted(str(p) for p in Path(os.environ["TRITON_CACHE_DIR"]).rglob("*") if p.is_file())

def warm(c):  # what a real launch of triton_gemv(x, w, config=c) asks for
    kernel.warmup(x, w, w, torch.empty(2, 96), x, x, x, 96, 256, 256, 256, 96, 256, 256, 0.0, grid=(1,),
                  M=2, BLOCK_M=2, HAS_BIAS=False, BLOCK_N=c[0], BLOCK_K=c[1], ADD_NORM=False, SILU_MUL=False,
                  PDL=False, PREFETCH=False, num_warps=c[2], num_stages=c[3])

x, w = torch.randn(2, 256), torch.randn(96, 256)
mode = sys.argv[1]
del TL.GEMV_CONFIGS[3:]  # the picker's candidates: three tile configs are enough here (and compile faster)
if mode == "picker":  # decide(): every tile config compiled ahead, then timed (here: a stand-in timer)
    timed = []
    picker = TL.LinearPicker(timer=lambda fn, flush: timed.append(len(cache)) or 1.0)
    candidates = picker.candidates(2)
    choice, times = picker.decide((2, 96, 256), candidates, x, w, None)
    print(json.dumps(dict(threads=compiled_on, configs=len(TL.GEMV_CONFIGS), timed=timed,
                          names=sorted(times) == sorted(candidates), timing_s=picker.timing_seconds,
                          totals=PC.totals.variants)))
elif mode == "inside":  # decide() inside a caller's compile_ahead: recorded, nothing timed
    timed = []
    picker = TL.LinearPicker(timer=lambda fn, flush: timed.append(1) or 1.0)
    with compile_ahead() as ahead:
        result = picker.decide((2, 96, 256), picker.candidates(2), x, w, None)
        during = len(compiled_on)
    print(json.dumps(dict(threads=compiled_on, during=during, configs=len(TL.GEMV_CONFIGS), timed=timed,
                          result=result, decisions=len(picker.decisions),
                          done=[type(v).__name__ for v in cache.values()])))
else:
    configs = TL.GEMV_CONFIGS[:3]
    if mode == "workers":
        PC.start_workers(2)
    with compile_ahead() as ahead:
        for c in configs:
            TL.triton_gemv(x, w, config=c)
        TL.triton_add_norm_gemv(x, x.clone(), torch.ones(256), 1e-6, w, config=configs[0])
        during = len(compiled_on)
    after_block = dict(threads=list(compiled_on), files=len(cache_files()), cached=len(cache))
    PC.stop_workers()
    files = cache_files()
    for c in configs:
        warm(c)
    print(json.dumps(dict(ahead=ahead, during=during, **after_block, totals=[PC.totals.variants, PC.totals.seconds],
                          compiles_after=len(compiled_on) - len(after_block["threads"]),
                          new_files=len(cache_files()) - len(files),
                          cached_after=[type(v).__name__ for v in cache.values()])))
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


def test_variants_compile_on_threads_and_launches_find_them(tmp_path):
    """Without workers: inside compile_ahead the launches only record their variants (nothing
    compiles there); at the exit they compile on threads and land in the kernel's cache, under the
    key a real launch with the same arguments looks up (warming those up compiles nothing more)."""
    out = _run("ahead", tmp_path)
    assert out["ahead"] is True and out["during"] == 0
    assert len(out["threads"]) == 4 and all(t.startswith("triton-compile") for t in out["threads"]), out
    assert out["cached"] == 4 and out["compiles_after"] == 0 and out["new_files"] == 0
    assert out["totals"][0] == 4 and out["totals"][1] > 0  # what start-up reports as its compiles ahead


def test_variants_compile_in_worker_processes_into_the_cache_directory(tmp_path):
    """With workers: the variants compile in the worker processes (none in this one) into Triton's
    cache directory; this process's launches then load them from there: the same cache keys (no
    new files), with the compiled kernels in the kernel's cache."""
    out = _run("workers", tmp_path)
    assert out["ahead"] is True and out["during"] == 0 and out["threads"] == [] and out["cached"] == 0
    assert out["files"] > 0
    assert out["compiles_after"] == 3 and out["new_files"] == 0
    assert out["cached_after"] == ["CompiledKernel"] * 3
    assert out["totals"][0] == 4


def test_the_picker_compiles_every_tile_config_before_timing(tmp_path):
    """LinearPicker.decide compiles all of our GEMV's tile configs side by side before it times the
    first candidate (so each is timed without its compile, and the compiles overlap)."""
    out = _run("picker", tmp_path)
    assert len(out["threads"]) == out["configs"] and all(t.startswith("triton-compile") for t in out["threads"])
    assert out["timed"] == [out["configs"]] * (out["configs"] + 1)  # cuBLAS and each config, all compiled
    assert out["names"] and out["timing_s"] > 0 and out["totals"] == out["configs"]


def test_the_picker_inside_compile_ahead_only_records(tmp_path):
    """Inside a caller's compile_ahead (the graph capture's compile pass) nothing runs, so decide()
    must not time: it records every tile config and decides nothing (returns None); they compile
    at the block's exit."""
    out = _run("inside", tmp_path)
    assert out["result"] is None and out["decisions"] == 0 and out["timed"] == [] and out["during"] == 0
    assert len(out["threads"]) == out["configs"] and all(t.startswith("triton-compile") for t in out["threads"])
    assert out["done"] == ["CompiledKernel"] * out["configs"]
