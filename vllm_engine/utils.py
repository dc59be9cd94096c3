"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Iterator, Optional

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. On CUDA the copy goes through pinned memory and is queued
    without waiting: a copy from pageable memory would make the host wait for the GPU to drain,
    which would undo the overlap of host and GPU work. On the CPU it is ``t`` itself."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def freeze_gc() -> int:
    """Moves every object alive now to the garbage collector's permanent generation; returns how many.

    Python's cycle collector scans every tracked object in a full (generation 2) collection. With an
    engine built, that is over 200,000 objects (torch, transformers, the model's modules, captured
    graphs): 170-200 ms per full collection on the development machine's CPU. The requests, lists and
    outputs a running engine allocates trigger one every so often, and the step it lands on stalls
    that long: a TTFT or TPOT outlier. Frozen objects are skipped by every later collection.

    Call it once the engine is built and warmed up, in a process that keeps that engine for its
    lifetime (the server, a benchmark): objects frozen here are never freed by the cycle collector,
    only by their reference counts. ``gc.unfreeze()`` undoes it, before dropping such an engine.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class StartupPhases:
    """Start-up phase timer: ``with phases("weights"): ...`` records the phase's seconds and logs one
    line for it (``startup: weights 3.21 s``). On CUDA a phase ends after the device finishes its
    work, so queued kernels are charged to the phase that queued them."""

    def __init__(self, logger: Any, device: Optional[Any] = None) -> None:
        self.seconds: dict[str, float] = {}
        self._logger = logger
        self._cuda = device is not None and getattr(device, "type", None) == "cuda"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            self._logger.info("startup: %s %.2f s", name, dt)

    def record(self, name: str, seconds: float, detail: str = "") -> None:
        """Records (and logs) a cost measured elsewhere, e.g. one spread over several phases."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self._logger.info("startup: %s %.2f s%s", name, seconds, f" ({detail})" if detail else "")
