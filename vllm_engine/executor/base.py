"""The executor interface: how the engine runs a step on one rank or on many.

The engine calls, per step, ``handle = executor.launch(request)`` then (possibly after launching
the next step: async scheduling) ``output = executor.collect(handle)``; handles are collected in
the order they were launched. ``request`` is the scheduler's picklable step message; ``output``
the ``ModelRunnerOutput`` of the rank that samples.

Three transports, one interface:

* ``UniProcExecutor`` ("uni"): the ModelRunner in the engine's process (one GPU, or the CPU).
* ``MultiprocExecutor`` ("mp"): one process per rank, started by the engine (one machine).
* ``TorchrunExecutor`` ("torchrun"): the command was started by torchrun, on one machine or several;
  each of its processes is one rank, and rank 0 runs the engine.

torch.distributed carries every tensor between ranks (NCCL on CUDA, gloo on the CPU); the
executor's own traffic is the small typed messages of ``executor/messages.py``.
"""

from __future__ import annotations

import abc
import logging
import threading
from typing import Any, Callable, Optional

from vllm_engine.config import EngineConfig
from vllm_engine.core.sched_output import ModelRunnerOutput

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A worker rank is gone (killed, crashed, or its process group broke); the engine cannot go on."""

    def __init__(self, message: str, rank: Optional[int] = None) -> None:
        super().__init__(message)
        self.rank = rank


class Executor(abc.ABC):
    """Runs the model on this config's ranks. After ``initialize()`` the KV cache exists on every
    rank; ``shutdown()`` releases the ranks (idempotent)."""

    #: The ModelRunner in the engine's process, if a rank lives there (uni, torchrun's rank 0).
    model_runner: Any = None

    def __init__(self) -> None:
        self._failure_callbacks: list[Callable[[BaseException], None]] = []
        self._failure: Optional[BaseException] = None
        self._failure_lock = threading.Lock()

    @staticmethod
    def create(config: EngineConfig) -> "Executor":
        """The executor of ``config.parallel.distributed_executor_backend``."""
        backend = config.parallel.distributed_executor_backend
        if backend == "uni":
            from vllm_engine.executor.uniproc import UniProcExecutor

            return UniProcExecutor(config)
        if backend == "mp":
            from vllm_engine.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(config)
        if backend == "torchrun":
            from vllm_engine.executor.torchrun import TorchrunExecutor

            return TorchrunExecutor(config)
        raise ValueError(f"unknown distributed_executor_backend {backend!r}")

    @abc.abstractmethod
    def initialize(self) -> tuple[int, int]:
        """Sizes the KV cache (the minimum over ranks of what fits) and allocates it on every rank;
        returns (num_gpu_blocks, num_cpu_blocks)."""

    @abc.abstractmethod
    def launch(self, request: Any) -> Any:
        """Starts one step on every rank without waiting for its result; returns its handle."""

    @abc.abstractmethod
    def collect(self, handle: Any) -> ModelRunnerOutput:
        """Waits for a launched step (the oldest not yet collected) and returns its output."""

    def execute_model(self, request: Any) -> ModelRunnerOutput:
        return self.collect(self.launch(request))

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stops every rank and frees what they hold; no process is left behind."""

    def check_health(self) -> None:
        """Raises the failure (e.g. ``WorkerDiedError``) if a rank is gone."""
        if self._failure is not None:
            raise self._failure

    def add_failure_callback(self, fn: Callable[[BaseException], None]) -> None:
        """``fn(error)`` runs once, from a monitor thread, when a rank dies while the engine is not
        waiting on it (an idle server must still fail, not serve a broken model); at once if one
        already has."""
        self._failure_callbacks.append(fn)
        if self._failure is not None:
            fn(self._failure)

    def _report_failure(self, error: BaseException) -> BaseException:
        """Records the first failure and tells the callbacks; returns the failure to raise."""
        with self._failure_lock:
            if self._failure is not None:
                return self._failure
            self._failure = error
        logger.error("%s", error)
        for fn in list(self._failure_callbacks):
            try:
                fn(error)
            except Exception:  # noqa: BLE001 - one callback's fault must not hide the failure
                logger.exception("executor failure callback failed")
        return error
