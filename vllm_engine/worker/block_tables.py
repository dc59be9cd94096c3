"""The running requests' block tables, kept on the host across steps.

Each step the attention kernels need a [num_seqs, width] table of block ids. Built from lists every
step, that is ~20 ns per block id: 0.7 ms of host time for 256 requests of ~70 blocks each, every
step. Yet a decode step changes few tables: a request moves into a new block once every
``block_size`` tokens, and copy-on-write replaces a block only when a fork writes into a shared
one. So each request keeps a row of a numpy array, rewritten (``write``) only when the scheduler
sends its table: a new request, or one whose table changed (``CachedRequestData.block_ids``).
A step then gathers its requests' rows in one numpy indexing operation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from vllm_engine.attention.backend import block_table_width


class HostBlockTables:
    def __init__(self, max_blocks_per_seq: int = 16, rows: int = 16) -> None:
        self.table = np.zeros((rows, block_table_width(max_blocks_per_seq)), dtype=np.int32)
        self.lens = np.zeros(rows, dtype=np.int64)  # valid block ids per row; zeros after them
        self._row_of: dict[str, int] = {}
        self._free = list(range(rows - 1, -1, -1))

    def release(self, request_ids: Iterable[str]) -> None:
        """Frees the rows of requests that are gone (finished or aborted)."""
        for rid in request_ids:
            row = self._row_of.pop(rid, None)
            if row is not None:
                self._free.append(row)

    def write(self, request_id: str, block_ids: Sequence[int]) -> None:
        """Sets a request's whole table (giving it a row if it has none)."""
        row = self._row_of.get(request_id)
        if row is None:
            row = self._new_row(request_id)
        self._write(row, block_ids)

    def gather(self, request_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(block tables [len(request_ids), width] int32, their lengths [len(request_ids)] int64), the
        width being ``block_table_width`` of the longest table. Every id must have been ``write``n."""
        row_of = self._row_of
        idx = np.fromiter((row_of[rid] for rid in request_ids), dtype=np.int64, count=len(request_ids))
        lens = self.lens[idx]
        width = block_table_width(int(lens.max()) if len(idx) else 1)
        return self.table[idx, :width], lens

    def _new_row(self, rid: str) -> int:
        if not self._free:  # more requests than rows: double them
            n = len(self.lens)
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        row = self._free.pop()
        self._row_of[rid] = row
        return row

    def _write(self, row: int, ids: Sequence[int]) -> None:
        n, old = len(ids), int(self.lens[row])
        if n > self.table.shape[1]:  # a longer table than any so far: widen every row
            extra = block_table_width(n) - self.table.shape[1]
            self.table = np.pad(self.table, ((0, 0), (0, extra)))
        self.table[row, :n] = ids
        if old > n:
            self.table[row, n:old] = 0
        self.lens[row] = n


class GroupedHostBlockTables:
    """``HostBlockTables`` for a model with several KV cache groups: one per group. A request's table
    is a tuple of one id list per group, all of one length (the scheduler's
    ``HybridKVCacheManager``); ``gather`` stacks the groups' rows into [groups, len(request_ids), width]."""

    def __init__(self, num_groups: int, max_blocks_per_seq: int = 16, rows: int = 16) -> None:
        self.groups = [HostBlockTables(max_blocks_per_seq, rows) for _ in range(num_groups)]

    def release(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        for tables in self.groups:
            tables.release(request_ids)

    def write(self, request_id: str, block_ids: Sequence[Sequence[int]]) -> None:
        if len(block_ids) != len(self.groups):
            raise ValueError(f"{request_id}: {len(block_ids)} block tables for {len(self.groups)} KV cache groups")
        for tables, ids in zip(self.groups, block_ids):
            tables.write(request_id, ids)

    def gather(self, request_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(block tables [groups, len(request_ids), width] int32, their lengths [len(request_ids)])."""
        parts = [tables.gather(request_ids) for tables in self.groups]
        width = max(t.shape[1] for t, _ in parts)
        stacked = np.zeros((len(parts), len(request_ids), width), dtype=np.int32)
        for g, (t, _) in enumerate(parts):
            stacked[g, :, :t.shape[1]] = t
        return stacked, parts[0][1]
