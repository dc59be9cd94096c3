"""The KV cache tensors: how many blocks, where they live, and the block copies the scheduler asks for.

One tensor per layer of this rank's pipeline stage, ``[2, num_blocks, block_size, num_kv_heads,
head_dim]`` (0: keys, 1: values; this rank's KV heads), all views into one allocation so a block id
means the same slot range in every layer. Layers whose attention declares the latent layout
(DeepSeek's MLA: one [latent | rope key] vector per token serves as every head's key and value)
get ``[num_blocks, block_size, head_dim]`` instead: half the bytes of K/V slots for the same vector. The CPU swap space (for ``--preemption-mode swap``) has the
same layout in pinned host memory.

A model with several KV cache groups (core/kv_cache_groups.py: Gemma 2/3's sliding-window and full
layers) allocates one tensor per *position in a group* rather than per layer: layer j of every group
uses tensor j (``KVCacheSpec.layer_slots``), and a block id, which belongs to one group's table at a
time, means that group's layers' slots. A block then costs group-size layers' bytes, not every layer's.

Sizing and allocation are two steps (``determine_num_blocks``, ``KVCache.allocate``) because with
several ranks the scheduler's one block pool must fit on every rank: the executor allocates the
minimum over ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vllm_engine.config import EngineConfig

logger = logging.getLogger(__name__)

GiB = 2**30


@dataclass(frozen=True)
class KVCacheSpec:
    """What one rank caches per block: its stage's layers, its share of the KV heads.

    ``num_layers``: the KV tensors of this rank (its layers; with several KV cache groups, the group
    positions its layers use); ``layer_slots[i]``: the tensor of the stage's i-th attention layer
    (None: tensor i); ``num_groups``: the KV cache groups (a sequence holds a block in each)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    layout: str = "kv"  # "kv": keys and values per KV head; "latent": one vector per token
    layer_slots: Optional[tuple[int, ...]] = None
    num_groups: int = 1

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across this rank's layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.block_size * self._vectors_per_token * self.head_dim * elem * self.num_layers

    @property
    def _vectors_per_token(self) -> int:
        return 1 if self.layout == "latent" else 2 * self.num_kv_heads

    @property
    def block_dim(self) -> int:
        """The dimension of a layer's cache tensor that indexes blocks."""
        return 0 if self.layout == "latent" else 1

    def layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """One layer's cache tensor for ``num_blocks`` blocks."""
        if self.layout == "latent":
            return (num_blocks, self.block_size, self.head_dim)
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


def determine_num_blocks(config: EngineConfig, spec: KVCacheSpec,
                         profile_free_memory: Callable[[], int], extra_bytes_per_block: int = 0) -> tuple[int, int]:
    """(num_gpu_blocks, num_cpu_blocks) that fit on this rank: the override, the profiled GPU budget,
    or the CPU space setting; CPU swap blocks from ``swap_space``. May be < 1 (too little memory:
    ``KVCache.allocate`` says so once the ranks agreed on a number).

    ``profile_free_memory`` is only called on CUDA: it runs a warm-up forward at the largest batch
    and returns the bytes left for KV blocks. ``extra_bytes_per_block``: what other caches indexed
    by the same block ids take per block (a draft model's, spec_decode/draft_model.py).
    """
    c, s = config.cache, config.scheduler
    per_block = spec.bytes_per_block + extra_bytes_per_block
    if c.num_gpu_blocks_override is not None:
        num_blocks = c.num_gpu_blocks_override
    elif config.device.device.type == "cuda":
        num_blocks = profile_free_memory() // per_block
    else:
        num_blocks = int(c.cpu_kv_cache_space_gib * GiB) // per_block
        # On the CPU, never allocate more than every sequence at full length could use.
        num_blocks = min(num_blocks, -(-config.model.max_model_len // c.block_size) * s.max_num_seqs * spec.num_groups)
    num_cpu_blocks = int(c.swap_space_gib * GiB) // per_block if s.preemption_mode == "swap" else 0
    return num_blocks, num_cpu_blocks


@dataclass(frozen=True)
class DeviceMemory:
    """The CUDA device's memory as this process sees it, in bytes: ``allocated`` (live torch
    tensors), ``reserved`` (held by torch's caching allocator, live or not), ``free``, ``total``."""

    allocated: int
    reserved: int
    free: int
    total: int

    @classmethod
    def now(cls) -> "DeviceMemory":
        free, total = torch.cuda.mem_get_info()
        return cls(torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), free, total)

    @property
    def outside_torch(self) -> int:
        """Held outside torch's allocator: other processes, the CUDA context, libraries' workspaces."""
        return self.total - self.free - self.reserved


def kv_budget(start: DeviceMemory, after: DeviceMemory, peak_allocated: int, utilization: float) -> int:
    """Bytes for this engine's KV blocks, from its memory profile (may be <= 0: nothing fits).

    As in vLLM, ``utilization`` is this engine's own share of the device (weights, activations, KV
    cache), whatever else runs there: two engines at 0.45 share one GPU. ``start``: the device when
    the engine began (what others held then: other processes, another engine in this process);
    ``after``: after its profiling forward, whose torch peak was ``peak_allocated``. The engine's
    own use is that peak less what was allocated at ``start``, plus what grew outside torch since
    (cuBLAS workspaces...). Memory torch's allocator holds but has not handed out (segments a live
    tensor pins, e.g. after a quantizing load) is reusable, not used.

    ValueError when the share is more than the device has free for it (free memory plus that
    reusable part, less the activations the next forwards take again), naming the setting.
    """
    own_peak = peak_allocated - start.allocated
    own_outside = max(0, after.outside_torch - start.outside_torch)
    share = after.total * utilization - own_peak - own_outside
    room = after.free + (after.reserved - after.allocated) - (peak_allocated - after.allocated)
    held_by_others = start.allocated + start.outside_torch
    logger.info("memory profile: total %.2f GiB, this engine's peak %.2f GiB (+%.2f GiB outside torch), held "
                "before it %.2f GiB; KV budget %.2f GiB (free for it %.2f GiB)", after.total / GiB, own_peak / GiB,
                own_outside / GiB, held_by_others / GiB, share / GiB, room / GiB)
    if share > room:
        raise ValueError(
            f"gpu_memory_utilization={utilization} gives this engine {after.total * utilization / GiB:.1f} GiB of "
            f"the device's {after.total / GiB:.1f} GiB, but {held_by_others / GiB:.1f} GiB were in use when it "
            f"started (other processes or engines): its KV cache would need {share / GiB:.1f} GiB and "
            f"{room / GiB:.1f} GiB are free; lower gpu_memory_utilization to at most "
            f"{utilization - (share - room) / after.total:.2f}, or free the device.")
    return int(share)


def _split_layers(buf: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
    return [buf[i] for i in range(num_layers)]


@dataclass
class KVCache:
    gpu_caches: list[torch.Tensor]  # per stage layer: KVCacheSpec.layer_shape
    cpu_caches: list[torch.Tensor]  # same layout, host (pinned when the device is CUDA); empty without swap space
    num_blocks: int
    num_cpu_blocks: int
    block_size: int
    block_dim: int = 1  # the dimension of a layer's tensor that indexes blocks (0: the latent layout)
    # The distinct GPU tensors when layers share them (several KV cache groups); None: gpu_caches.
    gpu_tensors: Optional[list[torch.Tensor]] = None

    @property
    def _gpu_store(self) -> list[torch.Tensor]:
        """Each GPU tensor once (the block moves' targets; ``cpu_caches`` matches it one to one)."""
        return self.gpu_tensors if self.gpu_tensors is not None else self.gpu_caches

    @classmethod
    def allocate(cls, config: EngineConfig, spec: KVCacheSpec, num_blocks: int, num_cpu_blocks: int,
                 device: torch.device) -> "KVCache":
        """``num_blocks`` blocks on ``device`` and ``num_cpu_blocks`` swap blocks on the host (pinned
        with CUDA); ValueError when fewer than one block fits."""
        c, m = config.cache, config.model
        per_block = spec.bytes_per_block
        blocks_per_seq = -(-m.max_model_len // c.block_size)
        if num_blocks < 1:
            raise ValueError(
                f"No memory left for the KV cache (one block needs {per_block / 2**20:.1f} MiB): lower "
                "max_num_batched_tokens or max_model_len, or raise gpu_memory_utilization."
            )
        if num_blocks < blocks_per_seq:
            logger.warning("the KV cache holds %d tokens, less than max_model_len=%d: long requests will be rejected",
                           num_blocks * c.block_size, m.max_model_len)
        gpu = torch.zeros(spec.num_layers, *spec.layer_shape(num_blocks), dtype=spec.dtype, device=device)
        cpu_list: list[torch.Tensor] = []
        if num_cpu_blocks:
            cpu = torch.zeros(spec.num_layers, *spec.layer_shape(num_cpu_blocks), dtype=spec.dtype,
                              pin_memory=device.type == "cuda")
            cpu_list = _split_layers(cpu, spec.num_layers)
        tensors = _split_layers(gpu, spec.num_layers)
        layer_caches = tensors if spec.layer_slots is None else [tensors[j] for j in spec.layer_slots]
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB), max concurrency at max_model_len=%d: %.1fx; "
            "CPU swap blocks: %d", num_blocks, c.block_size, num_blocks * c.block_size, num_blocks * per_block / GiB,
            m.max_model_len, num_blocks / blocks_per_seq, num_cpu_blocks)
        return cls(layer_caches, cpu_list, num_blocks, num_cpu_blocks, c.block_size, spec.block_dim,
                   None if spec.layer_slots is None else tensors)

    # ---- block moves, done before the step's forward pass ------------------------------------------
    def _index(self, ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=device)

    @staticmethod
    def _raw(caches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The caches as bytes when their type has no index ops (fp8): a block moves bit for bit."""
        if caches and caches[0].dtype.itemsize == 1:
            return [c.view(torch.uint8) for c in caches]
        return caches

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: GPU block src -> dst in every layer."""
        if not pairs:
            return
        dev = self.gpu_caches[0].device
        src = self._index([p[0] for p in pairs], dev)
        dst = self._index([p[1] for p in pairs], dev)
        dim = self.block_dim
        for cache in self._raw(self._gpu_store):
            cache.index_copy_(dim, dst, cache.index_select(dim, src))

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """(gpu block, cpu block) pairs: device -> host."""
        self._move(pairs, self._gpu_store, self.cpu_caches)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """(cpu block, gpu block) pairs: host -> device."""
        self._move(pairs, self.cpu_caches, self._gpu_store)

    def _move(self, pairs: list[tuple[int, int]], src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor]) -> None:
        if not pairs:
            return
        if not src_caches or not dst_caches:
            raise RuntimeError("swap requested but no CPU swap space was allocated")
        src_dev, dst_dev = src_caches[0].device, dst_caches[0].device
        src = self._index([p[0] for p in pairs], src_dev)
        dst = self._index([p[1] for p in pairs], dst_dev)
        dim = self.block_dim
        for s, d in zip(self._raw(src_caches), self._raw(dst_caches)):
            # Host -> device may be asynchronous (pinned source); device -> host must finish before the
            # host-side index_copy_ reads the staged blocks.
            d.index_copy_(dim, dst, s.index_select(dim, src).to(dst_dev, non_blocking=dst_dev.type == "cuda"))

    def usage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._gpu_store)
