"""FP8 W8A8: ``fp8_linear`` and every loaded layer against float64, and whole models against HF
transformers running the same arithmetic — the e4m3 weights dequantized, and each quantized linear's
input rounded to e4m3 (per token, or with the static scale) by a hook written here — for
``quantization="fp8"`` on an unquantized checkpoint and for fp8 checkpoints (per-tensor scales, static
and dynamic activations).

Whole models are compared loosely: rounding activations to e4m3 (steps of 1/16) turns a 1e-7
difference between two float32 implementations into a 6% change of one element now and then, which
later layers pass on. So the engine's logits must be far closer to the FP8 reference than the
unquantized model's are, and agree on nearly every argmax; exactness is checked layer by layer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_paged_steps
from tests.quantization.conftest import LINEARS, hf_reference
from tests.quantization.test_gptq import CPU, LENS, SCHEDULE, model_config
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.layers.linear import LinearBase
from vllm_engine.model_loader import get_model
from vllm_engine.quantization.fp8 import fp8_linear, scaled_mm_supported

E4M3 = torch.float8_e4m3fn
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def e4m3_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded to the e4m3 grid of the float32 ``scale`` (saturating at +-448; the division in float32,
    as the format's scales are), back in float64."""
    scale = scale.float()
    return (x.float() / scale).clamp(-448, 448).to(E4M3).double() * scale.double()


def round_activations(x: torch.Tensor, static_scale: float | None = None, group: int | None = None) -> torch.Tensor:
    """x rounded to e4m3 (float64): with a static scale, per token (amax / 448), or per token and
    group of ``group`` inputs."""
    if static_scale is not None:
        return e4m3_round(x, torch.tensor(static_scale))
    if group is not None:
        xg = x.unflatten(-1, (-1, group))
        return e4m3_round(xg, xg.float().abs().amax(-1, keepdim=True) / 448).flatten(-2)
    return e4m3_round(x, x.float().abs().amax(-1, keepdim=True) / 448)


def add_activation_hooks(model, scales: dict[str, float], skip: tuple[str, ...] = (), group: int | None = None) -> None:
    """Each quantized linear of the HF model (not those ending in ``skip``) sees its input rounded to
    e4m3 (``round_activations``: the module's static scale from ``scales``, else dynamic)."""

    def hook(name):
        def pre(_module, args):
            return (round_activations(args[0], scales.get(name), group).to(args[0].dtype),)
        return pre

    for name, m in model.named_modules():
        if name.split(".", 3)[-1] in LINEARS and not name.endswith(skip):
            m.register_forward_pre_hook(hook(name))


def check_model(model, cfg, float_checkpoint, weights, in_scales, skip=(), group=None) -> None:
    """Every quantized layer exactly (float64 reference on random inputs); the whole model loosely
    (module docstring) against HF with the FP8 arithmetic (activations per token, per token and
    ``group``, or static ``in_scales``)."""
    gen = torch.Generator().manual_seed(3)
    quantized = [(p, m) for p, m in model.named_modules()
                 if isinstance(m, LinearBase) and getattr(m, "weight", None) is not None and m.weight.dtype == E4M3]
    assert len(quantized) == 8 - 2 * len(skip)
    for prefix, m in quantized:
        names = [prefix.replace(m.prefix.rsplit(".", 1)[1], p) for p in hf_parts(prefix)]
        w = torch.cat([weights[f"{n}.weight"] for n in names])
        x = torch.randn(4, w.shape[1], generator=gen)
        static = [in_scales[n] for n in names if n in in_scales]
        want = round_activations(x, max(static) if static else None, group) @ w.t()
        torch.testing.assert_close(m(x).double(), want, rtol=1e-5, atol=1e-5, msg=prefix)
    hf = hf_reference(float_checkpoint, weights)
    add_activation_hooks(hf, in_scales, skip, group)
    unquantized = hf_reference(float_checkpoint, {})
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in LENS]
    for seq, got in zip(seqs, run_paged_steps(model, cfg, seqs, SCHEDULE)):
        with torch.no_grad():
            ref, far = (h(torch.tensor([seq])).logits[0] for h in (hf, unquantized))
        got = torch.stack(got)
        assert (got - ref).abs().mean() < 0.1 * (far - ref).abs().mean()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def hf_parts(prefix: str) -> list[str]:
    last = prefix.rsplit(".", 1)[1]
    return {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.get(last, [last])


@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_matches_float64(static):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen, dtype=torch.float64) * 0.1
    w_scale = w.abs().amax(1) / 448
    w_q = (w / w_scale[:, None]).to(E4M3)
    x = torch.randn(7, 128, generator=gen, dtype=torch.float64)
    bias = torch.randn(96, generator=gen, dtype=torch.float64)
    in_scale = torch.tensor(0.004, dtype=torch.float64)  # saturates the largest inputs
    xs = in_scale if static else x.abs().amax(-1, keepdim=True) / 448
    want = e4m3_round(x, xs) @ (w_q.double() * w_scale[:, None]).t() + bias
    args = (w_q.to(DEVICE), w_scale.float().to(DEVICE), in_scale.float().to(DEVICE) if static else None)
    got = fp8_linear(x.float().to(DEVICE), *args, bias=bias.float().to(DEVICE))
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    if scaled_mm_supported(DEVICE):  # FP8 tensor cores: bf16 in and out
        got = fp8_linear(x.bfloat16().to(DEVICE), *args, bias=bias.bfloat16().to(DEVICE), use_scaled_mm=True)
        want16 = e4m3_round(x.bfloat16().double(), xs) @ (w_q.double() * w_scale[:, None]).t() + bias
        torch.testing.assert_close(got.double().cpu(), want16, rtol=2e-2, atol=2e-2)


def test_dynamic_fp8_of_an_unquantized_checkpoint(float_checkpoint):
    """quantization="fp8": weights per output channel (amax / 448) at load, activations per token."""
    cfg = model_config(float_checkpoint, quantization="fp8")
    assert cfg.quantization == "fp8"
    model = get_model(cfg, CPU, TorchAttentionBackend())
    assert model.model.layers[0].mlp.down_proj.weight.dtype == E4M3
    assert model.lm_head.weight.dtype == torch.float32  # the LM head stays unquantized
    weights = {}
    for name, w in load_file(str(float_checkpoint / "model.safetensors")).items():
        if name[: -len(".weight")].split(".", 3)[-1] in LINEARS:
            weights[name] = e4m3_round(w, w.float().abs().amax(1, keepdim=True) / 448)
    check_model(model, cfg, float_checkpoint, weights, {})


def write_fp8_checkpoint(float_dir, out_dir, static: bool, ignored: tuple[str, ...] = ()):
    """An fp8 checkpoint (per-tensor weight scales; static input scales of 0.02) and its dequantized
    weights and input scales."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in float_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    out, weights, in_scales = {}, {}, {}
    for name, w in load_file(str(float_dir / "model.safetensors")).items():
        module = name[: -len(".weight")]
        if module.split(".", 3)[-1] not in LINEARS or module.endswith(ignored):
            out[name] = w
            continue
        scale = (w.abs().max() / 448).float()
        out[name] = (w / scale).clamp(-448, 448).to(E4M3)
        out[f"{module}.weight_scale"] = scale.reshape(())
        weights[name] = out[name].double() * scale.double()
        if static:
            out[f"{module}.input_scale"] = torch.tensor(0.02)
            in_scales[module] = 0.02
    save_file(out, str(out_dir / "model.safetensors"))
    cfg = json.loads((float_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
                                  "ignored_layers": list(ignored)}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return weights, in_scales


@pytest.mark.parametrize("static", [False, True])
def test_fp8_checkpoint(static, float_checkpoint, tmp_path):
    """Per-tensor scales of q, k and v (gate, up) spread over their rows of the fused weight; a static
    input scale of a fused layer is the largest of its parts'."""
    weights, in_scales = write_fp8_checkpoint(float_checkpoint, tmp_path / "fp8", static, ignored=("o_proj",))
    cfg = model_config(tmp_path / "fp8")
    model = get_model(cfg, CPU, TorchAttentionBackend())
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32  # ignored_layers
    float_weights = load_file(str(float_checkpoint / "model.safetensors"))
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        weights[name] = float_weights[name].double()
    check_model(model, cfg, float_checkpoint, weights, in_scales, skip=("o_proj",))


@pytest.mark.parametrize("edit,match", [
    ({"weight_block_size": [128, 100]}, "weight_block_size"),
    ({"activation_scheme": "per-head"}, "activation_scheme='per-head'"),
])
def test_unsupported_settings_refused_at_start(edit, match, float_checkpoint, tmp_path):
    write_fp8_checkpoint(float_checkpoint, tmp_path / "fp8", static=False)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"].update(edit)
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        model_config(tmp_path / "fp8")


def test_bad_scale_named(float_checkpoint, tmp_path):
    write_fp8_checkpoint(float_checkpoint, tmp_path / "fp8", static=False)
    tensors = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight_scale"] = torch.ones(4)
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight_scale has shape \(4,\), expected one"):
        get_model(model_config(tmp_path / "fp8"), CPU, TorchAttentionBackend())


def write_block_fp8_checkpoint(float_dir, out_dir, block=(128, 128)):
    """A block-scaled fp8 checkpoint (``weight_block_size``: DeepSeek / Qwen3 FP8 layout): one scale per
    block, k/v projections of 64 rows being half a block; returns the dequantized weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in float_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    bn, bk = block
    out, weights = {}, {}
    for name, w in load_file(str(float_dir / "model.safetensors")).items():
        module = name[: -len(".weight")]
        if module.split(".", 3)[-1] not in LINEARS:
            out[name] = w
            continue
        n, k = w.shape
        rows = -(-n // bn)
        scale = torch.stack([torch.stack([w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max() / 448
                                          for j in range(k // bk)]) for i in range(rows)]).float()
        per_row = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)
        out[name] = (w / per_row).clamp(-448, 448).to(E4M3)
        out[f"{module}.weight_scale_inv"] = scale
        weights[name] = out[name].double() * per_row.double()
    save_file(out, str(out_dir / "model.safetensors"))
    cfg = json.loads((float_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": list(block)}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return weights


@pytest.mark.parametrize("block", [(128, 128), (32, 64)])
def test_block_fp8_checkpoint(block, float_checkpoint, tmp_path):
    weights = write_block_fp8_checkpoint(float_checkpoint, tmp_path / "fp8", block)
    cfg = model_config(tmp_path / "fp8")
    model = get_model(cfg, CPU, TorchAttentionBackend())
    check_model(model, cfg, float_checkpoint, weights, {}, group=block[1])


@pytest.mark.parametrize("rows", [1, 19])
def test_block_fp8_kernel_matches_float64(rows):
    """The Triton kernel (interpreted on the CPU) and the torch path against float64."""
    from vllm_engine.quantization.kernels.fp8_block import fp8_block_linear

    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(80, 256, generator=gen, dtype=torch.float64) * 0.05
    w_scale = torch.rand(80, 4, generator=gen, dtype=torch.float64) * 1e-3 + 1e-4
    w_q = (w / w_scale.repeat_interleave(64, 1)).clamp(-448, 448).to(E4M3)
    x = torch.randn(rows, 256, generator=gen, dtype=torch.float64)
    bias = torch.randn(80, generator=gen, dtype=torch.float64)
    want = round_activations(x, group=64) @ (w_q.double() * w_scale.repeat_interleave(64, 1)).t() + bias
    for use_triton in (True, False):
        got = fp8_block_linear(x.float().to(DEVICE), w_q.to(DEVICE), w_scale.float().to(DEVICE), 64,
                               bias.float().to(DEVICE), use_triton=use_triton)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [32, 96, 256])
def test_activation_quantization_kernel_matches_torch(group):
    """The one-kernel per-token(-group) e4m3 quantization gives the torch ops' values and scales
    (groups of 96: not a power of two; 256 = the whole row: per token)."""
    from vllm_engine.quantization.kernels.fp8_block import quantize_per_token_group

    x = torch.randn(5, 768 if group == 96 else 256, dtype=torch.float64) * 3
    x[1] = 0.0  # an all-zero row: the minimum scale, zeros
    x = x.to(DEVICE, torch.bfloat16)
    q_ref, s_ref = quantize_per_token_group(x, group, use_triton=False)
    q, s = quantize_per_token_group(x, group, use_triton=True)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q.float(), q_ref.float())
