"""Small helpers shared across the package."""

from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. On CUDA the copy goes through pinned memory and is queued
    without waiting: a copy from pageable memory would make the host wait for the GPU to drain,
    which would undo the overlap of host and GPU work. On the CPU it is ``t`` itself."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
