"""layers/triton_linear.py: the Triton GEMV and GEMM against float64, and LinearPicker's choice logic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_engine.layers import triton_linear as L

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/kernels/conftest.py)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b, dtype: torch.dtype) -> None:
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == dtype
    want = x.double() @ w.double().T + (b.double() if b is not None else 0)
    # One rounding of a float32 sum: relative to the value and to the sum of |products| (the dot may cancel).
    scale = x.double().abs() @ w.double().abs().T
    err = (y.double() - want).abs().cpu()
    bound = RTOL[dtype] * (want.abs().cpu() + 1e-2) + 1e-5 * scale.cpu()
    assert (err <= bound).all(), err.max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 37, 300, False), (3, 64, 256, True), (4, 20, 77, False),
                                        (2, 16, 40, False)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gemv(dtype, m, n, k, bias, prefetch, monkeypatch):
    """``prefetch``: the first W tile loaded before the PDL wait (here without PDL, which needs sm_90)."""
    monkeypatch.setattr(L, "_gemv_pdl_args", lambda device: {"PDL": False, "PREFETCH": prefetch})
    x, w = rand(m, k, dtype=dtype, seed=50), rand(n, k, dtype=dtype, seed=51)
    b = rand(n, dtype=dtype, seed=52) if bias else None
    check(L.triton_gemv(x, w, b, config=(16, 64, 4, 1)), x, w, b, dtype)  # tiles smaller than N and K


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(5, 40, 96, False), (33, 70, 64, True), (16, 32, 100, False)])
def test_matmul(dtype, m, n, k, bias):
    x, w = rand(m, k, dtype=dtype, seed=60), rand(n, k, dtype=dtype, seed=61)
    b = rand(n, dtype=dtype, seed=62) if bias else None
    # Several row, column and K tiles, with ragged edges on every side.
    check(L.triton_matmul(x, w, b, config=(16, 32, 32, 4, 2)), x, w, b, dtype)


def test_matmul_strided_input_and_zero_rows():
    big = rand(9, 80, dtype=torch.float32, seed=63)
    x = big[:, 8:72]  # rows with a stride
    w = rand(24, 64, dtype=torch.float32, seed=64)
    check(L.triton_matmul(x, w, config=(16, 16, 32, 4, 2)), x, w, None, torch.float32)
    assert L.triton_matmul(x[:0], w).shape == (0, 24)


def test_bucket():
    assert [L._bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 200, 256)] == [1, 2, 4, 4, 8, 8, 16, 256, 256]


class FakeTimer:
    """Seconds per candidate, looked up by the function the picker times."""

    def __init__(self, seconds: dict):
        self.seconds = seconds
        self.calls = 0
        self.flushes = []

    def __call__(self, fn, flush="read"):
        self.calls += 1
        self.flushes.append(flush)
        return self.seconds[fn.__defaults__[0]]


def test_picker_keeps_cublas_unless_ours_wins_by_the_margin():
    cublas, ours = (lambda *a: "c"), (lambda *a: "o")
    timer = FakeTimer({cublas: 10e-6, ours: 9.7e-6})  # 3% faster: below the 5% margin
    picker = L.LinearPicker(margin=0.05, timer=timer)
    choice, times = picker.decide(("k1",), {"cublas": cublas, "gemm a": ours})
    assert choice == "cublas" and times == {"cublas": 10e-6, "gemm a": 9.7e-6}
    slow = lambda *a: "s"  # noqa: E731
    timer.seconds.update({ours: 8e-6, slow: 9e-6})  # 20% and 10% faster: the fastest config wins
    assert picker.decide(("k2",), {"cublas": cublas, "gemm slow": slow, "gemm a": ours})[0] == "gemm a"
    assert picker._fns[("k2",)] is ours
    timer.seconds[ours] = 20e-6
    assert picker.decide(("k3",), {"cublas": cublas, "gemv a": ours})[0] == "cublas"
    assert set(picker.decisions) == {("k1",), ("k2",), ("k3",)}
    assert "gemm for 1" in picker.summary() and "cublas for 2" in picker.summary()


def test_negative_margin_takes_our_fastest_while_slower_by_less_than_it():
    cublas, fast, slow = (lambda *a: "c"), (lambda *a: "f"), (lambda *a: "s")
    timer = FakeTimer({cublas: 10e-6, fast: 10.4e-6, slow: 11e-6})
    cands = {"cublas": cublas, "gemv slow": slow, "gemv fast": fast}
    picker = L.LinearPicker(margin=-0.05, timer=timer)
    assert picker.decide(("k1",), cands)[0] == "gemv fast"  # 4% slower: within the 5% allowance
    timer.seconds[fast] = 10.6e-6
    assert picker.decide(("k2",), cands)[0] == "cublas"  # 6% slower: not
    assert L.LinearPicker(margin=-1.0, timer=timer).decide(("k3",), cands)[0] == "gemv fast"
    assert L.LinearPicker(margin=-1.0, timer=timer).decide(("k4",), {"cublas": cublas})[0] == "cublas"


def test_picker_candidates_by_rows():
    kinds = lambda m: {name.split()[0] for name in L.LinearPicker.candidates(m)}  # noqa: E731
    assert kinds(1) == kinds(4) == {"cublas", "gemv"}
    assert kinds(5) == kinds(256) == {"cublas", "gemm"}
    assert len(L.LinearPicker.candidates(1)) == 1 + len(L.GEMV_CONFIGS)
    # No row tile larger than the rows rounded up (16 at least): 8 rows try only the 16-row tiles.
    assert all(int(n.split()[1].split("x")[0]) <= 16 for n in L.LinearPicker.candidates(8) if n != "cublas")
    assert len(L.LinearPicker.candidates(256)) == 1 + len(L.GEMM_CONFIGS)
    assert L.LinearPicker.candidates(256)["cublas"] is F.linear


def test_picker_off_cuda_is_f_linear_and_times_nothing():
    timer = FakeTimer({})
    picker = L.LinearPicker(timer=timer)
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.equal(picker(x, w, b), F.linear(x, w, b))
    assert timer.calls == 0 and not picker.decisions


@pytest.mark.parametrize("max_num_seqs", [1, 20, 256])
def test_lm_head_warm_up_covers_every_row_bucket_a_step_can_sample(max_num_seqs):
    """The runner warms the LM head (picker decisions, Triton compiles) at startup for every row count
    bucket from 1 to max_num_seqs, so none is timed or compiled while requests are running."""
    from types import SimpleNamespace

    from vllm_engine.worker.model_runner import ModelRunner

    rows = []
    stub = SimpleNamespace(
        config=SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=max_num_seqs)),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(hidden_size=8)),
        dtype=torch.float32, device=torch.device("cpu"),
        model=SimpleNamespace(compute_logits=lambda h: rows.append(h.shape[0])))
    ModelRunner._warm_lm_head(stub)
    assert rows and max(rows) <= max_num_seqs and min(rows) == 1
    assert {L._bucket(r) for r in rows} == {L._bucket(m) for m in range(1, max_num_seqs + 1)}
    # Triton compiles separate variants for multiples of 16 and the rest: both are warmed per bucket.
    for b in {L._bucket(m) for m in range(17, max_num_seqs + 1)}:
        possible = {m % 16 == 0 for m in range(17, max_num_seqs + 1) if L._bucket(m) == b}
        assert {r % 16 == 0 for r in rows if L._bucket(r) == b} == possible


def test_cuda_time_flush_mode_is_checked():
    with pytest.raises(ValueError, match="flush"):
        L.cuda_time_s(lambda: None, flush="evict")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the picker times only CUDA inputs")
def test_picker_times_gemv_with_a_read_flush_and_gemm_with_a_write_flush():
    timer = FakeTimer({})
    timer.seconds = type("AnyFn", (dict,), {"__missing__": lambda self, k: 1e-5})()
    picker = L.LinearPicker(timer=timer)
    w = torch.randn(64, 32, device="cuda")
    picker(torch.randn(2, 32, device="cuda"), w)
    assert set(timer.flushes) == {L.LinearPicker.GEMV_TIMING[0]}
    timer.flushes.clear()
    picker(torch.randn(32, 32, device="cuda"), w)
    assert set(timer.flushes) == {L.LinearPicker.GEMM_TIMING[0]}


def test_picker_timing_by_rows():
    assert L.LinearPicker.timing(1) == L.LinearPicker.timing(L.GEMV_MAX_ROWS) == L.LinearPicker.GEMV_TIMING
    assert L.LinearPicker.timing(L.GEMV_MAX_ROWS + 1) == L.LinearPicker.timing(256) == L.LinearPicker.GEMM_TIMING


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 37, 300, False), (3, 64, 256, True), (4, 20, 77, False)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_add_norm_gemv(dtype, m, n, k, bias, prefetch, monkeypatch):
    """The residual add and RMSNorm folded into the GEMV, against float64: the residual out is x + r
    rounded once (as fused_add_rms_norm stores it), the output linear(rmsnorm(x + r) * g)."""
    monkeypatch.setattr(L, "_gemv_pdl_args", lambda device: {"PDL": False, "PREFETCH": prefetch})
    x, r = rand(m, k, dtype=dtype, seed=70), rand(m, k, dtype=dtype, seed=71)
    g = (1 + 0.5 * rand(k, dtype=torch.float32, seed=72)).to(dtype)
    w = rand(n, k, dtype=dtype, seed=73)
    b = rand(n, dtype=dtype, seed=74) if bias else None
    y, res = L.triton_add_norm_gemv(x, r, g, 1e-6, w, b, config=(16, 64, 4, 1))
    h = (x.float() + r.float()).to(dtype)
    if DEVICE == "cuda" or dtype != torch.bfloat16:
        assert torch.equal(res.cpu(), h.cpu())
    else:  # the interpreter rounds float32 -> bfloat16 toward zero, torch to nearest: one unit apart
        assert ((res.double() - h.double()).abs() <= 2 ** -7 * h.double().abs()).all()
    hd = res.double()  # the norm and the GEMV take the kernel's own x + r
    xn = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-6) * g.double()
    # the kernel's input is the unrounded float32 product: compare with a float64 reference of it
    check(y, xn.to(dtype) if dtype == torch.float32 else xn, w, b, dtype)


def test_add_norm_gemv_checks_shapes():
    x = rand(2, 16, dtype=torch.float32, seed=75)
    with pytest.raises(ValueError, match="residual"):
        L.triton_add_norm_gemv(x, x[:1], torch.ones(16), 1e-6, rand(8, 16, dtype=torch.float32, seed=76))


def test_add_norm_decision_is_timed_against_the_unfused_pair():
    unfused, fused = (lambda *a: "u"), (lambda *a: "f")
    timer = FakeTimer({unfused: 20e-6, fused: 19e-6})
    picker = L.LinearPicker(timer=timer)
    cands = {"unfused": unfused, "add_norm gemv a": fused}
    assert picker.decide(("add_norm", 1), cands, flush="read", margin=0.0, baseline="unfused")[0] == "add_norm gemv a"
    timer.seconds[fused] = 21e-6
    assert picker.decide(("add_norm", 2), cands, flush="read", margin=0.0, baseline="unfused")[0] == "unfused"
    assert "1 us less" in picker.summary()  # 20 - 19 us saved by the one fused shape


def test_add_norm_linear_off_cuda_is_the_norm_then_the_linear():
    from vllm_engine.layers.layernorm import rms_norm

    picker = L.LinearPicker(timer=FakeTimer({}))
    x, r, g = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8) + 0.5
    w, b = torch.randn(5, 8), torch.randn(5)
    y, res = picker.add_norm_linear(x, r, g, 1e-6, w, b)
    h, want_res = rms_norm(x, g, 1e-6, r)
    assert torch.equal(res, want_res) and torch.equal(y, F.linear(h, w, b)) and not picker.decisions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the picker times only CUDA inputs")
@pytest.mark.parametrize("m", [1, 4, 8])
def test_add_norm_linear_on_cuda_matches_the_unfused_pair(m):
    from vllm_engine.layers import fused_ops

    picker = L.LinearPicker()
    x, r = rand(m, 512, dtype=torch.bfloat16, seed=80), rand(m, 512, dtype=torch.bfloat16, seed=81)
    g, w = (1 + 0.1 * rand(512, dtype=torch.bfloat16, seed=82)), rand(1024, 512, dtype=torch.bfloat16, seed=83)
    y, res = picker.add_norm_linear(x, r, g, 1e-6, w)
    h, want_res = fused_ops.fused_add_rms_norm(x, r, g, 1e-6)
    assert torch.equal(res, want_res)
    # float64 reference from the bf16 residual sum. The unfused pair rounds the normed input to bf16
    # (2^-9 relative per element) and the folded GEMV does not, so both are held to that rounding's
    # worst case over the dot (sum |h_i w_i| 2^-8) plus bf16's rounding of the output.
    s = want_res.double()
    h64 = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * g.double()
    want = h64 @ w.double().T
    bound = 2.0 ** -8 * (h64.abs() @ w.double().abs().T) + 2.0 ** -8 * want.abs()
    for got in (y, F.linear(h, w)):
        assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()
    keys = [k for k in picker.decisions if k[0] == "add_norm"]
    assert len(keys) == (1 if m <= L.GEMV_MAX_ROWS else 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 37, 300, False), (3, 64, 256, True), (4, 20, 77, False)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_silu_mul_gemv(dtype, m, n, k, bias, prefetch, monkeypatch):
    """SiLU-and-mul folded into the GEMV: the input it multiplies is exactly the silu_and_mul kernel's
    output, so the result is checked against float64 of that."""
    from vllm_engine.layers import fused_ops

    monkeypatch.setattr(L, "_gemv_pdl_args", lambda device: {"PDL": False, "PREFETCH": prefetch})
    gate_up = rand(m, 2 * k, dtype=dtype, seed=90)
    w = rand(n, k, dtype=dtype, seed=91)
    b = rand(n, dtype=dtype, seed=92) if bias else None
    y = L.triton_silu_mul_gemv(gate_up, w, b, config=(16, 64, 4, 1))
    check(y, fused_ops.triton_silu_and_mul(gate_up), w, b, dtype)
    with pytest.raises(ValueError, match="twice"):
        L.triton_silu_mul_gemv(gate_up[:, :k], w)


def test_silu_mul_linear_off_cuda_is_the_activation_then_the_linear():
    picker = L.LinearPicker(timer=FakeTimer({}))
    gu, w = torch.randn(3, 16), torch.randn(5, 8)
    want = F.linear(F.silu(gu[:, :8]) * gu[:, 8:], w)
    assert torch.equal(picker.silu_mul_linear(gu, w), want) and not picker.decisions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the picker times only CUDA inputs")
def test_silu_mul_linear_on_cuda_matches_the_unfused_pair():
    from vllm_engine.layers import fused_ops

    picker = L.LinearPicker()
    gu, w = rand(1, 2048, dtype=torch.bfloat16, seed=93), rand(512, 1024, dtype=torch.bfloat16, seed=94)
    y = picker.silu_mul_linear(gu, w)
    assert torch.allclose(y.float(), F.linear(fused_ops.silu_and_mul(gu), w).float(), rtol=2e-2, atol=2e-2)
    assert [k[0] for k in picker.decisions if isinstance(k[0], str)] == ["silu_mul"]
