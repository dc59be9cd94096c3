"""Safetensors onto a GPU at page-cache speed: each file memory-mapped, its data read in large chunks
into a few reusable (pinned) host buffers, each chunk copied to the device on a side stream while
the next chunk is read.

The per-tensor path (``safe_open(device="cuda")``) reads every tensor into fresh pageable memory and
copies it synchronously: the host read and the host-to-device copy never overlap, and each copy
goes through the driver's own bounce buffer. Here the reads land in pinned memory (one DMA, no
bounce), a chunk packs many small tensors (norms) into one copy or splits a large one (the
embedding) into several, and chunks run across file boundaries, so the next file's first read
overlaps the previous file's last copy.

Tensors are yielded on the device in the file's dtype (the caller casts), whole, or under tensor
parallelism with only the rows this rank's loaders read (``iter_files(rows=...)``, from the layers'
``checkpoint_rows``); each layer's ``weight_loader`` then copies its slice device to device.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping, Optional

import torch

from vllm_engine.model_loader.weights import read_safetensors_header

# safetensors' dtype names (the format's spec) -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {}),
}
READ_ALIGN = 1 << 20  # a pread thread's share of a chunk: a multiple of this
MAX_GAP = 64 << 10  # unread bytes (other ranks' rows) a chunk reads through rather than start a new one


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: the bytes to read are ``[start, end)`` of the file (absolute
    offsets), bytes ``[skip, skip + end - start)`` of the tensor (all of them unless ``only_rows``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    skip: int = 0

    @property
    def nbytes(self) -> int:
        """The whole tensor's bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    def only_rows(self, rows: Optional[tuple[int, int]]) -> "TensorEntry":
        """This entry reading only rows ``[start, stop)`` of dim 0 (contiguous bytes); itself when
        ``rows`` is None or not a range of its rows."""
        if rows is None or not self.shape or not 0 <= rows[0] <= rows[1] <= self.shape[0]:
            return self
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        first, last = rows[0] * row_bytes, rows[1] * row_bytes
        return replace(self, start=self.start + first, end=self.start + last, skip=first)


@dataclass(frozen=True)
class Piece:
    """Bytes ``[src, src + nbytes)`` of a chunk's buffer are bytes ``[dst, dst + nbytes)`` of entry ``entry``."""

    entry: int
    src: int
    dst: int
    nbytes: int


@dataclass
class Chunk:
    """One read: file bytes ``[start, end)`` into one host buffer; ``pieces`` go to the device from it;
    ``completes``: the entries whose last piece is in this chunk (ready once its copies are)."""

    start: int
    end: int = 0
    pieces: list[Piece] = field(default_factory=list)
    completes: list[int] = field(default_factory=list)


def read_header(path: str | os.PathLike) -> list[TensorEntry]:
    """The tensors of safetensors file ``path`` in the order their bytes are stored. ValueError naming
    the file for a truncated file, a corrupt header, an unknown dtype or a size that does not match."""
    header, data_start, size = read_safetensors_header(path)
    try:
        entries = [_entry(name, info, data_start) for name, info in header.items()]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"Corrupt safetensors file {path}: {e}") from None
    end = max((e.end for e in entries), default=0)
    if end > size:
        raise ValueError(f"Truncated safetensors file {path}: {size} bytes, its header needs {end}.")
    return sorted(entries, key=lambda e: (e.start, e.end))  # an empty tensor before one at its offset


def _entry(name: str, info: dict, data_start: int) -> TensorEntry:
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']!r}")
    shape = tuple(int(d) for d in info["shape"])
    begin, stop = (int(x) for x in info["data_offsets"])
    if stop - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise ValueError(f"tensor {name!r}: {stop - begin} bytes at offsets {begin}..{stop} for shape {shape} "
                         f"of {info['dtype']}")
    return TensorEntry(name, dtype, shape, data_start + begin, data_start + stop)


def plan_chunks(entries: list[TensorEntry], chunk_bytes: int) -> list[Chunk]:
    """Reads of at most ``chunk_bytes`` covering ``entries`` (sorted by offset) in file order: small
    tensors share a chunk, a tensor larger than a chunk spans several, and a gap of more than
    ``MAX_GAP`` unread bytes starts a new chunk. Empty tensors are completed by the chunk they sit in
    (or one of their own with nothing to read)."""
    chunks: list[Chunk] = []
    for i, e in enumerate(entries):
        off = e.start
        while True:
            if (not chunks or off - chunks[-1].start >= chunk_bytes or off < chunks[-1].end
                    or off - chunks[-1].end > MAX_GAP):
                chunks.append(Chunk(start=off, end=off))
            c = chunks[-1]
            stop = min(e.end, c.start + chunk_bytes)
            if stop > off:
                c.pieces.append(Piece(i, off - c.start, off - e.start + e.skip, stop - off))
            c.end = max(c.end, stop)
            off = stop
            if off >= e.end:
                c.completes.append(i)
                break
    return chunks


class MappedFile:
    """A file's bytes through a read-only memory map: a read is one (multi-threaded) torch copy."""

    def __init__(self, path: str | os.PathLike) -> None:
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
        with warnings.catch_warnings():  # read-only by construction: nothing writes through the tensor
            warnings.simplefilter("ignore", UserWarning)
            self.data = torch.frombuffer(self.map, dtype=torch.uint8) if self.map is not None else None

    def read_into(self, buf: torch.Tensor, start: int) -> None:
        """Bytes ``[start, start + buf.numel())`` of the file into ``buf`` (uint8, host)."""
        buf.copy_(self.data[start: start + buf.numel()])

    def close(self) -> None:
        self.data = None  # the last view of the map, before it closes
        if self.map is not None:
            self.map.close()


class PreadFile:
    """A file's bytes through ``pread`` calls, split over a thread pool (each releases the GIL): no
    page faults on the source, the kernel copies from the page cache straight into the buffer."""

    def __init__(self, path: str | os.PathLike, pool: ThreadPoolExecutor, num_threads: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.pool, self.num_threads = pool, num_threads

    def read_into(self, buf: torch.Tensor, start: int) -> None:
        view = memoryview(buf.numpy())
        per_thread = -(-len(view) // self.num_threads)
        step = max(READ_ALIGN, -(-per_thread // READ_ALIGN) * READ_ALIGN)
        parts = [(view[a: a + step], start + a) for a in range(0, len(view), step)]
        list(self.pool.map(lambda part: self._pread(*part), parts))

    def _pread(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"file ended at byte {offset + done}, its header promised more")
            done += n

    def close(self) -> None:
        os.close(self.fd)


class SafetensorsStager:
    """Streams safetensors files onto ``device`` through ``num_buffers`` host buffers of
    ``chunk_bytes`` each (pinned when the device is CUDA, unless ``pin_memory`` says otherwise).
    ``read``: ``"mmap"`` (the file memory-mapped, each chunk one torch copy over torch's threads) or
    ``"pread"`` (``read_threads`` threads of ``pread`` calls; default torch's thread count).

    On CUDA the host-to-device copies run on a side stream: a buffer is refilled only once the copy
    out of it finished (its event), and each yielded tensor's copies are ordered before the current
    stream's later work (``wait_event``), so a consumer may use it at once. On the CPU the same plan
    runs with plain copies (how the chunking is tested without a GPU).
    """

    def __init__(self, device: torch.device | str, chunk_bytes: int = 256 << 20, num_buffers: int = 3,
                 pin_memory: Optional[bool] = None, read: str = "mmap", read_threads: Optional[int] = None) -> None:
        if chunk_bytes <= 0 or num_buffers <= 0:
            raise ValueError(f"chunk_bytes ({chunk_bytes}) and num_buffers ({num_buffers}) must be positive")
        if read not in ("mmap", "pread"):
            raise ValueError(f"read must be 'mmap' or 'pread', not {read!r}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        pin = self.cuda if pin_memory is None else pin_memory
        self.chunk_bytes, self.read = chunk_bytes, read
        self.read_threads = max(1, read_threads or torch.get_num_threads())
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(num_buffers)]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.buffer_free: list[Optional[torch.cuda.Event]] = [None] * num_buffers
        self.num_chunks = 0  # chunks read so far, over every file: picks the next buffer
        self.bytes_read = 0

    def iter_files(self, paths: Iterable[str | os.PathLike],
                   rows: Optional[Mapping[str, tuple[int, int]]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor on the device, in the file's dtype) for every tensor of every file, in order.
        ``rows``: {name: (start, stop)} for tensors of which only those rows (dim 0) are read (this
        rank's under tensor parallelism); the yielded tensor has its full shape, the other rows
        uninitialized: the consumer must read no others."""
        pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="safetensors-read") \
            if self.read == "pread" else None
        try:
            for path in paths:
                yield from self.iter_file(path, pool, rows)
        finally:
            if self.stream is not None:  # no copy still writing into a tensor the consumer dropped
                self.stream.synchronize()
            if pool is not None:
                pool.shutdown()

    def iter_file(self, path: str | os.PathLike, pool: Optional[ThreadPoolExecutor] = None,
                  rows: Optional[Mapping[str, tuple[int, int]]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for each tensor of one file, each yielded as soon as its last chunk is copied."""
        entries = read_header(path)
        if rows:
            entries = sorted((e.only_rows(rows.get(e.name)) for e in entries), key=lambda e: (e.start, e.end))
        reader = MappedFile(path) if pool is None else PreadFile(path, pool, self.read_threads)
        try:
            dst: dict[int, torch.Tensor] = {}
            for chunk in plan_chunks(entries, self.chunk_bytes):
                self._copy_chunk(reader, chunk, entries, dst)
                for i in chunk.completes:
                    e = entries[i]
                    yield e.name, dst.pop(i).view(e.dtype).reshape(e.shape)
        finally:
            reader.close()

    def _copy_chunk(self, reader: MappedFile | PreadFile, chunk: Chunk, entries: list[TensorEntry],
                    dst: dict[int, torch.Tensor]) -> None:
        """Reads ``chunk`` into the next free buffer and copies its pieces into their tensors' bytes
        (allocated on the device at their first piece); orders them before the current stream's work."""
        for i in chunk.completes:  # nothing to read (an empty tensor, or no rows of it): no piece
            if i not in dst and entries[i].start == entries[i].end:
                dst[i] = torch.empty(entries[i].nbytes, dtype=torch.uint8, device=self.device)
        if not chunk.pieces:
            return
        k = self.num_chunks % len(self.buffers)
        self.num_chunks += 1
        if self.buffer_free[k] is not None:
            self.buffer_free[k].synchronize()  # its previous chunk's copies are done
        buf = self.buffers[k]
        reader.read_into(buf[: chunk.end - chunk.start], chunk.start)  # page cache -> host buffer
        self.bytes_read += chunk.end - chunk.start
        for p in chunk.pieces:
            if p.entry not in dst:
                dst[p.entry] = torch.empty(entries[p.entry].nbytes, dtype=torch.uint8, device=self.device)
        if self.stream is None:
            for p in chunk.pieces:
                dst[p.entry][p.dst: p.dst + p.nbytes].copy_(buf[p.src: p.src + p.nbytes])
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensors' allocations
        with torch.cuda.stream(self.stream):
            for p in chunk.pieces:
                dst[p.entry][p.dst: p.dst + p.nbytes].copy_(buf[p.src: p.src + p.nbytes], non_blocking=True)
            self.buffer_free[k] = self.stream.record_event()
        torch.cuda.current_stream(self.device).wait_event(self.buffer_free[k])
