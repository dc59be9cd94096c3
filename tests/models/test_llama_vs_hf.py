"""Our Llama-family model, run through the paged KV cache, against HF transformers' forward on the same
tiny checkpoints: logits of a ragged prefill, a chunked prefill and several decode steps."""

from __future__ import annotations

import pytest
import torch

from vllm_engine.attention.backend import AttentionMetadata
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import EngineArgs
from vllm_engine.model_loader import get_model

BLOCK_SIZE = 4


def paged_metadata(starts: list[int], counts: list[int], block_tables: list[list[int]]) -> AttentionMetadata:
    """Metadata for sequences whose new tokens are positions starts[i] .. starts[i] + counts[i] - 1."""
    seq_lens = [s + c for s, c in zip(starts, counts)]
    qsl = [0]
    for c in counts:
        qsl.append(qsl[-1] + c)
    width = max(len(bt) for bt in block_tables)
    bt = torch.zeros(len(starts), width, dtype=torch.int32)
    slots = []
    for i, (s, c) in enumerate(zip(starts, counts)):
        bt[i, : len(block_tables[i])] = torch.tensor(block_tables[i], dtype=torch.int32)
        for p in range(s, s + c):
            slots.append(block_tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
    return AttentionMetadata(
        num_actual_tokens=qsl[-1], num_seqs=len(starts),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=bt, slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(counts), max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)


def run_steps(model, cfg, seqs: list[list[int]], schedule: list[list[int]]) -> list[list[torch.Tensor]]:
    """Feeds each sequence's tokens in the chunk sizes of ``schedule`` (one list of per-sequence counts per
    step, 0 = not scheduled), all sequences batched; returns each sequence's logits per position."""
    num_blocks = 64
    caches = [torch.zeros(2, num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    # Non-contiguous, interleaved block tables so paging bugs show.
    tables = [[len(seqs) * j + i + 1 for j in range(16)] for i in range(len(seqs))]
    done = [0] * len(seqs)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    for counts in schedule:
        idx = [i for i, c in enumerate(counts) if c]
        ids = torch.tensor([t for i in idx for t in seqs[i][done[i]: done[i] + counts[i]]])
        pos = torch.tensor([p for i in idx for p in range(done[i], done[i] + counts[i])])
        meta = paged_metadata([done[i] for i in idx], [counts[i] for i in idx], [tables[i] for i in idx])
        with torch.inference_mode():
            out = model.compute_logits(model(ids, pos, caches, meta))
        row = 0
        for i in idx:
            logits[i].extend(out[row: row + counts[i]])
            row += counts[i]
            done[i] += counts[i]
    return logits


@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "tied", "mistral", "qwen2", "qwen3"])
def test_logits_match_hf(arch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch)
    cfg = EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=256).create_engine_config().model
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    # Lengths past the Mistral window (16) and past llama3's original context (32).
    lens = [39, 21, 7]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lens]
    schedule = [
        [20, 0, 5],    # sequence 0: first chunk; sequence 2: whole prompt
        [12, 18, 1],   # sequence 0: second chunk on top of cached tokens; sequence 1: whole prompt; 2 decodes
        [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [3, 0, 0],
    ]
    assert [sum(c[i] for c in schedule) for i in range(3)] == lens
    ours = run_steps(model, cfg, seqs, schedule)
    for seq, got in zip(seqs, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0].float()
        torch.testing.assert_close(torch.stack(got), ref, atol=1e-4, rtol=1e-4)
