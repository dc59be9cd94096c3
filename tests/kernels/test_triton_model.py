"""The whole GPU path of a decoder layer, composed, through the Triton interpreter: fused norms,
the fused q/k-norm + rotary + cache-write pass, the Triton attention backend (with the longest-first
decode order), SiLU-and-mul, and our GEMV/GEMM for every linear layer — against HF transformers'
logits on the same tiny checkpoints, over a ragged prefill, a chunked prefill and decode steps.
(On a GPU the same kernels run compiled; tests/e2e/test_gpu_engine.py checks the engine there.)"""

from __future__ import annotations

import pytest
import torch

from vllm_engine.attention.triton_attn import TritonAttentionBackend
from vllm_engine.config import EngineArgs
from vllm_engine.layers import fused_ops as FO
from vllm_engine.layers import linear as L
from vllm_engine.models.llama import LlamaForCausalLM, Ops

# run_paged_steps builds its tensors on the CPU: this is the interpreter's test (the GPU has test_gpu_engine.py).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")


def _linear(x, w, b=None):
    # Small tiles, so the tiny shapes still cover several tiles and the masked edges.
    if x.shape[0] <= 4:
        return L.triton_gemv(x, w, b, config=(16, 32, 4, 1))
    return L.triton_matmul(x, w, b, config=(16, 32, 32, 4, 2))


def _add_norm_linear(x, residual, g, eps, w, b=None):
    # At a few rows the norm folded into the GEMV, as the picker may choose on a GPU.
    if x.shape[0] <= 4:
        return L.triton_add_norm_gemv(x, residual, g, eps, w, b, config=(16, 32, 4, 1))
    h, res = FO.triton_fused_add_rms_norm(x, residual, g, eps)
    return _linear(h, w, b), res


def _silu_mul_linear(gate_up, w, b=None):
    if gate_up.shape[0] <= 4:
        return L.triton_silu_mul_gemv(gate_up, w, b, config=(16, 32, 4, 1))
    return _linear(FO.triton_silu_and_mul(gate_up), w, b)


TRITON_OPS = Ops(FO.triton_rms_norm, FO.triton_fused_add_rms_norm, FO.triton_silu_and_mul, FO.triton_rotary,
                 FO.triton_qkv_rope_cache, _linear, _add_norm_linear, _silu_mul_linear)


class LongestFirst(TritonAttentionBackend):
    """The Triton backend, with the decode order the model runner passes."""

    def forward(self, query, key, value, kv_cache, metadata, scale, sliding_window=None):
        if metadata.decode_order is None:
            metadata.decode_order = torch.argsort(metadata.seq_lens.cpu(), descending=True,
                                                  stable=True).to(torch.int32)
        return super().forward(query, key, value, kv_cache, metadata, scale, sliding_window)


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])  # q/k norm + GQA; sliding window
def test_triton_layers_match_hf(arch, tiny_model_dir, paged_vs_hf):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch)
    cfg = EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=256).create_engine_config().model
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model = LlamaForCausalLM(cfg.hf_config, LongestFirst(prefill_block_m=16, tile_n=16), max_position=256,
                             dtype=torch.float32, ops=TRITON_OPS)
    model.load_weights((name, t) for name, t in hf.state_dict().items())
    model.eval()
    paged_vs_hf(model, cfg, hf, [23, 9, 5], [[12, 0, 4], [9, 8, 1], [1, 1, 0], [1, 0, 0]], tol=2e-3)
