"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper and newer).

A batch-1 decode step of Llama-8B is ~380 kernels, most of them a few microseconds long. Launched
the ordinary way, each waits for its predecessor to finish completely before its programs are even
scheduled, so every boundary costs the launch latency and the predecessor's tail. With PDL the
kernel is launched with the programmatic-stream-serialization attribute (``launch_pdl=True``): its
programs may be scheduled as soon as every program of the predecessor has started and signalled
``gdc_launch_dependents``, and they block in ``gdc_wait`` until the predecessor has finished and its
writes are visible. A CUDA graph capture keeps these edges.

The rule that keeps this correct: a kernel launched with PDL calls ``gdc_wait`` in every program
before it reads or writes anything another kernel of the step touches (all our kernels do it first
thing, via ``pdl_prologue``). Then each kernel still finishes after its predecessor, which finished
after its own, and so on: the order of every write is the same as without PDL.

``VLLM_ENGINE_PDL=0`` turns it off. It is off on GPUs before sm_90, under the Triton interpreter,
and with a Triton that lacks the ``gdc`` intrinsics.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without grid dependency control
    triton = None
    gdc_wait = gdc_launch_dependents = None


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels launched for ``device`` use PDL (see the module docstring)."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("VLLM_ENGINE_PDL", "1") == "0":
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch whose kernel takes a ``PDL`` constexpr and starts with
    ``pdl_prologue(PDL)``: ``{"PDL": True, "launch_pdl": True}`` or ``{"PDL": False}``."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


if triton is not None and gdc_wait is not None:

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        """First thing in a kernel launched with PDL: let the next kernel's programs be scheduled, then
        wait until the previous kernel has finished (its writes visible)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()

elif triton is not None:

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        pass
