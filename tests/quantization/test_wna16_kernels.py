"""The W4A16 / W8A16 Triton kernels (TRITON_INTERPRET=1 on the CPU, compiled on a GPU) against a float64
product of the dequantized weight, built here from random integers; and the picker's choice."""

from __future__ import annotations

import pytest
import torch

from tests.quantization.test_gptq import CPU, model_config
from vllm_engine.attention.torch_ref import TorchAttentionBackend
from vllm_engine.model_loader import get_model
from vllm_engine.quantization.kernels import wna16 as k
from vllm_engine.quantization.kernels.wna16_picker import WNA16Picker
from vllm_engine.quantization.utils import pack_int32, unpack_int32

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_weight(in_f: int, out_f: int, bits: int, group_size: int, zeros: bool, layout: str, seed: int = 0):
    """(WNA16Weight, reference [K, N] float64 in the input's original column order). ``layout``:
    "runs" (row k in group k // group_size), "perm" (act order sorted into runs: perm), "g_idx"."""
    gen = torch.Generator().manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    q = torch.randint(0, 1 << bits, (in_f, out_f), generator=gen)
    groups = in_f // gs
    scales = torch.rand(groups, out_f, generator=gen, dtype=torch.float64) * 0.02 + 0.001
    z = torch.randint(0, 1 << bits, (groups, out_f), generator=gen).double() if zeros else None
    g = torch.arange(in_f) // gs
    if layout != "runs":
        g = g[torch.randperm(in_f, generator=gen)]
    ref = (q.double() - (z[g] if zeros else float(1 << (bits - 1)))) * scales[g]
    perm = g_idx = None
    if layout == "perm":
        perm = torch.argsort(g, stable=True)
        q = q[perm]
    elif layout == "g_idx":
        g_idx = g.int().to(DEVICE)
    w = k.WNA16Weight(pack_int32(q, bits, 0).to(DEVICE), scales.float().to(DEVICE),
                      z.float().to(DEVICE) if zeros else None, g_idx,
                      perm.to(DEVICE) if perm is not None else None, bits, gs)
    return w, ref


CASES = [(4, 32, False, "runs"), (4, 128, True, "runs"), (4, 64, True, "perm"), (4, 32, False, "g_idx"),
         (4, -1, True, "runs"), (8, 64, False, "runs"), (8, 128, True, "g_idx"), (8, -1, False, "runs")]


@pytest.mark.parametrize("bits,group_size,zeros,layout", CASES)
@pytest.mark.parametrize("rows", [1, 3, 16, 37])
def test_kernels_match_float64(bits, group_size, zeros, layout, rows):
    in_f, out_f = 256, 96  # N not a multiple of the column tile: masked edges
    w, ref = random_weight(in_f, out_f, bits, group_size, zeros, layout)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_f, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_f, generator=gen, dtype=torch.float64)
    want = x @ ref + bias
    xd, bd = x.float().to(DEVICE), bias.float().to(DEVICE)
    got = {"dequant": k.dequant_linear(xd, w, bd, use_triton=False),
           "gemm": k.wna16_gemm(xd, w, bd, config=(16, 32, 64, 4, 2)),
           "gemm, a word per row": k.wna16_gemm(xd, w, bd, config=(16, 32, 64, 4, 2, "rows")),
           "triton dequant": k.dequant_linear(xd, w, bd, use_triton=True)}
    if rows <= k.GEMV_MAX_ROWS:
        got["gemv"] = k.wna16_gemv(xd, w, bd, config=(32, 64, 4, 2))
        got["gemv split-k 3"] = k.wna16_gemv(xd, w, bd, config=(32, 32, 4, 2, 3))  # 256 inputs: uneven splits
    for name, y in got.items():
        torch.testing.assert_close(y.double().cpu(), want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 16)])
def test_scale_and_min_groups(bits, group_size):
    """GGUF's blocks: w = q * scale + min (float32 scales and mins, one per group)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 1 << bits, (128, 48), generator=gen)
    scales = torch.rand(128 // group_size, 48, generator=gen, dtype=torch.float64) * 0.02
    mins = torch.randn(128 // group_size, 48, generator=gen, dtype=torch.float64) * 0.1
    g = torch.arange(128) // group_size
    ref = q.double() * scales[g] + mins[g]
    w = k.WNA16Weight(pack_int32(q, bits, 0).to(DEVICE), scales.float().to(DEVICE), None, None, None, bits,
                      group_size, mins.float().to(DEVICE))
    x = torch.randn(6, 128, generator=gen, dtype=torch.float64)
    xd = x.float().to(DEVICE)
    for y in (k.wna16_gemv(xd[:3], w, config=(16, 64, 4, 2)), k.wna16_gemm(xd, w, config=(16, 16, 32, 4, 2)),
              k.dequant_linear(xd, w, use_triton=False), k.dequant_linear(xd, w, use_triton=True)):
        torch.testing.assert_close(y.double().cpu(), (x @ ref)[: y.shape[0]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_activations(dtype):
    """16-bit x and scales: the product of the dequantized weight as rounded to x's dtype, within
    16-bit accumulation error (float32 accumulators)."""
    w, ref = random_weight(256, 64, 4, 64, True, "perm")
    w.scales, w.zeros = w.scales.to(dtype), w.zeros.to(dtype)
    x = torch.randn(5, 256, dtype=torch.float64).to(dtype)
    want = x.double() @ ((k.dequantize(w, torch.float64)).to(dtype).double().cpu()[torch.argsort(w.perm.cpu())])
    for y in (k.wna16_gemm(x.to(DEVICE), w, config=(16, 64, 64, 4, 2)), k.wna16_gemv(x[:2].to(DEVICE), w)):
        torch.testing.assert_close(y.double().cpu(), want[: y.shape[0]], rtol=2e-2, atol=2e-2)


def test_loaded_gptq_layer_through_the_kernels(gptq_checkpoint):
    """A layer loaded from an act-order GPTQ checkpoint (input permutation) and one whose groups are
    read through g_idx (act order split across two ranks) give x @ the checkpoint's dequantized weight."""
    from vllm_engine.distributed import override_parallel_state

    path, weights = gptq_checkpoint(4, 32, True, False, "gptq")
    cfg = model_config(path)
    model = get_model(cfg, CPU, TorchAttentionBackend())
    with override_parallel_state(1, 2, 0, 1):
        rank1 = get_model(cfg, CPU, TorchAttentionBackend())
    layer = model.model.layers[0].mlp.down_proj
    split = rank1.model.layers[0].mlp.down_proj  # columns 128..255 of the whole input
    assert layer.wna16.perm is not None and split.wna16.g_idx is not None
    whole = weights["model.layers.0.mlp.down_proj.weight"].t()  # [K, N]
    x = torch.randn(3, 256, dtype=torch.float64)
    for w, xs, ref in ((layer.wna16, x, whole), (split.wna16, x[:, 128:], whole[128:])):
        wd = k.WNA16Weight(*(t.to(DEVICE) if t is not None else None
                             for t in (w.qweight, w.scales, w.zeros, w.g_idx, w.perm)), w.bits, w.group_size)
        for y in (k.wna16_gemv(xs.float().to(DEVICE), wd), k.wna16_gemm(xs.float().to(DEVICE), wd)):
            torch.testing.assert_close(y.double().cpu(), xs @ ref, rtol=1e-4, atol=1e-4)


def test_unpack_inverts_pack():
    for bits in (4, 8):
        v = torch.randint(0, 1 << bits, (16, 40))
        for dim in (0, 1):
            if v.shape[dim] % (32 // bits) == 0:
                assert torch.equal(unpack_int32(pack_int32(v, bits, dim), bits, dim), v.int())


def test_picker_keeps_the_fastest_config_per_shape():
    """Every candidate of the row count is timed once per shape key, the fastest kept (a fake timer:
    one GEMV config for 1 row, dequantize + cuBLAS for 64 rows)."""
    w, _ = random_weight(128, 64, 4, 32, False, "runs")
    fastest = {"gemv 64x256 w4 s3", "dequant+cublas"}
    for rows, want in ((1, "gemv 64x256 w4 s3"), (64, "dequant+cublas")):
        names, timed = list(WNA16Picker.candidates(rows)), []

        def timer(fn, flush):
            timed.append(fn)
            return 0.5 if names[len(timed) - 1] in fastest else 1.0

        picker = WNA16Picker(timer=timer)
        picker._decide(("key",), torch.zeros(rows, 128), w, None)
        assert picker.decisions[("key",)][0] == want and len(timed) == len(names)


@pytest.mark.parametrize("layout", ["runs", "g_idx"])
@pytest.mark.parametrize("rows", [1, 3])
def test_folded_norm_and_activation_gemv(layout, rows):
    """The residual add + RMSNorm, and SiLU-and-mul, folded into the quantized GEMV, against float64."""
    from vllm_engine.quantization.kernels.wna16_fused import wna16_add_norm_gemv, wna16_silu_mul_gemv

    w, ref = random_weight(256, 96, 4, 32, True, layout)
    gen = torch.Generator().manual_seed(rows)
    x, r = (torch.randn(rows, 256, generator=gen, dtype=torch.float64) for _ in range(2))
    g = 1 + 0.1 * torch.randn(256, generator=gen, dtype=torch.float64)
    bias = torch.randn(96, generator=gen, dtype=torch.float64)
    s = x + r
    h = s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-6) * g
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    y, res = wna16_add_norm_gemv(dev(x), dev(r), dev(g), 1e-6, w, dev(bias), config=(32, 64, 4, 2))
    torch.testing.assert_close(res.double().cpu(), s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double().cpu(), h @ ref + bias, rtol=1e-4, atol=1e-4)
    gate_up = torch.randn(rows, 512, generator=gen, dtype=torch.float64)
    act = torch.nn.functional.silu(gate_up[:, :256]) * gate_up[:, 256:]
    y = wna16_silu_mul_gemv(dev(gate_up), w, None, config=(32, 64, 4, 2))
    torch.testing.assert_close(y.double().cpu(), act @ ref, rtol=1e-4, atol=1e-4)


def test_folding_refuses_permuted_inputs():
    from vllm_engine.quantization.kernels.wna16_fused import wna16_silu_mul_gemv

    w, _ = random_weight(128, 32, 4, 32, False, "perm")
    with pytest.raises(ValueError, match="permuted input columns"):
        wna16_silu_mul_gemv(torch.zeros(1, 256, device=DEVICE), w)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 16)])
@pytest.mark.parametrize("rows", [1, 3])
def test_scale_and_min_groups_match_float64(bits, group_size, rows):
    """GGUF-style ``q * scale + min`` groups (K-quants: 16- and 32-value groups) in the GEMV, with and
    without split-K and the folded ops, and the GEMM, against float64."""
    from vllm_engine.quantization.kernels.wna16_fused import wna16_silu_mul_gemv

    gen = torch.Generator().manual_seed(bits + rows)
    in_f, out_f = 256, 48
    q = torch.randint(0, 1 << bits, (in_f, out_f), generator=gen)
    scales = torch.rand(in_f // group_size, out_f, generator=gen, dtype=torch.float64) * 0.02
    mins = -torch.rand(in_f // group_size, out_f, generator=gen, dtype=torch.float64) * 0.1
    g = torch.arange(in_f) // group_size
    ref = q.double() * scales[g] + mins[g]
    w = k.WNA16Weight(pack_int32(q, bits, 0).to(DEVICE), scales.float().to(DEVICE), None, None, None, bits,
                      group_size, mins=mins.float().to(DEVICE))
    x = torch.randn(rows, in_f, generator=gen, dtype=torch.float64)
    xd = x.float().to(DEVICE)
    for y in (k.wna16_gemv(xd, w, config=(16, 64, 4, 2)), k.wna16_gemv(xd, w, config=(32, 128, 4, 2, 2)),
              k.wna16_gemm(xd, w, config=(16, 16, 32, 4, 2)), k.wna16_gemm(xd, w, config=(16, 16, 32, 4, 2, "rows"))):
        torch.testing.assert_close(y.double().cpu(), x @ ref, rtol=1e-4, atol=1e-4)
    gate_up = torch.randn(rows, 2 * in_f, generator=gen, dtype=torch.float64)
    act = torch.nn.functional.silu(gate_up[:, :in_f]) * gate_up[:, in_f:]
    y = wna16_silu_mul_gemv(gate_up.float().to(DEVICE), w, None, config=(16, 128, 4, 2))
    torch.testing.assert_close(y.double().cpu(), act @ ref, rtol=1e-4, atol=1e-4)
