"""Compiling Triton kernel variants side by side, ahead of their first launch.

A first start compiles a few hundred Triton variants (one per tile config and constexpr value),
most of them the tile configs the linear-kernel picker times once per shape
(``layers/triton_linear.LinearPicker``). Compiled one after another on the launching thread, that
was most of the Llama-3.1-8B-shape first start on the H200 (graph capture 56 s of 93 s). Triton's
``AsyncCompileMode`` runs the compiles that ``kernel.warmup(...)`` asks for on a thread pool, where
its compiler passes and ptxas run without the GIL. Our launch sites call ``launch``; inside
``compile_ahead`` it asks only for the compile, and the block's exit waits for them all::

    with compile_ahead() as ahead:
        if ahead:
            for config in configs:
                triton_gemv(x, w, config=config)  # queued: nothing runs, the output stays empty
    # every variant is compiled here, in the kernels' caches; the launches that follow compile nothing

A compile that fails inside the block is dropped there and fails again, the usual way, at the
variant's first real launch (with an older Triton, at the block's exit). ``compile_ahead`` yields False (and ``launch`` launches) without a
Triton that has ``AsyncCompileMode`` (3.4+), under the interpreter, and when nested.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Iterator, Optional

from vllm_engine import envs

try:
    import triton
except ImportError:
    triton = None

_ahead: ContextVar[bool] = ContextVar("vllm_engine_compile_ahead", default=False)

MAX_WORKERS = 16  # compiles at once (each also uses a little of another core for ptxas)


def available() -> bool:
    """Whether ``compile_ahead`` can compile in parallel here."""
    return triton is not None and hasattr(triton, "AsyncCompileMode") and not envs.triton_interpret()


def compiling_ahead() -> bool:
    """Whether this thread is inside ``compile_ahead`` (launches only compile: nothing runs, so
    nothing may be timed or read)."""
    return _ahead.get()


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``compile_ahead``, only the variant's compile is queued."""
    if _ahead.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _async_mode(pool: ThreadPoolExecutor) -> Any:
    """Triton's AsyncCompileMode on ``pool``, dropping failed compiles where this Triton can."""
    try:
        return triton.AsyncCompileMode(pool, ignore_errors=True)
    except TypeError:  # an older one: a failed compile raises at the block's exit
        return triton.AsyncCompileMode(pool)


@contextlib.contextmanager
def compile_ahead(workers: Optional[int] = None) -> Iterator[bool]:
    """Inside, ``launch`` queues compiles on ``workers`` threads (default: the CPUs, at most
    ``MAX_WORKERS``) instead of launching; the exit waits for them. Yields whether that mode is on
    (False: launches launch, see the module docstring)."""
    if not available() or _ahead.get():
        yield False
        return
    workers = workers or max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool, _async_mode(pool):
        token = _ahead.set(True)
        try:
            yield True
        finally:
            _ahead.reset(token)
