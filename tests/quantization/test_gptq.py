"""GPTQ checkpoints (packed here from the format's description, tests/quantization/conftest.py): the
engine's logits against HF transformers running the dequantized weights, greedy tokens, each
tensor-parallel rank's share, and the settings and checkpoints refused at start."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.quantization.conftest import hf_reference
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.config import EngineArgs
from vllm_engine.distributed import override_parallel_state
from vllm_engine.layers.linear import LinearBase, RowParallelLinear
from vllm_engine.model_loader import get_model
from vllm_engine.quantization.kernels.wna16 import dequantize

CPU = torch.device("cpu")
LENS = [26, 11, 8]
SCHEDULE = [[12, 9, 0], [11, 0, 5], [1, 1, 1], [1, 1, 1], [1, 0, 1]]


def model_config(path, **kw):
    return EngineArgs(model=str(path), dtype="float32", device="cpu", max_model_len=128,
                      **kw).create_engine_config().model


# (bits, group_size, desc_act, sym, checkpoint_format)
CASES = [
    (4, 128, False, True, "gptq"),
    (4, 32, True, False, "gptq"),
    (4, 64, True, True, "gptq_v2"),
    (4, -1, False, False, "gptq_v2"),
    (8, 128, True, False, "gptq"),
    (8, 32, False, True, "gptq_v2"),
    (8, -1, True, True, "gptq"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "w%d-g%d-%s-%s-%s" % (
    c[0], c[1], "act" if c[2] else "seq", "sym" if c[3] else "asym", c[4]))
def test_logits_match_hf_on_dequantized_weights(case, gptq_checkpoint, float_checkpoint, paged_vs_hf):
    path, weights = gptq_checkpoint(*case)
    cfg = model_config(path)
    assert cfg.quantization == "gptq"  # detected from config.json
    model = get_model(cfg, CPU, TorchAttentionBackend())
    paged_vs_hf(model, cfg, hf_reference(float_checkpoint, weights), LENS, SCHEDULE, tol=2e-4)


def test_engine_greedy_tokens_equal_hf(gptq_checkpoint, float_checkpoint):
    from vllm_engine import Engine, SamplingParams

    path, weights = gptq_checkpoint(4, 32, True, False, "gptq")
    hf = hf_reference(float_checkpoint, weights)
    engine = Engine(model=str(path), quantization="gptq", dtype="float32", device="cpu", max_model_len=128)
    prompts = ["Hello, my name is", "The capital of France is", "One two three"]
    ids = [engine.tokenize(p) for p in prompts]
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt_ids, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt_ids, 10)[0]


@pytest.mark.parametrize("case", [(4, 32, True, False, "gptq"), (8, 64, False, True, "gptq_v2"),
                                  (4, -1, True, True, "gptq")])
def test_each_rank_holds_its_slice(case, gptq_checkpoint):
    """At tp = 2 each rank's weights, dequantized (act-order rows put back in place), are its slice of
    the whole dequantized weight: columns of q/k/v and gate/up, rows of o and down."""
    path, weights = gptq_checkpoint(*case)
    cfg = model_config(path)
    for rank in range(2):
        with override_parallel_state(rank, 2, 0, 1):
            model = get_model(cfg, CPU, TorchAttentionBackend())
        for prefix, m in model.named_modules():
            if not isinstance(m, LinearBase):
                continue
            got = dequantize(m.wna16, torch.float64)  # [K_rank, N_rank], rows in perm order
            if m.wna16.perm is not None:
                got = torch.empty_like(got).index_copy_(0, m.wna16.perm, got)
            assert torch.equal(got.t(), _rank_slice(m, prefix, weights)), prefix


def _rank_slice(m, prefix: str, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    r = m.tp_rank
    if isinstance(m, RowParallelLinear):
        k = m.input_size_per_partition
        return weights[f"{prefix}.weight"][:, r * k: (r + 1) * k]
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    fused = prefix.rsplit(".", 1)[1]
    rows = []
    for part, size in zip(parts[fused], m.output_partition_sizes):
        rows.append(weights[f"{prefix.replace(fused, part)}.weight"][r * size: (r + 1) * size])
    return torch.cat(rows)


@pytest.mark.parametrize("field,value,match", [
    ("bits", 3, "bits=3"),
    ("group_size", 100, "group_size=100"),
    ("checkpoint_format", "marlin", "checkpoint_format"),
    ("lm_head", True, "lm_head"),
])
def test_unsupported_settings_refused_at_start(field, value, match, gptq_checkpoint, tmp_path):
    path, _ = gptq_checkpoint(4, 128, False, True, "gptq")
    bad = _copy(path, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        model_config(bad)


def test_quantization_argument_checked_against_checkpoint(gptq_checkpoint, float_checkpoint):
    path, _ = gptq_checkpoint(4, 128, False, True, "gptq")
    with pytest.raises(ValueError, match="does not match the checkpoint's quantization_config.quant_method='gptq'"):
        model_config(path, quantization="compressed-tensors")
    with pytest.raises(ValueError, match="has no quantization_config"):
        model_config(float_checkpoint, quantization="gptq")
    with pytest.raises(ValueError, match="quantization='int3' is not supported"):
        model_config(path, quantization="int3")
    assert model_config(float_checkpoint).quantization is None


def test_group_size_must_divide_each_ranks_inputs(gptq_checkpoint):
    """Group 128 at tp = 2: the o projection's 128 inputs give 64 per rank, less than a group."""
    path, _ = gptq_checkpoint(4, 128, False, True, "gptq")
    cfg = model_config(path)
    with override_parallel_state(0, 2, 0, 1), pytest.raises(
            ValueError, match=r"layers.0.self_attn.o_proj: input features per rank \(64\) must be a multiple of the "
                              r"quantization group_size \(128\)"):
        get_model(cfg, CPU, TorchAttentionBackend())


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.scales"), "lacks 1 tensor.*model.layers.1.mlp.up_proj.scales"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.qweight":
                         t["model.layers.0.self_attn.o_proj.qweight"][:8]}),
     "model.layers.0.self_attn.o_proj.qweight has shape"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.g_idx":
                         t["model.layers.0.self_attn.k_proj.g_idx"].flip(0)}),
     r"model.layers.0.self_attn.[qkv]_proj.g_idx .*differs from the g_idx of the modules fused with it"),
])
def test_bad_checkpoints_name_the_tensor(edit, match, gptq_checkpoint, tmp_path):
    path, _ = gptq_checkpoint(4, 32, True, False, "gptq")
    bad = _copy(path, tmp_path)
    tensors = load_file(str(bad / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        get_model(model_config(bad), CPU, TorchAttentionBackend())


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "fp8", "squeezellm"])
def test_dummy_weights_in_each_format(method, float_checkpoint):
    """Benchmarks: a config without quantization_config, random weights in each format's default
    settings (load_format="dummy"); the model runs and every linear layer holds that format's tensors."""
    from tests.conftest import run_paged_steps

    cfg = model_config(float_checkpoint, load_format="dummy", quantization=method)
    model = get_model(cfg, CPU, TorchAttentionBackend())
    for layer in (m for m in model.modules() if isinstance(m, LinearBase)):
        if method == "fp8":
            assert layer.weight.dtype == torch.float8_e4m3fn
        else:
            assert layer.wna16.lut is not None if method == "squeezellm" else layer.wna16.group_size == 128
    logits = run_paged_steps(model, cfg, [[1, 2, 3]], [[3]])[0]
    assert torch.isfinite(torch.stack(logits)).all()


def test_quant_bench_latency_part_runs(float_checkpoint):
    """tests/benchmarks/quant_bench.py's engine loop (GPU-only as a script) on the tiny model: each
    method's engine builds, decodes, and its 4-bit weights take less memory than float32's."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quant_bench

    args = argparse.Namespace(model=str(float_checkpoint), methods=["none", "gptq", "fp8"], input_len=12,
                              output_len=3, runs=1, max_model_len=64, dtype="float32")
    rows = {r["method"]: r for r in quant_bench.latency(args)}
    assert all(r["tpot_ms_p50"] > 0 and r["kv_blocks"] > 0 for r in rows.values())
    assert rows["gptq"]["weight_bytes"] < rows["fp8"]["weight_bytes"] < rows["none"]["weight_bytes"]


def test_quant_perplexity_script(float_checkpoint, tmp_path):
    """tests/benchmarks/quant_perplexity.py on the tiny model: the unquantized perplexity is HF's on the
    same tokens; FP8 changes it."""
    import json
    import math
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quant_perplexity

    out = tmp_path / "ppl.json"
    assert quant_perplexity.main(["--model", str(float_checkpoint), "--methods", "none", "fp8", "--max-tokens", "48",
                                  "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    ids = AutoTokenizer.from_pretrained(str(float_checkpoint))(quant_perplexity.TEXT)["input_ids"][:48]
    hf = AutoModelForCausalLM.from_pretrained(str(float_checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    want = math.exp(-sum(logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0) / (len(ids) - 1))
    assert rows["none"]["tokens"] == 48 and abs(rows["none"]["perplexity"] - want) < 1e-3 * want
    assert rows["fp8"]["perplexity"] != rows["none"]["perplexity"]


def test_quantization_flag_on_the_command_line(gptq_checkpoint):
    """``--quantization`` / ``-q`` reach the engine config as ``quantization=`` does (vllm-engine serve and
    generate build their flags from EngineArgs)."""
    import argparse

    path, _ = gptq_checkpoint(4, 128, False, True, "gptq")
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--model", str(path), "--quantization", "gptq",
                                                       "--device", "cpu", "--dtype", "float32"]))
    assert args.create_engine_config().model.quantization == "gptq"
    args = EngineArgs.from_cli_args(parser.parse_args(["--model", str(path), "-q", "awq", "--device", "cpu"]))
    with pytest.raises(ValueError, match="quantization='awq' does not match"):
        args.create_engine_config()


def test_throughput_and_latency_scripts_take_quantization(float_checkpoint, tmp_path):
    """tests/benchmarks/throughput.py and latency.py with --quantization (the nano and batch-1 numbers of
    a quantized model; dummy weights in the method's default settings)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import latency
    import throughput

    out = tmp_path / "tp.json"
    assert throughput.main(["--model", str(float_checkpoint), "--load-format", "dummy", "--quantization", "gptq",
                            "--dataset", "random", "--num-prompts", "2", "--input-len", "12", "--output-len", "3",
                            "--runs", "1", "--max-model-len", "128", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["output_tok_s"] > 0
    out = tmp_path / "lat.json"
    assert latency.main(["--model", str(float_checkpoint), "--load-format", "dummy", "--quantization", "fp8",
                         "--input-len", "12", "--output-len", "3", "--batch-sizes", "1", "--runs", "1",
                         "--max-model-len", "64", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["tpot_ms_p50"] > 0
