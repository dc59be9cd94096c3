"""Our Llama-family model, run through the paged KV cache, against HF transformers' forward on the same
tiny checkpoints: logits of a ragged prefill, a chunked prefill and several decode steps."""

from __future__ import annotations

import pytest
import torch

from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import EngineArgs
from vllm_engine.model_loader import get_model

@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "tied", "mistral", "qwen2", "qwen3"])
def test_logits_match_hf(arch, tiny_model_dir, paged_vs_hf):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch)
    cfg = EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=256).create_engine_config().model
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # Lengths past the Mistral window (16) and past llama3's original context (32).
    lens = [39, 21, 7]
    schedule = [
        [20, 0, 5],    # sequence 0: first chunk; sequence 2: whole prompt
        [12, 18, 1],   # sequence 0: second chunk on top of cached tokens; sequence 1: whole prompt; 2 decodes
        [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [3, 0, 0],
    ]
    paged_vs_hf(model, cfg, hf, lens, schedule, tol=1e-4)

def test_ops_hook_picks_fused_ops_on_cuda_only():
    from vllm_engine.models.llama import TORCH_OPS, get_ops

    assert get_ops(torch.device("cpu")) is TORCH_OPS
    fused_ops = pytest.importorskip("vllm_engine.layers.fused_ops")
    ops = get_ops(torch.device("cuda"))  # a device name: no GPU needed to pick the functions
    assert ops.rms_norm is fused_ops.rms_norm and ops.fused_add_rms_norm is fused_ops.fused_add_rms_norm
    assert ops.silu_and_mul is fused_ops.silu_and_mul and ops.rotary is fused_ops.rotary


def test_linear_mode_env(monkeypatch):
    import torch.nn.functional as F

    from vllm_engine.models.llama import get_ops

    monkeypatch.setenv("VLLM_ENGINE_LINEAR", "cublas")
    assert get_ops(torch.device("cuda")).linear is F.linear
    monkeypatch.setenv("VLLM_ENGINE_LINEAR", "fast")
    with pytest.raises(ValueError, match="VLLM_ENGINE_LINEAR"):
        get_ops(torch.device("cuda"))
    monkeypatch.setenv("VLLM_ENGINE_LINEAR", "auto")
    pytest.importorskip("triton")
    from vllm_engine.layers.linear import LinearPicker

    assert isinstance(get_ops(torch.device("cuda")).linear, LinearPicker)
