"""One host-to-device copy per step for all of its input arrays.

A step's inputs are ten small arrays (token ids, positions, slot mapping, block tables, sequence
lengths, ...). Sent one by one through ``host_to_device``, each costs a pinned allocation, a
``pin_memory`` copy and a ``cudaMemcpyAsync``: about 50 µs of host time apiece on the GPU machines'
hosts (`gpu_kernel_profile.py`), 0.4-0.7 ms per step, while at batch 256 the host's whole step is
close to the GPU's. ``HostStaging`` packs them into one pinned buffer, copies that with one
asynchronous copy, and hands out typed views of the device copy.

The buffers form a ring of ``slots``. A slot's host buffer is rewritten only after the copy that
last read it has finished (a CUDA event; with async scheduling it finished steps ago), and its device
buffer only by a copy queued behind every kernel that read the views of its previous use (one
stream). Off CUDA the "device" buffer is the host buffer itself: the same packing, no copy.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

_ALIGN = 16  # every array starts at a multiple of 16 bytes: any dtype view is aligned


class HostStaging:
    def __init__(self, device: torch.device, slots: int = 4, initial_bytes: int = 64 << 10) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._host: list[Optional[torch.Tensor]] = [None] * slots
        self._dev: list[Optional[torch.Tensor]] = [None] * slots
        self._done: list[Optional[torch.cuda.Event]] = [None] * slots
        self._typed: list[dict] = [{} for _ in range(slots)]  # per slot: the device buffer viewed per dtype
        self._initial = initial_bytes
        self._next = 0
        self.num_copies = 0  # host-to-device copies issued (tests)

    def _buffers(self, slot: int, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._done[slot] is not None:  # the copy that last read this slot (normally long finished)
            self._done[slot].synchronize()
        host = self._host[slot]
        if host is None or host.numel() < nbytes:
            size = max(self._initial, 1 << (nbytes - 1).bit_length())
            host = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
            self._host[slot] = host
            self._dev[slot] = torch.empty(size, dtype=torch.uint8, device=self.device) if self.cuda else host
            self._typed[slot] = {}
        return host, self._dev[slot]

    def stage(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """The arrays on the device, in order, same dtypes and shapes (C-contiguous copies)."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        return self._stage([(a.shape, a.dtype) for a in arrays], arrays, None)

    def stage_filled(self, shape: tuple[int, ...], dtype: np.dtype, fill: Callable[[np.ndarray], None],
                     *arrays: np.ndarray) -> list[torch.Tensor]:
        """``stage`` of an array of ``shape`` / ``dtype`` that ``fill(view)`` writes straight into the
        staging buffer (every element: the view is not cleared), then ``arrays``: no host copy of the
        first (a step's structured-output bitmask, up to a few MB). If ``fill`` raises, nothing is
        copied and the exception propagates."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        layout = [(tuple(shape), np.dtype(dtype))] + [(a.shape, a.dtype) for a in arrays]
        return self._stage(layout, [None, *arrays], fill)

    def _stage(self, layout: list[tuple[tuple[int, ...], np.dtype]], arrays: list[Optional[np.ndarray]],
               fill: Optional[Callable[[np.ndarray], None]]) -> list[torch.Tensor]:
        """``layout``: each array's (shape, dtype); ``arrays``: each one's values, or None for the one
        ``fill`` writes in place."""
        offsets, total = [], 0
        for shape, dtype in layout:
            offsets.append(total)
            total += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // _ALIGN) * _ALIGN
        slot = self._next
        self._next = (slot + 1) % len(self._host)
        host, dev = self._buffers(slot, max(total, 1))
        host_np = host.numpy()
        for (shape, dtype), a, off in zip(layout, arrays, offsets):
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if a is None:
                fill(host_np[off: off + size].view(dtype).reshape(shape))
            else:
                host_np[off: off + size] = a.reshape(-1).view(np.uint8)
        if self.cuda:
            dev[:total].copy_(host[:total], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._done[slot] = event
            self.num_copies += 1
        # One as_strided per array on a per-dtype view of the buffer (slicing and re-viewing would be
        # three torch ops each: tens of microseconds per step on a slow host).
        typed = self._typed[slot]
        out = []
        for (shape, dtype), off in zip(layout, offsets):
            base = typed.get(dtype)
            if base is None:
                base = typed[dtype] = dev.view(_TORCH_DTYPES[dtype])
            out.append(base.as_strided(shape, _contiguous_strides(shape), off // dtype.itemsize))
        return out


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return strides[::-1]


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32,
                 np.dtype(np.bool_): torch.bool, np.dtype(np.uint8): torch.uint8}
