"""Our Llama-family model, run through the paged KV cache, against HF transformers' forward on the same
tiny checkpoints: logits of a ragged prefill, a chunked prefill and several decode steps."""

from __future__ import annotations

import pytest
import torch

from tests.models.family_helpers import load_hf_reference
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import EngineArgs
from vllm_engine.model_loader import get_model

@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "tied", "mistral", "qwen2", "qwen3"])
def test_logits_match_hf(arch, tiny_model_dir, paged_vs_hf):
    path = tiny_model_dir(arch)
    cfg = EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=256).create_engine_config().model
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    hf = load_hf_reference(path)
    # Lengths past the Mistral window (16) and past llama3's original context (32).
    lens = [39, 21, 7]
    schedule = [
        [20, 0, 5],    # sequence 0: first chunk; sequence 2: whole prompt
        [12, 18, 1],   # sequence 0: second chunk on top of cached tokens; sequence 1: whole prompt; 2 decodes
        [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [3, 0, 0],
    ]
    paged_vs_hf(model, cfg, hf, lens, schedule, tol=1e-4)

def test_layers_pick_kernels_by_device_and_switches(monkeypatch):
    """The quant method holds the kernel choice: F.linear off CUDA; on CUDA (a device name is enough
    to build it) the linear picker and its folded norm / activation, unless VLLM_ENGINE_LINEAR=cublas
    or VLLM_ENGINE_FOLD=0 (A/B runs); an unknown VLLM_ENGINE_LINEAR is an error."""
    import torch.nn.functional as F

    from vllm_engine.quantization import UnquantizedLinearMethod

    cpu = UnquantizedLinearMethod(torch.device("cpu"))
    assert cpu.linear is F.linear and cpu.picker is None and cpu.add_norm_linear is None
    pytest.importorskip("triton")
    from vllm_engine.layers.triton_linear import LinearPicker

    cuda = UnquantizedLinearMethod(torch.device("cuda"))
    assert isinstance(cuda.linear, LinearPicker) and cuda.picker is cuda.linear
    assert cuda.add_norm_linear.__self__ is cuda.picker and cuda.silu_mul_linear.__self__ is cuda.picker
    monkeypatch.setenv("VLLM_ENGINE_FOLD", "0")
    unfolded = UnquantizedLinearMethod(torch.device("cuda"))
    assert isinstance(unfolded.linear, LinearPicker) and unfolded.add_norm_linear is None
    assert unfolded.silu_mul_linear is None
    monkeypatch.setenv("VLLM_ENGINE_LINEAR", "cublas")
    cublas = UnquantizedLinearMethod(torch.device("cuda"))
    assert cublas.linear is F.linear and cublas.picker is None and cublas.add_norm_linear is None
    monkeypatch.setenv("VLLM_ENGINE_LINEAR", "fast")
    with pytest.raises(ValueError, match="VLLM_ENGINE_LINEAR"):
        UnquantizedLinearMethod(torch.device("cuda"))


def test_one_linear_method_for_the_whole_model(tiny_model_dir):
    """get_model gives every layer (and the LM head) one quant method: one picker, each shape timed once."""
    from vllm_engine.layers.linear import LinearBase
    from vllm_engine.layers.vocab_parallel_embedding import VocabParallelEmbedding

    cfg = EngineArgs(model=str(tiny_model_dir("llama")), dtype="float32", device="cpu",
                     max_model_len=64).create_engine_config().model
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    methods = {id(m.quant_method) for m in model.modules() if isinstance(m, (LinearBase, VocabParallelEmbedding))}
    assert len(methods) == 1
    assert model.quant_config.get_quant_method(model.lm_head, "lm_head") is model.lm_head.quant_method
