"""The Llama-family model split across simulated ranks in one process (``override_parallel_state``):
every rank's parameters are exactly its slices of the checkpoint tensors (and of the one-GPU dummy
weights), and pipeline stages run one after the other give the one-stage logits. (Forward passes
across real tensor-parallel ranks are in tests/distributed.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import EngineArgs
from vllm_engine.distributed import IntermediateTensors, kv_heads_per_rank, override_parallel_state
from vllm_engine.layers.layernorm import RMSNorm
from vllm_engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_engine.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm_engine.model_loader import get_model
from vllm_engine.models.utils import PPMissingLayer

CPU = torch.device("cpu")


def model_config(path, **kw):
    return EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=128,
                      **kw).create_engine_config().model


def build(cfg, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1):
    with override_parallel_state(tp_rank, tp_size, pp_rank, pp_size):
        return get_model(cfg, CPU, TorchAttentionBackend())


def expected_slices(model, hf: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """What each parameter of a rank's model must hold, cut here from the whole HF tensors."""
    want = {}
    for prefix, m in model.named_modules():
        if isinstance(m, QKVParallelLinear):
            d, r, tp = m.head_size, m.tp_rank, m.tp_size
            first_kv = r * m.total_num_kv_heads // tp
            for p in ("weight", "bias") if m.bias is not None else ("weight",):
                q, k, v = (hf[f"{prefix.replace('qkv_proj', x + '_proj')}.{p}"] for x in "qkv")
                want[f"{prefix}.{p}"] = torch.cat([q[r * m.num_heads * d: (r + 1) * m.num_heads * d],
                                                  k[first_kv * d: (first_kv + m.num_kv_heads) * d],
                                                  v[first_kv * d: (first_kv + m.num_kv_heads) * d]])
        elif isinstance(m, MergedColumnParallelLinear):
            n = m.output_partition_sizes[0]
            gate, up = (hf[f"{prefix.replace('gate_up_proj', x)}.weight"] for x in ("gate_proj", "up_proj"))
            want[f"{prefix}.weight"] = torch.cat([gate[m.tp_rank * n: (m.tp_rank + 1) * n],
                                                 up[m.tp_rank * n: (m.tp_rank + 1) * n]])
        elif isinstance(m, RowParallelLinear):
            n = m.input_size_per_partition
            want[f"{prefix}.weight"] = hf[f"{prefix}.weight"][:, m.tp_rank * n: (m.tp_rank + 1) * n]
        elif isinstance(m, VocabParallelEmbedding):
            name = "model.embed_tokens.weight" if tied else f"{prefix}.weight"
            w = torch.zeros(m.num_embeddings_padded, m.embedding_dim)
            w[: m.org_vocab_size] = hf[name]
            n = m.num_embeddings_per_partition
            want[f"{prefix}.weight"] = w[m.tp_rank * n: (m.tp_rank + 1) * n]
        elif isinstance(m, RMSNorm):
            want[f"{prefix}.weight"] = hf[f"{prefix}.weight"]
    return want


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("qwen2", 2), ("qwen3", 2), ("tied", 2), ("mistral", 2),
                                     ("tied", 4)])
def test_each_rank_holds_exactly_its_slices_of_the_checkpoint(arch, tp, tiny_model_dir):
    """qwen2: q/k/v biases; qwen3: q/k norms, tied head; tied: 1 KV head, replicated on every rank."""
    path = tiny_model_dir(arch)
    hf = load_file(str(path / "model.safetensors"))
    cfg = model_config(path)
    tied = cfg.hf_config.tie_word_embeddings
    for r in range(tp):
        model = build(cfg, r, tp)
        params = dict(model.named_parameters())
        want = expected_slices(model, hf, tied)
        assert set(want) == set(params)
        for name, w in want.items():
            assert torch.equal(params[name], w), name
        attn = model.model.layers[0].self_attn.attn
        assert attn.num_heads == cfg.num_heads // tp
        assert attn.num_kv_heads == kv_heads_per_rank(cfg.num_kv_heads, tp)


def _hf_view(model) -> dict[str, torch.Tensor]:
    """A one-rank model's parameters as the HF tensors they were loaded from (fused ones split)."""
    out = {}
    for name, p in model.named_parameters():
        if ".qkv_proj." in name:
            m = model.get_submodule(name.rsplit(".", 1)[0])
            q, kv = m.total_num_heads * m.head_size, m.total_num_kv_heads * m.head_size
            for x, part in zip("qkv", p.split([q, kv, kv])):
                out[name.replace("qkv_proj", f"{x}_proj")] = part
        elif ".gate_up_proj." in name:
            gate, up = p.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = gate, up
        else:
            out[name] = p
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_dummy_weights_of_each_rank_are_its_slices_of_the_one_gpu_dummy_weights(tp, tiny_model_dir):
    cfg = model_config(tiny_model_dir("qwen3"), load_format="dummy", seed=3)
    full = _hf_view(build(cfg))
    for r in range(tp):
        model = build(cfg, r, tp)
        for name, w in expected_slices(model, full, cfg.hf_config.tie_word_embeddings).items():
            assert torch.equal(dict(model.named_parameters())[name], w), name


def _caches(model, cfg, num_blocks=16, block_size=4):
    attn = model.model.stage_layers[0].self_attn.attn
    return [torch.zeros(2, num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
            for _ in model.model.stage_layers]


@pytest.mark.parametrize("arch", ["llama", "tied"])
def test_pipeline_stages_in_sequence_give_the_one_stage_logits(arch, tiny_model_dir, tmp_path):
    """Two stages (and, on a 3-layer model, an uneven 2 + 1 split): the first holds the embedding,
    the last the norm and the LM head (its own copy of a tied embedding); each loads only its
    layers; the second continues from the first's (hidden, residual)."""
    from transformers import AutoModelForCausalLM

    from conftest import paged_metadata

    src = tiny_model_dir(arch)
    d = tmp_path / "three-layers"
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    hf.config.num_hidden_layers = 3
    hf3 = AutoModelForCausalLM.from_config(hf.config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for name, p in hf3.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=gen))
    hf3.save_pretrained(str(d))
    for f in src.iterdir():
        if "token" in f.name:
            (d / f.name).write_bytes(f.read_bytes())
    cfg = model_config(d)
    whole = build(cfg)
    stages = [build(cfg, pp_rank=r, pp_size=2) for r in range(2)]
    assert (stages[0].start_layer, stages[0].end_layer, stages[1].start_layer, stages[1].end_layer) == (0, 2, 2, 3)
    assert isinstance(stages[1].model.embed_tokens, PPMissingLayer) and isinstance(stages[0].lm_head, PPMissingLayer)
    assert isinstance(stages[0].model.norm, PPMissingLayer) and isinstance(stages[0].model.layers[2], PPMissingLayer)
    assert not any(".layers.2." in n for n in stages[0].expected_weights())
    assert not any(".layers.0." in n or "embed" in n for n in stages[1].expected_weights())

    ids = torch.tensor([5, 9, 2, 7, 1, 3, 8])
    meta = paged_metadata([0, 0], [4, 3], [[1, 2], [3, 4]])
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    with torch.inference_mode():
        want = whole.compute_logits(whole(ids, pos, _caches(whole, cfg), meta))
        inter = stages[0](ids, pos, _caches(stages[0], cfg), meta)
        assert isinstance(inter, IntermediateTensors)
        got = stages[1].compute_logits(stages[1](None, pos, _caches(stages[1], cfg), meta, inter))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref = hf3(ids[:4][None]).logits[0]
    torch.testing.assert_close(got[:4], ref, atol=1e-4, rtol=1e-4)


def test_dummy_weights_of_a_tied_head_on_the_last_stage_are_the_embedding(tiny_model_dir):
    cfg = model_config(tiny_model_dir("tied"), load_format="dummy", seed=4)
    whole, last = build(cfg), build(cfg, pp_rank=1, pp_size=2)
    assert last.lm_head is not last.model.embed_tokens
    assert torch.equal(last.lm_head.weight, whole.model.embed_tokens.weight)
    assert torch.equal(last.model.norm.weight, whole.model.norm.weight)


def test_a_quantized_checkpoint_is_refused_with_its_method_named(tiny_model_dir):
    cfg = model_config(tiny_model_dir("llama"))
    hf = cfg.hf_config.__class__.from_dict({**cfg.hf_config.to_dict(), "quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ValueError, match="'bitsandbytes' is not supported"):
        get_model(dataclasses.replace(cfg, hf_config=hf), CPU, TorchAttentionBackend())


@pytest.mark.slow
def test_a_gguf_model_is_sliced_per_rank_too(smollm2_gguf):
    """The real SmolLM2-135M GGUF (9 heads, 3 KV heads) at tp=3: the dequantized tensors go through the
    same weight loaders, so rank 1 holds exactly its slices of what one rank holds."""
    cfg = model_config(smollm2_gguf)
    assert cfg.load_format == "gguf"
    full = _hf_view(build(cfg))
    model = build(cfg, 1, 3)
    params = dict(model.named_parameters())
    want = expected_slices(model, full, cfg.hf_config.tie_word_embeddings)
    assert set(want) == set(params)
    for name, w in want.items():
        assert torch.equal(params[name], w), name
