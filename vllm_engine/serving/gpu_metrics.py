"""GPU gauges on /metrics, read at scrape time, label ``gpu`` (the device's index as this process sees it):

- through NVML (``pip install nvidia-ml-py``, the ``gpu`` extra), for every device in
  ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) or every device: ``vllm_engine:gpu_memory_used_bytes``,
  ``gpu_memory_total_bytes`` (the whole device, every process) and ``gpu_utilization_perc`` (0-1: the
  fraction of the last sample period in which a kernel ran);
- without NVML, if this process has initialised CUDA: the memory gauges of its current device from
  ``torch.cuda.mem_get_info`` (never initialising CUDA itself), and no utilisation;
- on a host without GPUs: nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional

from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

P = "vllm_engine:"


def _nvml() -> Optional[Any]:
    """The initialised pynvml module (nvidia-ml-py), or None if absent or no driver answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - not installed, no driver, no device: no NVML gauges
        return None


def _nvml_handles(nvml: Any) -> list[tuple[str, Any]]:
    """(label, handle) of each device this process may use, in CUDA's order."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
    out = []
    for i, dev in enumerate(d.strip() for d in visible.split(",") if d.strip()):
        handle = nvml.nvmlDeviceGetHandleByUUID(dev) if not dev.isdigit() else nvml.nvmlDeviceGetHandleByIndex(int(dev))
        out.append((str(i), handle))
    return out


class GPUCollector:
    """A prometheus_client collector of the gauges above (module docstring)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.nvml = _nvml()
        self.handles = []
        if self.nvml is not None:
            try:
                self.handles = _nvml_handles(self.nvml)
            except Exception:  # noqa: BLE001 - a device NVML cannot open: fall back to torch
                logger.warning("NVML could not open the visible GPUs: no utilisation gauges", exc_info=True)
                self.nvml = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        rows = self._nvml_rows() if self.nvml is not None else self._torch_rows()
        if not rows:
            return
        labels = ["model_name", "gpu"]
        used = GaugeMetricFamily(P + "gpu_memory_used_bytes", "GPU memory in use (every process).", labels=labels)
        total = GaugeMetricFamily(P + "gpu_memory_total_bytes", "GPU memory in total.", labels=labels)
        util = GaugeMetricFamily(P + "gpu_utilization_perc", "Fraction of the last sample period in which a GPU "
                                 "kernel ran (NVML). 1 means 100 percent.", labels=labels)
        for gpu, used_bytes, total_bytes, utilization in rows:
            used.add_metric([self.model_name, gpu], used_bytes)
            total.add_metric([self.model_name, gpu], total_bytes)
            if utilization is not None:
                util.add_metric([self.model_name, gpu], utilization)
        yield used
        yield total
        if util.samples:
            yield util

    def _nvml_rows(self) -> list[tuple[str, float, float, Optional[float]]]:
        rows = []
        for gpu, handle in self.handles:
            mem = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            rate = self.nvml.nvmlDeviceGetUtilizationRates(handle)
            rows.append((gpu, float(mem.used), float(mem.total), rate.gpu / 100.0))
        return rows

    @staticmethod
    def _torch_rows() -> list[tuple[str, float, float, Optional[float]]]:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        device = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device)
        return [(str(device), float(total - free), float(total), None)]
