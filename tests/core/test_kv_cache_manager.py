"""KVCacheManager: allocation, prefix hits, free, fork + copy-on-write, swap; ref counts checked by hand."""

from __future__ import annotations

from vllm_engine.core.kv_cache_manager import KVCacheManager
from vllm_engine.engine.request import Request
from vllm_engine.sampling_params import SamplingParams

BS = 4


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def _compute(kv: KVCacheManager, r: Request, n: int) -> None:
    """What the scheduler does after a step: advance and cache full blocks."""
    r.num_computed_tokens += n
    kv.cache_blocks(r, r.num_computed_tokens)
    if r.num_cached_tokens < 0:
        r.num_cached_tokens = 0


def test_allocate_grows_block_table_and_fails_atomically():
    kv = KVCacheManager(num_gpu_blocks=5, block_size=BS, enable_caching=False)
    a = _req("a", list(range(10)))
    assert kv.allocate_slots(a, 10, []) == [0, 1, 2]  # ceil(10 / 4) blocks
    _compute(kv, a, 10)
    assert kv.allocate_slots(a, 1) == []  # token 10 fits in block 2
    _compute(kv, a, 1)
    assert kv.allocate_slots(a, 2) == [3]  # tokens 11, 12: block 2 is full after 11
    b = _req("b", list(range(7)))
    assert kv.allocate_slots(b, 7, []) is None  # needs 2, 1 free: nothing allocated
    assert kv.get_block_ids(b) == [] and kv.num_free_blocks == 1
    kv.check_integrity()
    kv.free(a)
    assert kv.num_free_blocks == 5 and kv.usage == 0.0
    kv.check_integrity()


def test_prefix_hit_shares_full_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_gpu_blocks=10, block_size=BS, enable_caching=True)
    prefix = [5, 6, 7, 8, 9, 10, 11, 12]
    a = _req("a", prefix + [1, 2, 3])
    kv.allocate_slots(a, a.num_tokens, [])
    _compute(kv, a, a.num_tokens)
    b = _req("b", prefix + [4])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in blocks] == kv.get_block_ids(a)[:2]
    assert kv.allocate_slots(b, 1, blocks) == [3]
    assert [x.ref_cnt for x in blocks] == [2, 2]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (11 + 9, 8)
    # A sequence that is entirely cached still leaves its last block to compute.
    c = _req("c", prefix)
    blocks, n = kv.get_computed_blocks(c)
    assert n == 4 and len(blocks) == 1
    # Same tokens after a different first block: no hit.
    d = _req("d", [0, 6, 7, 8, 9, 10, 11, 12, 1])
    assert kv.get_computed_blocks(d) == ([], 0)
    kv.check_integrity()
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10
    # Freed full blocks stay findable until evicted, and a hit on them takes them back from the free list.
    e = _req("e", prefix + [1, 2, 3, 4])
    blocks, n = kv.get_computed_blocks(e)
    assert n == 8 and all(x.ref_cnt == 0 for x in blocks)
    assert kv.allocate_slots(e, 4, blocks) is not None and kv.num_free_blocks == 7
    kv.check_integrity()


def test_free_cached_blocks_count_as_free_but_not_when_hit():
    kv = KVCacheManager(num_gpu_blocks=3, block_size=BS, enable_caching=True)
    a = _req("a", list(range(9)))
    kv.allocate_slots(a, 9, [])
    _compute(kv, a, 9)
    kv.free(a)  # 2 full cached blocks + 1 partial, all free
    b = _req("b", list(range(9)))
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8
    # Needs 1 new block besides the 2 hits: 3 free minus the 2 hit blocks leaves exactly 1.
    assert kv.allocate_slots(b, 1, blocks) is not None
    kv.free(b)
    c = _req("c", list(range(9)))
    blocks, _ = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, 5, blocks) is None  # needs 2 more: only 1 left after the hits
    kv.check_integrity()


def test_fork_shares_blocks_and_copy_on_write_before_any_write():
    kv = KVCacheManager(num_gpu_blocks=8, block_size=BS, enable_caching=False)
    parent = _req("p", list(range(6)))
    kv.allocate_slots(parent, 6, [])
    _compute(kv, parent, 6)
    child = _req("c", list(range(6)))
    kv.fork(child, parent, 5)  # shares blocks covering tokens 0..4: both blocks
    assert kv.get_block_ids(child) == kv.get_block_ids(parent) == [0, 1]
    assert [b.ref_cnt for b in kv.req_blocks["p"]] == [2, 2]
    kv.check_integrity()
    # The child writes token 5 into block 1, which is shared: it gets a copy first.
    child.num_computed_tokens = 5
    assert kv.allocate_slots(child, 1) == [2]
    assert kv.get_block_ids(child) == [0, 2] and kv.take_pending_copies() == [(1, 2)]
    assert [b.ref_cnt for b in kv.req_blocks["p"]] == [2, 1]
    # The parent now writes token 6 into its block 1 in place (no longer shared): no copy.
    parent.append_output_token_ids(42)
    assert kv.allocate_slots(parent, 1) == [] and kv.take_pending_copies() == []
    kv.check_integrity()
    # Parent-first order: a new child shares block 1 again, then the parent writes into it.
    child2 = _req("c2", list(range(6)))
    kv.fork(child2, parent, 5)
    _compute(kv, parent, 1)
    parent.append_output_token_ids(43)
    assert kv.allocate_slots(parent, 1) == [3]
    assert kv.take_pending_copies() == [(1, 3)] and kv.get_block_ids(parent) == [0, 3]
    assert kv.get_block_ids(child2) == [0, 1]
    kv.check_integrity()
    for r in (parent, child, child2):
        kv.free(r)
    assert kv.num_free_blocks == 8
    kv.check_integrity()


def test_pending_copy_dropped_when_its_request_is_freed_in_the_same_step():
    kv = KVCacheManager(num_gpu_blocks=4, block_size=BS, enable_caching=False)
    p = _req("p", list(range(6)))
    kv.allocate_slots(p, 6, [])
    _compute(kv, p, 6)
    c = _req("c", list(range(6)))
    kv.fork(c, p, 5)
    c.num_computed_tokens = 5
    kv.allocate_slots(c, 1)
    kv.free(c)
    assert kv.take_pending_copies() == []
    kv.check_integrity()


def test_swap_out_and_in_round_trip():
    kv = KVCacheManager(num_gpu_blocks=4, block_size=BS, enable_caching=False, num_cpu_blocks=3)
    a = _req("a", list(range(9)))
    kv.allocate_slots(a, 9, [])
    _compute(kv, a, 9)
    gpu_before = list(kv.get_block_ids(a))
    out = kv.swap_out(a)
    assert [g for g, _ in out] == gpu_before and len({c for _, c in out}) == 3
    assert kv.num_free_blocks == 4 and kv.num_free_cpu_blocks == 0 and kv.get_block_ids(a) == []
    kv.check_integrity()
    b = _req("b", list(range(5)))
    kv.allocate_slots(b, 5, [])
    _compute(kv, b, 5)
    assert kv.swap_out(b) is None  # 2 blocks, no CPU space left: refused, nothing changed
    assert len(kv.get_block_ids(b)) == 2
    assert not kv.can_swap_in(a, 1)  # needs 3 GPU blocks, 2 free
    kv.free(b)
    assert kv.can_swap_in(a, 1)
    back = kv.swap_in(a)
    assert [c for c, _ in back] == [c for _, c in out]
    assert [g for _, g in back] == kv.get_block_ids(a)
    assert kv.take_swap_ins() == back
    # The CPU blocks are read by this step's swap-in: free again only from the next step on.
    assert kv.num_free_cpu_blocks == 0
    kv.new_step()
    assert kv.num_free_cpu_blocks == 3
    kv.check_integrity()
    kv.free(a)
    kv.check_integrity()


def test_swap_out_after_copy_on_write_reads_the_copy_source():
    kv = KVCacheManager(num_gpu_blocks=6, block_size=BS, enable_caching=False, num_cpu_blocks=4)
    p = _req("p", list(range(6)))
    kv.allocate_slots(p, 6, [])
    _compute(kv, p, 6)
    c = _req("c", list(range(6)))
    kv.fork(c, p, 5)
    c.num_computed_tokens = 5
    kv.allocate_slots(c, 1)  # block 1 -> new block 2, copy pending
    out = kv.swap_out(c)  # preempted in the same step, before the copy happened
    assert out is not None and [g for g, _ in out] == [0, 1]
    assert kv.take_pending_copies() == []
    kv.check_integrity()


def test_swap_out_in_the_step_of_its_swap_in_cancels_the_swap_in():
    kv = KVCacheManager(num_gpu_blocks=4, block_size=BS, enable_caching=False, num_cpu_blocks=4)
    a = _req("a", list(range(6)))
    kv.allocate_slots(a, 6, [])
    _compute(kv, a, 6)
    out = kv.swap_out(a)
    kv.new_step()
    kv.swap_in(a)
    # Preempted again before the runner ran the swap-in: its GPU blocks hold nothing yet.
    assert kv.swap_out(a) == [] and kv.take_swap_ins() == []
    assert kv.swapped_blocks["a"] == [c for _, c in out] and kv.num_free_blocks == 4
    kv.check_integrity()
    kv.new_step()
    assert [c for c, _ in kv.swap_in(a)] == [c for _, c in out]
    kv.free(a)
    kv.new_step()
    assert kv.num_free_cpu_blocks == 4
    kv.check_integrity()


def test_integrity_catches_ref_count_mismatch():
    kv = KVCacheManager(num_gpu_blocks=4, block_size=BS, enable_caching=False)
    a = _req("a", [1, 2, 3])
    kv.allocate_slots(a, 3, [])
    kv.req_blocks["a"][0].ref_cnt = 2
    try:
        kv.check_integrity()
    except AssertionError:
        pass
    else:
        raise AssertionError("integrity check missed a ref count no table accounts for")
