"""What start-up measures once and can reuse: the linear-kernel picker's choice per shape.

The picker (layers/triton_linear.py) times cuBLAS against each Triton config for every linear shape
a model runs, which is a large part of a start-up on a GPU. Those choices depend only on the GPU,
the software (CUDA, torch, triton, this package) and the shape, so they are kept in
``<cache dir>/startup/linear-<fingerprint>.json`` and offered to the picker on the next start. A
file whose recorded fingerprint differs from this machine's (another GPU, another version) is
ignored, never trusted; an unreadable one too. ``--no-startup-cache`` turns this off.

Triton's compiled kernels (keyed by Triton on GPU, versions and source) are kept beside them, in
``<cache dir>/triton`` (``use_triton_cache``), unless ``TRITON_CACHE_DIR`` names another directory;
``--no-startup-cache`` gives each process a fresh, temporary one instead, so every kernel compiles.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TRITON_CACHE_ENV = "TRITON_CACHE_DIR"
_chosen: dict[str, bool] = {}  # directories use_triton_cache put in TRITON_CACHE_DIR -> temporary


def use_triton_cache(enabled: bool) -> str:
    """Points Triton's compiled-kernel cache at ``<cache dir>/triton``, unless ``TRITON_CACHE_DIR``
    was set by the user; with the start-up cache off (``enabled`` False), at a fresh temporary
    directory removed at exit, so that no kernel compiled by an earlier start is reused. Call it
    before this process's first Triton compile: Triton reads the variable at each compile, and
    processes started afterwards (compile workers, rank workers) inherit it. Returns the directory."""
    from vllm_engine.model_loader.resolve import cache_dir

    current = os.environ.get(TRITON_CACHE_ENV)
    if current is not None and current not in _chosen and enabled:
        return current  # the user's choice
    if enabled:
        path = str(cache_dir() / "triton")
    elif current is not None and _chosen.get(current):
        return current  # this process's temporary one already
    else:
        path = tempfile.mkdtemp(prefix="vllm-engine-triton-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        logger.info("start-up cache off: Triton compiles into %s (removed at exit)", path)
    _chosen[path] = not enabled
    os.environ[TRITON_CACHE_ENV] = path
    return path


def fingerprint(device: torch.device) -> dict[str, Any]:
    """What the choices depend on besides the shape."""
    import triton

    from vllm_engine import __version__

    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__,
            "vllm_engine": __version__}


def _path(fp: dict[str, Any]) -> Path:
    from vllm_engine.model_loader.resolve import cache_dir

    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "startup" / f"linear-{digest}.json"


def load_linear_choices(fp: dict[str, Any]) -> dict[str, str]:
    """The choices recorded for exactly this fingerprint ({} when none, or the file does not match)."""
    path = _path(fp)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("start-up cache %s unreadable (%s): ignored", path, e)
        return {}
    if not isinstance(data, dict) or data.get("fingerprint") != fp or not isinstance(data.get("linear"), dict):
        logger.warning("start-up cache %s was made for another GPU or version: ignored", path)
        return {}
    return {str(k): str(v) for k, v in data["linear"].items()}


def save_linear_choices(fp: dict[str, Any], choices: dict[str, str]) -> None:
    """Adds ``choices`` to this fingerprint's file (written whole, then renamed into place)."""
    if not choices:
        return
    path = _path(fp)
    merged = {**load_linear_choices(fp), **choices}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "linear": merged}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache directory costs the next start its timing, nothing else
        logger.warning("start-up cache %s not written: %s", path, e)


def is_first_start(device: torch.device) -> bool:
    """Whether no start on this GPU and software has recorded its choices yet: a first start, whose
    Triton compiles (more than a hundred variants) are worth compile worker processes; later ones
    find them in Triton's cache (layers/parallel_compile.py)."""
    return not load_linear_choices(fingerprint(device))
