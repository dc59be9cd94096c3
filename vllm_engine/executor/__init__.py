"""Executors: run the model's steps on one rank (in this process) or on many (one process per rank,
started by the engine or by torchrun). See ``executor/base.py``."""

from vllm_engine.executor.base import Executor, WorkerDiedError

__all__ = ["Executor", "WorkerDiedError"]
