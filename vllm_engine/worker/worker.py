"""Worker: one rank of the model. Its device, its place in the process groups, its ModelRunner
(which builds this rank's slice of the model) and its KV cache.

Executors (``vllm_engine/executor/``) create one Worker per rank: in the engine's process for one
rank, in processes of their own (or torchrun's) for several. ``run_worker_loop`` is what a worker
process does: carry out the driver's messages, in order, until ``Shutdown``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from vllm_engine.config import EngineConfig
from vllm_engine.core.sched_output import ModelRunnerOutput
from vllm_engine.distributed import destroy_distributed, init_distributed
from vllm_engine.distributed.parallel_state import default_backend
from vllm_engine.executor.messages import (CollectStep, DetermineNumBlocks, InitializeCache, LaunchStep, Reply,
                                           Shutdown)
from vllm_engine.layers import parallel_compile
from vllm_engine.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def output_rank(config: EngineConfig) -> int:
    """The rank whose outputs the engine reads: tensor rank 0 of the last pipeline stage (it samples;
    its tensor-parallel peers sample the same tokens)."""
    p = config.parallel
    return (p.pipeline_parallel_size - 1) * p.tensor_parallel_size


class Worker:
    """Rank ``rank`` of ``config.parallel.world_size``, on ``cuda:local_rank`` (or the CPU).

    With one rank nothing distributed is set up and the device is the configured one, so the
    in-process executor runs exactly the ModelRunner it ran before there were workers.
    ``distributed_init_method``: how the ranks find each other (``tcp://``, ``file://``, or
    ``env://`` under torchrun).
    """

    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0,
                 distributed_init_method: Optional[str] = None) -> None:
        p = config.parallel
        self.rank, self.local_rank, self.world_size = rank, local_rank, p.world_size
        if self.world_size > 1 and config.device.device.type == "cuda":
            # One GPU per rank on a machine; the config names "cuda", this rank means its own.
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            config = dataclasses.replace(config, device=dataclasses.replace(config.device, device=device))
        self.config = config
        self.device = config.device.device
        if self.world_size > 1:
            init_distributed(self.world_size, rank, default_backend(self.device), distributed_init_method,
                             p.tensor_parallel_size, p.pipeline_parallel_size)
        self.model_runner = ModelRunner(config)

    def determine_num_blocks(self) -> tuple[int, int]:
        """(num_gpu_blocks, num_cpu_blocks): the minimum over every rank of what fits there (a
        collective: every rank calls it)."""
        num_gpu_blocks, num_cpu_blocks = self.model_runner.determine_num_blocks()
        if self.world_size == 1:
            return num_gpu_blocks, num_cpu_blocks
        counts = torch.tensor([num_gpu_blocks, num_cpu_blocks], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)
        num_gpu_blocks, num_cpu_blocks = counts.tolist()
        return num_gpu_blocks, num_cpu_blocks

    def initialize_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        self.model_runner.initialize_cache(num_gpu_blocks, num_cpu_blocks)

    def launch(self, request: Any) -> Any:
        return self.model_runner.launch(request)

    def collect(self, handle: Any) -> ModelRunnerOutput:
        return self.model_runner.collect(handle)

    def execute_model(self, request: Any) -> ModelRunnerOutput:
        return self.model_runner.execute_model(request)

    def shutdown(self) -> None:
        """Ends start-up's compile workers if a failed start left them, and leaves the process group
        (a no-op with one rank)."""
        parallel_compile.stop_workers()
        if self.world_size > 1:
            destroy_distributed()


def run_worker_loop(worker: Worker, recv: Callable[[], Any], reply: Optional[Callable[[Reply], None]]) -> None:
    """Carries out the driver's messages in order until ``Shutdown``.

    Steps are launched and collected in the driver's own order (a launch may come before the
    previous step is collected: async scheduling), so this rank's request states match the
    driver's at every launch. ``reply``: set on the output rank only, which answers CollectStep,
    DetermineNumBlocks and InitializeCache.
    """
    launched: deque = deque()
    while True:
        msg = recv()
        if isinstance(msg, LaunchStep):
            launched.append(worker.launch(msg.request))
            continue
        if isinstance(msg, CollectStep):
            value: Any = worker.collect(launched.popleft())
        elif isinstance(msg, DetermineNumBlocks):
            value = worker.determine_num_blocks()
        elif isinstance(msg, InitializeCache):
            value = worker.initialize_cache(msg.num_gpu_blocks, msg.num_cpu_blocks)
        elif isinstance(msg, Shutdown):
            return
        else:
            raise TypeError(f"worker rank {worker.rank}: unexpected message {type(msg).__name__}")
        if reply is not None:
            reply(Reply(value))
