"""The torchrun executor: the command was started by torchrun, one process per rank, on one machine
or several; each process finds its rank in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT).

    torchrun --nproc-per-node 2 -m vllm_engine.cli serve MODEL -tp 2
    # two machines, one GPU each: on machine N (0 or 1), machine 0's address as the meeting point
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank N --master-addr HOST0 --master-port 29500 \\
        -m vllm_engine.cli serve MODEL -tp 2

Process 0 runs the engine (and the server); ``Engine(...)`` in every other process serves process
0's messages until it shuts down, then ends the process (``SystemExit(0)``): the same command works
on every rank. Messages go by ``broadcast_object_list`` on a gloo group of their own; tensors by the
model's NCCL / gloo groups.

Process 0 is given the output rank's place in the layout (tensor rank 0 of the last pipeline
stage, which samples), so the engine reads its outputs from its own ModelRunner, with no transfer.
"""

from __future__ import annotations

import datetime
import logging
import os
import weakref
from typing import Any

import torch.distributed as dist

from vllm_engine.config import EngineConfig
from vllm_engine.core.sched_output import ModelRunnerOutput
from vllm_engine.executor.base import Executor, WorkerDiedError
from vllm_engine.executor.messages import CollectStep, DetermineNumBlocks, InitializeCache, LaunchStep, Shutdown

logger = logging.getLogger(__name__)

# Ranks other than 0 wait for messages in a collective: idle time must not count as a timeout.
MESSAGE_TIMEOUT = datetime.timedelta(days=365)


def layout_rank(launch_rank: int, out_rank: int) -> int:
    """Launch rank 0 (the engine) takes the output rank's place; the process that would have had it
    takes rank 0's. Every other rank keeps its number."""
    if launch_rank == 0:
        return out_rank
    return 0 if launch_rank == out_rank else launch_rank


class TorchrunExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        from vllm_engine.worker.worker import Worker, output_rank, run_worker_loop

        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            raise ValueError("distributed_executor_backend='torchrun' needs the command started by torchrun "
                             "(RANK and WORLD_SIZE are not set).")
        launch_rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        if world_size != config.parallel.world_size:
            raise ValueError(f"torchrun started {world_size} processes, but tensor_parallel_size x "
                             f"pipeline_parallel_size = {config.parallel.world_size}.")
        self.driver_rank = output_rank(config)
        rank = layout_rank(launch_rank, self.driver_rank)
        self.worker = Worker(config, rank, int(env.get("LOCAL_RANK", 0)), "env://")
        # Every rank creates it, in the same order after the model's groups (torch.distributed's rule).
        self.message_group = dist.new_group(backend="gloo", timeout=MESSAGE_TIMEOUT)
        self._closed = False
        if launch_rank != 0:
            logger.info("torchrun rank %d (layout rank %d): serving rank 0's engine", launch_rank, rank)
            try:
                run_worker_loop(self.worker, self._recv, None)
            finally:
                self.worker.shutdown()
            raise SystemExit(0)
        self.model_runner = self.worker.model_runner
        # The other ranks wait for a message: without shutdown() they must still get one when this
        # process ends (or they would fail on the broken connection, and torchrun with them).
        self._finalizer = weakref.finalize(self, _shutdown_ranks, self.worker, self.message_group, self.driver_rank)

    # ---- the interface (the engine's process) --------------------------------------------------------
    def initialize(self) -> tuple[int, int]:
        self._broadcast(DetermineNumBlocks())
        num_gpu_blocks, num_cpu_blocks = self.worker.determine_num_blocks()
        self._broadcast(InitializeCache(num_gpu_blocks, num_cpu_blocks))
        self.worker.initialize_cache(num_gpu_blocks, num_cpu_blocks)
        return num_gpu_blocks, num_cpu_blocks

    def launch(self, request: Any) -> Any:
        self._broadcast(LaunchStep(request))
        return self.worker.launch(request)

    def collect(self, handle: Any) -> ModelRunnerOutput:
        self._broadcast(CollectStep())
        return self.worker.collect(handle)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        if self._failure is None:
            _shutdown_ranks(self.worker, self.message_group, self.driver_rank)
        else:
            self.worker.shutdown()

    # ---- messages ------------------------------------------------------------------------------------
    def _broadcast(self, msg: Any) -> None:
        self.check_health()
        try:
            dist.broadcast_object_list([msg], src=self.driver_rank, group=self.message_group)
        except Exception as e:  # a broken connection: another rank is gone (torchrun stops the rest)
            raise self._report_failure(WorkerDiedError(f"a worker rank is gone: {e}")) from e

    def _recv(self) -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=self.driver_rank, group=self.message_group)
        return box[0]


def _shutdown_ranks(worker: Any, message_group: Any, driver_rank: int) -> None:
    """Rank 0: tells the other ranks to leave, then leaves the process group itself."""
    try:
        dist.broadcast_object_list([Shutdown()], src=driver_rank, group=message_group)
    except Exception:  # noqa: BLE001 - the other ranks may be gone already
        logger.warning("could not tell the other ranks to shut down", exc_info=True)
    worker.shutdown()
