"""HostBlockTables: block-table rows kept across steps, checked against the lists they mirror."""

from __future__ import annotations

import numpy as np

from vllm_engine.attention.backend import block_table_width
from vllm_engine.worker.block_tables import HostBlockTables


def expect(rows: np.ndarray, lens: np.ndarray, tables: list[list[int]]) -> None:
    assert rows.dtype == np.int32 and rows.shape == (len(tables), block_table_width(max(map(len, tables))))
    assert lens.tolist() == [len(t) for t in tables]
    for row, t in zip(rows, tables):
        assert row[: len(t)].tolist() == t and not row[len(t):].any()


def test_rows_follow_writes_widen_shrink_and_are_reused_after_release():
    ht = HostBlockTables(max_blocks_per_seq=2, rows=1)
    ht.write("a", [5, 6])
    ht.write("b", [7])  # a second request: the rows double
    expect(*ht.gather(["a", "b"]), [[5, 6], [7]])
    ht.write("a", [5, 6, 9])
    ht.write("b", [8])  # copy-on-write replaced its block
    expect(*ht.gather(["b", "a"]), [[8], [5, 6, 9]])
    long = [5, 6, 9, *range(100, 140)]  # longer than the table is wide: every row widens
    ht.write("a", long)
    expect(*ht.gather(["a", "b"]), [long, [8]])
    ht.write("a", [1])  # rebuilt shorter (preempted, then scheduled again): the rest is zeroed
    expect(*ht.gather(["a"]), [[1]])
    ht.release(["a"])
    ht.write("c", [4, 4])  # c reuses a's row
    expect(*ht.gather(["b", "c"]), [[8], [4, 4]])
    assert sorted(ht._row_of) == ["b", "c"]
