"""tests/benchmarks/spec_decode_bench.py runs end to end on the CPU with a tiny model (the GPU run is
in docs/speculative_decoding.md): its JSON has a row per k, acceptance metrics and the token check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import spec_decode_bench  # noqa: E402


def test_spec_decode_bench_script(tiny_model_dir, tmp_path):
    out = tmp_path / "spec.json"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": ["One two three four five six seven one two three four five six",
                                               "The quick brown fox jumps over the lazy dog. The quick brown"]}))
    assert spec_decode_bench.main(["--model", str(tiny_model_dir("llama")), "--prompts", str(prompts),
                                   "--output-len", "12", "--max-model-len", "128", "--num-speculative-tokens", "2",
                                   "--prompt-lookup-min", "1", "--prompt-lookup-max", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    off, k2 = res["rows"]
    assert (off["k"], k2["k"]) == (0, 2) and off["tpot_ms_p50"] > 0 and k2["tpot_ms_p50"] > 0
    assert k2["same_tokens_as_off"] is True and k2["num_drafts"] > 0
    assert 0 <= k2["acceptance_rate"] <= 1 and len(k2["per_position_acceptance"]) <= 2
    assert "acceptance_rate" not in off
    # Where the steps' time goes: verifying steps only with speculation, plain steps in both.
    assert off["verify_step"]["steps"] == 0 and off["plain_step"]["steps"] > 0
    assert k2["verify_step"]["steps"] > 0 and k2["verify_step"]["total_ms"] >= k2["verify_step"]["host_ms"] > 0


def test_spec_verify_cost_script_forces_the_acceptance(tiny_model_dir, tmp_path):
    import spec_verify_cost

    out = tmp_path / "cost.json"
    assert spec_verify_cost.main(["--model", str(tiny_model_dir("llama")), "--load-format", "auto", "--k", "3",
                                  "--acceptance", "0.6", "--batch-sizes", "2", "--input-len", "8",
                                  "--output-len", "60", "--max-model-len", "256", "--out", str(out)]) == 0
    off, forced = json.loads(out.read_text())["rows"]
    assert off["k"] == 0 and forced["k"] == 3 and forced["tpot_ms"] > 0
    # The engine's own counter agrees with the forced rate: 1 + 0.6 + 0.36 + 0.216 = 2.18 tokens a step.
    assert abs(forced["mean_acceptance_length"] - forced["expected_acceptance_length"]) < 0.3
    # Every step of the forced run verifies; the run without speculation has only plain steps.
    assert forced["verify_step"]["steps"] > 0 and forced["verify_step_ms"] > 0
    assert off["plain_step"]["steps"] > 0 and off["verify_step"]["steps"] == 0


def test_throughput_script_passes_the_speculative_config(tiny_model_dir, tmp_path):
    import throughput

    out = tmp_path / "tp.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "adaptive": false}'
    assert throughput.main(["--model", str(tiny_model_dir("llama")), "--load-format", "auto", "--dataset", "random",
                            "--num-prompts", "3", "--input-len", "20", "--output-len", "12", "--runs", "1",
                            "--max-model-len", "128", "--speculative-config", spec, "--out", str(out)]) == 0
    sd = json.loads(out.read_text())["engine"]["spec_decode"]
    assert sd["num_drafts"] > 0 and 0 <= sd["acceptance_rate"] <= 1


def test_spec_decode_bench_draft_model_forced_acceptance(tiny_model_dir, tmp_path):
    """--draft-model with --acceptance (CPU smoke run of the Llama-3.1-8B / Llama-3.2-1B study): a row
    per (k, acceptance, batch) against the target alone; the engine's measured acceptance length
    follows the forced rate, although this draft (the target itself) would have every token accepted."""
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "draft.json"
    assert spec_decode_bench.main(["--model", model, "--draft-model", model, "--num-speculative-tokens", "2",
                                   "--acceptance", "0.5", "--batch-sizes", "2", "--input-len", "8",
                                   "--output-len", "60", "--max-model-len", "256", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    off, forced = res["rows"]
    assert (off["k"], forced["k"], forced["acceptance"], forced["batch"]) == (0, 2, 0.5, 2)
    assert res["draft_model"] == model and off["tpot_ms"] > 0 and forced["tpot_speedup"] > 0
    assert forced["expected_acceptance_length"] == 1.75
    assert abs(forced["mean_acceptance_length"] - 1.75) < 0.3


def test_the_8b_target_takes_the_1b_draft():
    """The GPU study's configuration resolves (bundled configs, dummy weights, one vocabulary)."""
    from vllm_engine.config import EngineArgs

    config = EngineArgs(model="llama-3.1-8b", load_format="dummy", max_model_len=2048,
                        speculative_config={"model": "llama-3.2-1b", "num_speculative_tokens": 4}).create_engine_config()
    draft = config.speculative.draft_model_config
    assert config.speculative.method == "draft_model" and draft.load_format == "dummy"
    assert (draft.hf_config.num_hidden_layers, draft.hf_config.hidden_size) == (16, 2048)


def test_spec_decode_bench_eagle_head(tiny_model_dir, tmp_path):
    """--draft-method eagle: an EAGLE-1 head (a tiny one in the published layout) proposes, forced to 0.5."""
    from tests.spec_decode.test_eagle import head_tensors, save_head

    model = tiny_model_dir("llama")
    cfg = json.loads((model / "config.json").read_text())
    head = save_head(tmp_path / "head", cfg, head_tensors(cfg))
    out = tmp_path / "eagle.json"
    assert spec_decode_bench.main(["--model", str(model), "--draft-model", str(head), "--draft-method", "eagle",
                                   "--num-speculative-tokens", "2", "--acceptance", "0.5", "--batch-sizes", "1",
                                   "--input-len", "8", "--output-len", "60", "--max-model-len", "256",
                                   "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    off, forced = res["rows"]
    assert res["draft_method"] == "eagle" and forced["k"] == 2 and forced["tpot_ms"] > 0
    assert abs(forced["mean_acceptance_length"] - 1.75) < 0.35


def test_the_8b_target_takes_the_eagle_head_config():
    from vllm_engine.config import EngineArgs

    config = EngineArgs(model="llama-3.1-8b", load_format="dummy", max_model_len=2048,
                        speculative_config={"model": "eagle-llama-3.1-8b", "num_speculative_tokens": 3}
                        ).create_engine_config()
    head = config.speculative.draft_model_config
    assert config.speculative.method == "eagle" and head.load_format == "dummy"
    assert (head.hf_config.num_hidden_layers, head.hf_config.hidden_size) == (1, 4096)


def test_ngram_bench_script_times_both_and_checks_the_proposals(tmp_path):
    import ngram_bench

    out = tmp_path / "ngram.json"
    assert ngram_bench.main(["--batch-sizes", "1", "3", "--context-len", "120", "--seconds", "0.01", "--rounds", "1",
                             "--baseline-rev", "HEAD", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["same"] and r["ms_p50"] > 0 and r["baseline_ms_p50"] > 0 for r in rows)
