"""HostBlockTables: block-table rows kept across steps, checked against the lists they mirror."""

from __future__ import annotations

import numpy as np

from vllm_engine.attention.backend import block_table_width
from vllm_engine.engine.request import Request
from vllm_engine.sampling_params import SamplingParams
from vllm_engine.worker.block_tables import HostBlockTables


def reqs(*ids: str) -> list[Request]:
    return [Request(i, [1, 2, 3], SamplingParams(max_tokens=2)) for i in ids]


def expect(rows: np.ndarray, lens: np.ndarray, tables: list[list[int]]) -> None:
    assert rows.dtype == np.int32 and rows.shape == (len(tables), block_table_width(max(map(len, tables))))
    assert lens.tolist() == [len(t) for t in tables]
    for row, t in zip(rows, tables):
        assert row[: len(t)].tolist() == t and not row[len(t):].any()


def test_rows_follow_appends_copies_new_lists_and_releases():
    ht = HostBlockTables(max_blocks_per_seq=2, rows=1)
    a, b = [5, 6], [7]
    r = reqs("a", "b")
    expect(*ht.gather(r, [a, b], changed=set()), [a, b])  # new requests: written (rows doubled to 2)
    a.append(9)
    b[0] = 8  # copy-on-write, in place
    expect(*ht.gather(r, [a, b], changed={"a", "b"}), [[5, 6, 9], [8]])
    a.extend(range(100, 140))  # longer than the table is wide: every row widens
    expect(*ht.gather(r, [a, b], changed={"a"}), [a, b])
    b2 = [3]  # rebuilt (preempted, then scheduled again): a new, shorter list; the rest is zeroed
    expect(*ht.gather(r, [[1], b2], changed=set()), [[1], b2])
    ht.release(["a"])
    c = reqs("c")
    expect(*ht.gather([r[1], c[0]], [b2, [4, 4]], changed=set()), [b2, [4, 4]])  # c reuses a's row
    assert sorted(ht._row_of) == ["b", "c"]


def test_unreported_in_place_change_is_kept_unless_changes_are_not_tracked():
    ht = HostBlockTables()
    a = [1, 2]
    r = reqs("a")
    ht.gather(r, [a], changed=set())
    a[1] = 7  # a producer that changed the list in place without saying so
    assert ht.gather(r, [a], changed=set())[0][0, :2].tolist() == [1, 2]  # the contract: changes are reported
    assert ht.gather(r, [a], changed=None)[0][0, :2].tolist() == [1, 7]  # None: every row is reread
