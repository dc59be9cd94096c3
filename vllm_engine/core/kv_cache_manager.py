"""KVCacheManager: the scheduler's request-level view of KV memory (block tables, prefix hits, CoW, swap).

Every request that holds GPU blocks has a block table: ``blocks[i]`` holds the K/V of token
positions ``[i * block_size, (i + 1) * block_size)``. The manager keeps both the block objects and
the list of their ids (the list handed to the model runner, updated in place rather than rebuilt).
No tensors here: the copies and swaps it decides are carried out by the model runner.

Sliding window (every attention layer sees only the last ``sliding_window`` tokens: Mistral v0.1,
Phi-3): a block whose tokens no future query can see goes back to the pool (into the prefix cache,
if full and hashed) and its table entry becomes ``NULL_BLOCK``. The attention backends never read
blocks before a query's window, so a request holds about window / block_size blocks however long
it grows.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from vllm_engine.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block_tokens
from vllm_engine.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The table entry of a block freed because it fell out of the sliding window: never in the pool,
# never read (its id 0 only keeps the workers' int tables valid).
NULL_BLOCK = KVCacheBlock(0)


def _real(blocks) -> list[KVCacheBlock]:
    return [b for b in blocks if b is not NULL_BLOCK]


class KVCacheManager:
    def __init__(self, num_gpu_blocks: int, block_size: int, enable_caching: bool = True,
                 num_cpu_blocks: int = 0, sliding_window: Optional[int] = None) -> None:
        self.block_size = block_size
        self.sliding_window = sliding_window
        # Per request: blocks [0, n) are out of the window (NULL_BLOCK in its table).
        self.num_window_freed: dict[str, int] = {}
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_gpu_blocks, enable_caching)
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_block_ids: dict[str, list[int]] = {}
        # Requests whose req_block_ids list was changed in place since take_changed_tables() (the
        # workers keep their copies of the tables across steps; a rebuilt table is a new list).
        self.changed_tables: set[str] = set()
        # How many leading blocks of each request were already offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        # Copy-on-write copies decided since the scheduler last took them: (src, dst) GPU block ids.
        self.pending_copies: list[tuple[int, int]] = []
        # CPU swap space: a plain free list of ids. This step's swap-ins, per request: their CPU blocks
        # are released only at the next step, since the runner performs swap-outs before swap-ins.
        self.cpu_free: list[int] = list(range(num_cpu_blocks - 1, -1, -1))
        self.swap_ins_now: dict[str, list[tuple[int, int]]] = {}
        self.swapped_blocks: dict[str, list[int]] = {}
        self.prefix_cache_queries = 0  # tokens looked up (once per request, at its first scheduling)
        self.prefix_cache_hits = 0  # tokens found

    # ---- stats -------------------------------------------------------------------------------
    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self.cpu_free)

    def new_step(self) -> None:
        """Called at the start of each schedule(): CPU blocks read by last step's swap-ins become free."""
        for pairs in self.swap_ins_now.values():
            self.cpu_free.extend(c for c, _ in pairs)
        self.swap_ins_now = {}

    def take_swap_ins(self) -> list[tuple[int, int]]:
        """This step's (cpu, gpu) swap-in copies (those not cancelled by a swap-out in the same step)."""
        return [pair for pairs in self.swap_ins_now.values() for pair in pairs]

    def take_changed_tables(self) -> set[str]:
        out, self.changed_tables = self.changed_tables, set()
        return out

    def take_pending_copies(self) -> list[tuple[int, int]]:
        out, self.pending_copies = self.pending_copies, []
        return out

    # ---- prefix cache ------------------------------------------------------------------------
    def _block_hash(self, request: Request, i: int) -> BlockHash:
        """Hash of the request's full block i (hashes are computed once and kept in request.block_hashes)."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else None
            hashes.append(hash_block_tokens(parent, tuple(tokens[j * bs:(j + 1) * bs])))
        return hashes[i]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached full blocks at the start of ``request.all_token_ids``.

        Returns (blocks, num_tokens they cover). At least one token is always left to compute (the
        step that computes it samples the next token), so a fully cached sequence drops its last block.
        """
        if not self.enable_caching:
            return [], 0
        if request.sampling_params.prompt_logprobs is not None and request.num_output_tokens == 0:
            # Prompt logprobs need the logits of every prompt position: compute them all (as vLLM does).
            # The blocks it fills are still cached for others.
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        for i in range(max_blocks):
            h = self._block_hash(request, i)
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            if block.block_hash is not h:
                # Adopt the cached object: the next hash in the chain then has the very same parent
                # object, and equality stops at it instead of walking the whole chain again.
                request.block_hashes[i] = block.block_hash  # type: ignore[assignment]
                if len(request.block_hashes) > i + 1:
                    del request.block_hashes[i + 1:]
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Registers the request's blocks that became full (all their tokens computed) in the prefix cache."""
        if not self.enable_caching:
            return
        rid = request.request_id
        blocks = self.req_blocks.get(rid)
        if blocks is None:
            return
        start = self.num_cached_blocks.get(rid, 0)
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        for i in range(start, num_full):
            if blocks[i] is not NULL_BLOCK:
                self.pool.cache_full_block(blocks[i], self._block_hash(request, i))
        if num_full > start:
            self.num_cached_blocks[rid] = num_full

    # ---- allocation --------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Optional[list[KVCacheBlock]] = None) -> Optional[list[int]]:
        """Makes the block table cover the tokens up to ``start + num_new_tokens``, where ``start`` is
        ``request.num_computed_tokens``, or the prefix hit ``len(computed_blocks) * block_size`` when
        ``computed_blocks`` (from get_computed_blocks, for a request holding no blocks yet) is given.

        Blocks the new tokens would write into that are shared (ref_cnt > 1) are first replaced by
        private copies (copy-on-write; the copies are queued in ``pending_copies``).
        Returns the ids of newly allocated blocks, or None (allocating nothing) when too few are free.
        Free cached blocks count as free: they are evicted on demand. Pass ``computed_blocks`` (even
        empty) when scheduling a waiting request: its first scheduling counts in the prefix-cache stats.
        """
        rid = request.request_id
        bs = self.block_size
        blocks = self.req_blocks.get(rid)
        if self.sliding_window is not None and blocks:
            self._free_out_of_window(request, blocks)
        if computed_blocks is None and blocks:
            # Fast path (most decode steps): the tokens land in held blocks that no one else shares.
            start = request.num_computed_tokens
            last = (start + num_new_tokens - 1) // bs
            if last < len(blocks):
                first = start // bs
                if first == last:  # one block (every decode): no generator to build
                    if blocks[last].ref_cnt == 1:
                        return []
                elif all(blocks[i].ref_cnt == 1 for i in range(first, last + 1)):
                    return []
        first_lookup = computed_blocks is not None and request.num_cached_tokens < 0
        computed_blocks = computed_blocks or []
        if computed_blocks:
            assert not blocks, "a prefix hit is only for a request that holds no blocks"
        start = max(request.num_computed_tokens, len(computed_blocks) * bs)
        num_held = (len(blocks) if blocks else 0) + len(computed_blocks)
        num_needed = cdiv(start + num_new_tokens, bs)
        num_fresh = max(0, num_needed - num_held)
        # Copy-on-write: held blocks this step writes into (from the block of `start` on) that others share.
        cow = []
        if blocks:
            for i in range(start // bs, min(num_needed, len(blocks))):
                if blocks[i].ref_cnt > 1:
                    cow.append(i)
        # Free cached blocks taken by the hit leave the free list: they do not count as available.
        num_hit_free = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_fresh + len(cow) > self.pool.num_free_blocks - num_hit_free:
            return None

        if blocks is None:
            blocks = self.req_blocks[rid] = []
            self.req_block_ids[rid] = []
        ids = self.req_block_ids[rid]
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            ids.extend(b.block_id for b in computed_blocks)
            self.num_cached_blocks[rid] = len(computed_blocks)
        if first_lookup:  # the request's first scheduling: count its prefix lookup once
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * bs
        new_ids = []
        if cow:
            copies = self.pool.get_new_blocks(len(cow))
            for i, dst in zip(cow, copies):
                src = blocks[i]
                self.pending_copies.append((src.block_id, dst.block_id))
                self.pool.free_blocks([src])  # ref_cnt > 1: stays in use by its other holders
                blocks[i] = dst
                ids[i] = dst.block_id
                new_ids.append(dst.block_id)
        if num_fresh:
            fresh = self.pool.get_new_blocks(num_fresh)
            blocks.extend(fresh)
            for b in fresh:
                ids.append(b.block_id)
                new_ids.append(b.block_id)
        if computed_blocks or new_ids:
            self.changed_tables.add(rid)
        return new_ids

    def _free_out_of_window(self, request: Request, blocks: list[KVCacheBlock]) -> None:
        """Frees the blocks no query from ``num_computed_tokens`` on can see: keys before position
        ``num_computed_tokens - sliding_window + 1``."""
        rid = request.request_id
        first_needed = max(0, request.num_computed_tokens - self.sliding_window + 1) // self.block_size
        done = self.num_window_freed.get(rid, 0)
        if first_needed <= done:
            return
        ids = self.req_block_ids[rid]
        out = _real(blocks[done:first_needed])
        for i in range(done, first_needed):
            blocks[i] = NULL_BLOCK
            ids[i] = NULL_BLOCK.block_id
        self.pool.free_blocks(out)
        self.num_window_freed[rid] = first_needed
        self.changed_tables.add(rid)

    def can_fork(self, parent: Request, num_tokens: int) -> bool:
        """Whether the parent still holds the blocks a child computing the token at position
        ``num_tokens`` reads: with a sliding window it may have freed them since."""
        if self.sliding_window is None:
            return parent.request_id in self.req_blocks
        first_needed = max(0, num_tokens - self.sliding_window + 1) // self.block_size
        return (parent.request_id in self.req_blocks
                and self.num_window_freed.get(parent.request_id, 0) <= first_needed)

    def fork(self, child: Request, parent: Request, num_tokens: int) -> None:
        """Gives ``child`` (holding no blocks) the parent's blocks covering its first ``num_tokens`` tokens,
        shared (ref_cnt + 1). Whoever of the two later writes into a shared block gets a copy first."""
        assert child.request_id not in self.req_blocks, "fork into a request that already holds blocks"
        shared = self.req_blocks[parent.request_id][:cdiv(num_tokens, self.block_size)]
        self.pool.touch(_real(shared))
        self.req_blocks[child.request_id] = shared
        self.req_block_ids[child.request_id] = [b.block_id for b in shared]
        if parent.request_id in self.num_window_freed:  # the NULL_BLOCK entries lead the table
            self.num_window_freed[child.request_id] = min(len(shared), self.num_window_freed[parent.request_id])
        # The parent already offered its full blocks to the prefix cache.
        self.num_cached_blocks[child.request_id] = num_tokens // self.block_size

    def free(self, request: Request) -> None:
        """Releases the request's GPU blocks (tail blocks first into the LRU list) and CPU swap blocks."""
        rid = request.request_id
        blocks = self.req_blocks.pop(rid, None)
        self.req_block_ids.pop(rid, None)
        self.num_cached_blocks.pop(rid, None)
        self.num_window_freed.pop(rid, None)
        if blocks:
            blocks = _real(blocks)
            if self.pending_copies:
                # A copy into a block freed in the same step would land after the block's next owner's swap-in.
                mine = {b.block_id for b in blocks}
                self.pending_copies = [(s, d) for s, d in self.pending_copies if d not in mine]
            self.pool.free_blocks(reversed(blocks))
        cpu = self.swapped_blocks.pop(rid, None)
        if cpu:
            self.cpu_free.extend(cpu)

    def get_block_ids(self, request: Request) -> list[int]:
        """The request's block table (its own list: read, do not modify)."""
        return self.req_block_ids.get(request.request_id, [])

    def num_blocks_held(self, request: Request) -> int:
        return len(_real(self.req_blocks.get(request.request_id, ())))

    def min_blocks_needed(self, num_tokens: int) -> int:
        """The fewest blocks a sequence of ``num_tokens`` tokens holds at once."""
        return cdiv(num_tokens, self.block_size)

    def num_table_entries(self, request: Request) -> int:
        """Entries of the request's table (window-freed ones included): it covers that many blocks of tokens."""
        return len(self.req_block_ids.get(request.request_id, ()))

    def live_block_ids(self, request: Request) -> list[int]:
        """The ids of the blocks the request holds (window-freed entries left out)."""
        return [b.block_id for b in _real(self.req_blocks.get(request.request_id, ()))]

    # A copy of a table to send to the workers (HybridKVCacheManager: one list per group).
    copy_block_ids = staticmethod(list)

    # ---- swap --------------------------------------------------------------------------------
    def swap_out(self, request: Request) -> Optional[list[tuple[int, int]]]:
        """Moves the blocks holding the request's computed tokens to CPU swap space and frees its GPU blocks.

        Returns the (gpu block, cpu block) copies to make, or None (changing nothing) if CPU space is short.
        """
        rid = request.request_id
        if rid in self.swap_ins_now:
            # Swapped in earlier in this same step: its GPU blocks are not filled yet (swap-outs run
            # first), but its CPU copy is intact. Cancel the swap-in instead of copying anything.
            window_freed = self.num_window_freed.get(rid)
            # Out-of-window entries lead the table; new blocks allocated after the swap-in are dropped.
            cpu = [None] * (window_freed or 0) + [c for c, _ in self.swap_ins_now.pop(rid)]
            self.free(request)
            self.swapped_blocks[rid] = cpu
            if window_freed is not None:
                self.num_window_freed[rid] = window_freed
            return []
        blocks = self.req_blocks.get(rid, [])
        num_valid = min(len(blocks), cdiv(request.num_computed_tokens, self.block_size))
        if len(_real(blocks[:num_valid])) > len(self.cpu_free):
            return None
        # A copy-on-write copy queued this step has not happened yet when swap-outs run: read its source.
        pending_src = {d: s for s, d in self.pending_copies}
        mapping = []
        cpu: list[Optional[int]] = []  # None: out of the sliding window, nothing to keep
        for b in blocks[:num_valid]:
            if b is NULL_BLOCK:
                cpu.append(None)
                continue
            c = self.cpu_free.pop()
            cpu.append(c)
            mapping.append((pending_src.get(b.block_id, b.block_id), c))
        window_freed = self.num_window_freed.get(rid)
        self.free(request)
        self.swapped_blocks[rid] = cpu
        if window_freed is not None:
            self.num_window_freed[rid] = window_freed
        return mapping

    def can_swap_in(self, request: Request, num_new_tokens: int = 0) -> bool:
        """Whether swap_in and then allocate_slots(request, num_new_tokens) would both succeed now."""
        num_cpu = len(self.swapped_blocks.get(request.request_id, ()))  # with out-of-window entries: an upper bound
        needed = max(num_cpu, cdiv(request.num_computed_tokens + num_new_tokens, self.block_size))
        return needed <= self.pool.num_free_blocks

    def swap_in(self, request: Request) -> Optional[list[tuple[int, int]]]:
        """Brings a swapped request's blocks back into fresh GPU blocks. Returns (cpu, gpu) copies, or None."""
        rid = request.request_id
        cpu = self.swapped_blocks.get(rid)
        assert cpu is not None, f"{request} is not swapped out"
        kept = [c for c in cpu if c is not None]
        if len(kept) > self.pool.num_free_blocks:
            return None
        del self.swapped_blocks[rid]
        fresh = iter(self.pool.get_new_blocks(len(kept)))
        gpu = [NULL_BLOCK if c is None else next(fresh) for c in cpu]
        self.req_blocks[rid] = gpu
        self.req_block_ids[rid] = [b.block_id for b in gpu]
        self.num_cached_blocks[rid] = 0
        pairs = [(c, g.block_id) for c, g in zip(cpu, gpu) if c is not None]
        self.swap_ins_now[rid] = pairs
        return pairs

    # ---- checks ------------------------------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Pool integrity, plus: each block's ref_cnt == the number of block tables holding it; CPU pool likewise."""
        self.pool.check_integrity()
        holders: Counter[int] = Counter()
        for rid, blocks in self.req_blocks.items():
            assert [b.block_id for b in blocks] == self.req_block_ids[rid], f"{rid}: block ids out of sync"
            blocks = _real(blocks)
            assert len(set(b.block_id for b in blocks)) == len(blocks), f"{rid} holds a block twice"
            holders.update(b.block_id for b in blocks)
        for b in self.pool.blocks:
            assert holders[b.block_id] == b.ref_cnt, (
                f"block {b.block_id}: ref_cnt {b.ref_cnt} but held by {holders[b.block_id]} requests")
        cpu_ids = list(self.cpu_free) + [c for pairs in self.swap_ins_now.values() for c, _ in pairs]
        for ids in self.swapped_blocks.values():
            cpu_ids.extend(c for c in ids if c is not None)
        assert sorted(cpu_ids) == list(range(self.num_cpu_blocks)), "CPU swap blocks leaked or double counted"
        assert not set(self.swapped_blocks) & set(self.req_blocks), "a request both on GPU and swapped out"
