"""Tensor- and pipeline-parallel groups over torch.distributed.

Ranks are laid out as in vLLM: ``global rank = pp_rank * tp_size + tp_rank``, so the ranks of a
pipeline stage (one tensor-parallel group) are consecutive, and pipeline group ``i`` holds tensor
rank ``i`` of every stage.

A worker process calls ``init_distributed(world_size, rank, ...)`` once, then builds its model: the
layers read ``get_tp_group()`` / ``get_pp_group()`` when they are built. Without that call (one GPU,
the CPU, tests) both groups are the single-process group: rank 0 of 1, no torch.distributed, and
every collective returns its input (the layers do not even call them at world size 1, so one rank
runs exactly the kernels it ran before tensor parallelism existed).

The one piece of module state is the registry of these two groups (``_GROUPS``), the counterpart of
torch.distributed's own default process group: set by ``init_distributed`` or
``override_parallel_state``, cleared by ``destroy_distributed``.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist


class GroupCoordinator:
    """One process group seen from one of its members.

    ``rank``: this process's rank in the group; ``world_size``: the group's size; ``ranks``: the
    global ranks of its members, in group order. ``device_group`` is the torch.distributed group
    (None for a group of one, or a simulated group: see ``override_parallel_state``).
    """

    def __init__(self, ranks: list[int], rank: int, device_group: Optional[dist.ProcessGroup] = None,
                 name: str = "", backend: Optional[str] = None) -> None:
        if rank not in ranks and len(ranks) > 0:
            raise ValueError(f"rank {rank} is not in group {ranks}")
        self.ranks = list(ranks)
        self.rank = self.ranks.index(rank)
        self.world_size = len(self.ranks)
        self.device_group = device_group
        self.name = name
        self.backend = backend

    # ---- position in the group (pipeline stages) ---------------------------------------------------
    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """The group rank after this one (wrapping), e.g. the next pipeline stage."""
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    def _group(self) -> dist.ProcessGroup:
        if self.device_group is None:
            raise RuntimeError(f"{self.name or 'this'} group of {self.world_size} ranks has no process group "
                               "(a simulated group, see override_parallel_state): no collectives")
        return self.device_group

    # ---- collectives -------------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group, in place; returns ``x`` (itself at world size 1)."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self._group())
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The members' ``x`` (same shape on every rank) concatenated along ``dim`` in rank order."""
        if self.world_size == 1:
            return x
        group = self._group()
        x = x.contiguous()
        if self.backend == "nccl":
            out = torch.empty((self.world_size,) + tuple(x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=group)
            return torch.cat(out.unbind(0), dim=dim)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` of group rank ``src`` on every member, in place."""
        if self.world_size == 1:
            return x
        dist.broadcast(x, src=self.ranks[src], group=self._group())
        return x

    def send(self, x: torch.Tensor, dst: Optional[int] = None) -> None:
        """Sends ``x`` to group rank ``dst`` (default: the next rank)."""
        dst = self.next_rank if dst is None else dst
        dist.send(x.contiguous(), dst=self.ranks[dst], group=self._group())

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             src: Optional[int] = None) -> torch.Tensor:
        """A tensor of ``shape``/``dtype`` from group rank ``src`` (default: the previous rank)."""
        src = self.prev_rank if src is None else src
        out = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out, src=self.ranks[src], group=self._group())
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._group())

    def __repr__(self) -> str:
        return f"GroupCoordinator({self.name}: rank {self.rank} of {self.world_size}, global ranks {self.ranks})"


@dataclass
class _ParallelGroups:
    tp: GroupCoordinator
    pp: GroupCoordinator
    world_size: int = 1
    rank: int = 0  # global rank


def _single() -> _ParallelGroups:
    return _ParallelGroups(GroupCoordinator([0], 0, name="tp"), GroupCoordinator([0], 0, name="pp"))


_GROUPS: Optional[_ParallelGroups] = None  # None: the single-process default


def get_tp_group() -> GroupCoordinator:
    """This process's tensor-parallel group (rank 0 of 1 unless ``init_distributed`` said otherwise)."""
    return (_GROUPS or _SINGLE).tp


def get_pp_group() -> GroupCoordinator:
    """This process's pipeline-parallel group: ``rank`` is the pipeline stage."""
    return (_GROUPS or _SINGLE).pp


def get_tensor_model_parallel_rank() -> int:
    return get_tp_group().rank


def get_tensor_model_parallel_world_size() -> int:
    return get_tp_group().world_size


def default_backend(device: Optional[torch.device] = None) -> str:
    """NCCL for CUDA, gloo otherwise."""
    if device is not None:
        return "nccl" if torch.device(device).type == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(world_size: int = 1, rank: int = 0, backend: Optional[str] = None,
                     init_method: Optional[str] = None, tp_size: int = 1, pp_size: int = 1,
                     timeout_s: float = 600.0) -> None:
    """Joins the process group (unless ``world_size`` is 1) and registers this rank's TP and PP groups.

    ``world_size`` must equal ``tp_size * pp_size``; ``init_method``: e.g. ``tcp://127.0.0.1:PORT`` or
    ``file:///path`` (default ``env://``: MASTER_ADDR / MASTER_PORT); ``backend``: ``nccl`` or ``gloo``
    (default: NCCL when CUDA is available). A CUDA worker should ``torch.cuda.set_device`` first.
    Calling it again with another layout without ``destroy_distributed`` is an error.
    """
    global _GROUPS
    if tp_size < 1 or pp_size < 1 or tp_size * pp_size != world_size:
        raise ValueError(f"world_size {world_size} must equal tp_size {tp_size} x pp_size {pp_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if _GROUPS is not None:
        raise RuntimeError("the parallel state is already initialized; call destroy_distributed() first")
    if world_size == 1:
        _GROUPS = _single()
        return
    backend = backend or default_backend()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method or "env://", world_size=world_size,
                                rank=rank, timeout=datetime.timedelta(seconds=timeout_s))
    tp = pp = None
    # Every rank creates every group, in the same order (torch.distributed's rule).
    for stage in range(pp_size):
        ranks = [stage * tp_size + i for i in range(tp_size)]
        group = dist.new_group(ranks, backend=backend) if tp_size > 1 else None
        if rank in ranks:
            tp = GroupCoordinator(ranks, rank, group, "tp", backend)
    for i in range(tp_size):
        ranks = [stage * tp_size + i for stage in range(pp_size)]
        group = dist.new_group(ranks, backend=backend) if pp_size > 1 else None
        if rank in ranks:
            pp = GroupCoordinator(ranks, rank, group, "pp", backend)
    assert tp is not None and pp is not None
    _GROUPS = _ParallelGroups(tp, pp, world_size, rank)


def destroy_distributed() -> None:
    """Forgets the groups and leaves the process group (if this module's ``init_distributed`` joined one)."""
    global _GROUPS
    groups, _GROUPS = _GROUPS, None
    if groups is not None and groups.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return _GROUPS is not None


@contextlib.contextmanager
def override_parallel_state(tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0,
                            pp_size: int = 1) -> Iterator[None]:
    """Within the block, layers and models are built as rank ``tp_rank`` of ``tp_size`` and stage
    ``pp_rank`` of ``pp_size``, in this one process and without communication (collectives of such
    a group raise): for checking what one rank holds, or running pipeline stages one after the other
    in one process. The previous state comes back afterwards."""
    global _GROUPS
    previous = _GROUPS
    tp_ranks = list(range(tp_size))
    pp_ranks = list(range(pp_size))
    _GROUPS = _ParallelGroups(GroupCoordinator(tp_ranks, tp_rank, name="tp"),
                              GroupCoordinator(pp_ranks, pp_rank, name="pp"),
                              tp_size * pp_size, pp_rank * tp_size + tp_rank)
    try:
        yield
    finally:
        _GROUPS = previous


_SINGLE = _single()
