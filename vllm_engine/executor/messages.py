"""The typed messages between the engine (or the driver rank) and the worker ranks.

The engine sends each worker the same sequence of messages; every worker carries them out in that
order, so their request states, KV caches and sampled tokens stay identical to the driver's. A
step's ``request`` is the scheduler's picklable step message (``ExecuteModelRequest``); the executor
never looks inside it. Replies come only from the rank whose output the engine reads
(``output_rank``): the first tensor-parallel rank of the last pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class LaunchStep:
    """Launch one step (``ModelRunner.launch``); no reply: the engine does not wait for it."""

    request: Any


@dataclass(frozen=True)
class CollectStep:
    """Wait for the oldest launched step not yet collected; the output rank replies with its
    ``ModelRunnerOutput``."""


@dataclass(frozen=True)
class DetermineNumBlocks:
    """Measure the KV blocks that fit; every rank agrees on the minimum (reply: (gpu, cpu) blocks)."""


@dataclass(frozen=True)
class InitializeCache:
    """Allocate this many KV blocks (reply: None, once done)."""

    num_gpu_blocks: int
    num_cpu_blocks: int


@dataclass(frozen=True)
class Shutdown:
    """Leave the worker loop and the process group."""


@dataclass(frozen=True)
class WorkerReady:
    """A worker built its model and waits for messages."""

    rank: int
    pid: int


@dataclass(frozen=True)
class WorkerFailure:
    """A worker's exception, sent before it exits; ``error`` is kept when it pickles (a ValueError
    about the configuration reaches the user as such)."""

    rank: int
    traceback: str
    error: Optional[BaseException] = None


@dataclass(frozen=True)
class Reply:
    """The output rank's answer to CollectStep / DetermineNumBlocks / InitializeCache."""

    value: Any


ToWorker = (LaunchStep, CollectStep, DetermineNumBlocks, InitializeCache, Shutdown)
