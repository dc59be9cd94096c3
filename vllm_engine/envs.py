"""Every environment variable the engine reads, read here (docs/environment.md lists them).

Each accessor reads the environment when called, so a test's ``monkeypatch.setenv`` takes effect.

| variable | default | effect |
|---|---|---|
| ``VLLM_ENGINE_CACHE_DIR`` | ``$XDG_CACHE_HOME/vllm-engine`` | where downloaded models and converted tokenizers live |
| ``VLLM_ENGINE_API_KEY`` | unset | the server requires ``Authorization: Bearer <key>`` |
| ``VLLM_ENGINE_PDL`` | ``1`` | ``0``: Triton kernels launch without programmatic dependent launch (layers/pdl.py) |
| ``VLLM_ENGINE_LINEAR`` | ``auto`` | ``cublas``: every linear layer on CUDA takes cuBLAS, no GEMV/GEMM picker (A/B runs) |
| ``VLLM_ENGINE_FOLD`` | ``1`` | ``0``: no norm / activation folded into the GEMV (A/B runs) |
| ``VLLM_ENGINE_WORKER_MULTIPROC_METHOD`` | ``forkserver`` | how ``-tp``/``-pp`` worker processes start: ``forkserver`` (fast) or ``spawn`` |
| ``TRITON_INTERPRET`` | unset | Triton's own: ``1`` runs kernels in its interpreter (CPU tests) |
"""

from __future__ import annotations

import os
from typing import Optional

LINEAR_MODES = ("auto", "cublas")


def cache_dir() -> Optional[str]:
    """``$VLLM_ENGINE_CACHE_DIR`` when set and non-empty, else None (the caller's default applies)."""
    return os.environ.get("VLLM_ENGINE_CACHE_DIR") or None


def api_key() -> Optional[str]:
    """``$VLLM_ENGINE_API_KEY`` when set and non-empty, else None (no authentication)."""
    return os.environ.get("VLLM_ENGINE_API_KEY") or None


def pdl_enabled() -> bool:
    """False when ``VLLM_ENGINE_PDL=0``."""
    return os.environ.get("VLLM_ENGINE_PDL", "1") != "0"


def linear_mode() -> str:
    """``VLLM_ENGINE_LINEAR``: ``auto`` (time cuBLAS against our Triton kernels per shape) or ``cublas``."""
    mode = os.environ.get("VLLM_ENGINE_LINEAR", "auto")
    if mode not in LINEAR_MODES:
        raise ValueError(f"VLLM_ENGINE_LINEAR={mode!r}: use 'auto' (time cuBLAS against our kernels) or 'cublas'.")
    return mode


def fold_enabled() -> bool:
    """False when ``VLLM_ENGINE_FOLD=0``: norms and SiLU-and-mul stay their own kernels."""
    return os.environ.get("VLLM_ENGINE_FOLD", "1") != "0"


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


WORKER_MULTIPROC_METHODS = ("forkserver", "spawn")


def worker_multiproc_method() -> str:
    """``VLLM_ENGINE_WORKER_MULTIPROC_METHOD``: how the multiprocess executor starts its workers."""
    method = os.environ.get("VLLM_ENGINE_WORKER_MULTIPROC_METHOD", "forkserver")
    if method not in WORKER_MULTIPROC_METHODS:
        raise ValueError(f"VLLM_ENGINE_WORKER_MULTIPROC_METHOD={method!r}: use 'forkserver' or 'spawn'.")
    return method
