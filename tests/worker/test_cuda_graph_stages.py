"""CUDA graphs of pipeline stages (GPU): stage 0 and stage 1 of a two-stage split, each replayed from
its own graphs (stage 1 reading stage 0's hidden states and residual from its input buffers), give
the eager stages' logits and the one-stage model's, at batch sizes that need padding rows."""

from __future__ import annotations

import pytest
import torch

from tests.worker.metadata_helpers import step_metadata
from vllm_engine.attention.backend import AttentionMetadata, get_attn_backend
from vllm_engine.config import EngineArgs
from vllm_engine.distributed import IntermediateTensors, override_parallel_state
from vllm_engine.model_loader import get_model
from vllm_engine.worker.cuda_graphs import CUDAGraphRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BLOCK = 16
MAX_LEN = 128
CUDA = torch.device("cuda")


def _metadata(starts: list[int], counts: list[int], tables: list[list[int]]) -> AttentionMetadata:
    return step_metadata(starts, counts, tables, BLOCK, CUDA)


def _caches(model, cfg, num_blocks: int) -> list[torch.Tensor]:
    n = sum(1 for _ in model.model.stage_layers)
    return [torch.zeros(2, num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim, device=CUDA) for _ in range(n)]


@pytest.mark.parametrize("num_seqs", [1, 3])
def test_stage_graphs_match_eager_stages_and_one_stage(tiny_model_dir, num_seqs):
    cfg = EngineArgs(model=str(tiny_model_dir("llama")), dtype="float32", device="cuda",
                     max_model_len=MAX_LEN).create_engine_config().model
    backend = get_attn_backend(CUDA, "triton")
    torch.manual_seed(0)
    with override_parallel_state(pp_rank=0, pp_size=2):
        first = get_model(cfg, CUDA, backend)
    with override_parallel_state(pp_rank=1, pp_size=2):
        last = get_model(cfg, CUDA, backend)
    whole = get_model(cfg, CUDA, backend)
    num_blocks = 4 * num_seqs + 1
    models = {"first": first, "last": last, "whole": whole}
    caches = {k: _caches(m, cfg, num_blocks) for k, m in models.items()}
    hidden = cfg.hf_config.hidden_size
    runners = {k: CUDAGraphRunner(m, caches[k], 4, MAX_LEN, BLOCK, hidden, torch.float32, CUDA,
                                  stage_input=(k == "last")) for k, m in models.items()}
    for r in runners.values():
        r.capture()

    gen = torch.Generator().manual_seed(1)
    lens = [5 + 4 * i for i in range(num_seqs)]
    seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in lens]
    tables = [[1 + i * 4 + j for j in range(4)] for i in range(num_seqs)]
    with torch.inference_mode():
        # Prompts but their last token, eagerly, through both layouts.
        prefill = _metadata([0] * num_seqs, [n - 1 for n in lens], tables)
        ids = torch.tensor([t for s in seqs for t in s[:-1]], device=CUDA)
        pos = torch.tensor([p for n in lens for p in range(n - 1)], device=CUDA)
        mid = first(ids, pos, caches["first"], prefill)
        last(ids, pos, caches["last"], prefill, mid)
        whole(ids, pos, caches["whole"], prefill)
        # The last token of each: a decode step, eager and replayed.
        decode = _metadata([n - 1 for n in lens], [1] * num_seqs, tables)
        ids = torch.tensor([s[-1] for s in seqs], device=CUDA)
        pos = torch.tensor([n - 1 for n in lens], device=CUDA)
        mid = first(ids, pos, caches["first"], decode)
        eager = last.compute_logits(last(ids, pos, caches["last"], decode, mid))
        ref = whole.compute_logits(whole(ids, pos, caches["whole"], decode))
        g_mid = runners["first"].run(ids, pos, decode)
        assert isinstance(g_mid, IntermediateTensors) and g_mid.hidden_states.shape == (num_seqs, hidden)
        torch.testing.assert_close(g_mid.hidden_states, mid.hidden_states, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_mid.residual, mid.residual, rtol=1e-5, atol=1e-5)
        graphed = last.compute_logits(runners["last"].run(ids, pos, decode, g_mid))
        whole_graphed = whole.compute_logits(runners["whole"].run(ids, pos, decode))
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graphed, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole_graphed, ref, rtol=1e-4, atol=1e-4)
