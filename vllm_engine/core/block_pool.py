"""BlockPool: the GPU KV cache's blocks, their reference counts, the LRU free list and the prefix-cache map.

The pool knows nothing about requests. A block is *in use* while ``ref_cnt > 0`` and *free* otherwise.
Free blocks sit in a doubly linked list in LRU order: freed blocks are appended at the tail and
allocation takes from the head. A free block that holds a full, hashed block of tokens stays in the
prefix-cache map until it is reallocated (evicted), so a later request with the same prefix can take
it back (``touch``) without recomputing it.
"""

from __future__ import annotations

from typing import Iterable, Optional


class BlockHash:
    """Identity of one full block of tokens *and everything before it* (a hash chain).

    Equality compares the tokens of this block and of every ancestor block (stopping early at a
    shared ancestor object), never the hash value alone, so two different token blocks can never be
    mistaken for each other even when their 64-bit hashes collide.
    """

    __slots__ = ("value", "parent", "token_ids", "extra")

    def __init__(self, parent: Optional["BlockHash"], token_ids: tuple[int, ...], extra: object = None) -> None:
        self.parent = parent
        self.token_ids = token_ids
        self.extra = extra
        self.value = hash((parent.value if parent is not None else None, token_ids, extra))

    def __hash__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        a: Optional[BlockHash] = self
        b = other
        # Iterative (not recursive) so that very long chains (block_size 1) cannot overflow the stack.
        while a is not b:
            if a is None or not isinstance(b, BlockHash):
                return False
            if a.value != b.value or a.token_ids != b.token_ids or a.extra != b.extra:
                return False
            a, b = a.parent, b.parent
        return True

    def __repr__(self) -> str:
        return f"BlockHash({self.value:#x}, tokens={self.token_ids})"


def hash_block_tokens(parent_hash: Optional[BlockHash], token_ids: tuple[int, ...], extra: object = None) -> BlockHash:
    """The hash of a full block: its tokens, chained to the previous block's hash (None for the first block)."""
    return BlockHash(parent_hash, tuple(token_ids), extra)


class KVCacheBlock:
    """One KV cache block: ``block_id`` indexes the KV tensors of every layer (the runner's side)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[BlockHash] = None
        # Links of the free list; both None while the block is not in it.
        self.prev_free: Optional[KVCacheBlock] = None
        self.next_free: Optional[KVCacheBlock] = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, hashed={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) append, popleft and remove (sentinel head and tail)."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free list"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def __iter__(self):
        b = self._head.next_free
        while b is not None and b is not self._tail:
            yield b
            b = b.next_free

    def __len__(self) -> int:
        return self.num_free


class BlockPool:
    """``num_blocks`` KV blocks with reference counts, LRU eviction and (if ``enable_caching``) a prefix cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}
        self.num_evictions = 0

    # ---- allocation --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, including free blocks still holding cached content."""
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref_cnt > 0), in [0, 1]."""
        return 1.0 - self.free_queue.num_free / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Takes ``n`` blocks from the head of the free list (least recently freed first), ref_cnt 1 each.

        A block that still held cached content loses it (eviction). ValueError if fewer than n are free.
        """
        if n > self.free_queue.num_free:
            raise ValueError(f"asked for {n} blocks, only {self.free_queue.num_free} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        h = block.block_hash
        if self.cached_blocks.get(h) is block:  # type: ignore[arg-type]
            del self.cached_blocks[h]  # type: ignore[arg-type]
        block.block_hash = None
        self.num_evictions += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference from each block; blocks reaching 0 go to the free list's tail in the given order.

        Callers free a request's blocks in reverse order, so that a sequence's tail blocks (the least
        likely to be shared as a prefix) are evicted before its head blocks.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Adds one reference to each block, taking it out of the free list if it was free (a cache hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    # ---- prefix cache ------------------------------------------------------------------------
    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Registers a full block under ``block_hash``. Returns False (and registers nothing) when caching
        is off, the block is already registered, or another block already holds that content."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached_blocks:
            return False  # same content computed twice concurrently: keep the first copy
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block
        return True

    def get_cached_block(self, block_hash: BlockHash) -> Optional[KVCacheBlock]:
        """The block holding exactly this content (tokens of the block and all ancestors), or None."""
        if not self.enable_caching:
            return None
        return self.cached_blocks.get(block_hash)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block (in use or free); their contents are no longer found by hash."""
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()

    # ---- checks ------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """AssertionError if the free list, reference counts or the hash map disagree."""
        free_ids = set()
        for block in self.free_queue:
            assert block.ref_cnt == 0, f"free block {block} has references"
            assert block.block_id not in free_ids, f"{block} twice in the free list"
            free_ids.add(block.block_id)
        assert len(free_ids) == self.free_queue.num_free, "free list length counter is wrong"
        in_use = 0
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"{block} has a negative ref_cnt"
            if block.ref_cnt > 0:
                in_use += 1
                assert block.block_id not in free_ids
            else:
                assert block.block_id in free_ids, f"{block} has no references but is not in the free list"
            if block.block_hash is not None:
                assert self.cached_blocks.get(block.block_hash) is block, f"{block} hashed but not in the map"
        assert in_use + len(free_ids) == self.num_blocks, (
            f"{in_use} in use + {len(free_ids)} free != {self.num_blocks} blocks")
        for h, block in self.cached_blocks.items():
            assert block.block_hash is h or block.block_hash == h, f"hash map entry {h} points to {block}"
