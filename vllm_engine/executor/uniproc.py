"""The in-process executor: one rank, in the engine's process (one GPU, or the CPU)."""

from __future__ import annotations

import gc
from typing import Any

import torch

from vllm_engine.config import EngineConfig
from vllm_engine.core.sched_output import ModelRunnerOutput
from vllm_engine.executor.base import Executor
from vllm_engine.worker.worker import Worker


class UniProcExecutor(Executor):
    """The ModelRunner of one Worker, called directly: a step costs what it cost before executors
    existed (one more Python call; no copy, no message, no process group)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.worker = Worker(config)
        self.model_runner = self.worker.model_runner

    def initialize(self) -> tuple[int, int]:
        return self.model_runner.initialize_kv_cache()

    def launch(self, request: Any) -> Any:
        return self.model_runner.launch(request)

    def collect(self, handle: Any) -> ModelRunnerOutput:
        return self.model_runner.collect(handle)

    def execute_model(self, request: Any) -> ModelRunnerOutput:
        return self.model_runner.execute_model(request)

    def shutdown(self) -> None:
        """Leaves the process group and lets go of the rank (model, KV cache, CUDA graphs): on CUDA
        their memory goes back to the device once nothing else holds them, so another engine can
        start in this process. Idempotent."""
        if self.worker is None:
            return
        self.worker.shutdown()
        device = self.model_runner.device
        self.worker = self.model_runner = None
        if device.type == "cuda":
            gc.collect()  # the runner's reference cycles (graphs, hooks) hold device tensors
            torch.cuda.empty_cache()
