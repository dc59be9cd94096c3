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
from vllm_engine.layers import triton_linear as L
from vllm_engine.models.llama import LlamaForCausalLM
from vllm_engine.quantization import UnquantizedConfig, UnquantizedLinearMethod

# run_paged_steps builds its tensors on the CPU: this is the interpreter's test (the GPU has test_gpu_engine.py).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")


class InterpretedTritonLinear(UnquantizedLinearMethod):
    """Our GEMV/GEMM for every product, and at a few rows the norm and the activation folded into
    the GEMV, as the picker may choose on a GPU; small tiles, so the tiny shapes still cover
    several tiles and the masked edges. (A linear method of its own: the layers' kernel seam.)"""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.linear = self._linear
        self.add_norm_linear = self._add_norm_linear
        self.silu_mul_linear = self._silu_mul_linear

    @staticmethod
    def _linear(x, w, b=None):
        if x.shape[0] <= 4:
            return L.triton_gemv(x, w, b, config=(16, 32, 4, 1))
        return L.triton_matmul(x, w, b, config=(16, 32, 32, 4, 2))

    def _add_norm_linear(self, x, residual, g, eps, w, b=None):
        if x.shape[0] <= 4:
            return L.triton_add_norm_gemv(x, residual, g, eps, w, b, config=(16, 32, 4, 1))
        h, res = FO.triton_fused_add_rms_norm(x, residual, g, eps)
        return self._linear(h, w, b), res

    def _silu_mul_linear(self, gate_up, w, b=None):
        if gate_up.shape[0] <= 4:
            return L.triton_silu_mul_gemv(gate_up, w, b, config=(16, 32, 4, 1))
        return self._linear(FO.triton_silu_and_mul(gate_up), w, b)


class InterpretedTritonConfig(UnquantizedConfig):
    def get_quant_method(self, layer, prefix):
        if self._method is None:
            self._method = InterpretedTritonLinear()
        return self._method


class LongestFirst(TritonAttentionBackend):
    """The Triton backend, with the decode order the model runner passes."""

    def forward(self, query, key, value, kv_cache, metadata, *args, **kwargs):
        if metadata.decode_order is None:
            metadata.decode_order = torch.argsort(metadata.seq_lens.cpu(), descending=True,
                                                  stable=True).to(torch.int32)
        return super().forward(query, key, value, kv_cache, metadata, *args, **kwargs)


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])  # q/k norm + GQA; sliding window
def test_triton_layers_match_hf(arch, tiny_model_dir, paged_vs_hf, monkeypatch):
    from transformers import AutoModelForCausalLM

    # The layers' elementwise ops (norms, SiLU-and-mul, q/k norm + rotary + cache write) take the
    # Triton kernels for CUDA tensors: here for every tensor, through the interpreter.
    monkeypatch.setattr(FO, "_use_triton", lambda x: True)
    path = tiny_model_dir(arch)
    cfg = EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=256).create_engine_config().model
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model = LlamaForCausalLM(cfg.hf_config, LongestFirst(prefill_block_m=16, tile_n=16), max_position=256,
                             dtype=torch.float32, quant_config=InterpretedTritonConfig())
    model.load_weights((name, t) for name, t in hf.state_dict().items())
    model.eval()
    paged_vs_hf(model, cfg, hf, [23, 9, 5], [[12, 0, 4], [9, 8, 1], [1, 1, 0], [1, 0, 0]], tol=2e-3)
