"""BlockPool: LRU free list, reference counts, hash chains that check tokens, eviction, integrity."""

from __future__ import annotations

import pytest

from vllm_engine.core.block_pool import BlockHash, BlockPool, hash_block_tokens


def _free_order(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_queue]


def test_allocation_takes_from_head_and_free_appends_to_tail():
    pool = BlockPool(6, enable_caching=True)
    assert _free_order(pool) == [0, 1, 2, 3, 4, 5]
    a = pool.get_new_blocks(3)
    assert [b.block_id for b in a] == [0, 1, 2] and all(b.ref_cnt == 1 for b in a)
    assert pool.num_free_blocks == 3 and pool.usage == pytest.approx(0.5)
    # A request frees its blocks in reverse order: its tail block is the first to be reused.
    pool.free_blocks(reversed(a))
    assert _free_order(pool) == [3, 4, 5, 2, 1, 0]
    assert [b.block_id for b in pool.get_new_blocks(4)] == [3, 4, 5, 2]
    pool.check_integrity()


def test_ref_counts_and_touch():
    pool = BlockPool(4)
    (b,) = pool.get_new_blocks(1)
    pool.touch([b])  # shared by a second holder
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 3  # still held: not free
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and pool.num_free_blocks == 4 and _free_order(pool)[-1] == b.block_id
    with pytest.raises(AssertionError):
        pool.free_blocks([b])  # double free
    b.ref_cnt = 0
    # touch() on a free block takes it out of the free list wherever it is (a prefix-cache hit).
    pool.touch([pool.blocks[2]])
    assert _free_order(pool) == [1, 3, 0] and pool.blocks[2].ref_cnt == 1
    pool.check_integrity()
    with pytest.raises(ValueError):
        pool.get_new_blocks(4)


def test_hash_chain_includes_parent_and_checks_tokens():
    h1 = hash_block_tokens(None, (1, 2, 3, 4))
    assert h1 == hash_block_tokens(None, (1, 2, 3, 4))
    assert h1 != hash_block_tokens(None, (1, 2, 3, 5))
    # Same tokens after a different parent: a different block.
    h2a = hash_block_tokens(h1, (5, 6, 7, 8))
    h2b = hash_block_tokens(hash_block_tokens(None, (0, 2, 3, 4)), (5, 6, 7, 8))
    assert h2a != h2b
    assert h2a == hash_block_tokens(hash_block_tokens(None, (1, 2, 3, 4)), (5, 6, 7, 8))
    assert hash_block_tokens(None, (1, 2), extra="lora-a") != hash_block_tokens(None, (1, 2), extra="lora-b")


def test_colliding_hash_values_never_share_a_block():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    a = hash_block_tokens(None, (1, 2, 3, 4))
    b = hash_block_tokens(None, (9, 9, 9, 9))
    b.value = a.value  # force a 64-bit collision: the tokens must still tell them apart
    assert hash(a) == hash(b) and a != b
    assert pool.cache_full_block(blocks[0], a)
    assert pool.get_cached_block(b) is None
    assert pool.cache_full_block(blocks[1], b)
    assert pool.get_cached_block(a) is blocks[0] and pool.get_cached_block(b) is blocks[1]
    # A collision in the parent is caught too: equality walks the chain's tokens.
    child_a = hash_block_tokens(a, (5,))
    child_b = hash_block_tokens(b, (5,))
    child_b.value = child_a.value
    assert child_a != child_b
    pool.check_integrity()


def test_long_chain_equality_does_not_recurse():
    a = b = None
    for i in range(5000):  # block_size 1 over a long context
        a = hash_block_tokens(a, (i,))
        b = hash_block_tokens(b, (i,))
    assert a == b


def test_cached_free_block_kept_until_reused_then_evicted():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    hashes: list[BlockHash] = []
    parent = None
    for i, b in enumerate(blocks):
        parent = hash_block_tokens(parent, (i,))
        hashes.append(parent)
        assert pool.cache_full_block(b, parent)
    assert not pool.cache_full_block(blocks[0], hashes[0])  # already registered
    pool.free_blocks(reversed(blocks))  # free order: 2, 1, 0
    # Still findable while free.
    assert [pool.get_cached_block(h) for h in hashes] == blocks
    # A hit takes the block back out of the free list without evicting anything.
    pool.touch([pool.get_cached_block(hashes[0])])
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 2
    # New allocations evict in LRU order: block 2 (the sequence's tail) first.
    (new,) = pool.get_new_blocks(1)
    assert new is blocks[2] and new.block_hash is None and pool.get_cached_block(hashes[2]) is None
    assert pool.get_cached_block(hashes[1]) is blocks[1]
    assert pool.num_evictions == 1
    pool.check_integrity()


def test_duplicate_content_keeps_first_block_and_caching_off_caches_nothing():
    pool = BlockPool(2)
    x, y = pool.get_new_blocks(2)
    h = hash_block_tokens(None, (3, 4))
    assert pool.cache_full_block(x, h)
    assert not pool.cache_full_block(y, hash_block_tokens(None, (3, 4)))
    assert y.block_hash is None and pool.get_cached_block(h) is x
    pool.check_integrity()
    off = BlockPool(2, enable_caching=False)
    (z,) = off.get_new_blocks(1)
    assert not off.cache_full_block(z, h) and off.get_cached_block(h) is None


def test_reset_prefix_cache():
    pool = BlockPool(2)
    x, y = pool.get_new_blocks(2)
    h = hash_block_tokens(None, (1,))
    pool.cache_full_block(x, h)
    pool.free_blocks([x])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(h) is None and x.block_hash is None
    pool.check_integrity()


def test_integrity_detects_corruption():
    pool = BlockPool(4)
    a = pool.get_new_blocks(2)
    pool.check_integrity()
    a[0].ref_cnt = 0  # leaked: neither in use nor free
    with pytest.raises(AssertionError):
        pool.check_integrity()
    a[0].ref_cnt = 1
    pool.free_queue._head.next_free.ref_cnt = 1  # a free block with a reference
    with pytest.raises(AssertionError):
        pool.check_integrity()
    pool.free_queue._head.next_free.ref_cnt = 0
    h = hash_block_tokens(None, (1,))
    pool.cache_full_block(a[1], h)
    a[1].block_hash = hash_block_tokens(None, (2,))  # the map points to a block whose hash differs
    with pytest.raises(AssertionError):
        pool.check_integrity()
