"""layers/linear.py: the Triton GEMV and GEMM against float64, and LinearPicker's choice logic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_engine.layers import linear as L

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
