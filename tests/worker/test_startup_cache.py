"""The start-up cache of linear-kernel choices: a picker takes the choices an earlier run measured
without timing them again (and times a shape whose recorded choice is no longer a candidate); the
file is used only by exactly the GPU and software that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_engine.layers.triton_linear import LinearPicker
from vllm_engine.worker import startup_cache

FP = {"gpu": "NVIDIA H200", "capability": "9.0", "sms": 132, "cuda": "13.0", "torch": "2.11", "triton": "3.6",
      "vllm_engine": "0.1.0"}


def _candidates(*names):
    return {name: (lambda name=name: name) for name in names}


class Timer:
    """Times in the order the picker asks for them; counts the calls."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, fn, flush):
        self.calls += 1
        return self.times.pop(0)


def test_a_picker_takes_recorded_choices_without_timing():
    first = LinearPicker(margin=0.0, timer=Timer([3.0, 1.0, 2.0, 1.0, 5.0, 6.0]))
    a, b = (1, 4096, 4096, "bf16", False), (16, 4096, 4096, "bf16", False)
    assert first.decide(a, _candidates("cublas", "gemv x", "gemv y"))[0] == "gemv x"
    assert first.decide(b, _candidates("cublas", "gemm x", "gemm y"))[0] == "cublas"
    choices = json.loads(json.dumps(first.choices()))  # through a file
    second = LinearPicker(margin=0.0, timer=Timer([]))
    second.prefer(choices)
    assert second.decide(a, _candidates("cublas", "gemv x", "gemv y")) == ("gemv x", {})
    assert second.decide(b, _candidates("cublas", "gemm x", "gemm y")) == ("cublas", {})
    assert second.timer.calls == 0
    assert "2 shapes (2 from the start-up cache)" in second.summary()
    # A recorded choice that is no longer a candidate (configs changed): timed again.
    third = LinearPicker(margin=0.0, timer=Timer([1.0, 2.0]))
    third.prefer(choices)
    assert third.decide(a, _candidates("cublas", "gemv z"))[0] == "cublas" and third.timer.calls == 2


def test_the_file_is_used_only_by_the_gpu_and_software_that_wrote_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENGINE_CACHE_DIR", str(tmp_path))
    assert startup_cache.load_linear_choices(FP) == {}
    startup_cache.save_linear_choices(FP, {"k1": "gemv x"})
    startup_cache.save_linear_choices(FP, {"k2": "cublas"})  # merged
    assert startup_cache.load_linear_choices(FP) == {"k1": "gemv x", "k2": "cublas"}
    for field, other in (("gpu", "NVIDIA H100 80GB HBM3"), ("triton", "3.7"), ("vllm_engine", "0.2.0")):
        assert startup_cache.load_linear_choices(dict(FP, **{field: other})) == {}
    # A file under this fingerprint's name that records another one (copied, edited): ignored.
    path = startup_cache._path(FP)
    path.write_text(json.dumps({"fingerprint": dict(FP, gpu="other"), "linear": {"k1": "gemv x"}}))
    assert startup_cache.load_linear_choices(FP) == {}
    path.write_text("{not json")
    assert startup_cache.load_linear_choices(FP) == {}


def test_the_flag_turns_it_off():
    from vllm_engine.config import EngineArgs

    parser = EngineArgs.add_cli_args(__import__("argparse").ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args([])).startup_cache is True
    assert EngineArgs.from_cli_args(parser.parse_args(["--no-startup-cache"])).startup_cache is False


def test_a_first_start_is_one_without_recorded_choices(tmp_path, monkeypatch):
    """Compile worker processes are for a first start on a GPU and software (is_first_start): until
    a start has recorded its choices, and for this fingerprint only."""
    monkeypatch.setenv("VLLM_ENGINE_CACHE_DIR", str(tmp_path))
    fp = dict(FP)
    monkeypatch.setattr(startup_cache, "fingerprint", lambda device: fp)
    assert startup_cache.is_first_start("cuda")
    startup_cache.save_linear_choices(FP, {"k1": "gemv x"})
    assert not startup_cache.is_first_start("cuda")
    fp["triton"] = "3.7"  # another software: its first start
    assert startup_cache.is_first_start("cuda")


def test_triton_kernels_are_cached_beside_the_choices_unless_the_cache_is_off(tmp_path, monkeypatch):
    """Triton compiles into <cache dir>/triton (read by Triton itself: knobs.cache.dir); a directory
    the user set is kept; with the start-up cache off each process gets a fresh temporary one."""
    knobs = pytest.importorskip("triton").knobs
    monkeypatch.setenv("VLLM_ENGINE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(startup_cache.TRITON_CACHE_ENV, raising=False)
    monkeypatch.setattr(startup_cache, "_chosen", {})
    ours = startup_cache.use_triton_cache(True)
    assert ours == str(tmp_path / "triton") and knobs.cache.dir == ours
    fresh = startup_cache.use_triton_cache(False)
    assert fresh != ours and not any(Path(fresh).iterdir()) and knobs.cache.dir == fresh
    assert startup_cache.use_triton_cache(False) == fresh  # one per process
    assert startup_cache.use_triton_cache(True) == ours  # back on: the kept one
    monkeypatch.setenv(startup_cache.TRITON_CACHE_ENV, str(tmp_path / "mine"))
    assert startup_cache.use_triton_cache(True) == str(tmp_path / "mine")  # the user's choice
    assert startup_cache.use_triton_cache(False) not in (str(tmp_path / "mine"), ours, fresh)
