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


def test_throughput_and_latency_scripts_at_tp2(tiny_model_dir, tmp_path):
    """-tp 2: the engine runs in two worker processes (gloo here); no link to measure on the CPU."""
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "tp2.json"
    assert throughput.main(["--model", model, "--load-format", "auto", "--dataset", "random", "--num-prompts", "3",
                            "--input-len", "20", "--output-len", "5", "--runs", "1", "--max-model-len", "128",
                            "-tp", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["args"]["tensor_parallel_size"] == 2 and res["link_gbs"] is None
    assert res["rows"][0]["output_tok_s"] > 0 and res["linear"] is None
    out = tmp_path / "lat_pp2.json"
    assert latency.main(["--model", model, "--load-format", "auto", "--input-len", "20", "--output-len", "4",
                         "--batch-sizes", "1", "--runs", "1", "--max-model-len", "64", "-pp", "2",
                         "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["tpot_ms_p50"] > 0


def test_parallel_roofline_against_hand_counts():
    """One request of 4 prompt tokens and 2 outputs on a 2-layer model; each term counted by hand."""
    from types import SimpleNamespace

    import parallel_costs
    from common import roofline_floor_seconds

    cfg = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=128, vocab_size=100, num_hidden_layers=2, model_type="llama")
    args = ([4], [2], cfg, 1.0, 1.0, 8)  # 1 GB/s, 1 TFLOPS: bytes are ns, FLOPs are ps
    one = roofline_floor_seconds(*args)
    assert parallel_costs.parallel_roofline_seconds(*args, tp=1) == one
    # tp=2 (= the KV heads): everything per rank halves; a 100 GB/s link adds each token's all-reduces:
    # 2 layers x 2 all-reduces x 64 values x 2 bytes, of which a ring moves 2 (2 - 1) / 2 = 1x.
    ar = 2 * 2 * 64 * 2 / 100e9
    assert parallel_costs.allreduce_seconds_per_token(cfg, 2, 100.0) == ar
    two = parallel_costs.parallel_roofline_seconds(*args, tp=2, link_gbs=100.0)
    assert abs(two - (one / 2 + 6 * ar)) < 1e-15
    # tp=4 > 2 KV heads: the KV cache splits only 2 ways. The decode steps read contexts 4 and 5:
    # 9 tokens x 2 layers x 2 (K, V) x 2 heads x 16 x 2 bytes, at 1/2 instead of 1/4 of it per rank.
    kv = 9 * 2 * 2 * 2 * 16 * 2 / 1e9
    four = parallel_costs.parallel_roofline_seconds(*args, tp=4)
    assert abs(four - (one / 4 + kv * (1 / 2 - 1 / 4))) < 1e-15


def test_allreduce_bench_on_gloo(tmp_path):
    import allreduce_bench

    out = tmp_path / "ar.json"
    assert allreduce_bench.main(["--device", "cpu", "--world-sizes", "2", "--tokens", "1", "4", "--hidden", "64",
                                 "--iters", "3", "--bus-mib", "1", "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["world_size"] == 2 and [r["tokens"] for r in run["rows"]] == [1, 4]
    assert run["rows"][1]["bytes"] == 4 * 64 * 4 and all(r["gloo_us"] > 0 for r in run["rows"])


def test_plot_scaling_draws_both_panels(tmp_path):
    """The plot script reads latency.py / throughput.py JSONs of several layouts and writes a PNG."""
    import plot_scaling

    lat, thr = [], []
    for tp, ms in [(1, 4.6), (2, 2.7), (4, 1.6)]:
        path = tmp_path / f"lat{tp}.json"
        path.write_text(json.dumps({"args": {"tensor_parallel_size": tp, "pipeline_parallel_size": 1},
                                    "rows": [{"batch": 1, "tpot_ms_p50": ms}]}))
        lat.append(str(path))
    for tp, pp, tok in [(4, 1, 9000.0), (2, 2, 7000.0)]:
        path = tmp_path / f"thr{tp}{pp}.json"
        path.write_text(json.dumps({"args": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp},
                                    "rows": [{"backend": "vllm-engine", "output_tok_s": tok,
                                              "roofline_output_tok_s": tok * 1.3}]}))
        thr.append(str(path))
    assert plot_scaling.latency_points(lat) == [(1, 4.6), (2, 2.7), (4, 1.6)]
    assert [p[0] for p in plot_scaling.throughput_points(thr)] == ["tp=4", "tp=2 x pp=2"]
    out = tmp_path / "scaling.png"
    assert plot_scaling.main(["--latency", *lat, "--throughput", *thr, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_startup_script_times_two_starts_by_phase(tiny_model_dir, tmp_path):
    import startup

    out = tmp_path / "startup.json"
    assert startup.main(["--model", str(tiny_model_dir("llama")), "--load-format", "auto", "--max-model-len", "64",
                         "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for start in (res["first"], res["second"]):
        assert {"config", "tokenizer", "ranks (model and weights)", "rank 0: model and weights",
                "rank 0: memory profile", "total", "process", "wall"} <= set(start)
        # the phases are parts of the start-up, which is part of the process's life
        assert start["ranks (model and weights)"] + start["config"] <= start["total"] <= start["process"] <= start["wall"]
