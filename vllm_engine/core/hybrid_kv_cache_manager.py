"""HybridKVCacheManager: block tables per KV cache group, for models that mix attention kinds.

Gemma 2 and 3 mix sliding-window layers with full-attention layers. Their layers are split into KV
cache groups of one kind (core/kv_cache_groups.py); every request holds one block table per group,
all of the same length (entry i covers token positions [i * block_size, (i + 1) * block_size)),
filled from one shared ``BlockPool``. A full-attention group keeps every block; a sliding-window
group gives back the blocks wholly before its window (their entries become ``NULL_BLOCK``), so a
request holds about ``window / block_size`` blocks per sliding group however long it grows.

The scheduler sees the same API as ``KVCacheManager`` (it picks this class when the cache config
has several groups; one-group models never run any of this code). What differs:

* ``get_block_ids`` is a tuple of one id list per group, and so is every table sent to the workers;
* ``allocate_slots`` is all-or-nothing over the groups: it counts the blocks every group needs
  (new blocks and copy-on-write copies) before it takes any;
* prefix caching keeps a hash per group: block i of group g is cached under ``(g, hash of blocks
  0..i)``. A hit of h blocks needs blocks 0..h-1 in every full-attention group, and in every
  sliding group the blocks of the window before position h * block_size (the earlier ones are
  ``NULL_BLOCK``); the longest h that every group can serve is taken;
* swap space holds the real blocks of every group; a group's out-of-window entries stay None there.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from vllm_engine.core.block_pool import KVCacheBlock
from vllm_engine.core.kv_cache_manager import NULL_BLOCK, KVCacheManager, _real, cdiv
from vllm_engine.engine.request import Request

GroupBlocks = list[list[KVCacheBlock]]  # one block list per group


class HybridKVCacheManager(KVCacheManager):
    """``sliding_windows[g]``: group g's window (None: full attention); at least two groups."""

    def __init__(self, num_gpu_blocks: int, block_size: int, enable_caching: bool = True,
                 num_cpu_blocks: int = 0, sliding_windows: Sequence[Optional[int]] = (None, None)) -> None:
        super().__init__(num_gpu_blocks, block_size, enable_caching, num_cpu_blocks, sliding_window=None)
        if len(sliding_windows) < 2:
            raise ValueError("HybridKVCacheManager is for two KV cache groups or more; use KVCacheManager")
        self.sliding_windows = tuple(sliding_windows)
        self.num_groups = len(sliding_windows)
        self._sliding = [(g, w) for g, w in enumerate(sliding_windows) if w is not None]
        self._full = [g for g, w in enumerate(sliding_windows) if w is None]
        self._no_ids: tuple[list[int], ...] = tuple([] for _ in sliding_windows)
        # Swapped in this step, per request: its CPU blocks per group (a swap-out in the same step restores them).
        self._swap_in_cpu: dict[str, list[list[Optional[int]]]] = {}

    @staticmethod
    def copy_block_ids(block_ids: tuple[list[int], ...]) -> tuple[list[int], ...]:
        """A copy of a request's tables to send to the workers."""
        return tuple(list(ids) for ids in block_ids)

    def new_step(self) -> None:
        super().new_step()
        self._swap_in_cpu = {}

    def _first_needed(self, num_computed_tokens: int, window: int) -> int:
        """The first block a query at position ``num_computed_tokens`` (or later) reads under ``window``."""
        return max(0, num_computed_tokens - window + 1) // self.block_size

    # ---- prefix cache ------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[GroupBlocks, int]:
        """Per group, the blocks of the longest cached prefix that every group can serve (sliding
        groups: ``NULL_BLOCK`` before their window), and the tokens it covers."""
        G = self.num_groups
        if not self.enable_caching or (request.sampling_params.prompt_logprobs is not None
                                       and request.num_output_tokens == 0):
            return [[] for _ in range(G)], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        found: GroupBlocks = [[] for _ in range(G)]  # sliding groups: None where not cached
        limit = max_blocks
        for i in range(max_blocks):
            h = self._block_hash(request, i)
            if not self._lookup(request, i, h, found):
                limit = i
                break
        hit = limit
        while hit and not all(self._window_cached(found[g], hit, w) for g, w in self._sliding):
            hit -= 1
        blocks = []
        for g, window in enumerate(self.sliding_windows):
            first = 0 if window is None else self._first_needed(hit * self.block_size, window)
            blocks.append([NULL_BLOCK] * first + found[g][first:hit])
        return blocks, hit * self.block_size

    def _lookup(self, request: Request, i: int, h, found: GroupBlocks) -> bool:
        """Appends block i's cached block of every group to ``found`` (None for a sliding group that
        lacks it); False when a full-attention group lacks it (no longer prefix can be served)."""
        pool = self.pool
        for g in self._full:
            if pool.get_cached_block((g, h)) is None:
                return False
        for g in range(self.num_groups):
            found[g].append(pool.get_cached_block((g, h)))
        first = found[0][i]
        if first is not None and first.block_hash[1] is not h:  # type: ignore[index]
            # Adopt the cached hash object, so the next block's equality check stops at its parent.
            request.block_hashes[i] = first.block_hash[1]  # type: ignore[index]
            del request.block_hashes[i + 1:]
        return True

    def _window_cached(self, found: list[Optional[KVCacheBlock]], hit: int, window: int) -> bool:
        first = self._first_needed(hit * self.block_size, window)
        return all(found[i] is not None for i in range(first, hit))

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Registers every group's blocks that became full in the prefix cache, under (group, hash)."""
        if not self.enable_caching:
            return
        rid = request.request_id
        tables = self.req_blocks.get(rid)
        if tables is None:
            return
        start = self.num_cached_blocks.get(rid, 0)
        num_full = min(num_computed_tokens // self.block_size, len(tables[0]))
        for i in range(start, num_full):
            h = self._block_hash(request, i)
            for g, table in enumerate(tables):
                if table[i] is not NULL_BLOCK:
                    self.pool.cache_full_block(table[i], (g, h))  # type: ignore[arg-type]
        if num_full > start:
            self.num_cached_blocks[rid] = num_full

    # ---- allocation --------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Optional[GroupBlocks] = None) -> Optional[list[int]]:
        """``KVCacheManager.allocate_slots`` over every group at once: all of them get their blocks,
        or (None) none does."""
        rid = request.request_id
        tables = self.req_blocks.get(rid)
        if tables:
            self._free_out_of_windows(request, tables)
            if computed_blocks is None and self._fits(request, num_new_tokens, tables):
                return []
        first_lookup = computed_blocks is not None and request.num_cached_tokens < 0
        num_hit = len(computed_blocks[0]) if computed_blocks else 0
        assert not (num_hit and tables), "a prefix hit is only for a request that holds no blocks"
        bs = self.block_size
        start = max(request.num_computed_tokens, num_hit * bs)
        num_needed = cdiv(start + num_new_tokens, bs)
        num_fresh = max(0, num_needed - (len(tables[0]) if tables else num_hit))
        cow = [(g, i) for g, table in enumerate(tables or ()) for i in range(start // bs, min(num_needed, len(table)))
               if table[i].ref_cnt > 1]
        hit_blocks = [b for group in (computed_blocks or ()) for b in _real(group)]
        num_hit_free = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if num_fresh * self.num_groups + len(cow) > self.pool.num_free_blocks - num_hit_free:
            return None
        if tables is None:
            tables = self.req_blocks[rid] = [[] for _ in range(self.num_groups)]
            self.req_block_ids[rid] = tuple([] for _ in range(self.num_groups))
            self.num_window_freed[rid] = [0] * self.num_groups
        if num_hit:
            self._take_hit(rid, tables, computed_blocks, hit_blocks)  # type: ignore[arg-type]
        if first_lookup:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit * bs
        new_ids = self._copy_on_write(rid, tables, cow)
        if num_fresh:
            ids = self.req_block_ids[rid]
            for g, table in enumerate(tables):
                fresh = self.pool.get_new_blocks(num_fresh)
                table.extend(fresh)
                ids[g].extend(b.block_id for b in fresh)
                new_ids.extend(b.block_id for b in fresh)
        if num_hit or new_ids:
            self.changed_tables.add(rid)
        return new_ids

    def _fits(self, request: Request, num_new_tokens: int, tables: GroupBlocks) -> bool:
        """The new tokens land in held blocks that no one else shares, in every group."""
        start = request.num_computed_tokens
        last = (start + num_new_tokens - 1) // self.block_size
        if last >= len(tables[0]):
            return False
        first = start // self.block_size
        return all(table[i].ref_cnt == 1 for table in tables for i in range(first, last + 1))

    def _take_hit(self, rid: str, tables: GroupBlocks, computed_blocks: GroupBlocks,
                  hit_blocks: list[KVCacheBlock]) -> None:
        self.pool.touch(hit_blocks)
        ids = self.req_block_ids[rid]
        for g, group in enumerate(computed_blocks):
            tables[g].extend(group)
            ids[g].extend(b.block_id for b in group)
            self.num_window_freed[rid][g] = sum(1 for b in group if b is NULL_BLOCK)
        self.num_cached_blocks[rid] = len(computed_blocks[0])

    def _copy_on_write(self, rid: str, tables: GroupBlocks, cow: list[tuple[int, int]]) -> list[int]:
        """Private copies of the shared blocks (group, index) the step writes into; their ids."""
        if not cow:
            return []
        ids = self.req_block_ids[rid]
        new_ids = []
        for (g, i), dst in zip(cow, self.pool.get_new_blocks(len(cow))):
            src = tables[g][i]
            self.pending_copies.append((src.block_id, dst.block_id))
            self.pool.free_blocks([src])  # ref_cnt > 1: stays in use by its other holders
            tables[g][i] = dst
            ids[g][i] = dst.block_id
            new_ids.append(dst.block_id)
        return new_ids

    def _free_out_of_windows(self, request: Request, tables: GroupBlocks) -> None:
        """In each sliding group, frees the blocks no query from ``num_computed_tokens`` on can see."""
        rid = request.request_id
        freed = self.num_window_freed[rid]
        for g, window in self._sliding:
            first_needed = self._first_needed(request.num_computed_tokens, window)
            done = freed[g]
            if first_needed <= done:
                continue
            table, ids = tables[g], self.req_block_ids[rid][g]
            out = _real(table[done:first_needed])
            for i in range(done, first_needed):
                table[i] = NULL_BLOCK
                ids[i] = NULL_BLOCK.block_id
            self.pool.free_blocks(out)
            freed[g] = first_needed
            self.changed_tables.add(rid)

    def can_fork(self, parent: Request, num_tokens: int) -> bool:
        """Whether the parent still holds, in every group, the blocks a child computing the token at
        position ``num_tokens`` reads (its sliding groups may have freed them since)."""
        freed = self.num_window_freed.get(parent.request_id)
        if freed is None:
            return False
        return all(freed[g] <= self._first_needed(num_tokens, w) for g, w in self._sliding)

    def fork(self, child: Request, parent: Request, num_tokens: int) -> None:
        """Every group's blocks covering the parent's first ``num_tokens`` tokens, shared with ``child``."""
        assert child.request_id not in self.req_blocks, "fork into a request that already holds blocks"
        n = cdiv(num_tokens, self.block_size)
        shared = [table[:n] for table in self.req_blocks[parent.request_id]]
        self.pool.touch([b for table in shared for b in _real(table)])
        self.req_blocks[child.request_id] = shared
        self.req_block_ids[child.request_id] = tuple([b.block_id for b in table] for table in shared)
        self.num_window_freed[child.request_id] = [min(n, f) for f in self.num_window_freed[parent.request_id]]
        self.num_cached_blocks[child.request_id] = num_tokens // self.block_size

    def free(self, request: Request) -> None:
        """Releases every group's GPU blocks (each group's tail first into the LRU list) and CPU blocks."""
        rid = request.request_id
        tables = self.req_blocks.pop(rid, None)
        self.req_block_ids.pop(rid, None)
        self.num_cached_blocks.pop(rid, None)
        self.num_window_freed.pop(rid, None)
        if tables:
            blocks = [b for table in tables for b in reversed(_real(table))]
            if self.pending_copies:
                mine = {b.block_id for b in blocks}
                self.pending_copies = [(s, d) for s, d in self.pending_copies if d not in mine]
            self.pool.free_blocks(blocks)
        cpu = self.swapped_blocks.pop(rid, None)
        if cpu:
            self.cpu_free.extend(c for group in cpu for c in group if c is not None)

    def get_block_ids(self, request: Request) -> tuple[list[int], ...]:
        """The request's tables, one id list per group (its own lists: read, do not modify)."""
        return self.req_block_ids.get(request.request_id, self._no_ids)

    def num_blocks_held(self, request: Request) -> int:
        return sum(len(_real(table)) for table in self.req_blocks.get(request.request_id, ()))

    def min_blocks_needed(self, num_tokens: int) -> int:
        """The fewest blocks a sequence of ``num_tokens`` tokens holds at once: all of its blocks in each
        full-attention group, its last window's in each sliding group."""
        n = cdiv(num_tokens, self.block_size)
        return sum(n if w is None else min(n, cdiv(w, self.block_size)) for w in self.sliding_windows)

    def num_table_entries(self, request: Request) -> int:
        tables = self.req_blocks.get(request.request_id)
        return len(tables[0]) if tables else 0

    def live_block_ids(self, request: Request) -> list[int]:
        return [b.block_id for table in self.req_blocks.get(request.request_id, ()) for b in _real(table)]

    # ---- swap --------------------------------------------------------------------------------
    def swap_out(self, request: Request) -> Optional[list[tuple[int, int]]]:
        """Every group's blocks holding computed tokens to CPU swap space (out-of-window entries stay
        None there); GPU blocks freed. None (changing nothing) if CPU space is short."""
        rid = request.request_id
        if rid in self.swap_ins_now:
            # Swapped in earlier in this step (its GPU blocks not filled yet): the CPU copy is intact.
            cpu = self._swap_in_cpu.pop(rid)
            del self.swap_ins_now[rid]
            self.free(request)
            self.swapped_blocks[rid] = cpu  # type: ignore[assignment]
            return []
        tables = self.req_blocks.get(rid) or [[] for _ in range(self.num_groups)]
        num_valid = min(len(tables[0]), cdiv(request.num_computed_tokens, self.block_size))
        if sum(len(_real(table[:num_valid])) for table in tables) > len(self.cpu_free):
            return None
        pending_src = {d: s for s, d in self.pending_copies}
        mapping, cpu = [], []
        for table in tables:
            group_cpu: list[Optional[int]] = []
            for b in table[:num_valid]:
                if b is NULL_BLOCK:
                    group_cpu.append(None)
                    continue
                c = self.cpu_free.pop()
                group_cpu.append(c)
                mapping.append((pending_src.get(b.block_id, b.block_id), c))
            cpu.append(group_cpu)
        self.free(request)
        self.swapped_blocks[rid] = cpu  # type: ignore[assignment]
        return mapping

    def can_swap_in(self, request: Request, num_new_tokens: int = 0) -> bool:
        cpu = self.swapped_blocks.get(request.request_id, ())
        num_needed = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        needed = sum(sum(c is not None for c in group) + max(0, num_needed - len(group)) for group in cpu)
        return needed <= self.pool.num_free_blocks

    def swap_in(self, request: Request) -> Optional[list[tuple[int, int]]]:
        rid = request.request_id
        cpu: list[list[Optional[int]]] = self.swapped_blocks.get(rid)  # type: ignore[assignment]
        assert cpu is not None, f"{request} is not swapped out"
        kept = sum(c is not None for group in cpu for c in group)
        if kept > self.pool.num_free_blocks:
            return None
        del self.swapped_blocks[rid]
        fresh = iter(self.pool.get_new_blocks(kept))
        tables = [[NULL_BLOCK if c is None else next(fresh) for c in group] for group in cpu]
        self.req_blocks[rid] = tables
        self.req_block_ids[rid] = tuple([b.block_id for b in table] for table in tables)
        self.num_window_freed[rid] = [sum(1 for c in group if c is None) for group in cpu]
        self.num_cached_blocks[rid] = 0
        pairs = [(c, b.block_id) for group, table in zip(cpu, tables) for c, b in zip(group, table) if c is not None]
        self.swap_ins_now[rid] = pairs
        self._swap_in_cpu[rid] = cpu
        return pairs

    # ---- checks ------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Pool integrity; per request: equal-length tables per group, in sync with their ids, NULL
        entries only before a sliding group's window; each block's ref_cnt == its holders, a cached
        block held only by its own group's tables; CPU blocks neither leaked nor double counted."""
        self.pool.check_integrity()
        holders: Counter[int] = Counter()
        group_of: dict[int, set[int]] = {}
        for rid, tables in self.req_blocks.items():
            ids = self.req_block_ids[rid]
            assert len(tables) == self.num_groups and len({len(t) for t in tables}) == 1, f"{rid}: table lengths"
            freed = self.num_window_freed[rid]
            for g, table in enumerate(tables):
                assert [b.block_id for b in table] == ids[g], f"{rid}: group {g} ids out of sync"
                nulls = [i for i, b in enumerate(table) if b is NULL_BLOCK]
                assert nulls == list(range(freed[g])), f"{rid}: group {g} NULL entries {nulls}, freed {freed[g]}"
                for b in table[freed[g]:]:
                    group_of.setdefault(b.block_id, set()).add(g)
            real = [b.block_id for table in tables for b in _real(table)]
            assert len(set(real)) == len(real), f"{rid} holds a block twice"
            holders.update(real)
        for b in self.pool.blocks:
            assert holders[b.block_id] == b.ref_cnt, (
                f"block {b.block_id}: ref_cnt {b.ref_cnt} but held by {holders[b.block_id]} tables")
            if b.ref_cnt:
                assert len(group_of[b.block_id]) == 1, f"block {b.block_id} in the tables of several groups"
                if b.block_hash is not None:
                    assert group_of[b.block_id] == {b.block_hash[0]}, f"block {b.block_id} cached for another group"
        cpu_ids = list(self.cpu_free) + [c for pairs in self.swap_ins_now.values() for c, _ in pairs]
        for groups in self.swapped_blocks.values():
            cpu_ids.extend(c for group in groups for c in group if c is not None)  # type: ignore[union-attr]
        assert sorted(cpu_ids) == list(range(self.num_cpu_blocks)), "CPU swap blocks leaked or double counted"
        assert not set(self.swapped_blocks) & set(self.req_blocks), "a request both on GPU and swapped out"
