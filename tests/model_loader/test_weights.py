"""get_model: safetensors (single and sharded) against the HF checkpoint, dummy weights, load errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import EngineArgs, ModelConfig
from vllm_engine.model_loader import get_model
from vllm_engine.model_loader.resolve import resolve_model

CPU = torch.device("cpu")


def model_config(path: str, **kw) -> ModelConfig:
    return EngineArgs(model=path, dtype="float32", device="cpu", max_model_len=128, **kw).create_engine_config().model


def test_fused_weights_are_the_hf_tensors(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    model = get_model(model_config(str(path)), CPU, TorchAttentionBackend())
    hf = load_file(str(path / "model.safetensors"))
    p = "model.layers.1."
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    want_qkv = torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(attn.qkv_proj.weight, want_qkv)
    assert torch.equal(attn.qkv_proj.bias, torch.cat([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
    assert attn.o_proj.bias is None  # Qwen2: bias on q/k/v only
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]))
    assert torch.equal(model.lm_head.weight, hf["lm_head.weight"])
    assert not model.training


def test_sharded_checkpoint_with_index(tiny_model_dir, tmp_path, run_paged):
    """A checkpoint split over 3 shards + index loads to the same logits as HF on the original."""
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("qwen3")
    d = tmp_path / "sharded"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        part = names[i::3]
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "stray.safetensors").write_bytes(b"junk: not in the index, never read")

    cfg = model_config(str(d))
    model = get_model(cfg, CPU, TorchAttentionBackend())
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    seq = list(range(3, 20))
    got = torch.stack(run_paged(model, cfg, [seq], [[len(seq)]])[0])
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    d = tmp_path / "missing"
    shutil.copytree(src, d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.1.self_attn.k_proj.weight"):
        get_model(model_config(str(d)), CPU, TorchAttentionBackend())


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    d = tmp_path / "shape"
    shutil.copytree(tiny_model_dir("llama"), d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight has shape \\(63,\\)"):
        get_model(model_config(str(d)), CPU, TorchAttentionBackend())


def _reduced(name: str, seed: int = 0, **overrides) -> ModelConfig:
    r = resolve_model(name, load_format="dummy")
    hf = copy.deepcopy(r.hf_config)
    for k, v in overrides.items():
        setattr(hf, k, v)
    return ModelConfig(model=name, model_path=r.model_path, load_format="dummy", hf_config=hf, dtype=torch.float32,
                       max_model_len=64, seed=seed, served_model_name=name)


@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.1-8b", "mistral-7b"])
def test_dummy_weights_on_a_reduced_bundled_config(name, run_paged):
    """Real head counts, head_dim, rope scaling and sliding window; fewer layers, narrower, smaller vocab."""
    hidden = 256 if name.startswith("qwen3") else 512  # qwen3 keeps head_dim 128 from its config
    cfg = _reduced(name, num_hidden_layers=2, vocab_size=512, hidden_size=hidden, intermediate_size=512)
    model = get_model(cfg, CPU, TorchAttentionBackend())
    hf = cfg.hf_config
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == ((hf.num_attention_heads + 2 * hf.num_key_value_heads) * cfg.head_dim,
                                          hf.hidden_size)
    for pname, p in model.named_parameters():
        if pname.endswith("norm.weight"):
            assert torch.all(p == 1)
    w = model.model.layers[1].mlp.down_proj.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    logits = torch.stack(run_paged(model, cfg, [[1, 2, 3, 4, 5]], [[3], [1], [1]])[0])
    assert logits.shape == (5, 512) and torch.isfinite(logits).all()

    again = get_model(cfg, CPU, TorchAttentionBackend())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    other = get_model(dataclasses.replace(cfg, seed=1), CPU, TorchAttentionBackend())
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_dummy_weights_in_bfloat16():
    cfg = dataclasses.replace(_reduced("llama-3.2-1b", num_hidden_layers=1, vocab_size=256), dtype=torch.bfloat16)
    model = get_model(cfg, CPU, TorchAttentionBackend())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert model.tie_word_embeddings and model.lm_head is model.model.embed_tokens
