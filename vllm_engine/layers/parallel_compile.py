"""Compiling Triton kernel variants side by side, ahead of their first launch.

A first start compiles more than a hundred Triton variants (one per tile config and constexpr
value), most of them the tile configs the linear-kernel picker times once per shape
(``layers/triton_linear.LinearPicker``). Compiled one after another on the launching thread, that
was most of the Llama-3.1-8B-shape first start on the H200 (graph capture 56 s of 93 s). A compile
holds the GIL for most of its time, so threads overlap little of it; processes do.

Our launch sites call ``launch``. Inside ``compile_ahead`` it launches nothing: Triton's
``jit_cache_hook`` records each variant the launch would compile (its specialization, as
``JITFunction.preload`` takes it) and skips the compile. At the block's exit the variants compile
side by side, in compile worker processes (``start_workers``, ``compile_worker.py``), which write
them into Triton's cache directory, or, without workers, on threads of this process. The launches
that follow find them there::

    start_workers()                 # as early as possible: each imports torch and Triton first
    with compile_ahead() as ahead:
        if ahead:
            model(*inputs)          # runs no Triton kernel: its outputs are left unwritten
    model(*inputs)                  # compiles nothing (loads from the cache), runs
    stop_workers()

A variant that fails to compile is left out there and fails again, the usual way, at its first
real launch. Launches of kernels that do not go through ``launch`` still run (and compile as
usual) inside the block. ``compile_ahead`` yields False (and ``launch`` launches) without Triton,
under the interpreter, and when nested.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import queue
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from vllm_engine import envs

try:
    import triton
    from triton import knobs
except ImportError:  # no Triton, or one without knobs (before 3.4)
    triton = knobs = None

logger = logging.getLogger(__name__)

# The variants recorded in this compile_ahead block: specialization JSON -> (module, kernel name).
_jobs: ContextVar[Optional[dict[str, tuple[str, str]]]] = ContextVar("vllm_engine_compile_ahead", default=None)

MAX_WORKERS = 16
JOB_TIMEOUT_S = 300.0  # waiting for one variant from a worker; past it, left to its first launch


def available() -> bool:
    """Whether ``compile_ahead`` can compile ahead here."""
    return knobs is not None and hasattr(knobs.runtime, "jit_cache_hook") and not envs.triton_interpret()


def compiling_ahead() -> bool:
    """Whether this thread is inside ``compile_ahead`` (launches only record their variants: nothing
    runs, so nothing may be timed or read)."""
    return _jobs.get() is not None


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``compile_ahead``, only the variant is recorded."""
    if _jobs.get() is not None:
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _record(previous: Any):
    """A ``jit_cache_hook`` recording the warm-ups of ``launch`` inside ``compile_ahead`` (True: Triton
    skips their compile); any other compile goes on as usual (to ``previous``, the hook it replaced)."""

    def hook(**kw: Any) -> Optional[bool]:
        jobs = _jobs.get()
        if jobs is None or not kw.get("is_manual_warmup"):
            return previous(**kw) if previous is not None else None
        fn = kw["fn"]
        jobs.setdefault(kw["compile"]["specialization_data"], (str(fn.module), fn.name))
        return True

    return hook


@contextlib.contextmanager
def compile_ahead() -> Iterator[bool]:
    """Inside, ``launch`` records variants instead of launching; the exit compiles them side by
    side. Yields whether that mode is on (False: launches launch, see the module docstring)."""
    if not available() or _jobs.get() is not None:
        yield False
        return
    jobs: dict[str, tuple[str, str]] = {}
    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = _record(previous)
    token = _jobs.set(jobs)
    try:
        yield True
    finally:
        _jobs.reset(token)
        knobs.runtime.jit_cache_hook = previous
    compile_variants([(module, name, spec) for spec, (module, name) in jobs.items()])


def kernel_by_name(module: str, name: str) -> Any:
    """The JITFunction ``module.name`` (through wrappers such as an autotuner: their ``fn``)."""
    kernel = importlib.import_module(module)
    for part in name.split("."):
        kernel = getattr(kernel, part)
    while not hasattr(kernel, "preload") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


@dataclass
class CompileTotals:
    """What ``compile_variants`` did in this process: variants compiled, and its wall seconds."""

    variants: int = 0
    seconds: float = 0.0


totals = CompileTotals()  # start-up reports them (ModelRunner.initialize_cache)


def compile_variants(jobs: list[tuple[str, str, str]]) -> int:
    """Compiles each (module, kernel name, specialization) side by side: on the workers when
    started (into Triton's cache directory), else on threads of this process (into the kernels'
    caches). Returns how many compiled; the others are logged and left to their first launch."""
    if not jobs:
        return 0
    t0 = time.perf_counter()
    if _workers is not None:
        from triton.runtime.driver import driver

        errors = _workers.compile(jobs, driver.active.get_current_target())
    else:
        threads = min(MAX_WORKERS, usable_cpus(), len(jobs))
        with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool:
            errors = list(pool.map(lambda job: _preload(*job), jobs))
    failed = [e for e in errors if e]
    for e in failed[:3]:
        logger.debug("compiling ahead failed (left to the first launch): %s", e)
    totals.variants += len(jobs) - len(failed)
    totals.seconds += time.perf_counter() - t0
    return len(jobs) - len(failed)


def _preload(module: str, name: str, spec: str) -> Optional[str]:
    """Compiles one variant in this process; returns the error, if any."""
    try:
        kernel_by_name(module, name).preload(spec)
    except Exception as e:  # the first real launch compiles it again and raises
        return f"{module}.{name}: {type(e).__name__}: {e}"
    return None


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class TargetDriver:
    """What ``JITFunction.preload`` asks Triton's driver, answered for a fixed target (no GPU): the
    compile workers' driver."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


class CompileWorkers:
    """``count`` processes running ``python -m vllm_engine.layers.compile_worker``, started at once:
    each imports Triton and the kernels' modules (seconds), then compiles one variant at a time (a
    JSON line on its stdin, with the target) into Triton's cache directory and answers with a JSON
    line (null, or the error). They never touch the GPU."""

    def __init__(self, count: int) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="",  # this process's modules, whatever put them on its path
                   PYTHONPATH=os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path))
        self._procs = [subprocess.Popen([sys.executable, "-m", "vllm_engine.layers.compile_worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, env=env) for _ in range(count)]

    def __len__(self) -> int:
        return len(self._procs)

    def compile(self, jobs: list[tuple[str, str, str]], target: Any) -> list[Optional[str]]:
        """Compiles each (module, kernel name, specialization) for ``target``, each worker taking the
        next job when done with its last; the errors, in order (None: compiled)."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for i, job in enumerate(jobs):
            todo.put((i, job))
        errors: list[Optional[str]] = [f"{m}.{n}: no compile worker left" for m, n, _ in jobs]
        head = [str(target.backend), target.arch, target.warp_size]

        def feed(proc: subprocess.Popen) -> None:
            while True:
                try:
                    i, (module, name, spec) = todo.get_nowait()
                except queue.Empty:
                    return
                errors[i] = self._one(proc, head + [module, name, spec])
                if proc.poll() is not None:  # it died: the others take the rest
                    return

        with ThreadPoolExecutor(len(self._procs), thread_name_prefix="triton-compile") as pool:
            list(pool.map(feed, self._procs))
        return errors

    @staticmethod
    def _one(proc: subprocess.Popen, job: list) -> Optional[str]:
        what = f"{job[-3]}.{job[-2]}"
        try:
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            if not select.select([proc.stdout], [], [], JOB_TIMEOUT_S)[0]:
                proc.kill()
                return f"{what}: no answer from its compile worker within {JOB_TIMEOUT_S:.0f} s"
            line = proc.stdout.readline()
        except OSError as e:
            return f"{what}: compile worker gone ({e})"
        return json.loads(line) if line else f"{what}: compile worker gone (exit {proc.poll()})"

    def close(self) -> None:
        """Ends the workers (at the end of their input; one that does not end within seconds is killed)."""
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


_workers: Optional[CompileWorkers] = None


def start_workers(count: Optional[int] = None) -> None:
    """Starts ``count`` compile workers (default: this process's CPUs, at most ``MAX_WORKERS``), used
    by ``compile_ahead`` until ``stop_workers``; a no-op when they run already. Start them early:
    each first imports torch, Triton and the kernels' modules (seconds), and the compiles wait
    for that."""
    global _workers
    if _workers is None and available():
        _workers = CompileWorkers(count or max(1, min(MAX_WORKERS, usable_cpus())))


def stop_workers() -> None:
    """Ends the compile workers (``compile_ahead`` then compiles on threads)."""
    global _workers
    workers, _workers = _workers, None
    if workers is not None:
        workers.close()
