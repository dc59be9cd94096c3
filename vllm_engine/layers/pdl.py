"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper and newer).

A batch-1 decode step of Llama-8B is ~380 kernels, most of them a few microseconds long. Launched
the ordinary way, each waits for its predecessor to finish completely before its programs are even
scheduled, so every boundary costs the launch latency and the predecessor's tail. With PDL the
kernel is launched with the programmatic-stream-serialization attribute (``launch_pdl=True``): its
programs may be scheduled as soon as every program of the predecessor has started and signalled
``gdc_launch_dependents``, and they block in ``gdc_wait`` until the predecessor has finished and its
writes are visible. A CUDA graph capture keeps these edges.

The rules that keep this correct:

1. Every program of a kernel launched with PDL calls ``gdc_wait`` (via ``pdl_prologue``) before it
   writes anything, before it reads anything an earlier kernel of the step writes, and before any
   early return. Then each kernel still finishes after its predecessor, which finished after its
   own, and so on: every write lands in the same order as without PDL.
2. Before the wait a kernel may read only what no kernel of the step writes: weights and other
   constants (norm weights, the rotary table), and the step's metadata (positions, slot mapping,
   sequence lengths, start rows, block tables, decode order). The host's copies put the metadata
   in place before the step's first kernel, and a kernel can start only after its predecessor has
   started; going back along that chain one reaches a kernel launched without PDL (the embedding
   lookup at the latest), which started after everything queued before it had finished. So the
   GEMV fetches its first weight tile, and the attention kernels walk their index arrays, while
   the previous kernel is still running.

``VLLM_ENGINE_PDL=0`` turns it off. It is off on GPUs before sm_90, under the Triton interpreter,
and with a Triton that lacks the ``gdc`` intrinsics.
"""

from __future__ import annotations

import functools

import torch

from vllm_engine import envs

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
    if gdc_wait is None or device.type != "cuda" or envs.triton_interpret() or not envs.pdl_enabled():
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch whose kernel takes a ``PDL`` constexpr and starts with
    ``pdl_prologue(PDL)``: ``{"PDL": True, "launch_pdl": True}`` or ``{"PDL": False}``."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


if triton is not None and gdc_wait is not None:

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        """In a kernel launched with PDL, before its first write or dependent read (module docstring):
        let the next kernel's programs be scheduled, then wait until the previous kernel has finished
        (its writes visible)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()

elif triton is not None:

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        pass
