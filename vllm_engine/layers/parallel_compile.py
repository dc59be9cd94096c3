"""Compiling Triton kernel variants side by side, ahead of their first launch.

A first start compiles more than a hundred Triton variants (one per tile config and constexpr
value), most of them the tile configs the linear-kernel picker times once per shape
(``layers/triton_linear.LinearPicker``). Compiled one after another on the launching thread, that
was most of the Llama-3.1-8B-shape first start on the H200 (graph capture 56 s of 93 s). A compile
holds the GIL for most of its time, so threads overlap little of it; processes do.

Our launch sites call ``launch``. Inside ``compile_ahead`` it launches nothing: Triton's
``jit_cache_hook`` records each variant the launch would compile (its specialization, as
``JITFunction.preload`` takes it) and skips the compile. At the block's exit the variants compile
side by side, in compile worker processes forked from this one (``start_workers``), which write
them into Triton's cache directory, or, without workers, on threads of this process. The launches
that follow find them there::

    start_workers()                 # at start-up (forked at the first variant)
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
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextvars import ContextVar
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
JOB_TIMEOUT_S = 300.0  # waiting for one variant from the workers; past it, left to its first launch


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


def compile_variants(jobs: list[tuple[str, str, str]]) -> int:
    """Compiles each (module, kernel name, specialization) side by side: on the workers when
    started (into Triton's cache directory), else on threads of this process (into the kernels'
    caches). Returns how many compiled; the others are logged and left to their first launch."""
    if not jobs:
        return 0
    if _workers is not None:
        errors = _workers.compile(jobs)
    else:
        with ThreadPoolExecutor(min(MAX_WORKERS, usable_cpus(), len(jobs)), thread_name_prefix="triton-compile") as pool:
            errors = list(pool.map(lambda job: _preload(*job), jobs))
    failed = [e for e in errors if e]
    for e in failed[:3]:
        logger.debug("compiling ahead failed (left to the first launch): %s", e)
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


def _init_worker(target: Any) -> None:
    from triton.runtime.driver import driver

    driver.set_active(TargetDriver(target))  # never the GPU's: this process only compiles


class CompileWorkers:
    """``count`` processes forked from this one when first needed (they have every module already;
    they never touch the GPU: their Triton driver is a ``TargetDriver`` for ``target``), each
    compiling one variant at a time into Triton's cache directory."""

    def __init__(self, count: int, target: Any) -> None:
        self.count, self.target = count, target
        self._pool: Optional[ProcessPoolExecutor] = None

    def compile(self, jobs: list[tuple[str, str, str]]) -> list[Optional[str]]:
        """Compiles each (module, kernel name, specialization) on the workers; the errors, in order
        (None: compiled)."""
        pool = self._workers()
        futures = [pool.submit(_preload, *job) for job in jobs]
        errors: list[Optional[str]] = []
        for (module, name, _), future in zip(jobs, futures):
            try:
                errors.append(future.result(timeout=JOB_TIMEOUT_S))
            except Exception as e:  # a worker died (BrokenProcessPool) or hung: the first launch compiles it
                errors.append(f"{module}.{name}: compile worker failed ({type(e).__name__}: {e})")
        return errors

    def _workers(self) -> ProcessPoolExecutor:
        if self._pool is None:  # forked at the first submit (all of them: a fork pool never adds any later)
            self._pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_init_worker, initargs=(self.target,))
        return self._pool

    def close(self) -> None:
        """Ends the workers (one that does not end within seconds is killed)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            procs = list((getattr(pool, "_processes", None) or {}).values())  # the executor's own record
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()


_workers: Optional[CompileWorkers] = None


def start_workers(count: Optional[int] = None, target: Any = None) -> None:
    """From now until ``stop_workers``, ``compile_ahead`` compiles in ``count`` worker processes
    (default: this process's CPUs, at most ``MAX_WORKERS``) for ``target`` (default: the current
    GPU's), forked at its first variant. Where processes cannot be forked, it keeps to threads."""
    global _workers
    if _workers is not None or not available() or "fork" not in multiprocessing.get_all_start_methods():
        return
    if target is None:
        from triton.runtime.driver import driver

        target = driver.active.get_current_target()
    _workers = CompileWorkers(count or max(1, min(MAX_WORKERS, usable_cpus())), target)


def stop_workers() -> None:
    """Ends the compile workers (``compile_ahead`` then compiles on threads)."""
    global _workers
    workers, _workers = _workers, None
    if workers is not None:
        workers.close()
