"""The benchmark scripts run end to end on the CPU with a tiny model (the GPU runs are in gpu_suite.sh):
they must not break between GPU sessions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import latency  # noqa: E402
import throughput  # noqa: E402


def test_throughput_and_latency_scripts(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("qwen3"))
    out = tmp_path / "tp.json"
    assert throughput.main(["--model", model, "--load-format", "auto", "--dataset", "random", "--num-prompts", "3",
                            "--input-len", "20", "--output-len", "5", "--runs", "1", "--max-model-len", "128",
                            "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert row["backend"] == "vllm-engine" and row["requests"] == 3 and row["output_tok_s"] > 0
    assert res["linear"] is None  # no LinearPicker on the CPU
    out = tmp_path / "lat.json"
    assert latency.main(["--model", model, "--load-format", "auto", "--input-len", "20", "--output-len", "4",
                         "--batch-sizes", "1", "2", "--runs", "1", "--max-model-len", "64", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["tpot_ms_p50"] > 0 for r in rows)


def test_throughput_hf_baselines_run_and_count_their_tokens(tiny_model_dir, tmp_path):
    """``--backend both``: the engine, HF's static-batch ``generate`` and (where transformers has it)
    the continuous-batching ``generate_batch`` on the same requests, each producing every token."""
    model = str(tiny_model_dir("qwen3"))
    out = tmp_path / "both.json"
    assert throughput.main(["--model", model, "--load-format", "auto", "--dataset", "random", "--num-prompts", "3",
                            "--input-len", "20", "--output-len", "5", "--runs", "1", "--max-model-len", "128",
                            "--backend", "both", "--hf-num-prompts", "3", "--hf-batch-size", "3",
                            "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["backend"]: r for r in res["rows"]}
    assert "hf_generate_batch_error" not in res, res.get("hf_generate_batch_error")
    for name in ("vllm-engine", "hf-generate (static batch)", "hf-generate_batch (continuous)"):
        assert rows[name]["requests"] == 3
        # 3 requests x 5 tokens, no EOS stop: the token count behind the rate is exactly 15
        assert abs(rows[name]["output_tok_s"] * rows[name]["seconds"] - 15) < 1e-6


def test_host_prepare_script(tmp_path):
    import host_prepare

    out = tmp_path / "hp.json"
    assert host_prepare.main(["--batch", "8", "--min-len", "20", "--max-len", "50", "--reps", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["median_ms"] > 0 and res["blocks"] >= 8 * 2


def test_host_step_script(tmp_path):
    """The host's work per step with the model stubbed out: every phase measured on full-batch decode steps."""
    import host_step

    out = tmp_path / "hs.json"
    assert host_step.main(["--batch", "8", "--input-len", "32", "--output-len", "6", "--runs", "2",
                           "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["runs"]) == 2 and res["median"] in res["runs"]
    for run in res["runs"]:
        # 6 output tokens each: the first comes with the prompt's step, the next 5 from decode steps
        assert run["steps"] == 5
        assert all(run[k] > 0 for k in host_step.PHASES)
        assert run["host_ms"] >= run["schedule_ms"]


def test_throughput_rejects_unknown_hf_modes():
    import pytest

    with pytest.raises(SystemExit):
        throughput.main(["--backend", "hf", "--hf-modes", "static,eager"])


def test_prefill_bench_fills_a_mixed_step_with_nano_length_prompts():
    import prefill_attn_bench

    lens = prefill_attn_bench.prompt_lens(8192, seed=0)
    assert sum(lens) == 8192
    assert all(100 <= n <= 1024 for n in lens[:-1]) and 1 <= lens[-1] <= 1024
    assert prefill_attn_bench.prompt_lens(8192, seed=0) == lens  # seeded
    assert prefill_attn_bench.prompt_lens(50, seed=1) == [50]
