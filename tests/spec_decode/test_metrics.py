"""Speculative-decoding metrics in /metrics (vLLM's counter names, our prefix) from an engine's stats."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.spec_decode.test_engine_spec import GPU_POOL
from vllm_engine import Engine, SamplingParams
from vllm_engine.serving.metrics import ServerMetrics


def test_metrics_expose_the_engine_counters(tiny_model_dir):
    engine = Engine(model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=128, seed=0, **GPU_POOL,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    engine.generate(["One two three four five six seven eight one two three four five six"],
                    SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    spec = engine.get_stats().spec_decode
    assert spec.num_drafts > 0
    text = ServerMetrics("m", engine.get_stats).render().decode()
    samples = {(s.name, s.labels.get("position")): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("vllm_engine:spec_decode_num_drafts_total", None)] == spec.num_drafts
    assert samples[("vllm_engine:spec_decode_num_draft_tokens_total", None)] == spec.num_draft_tokens
    assert samples[("vllm_engine:spec_decode_num_accepted_tokens_total", None)] == spec.num_accepted_tokens
    per_pos = [samples[("vllm_engine:spec_decode_num_accepted_tokens_per_pos_total", str(i))]
               for i in range(len(spec.accepted_per_position))]
    assert per_pos == spec.accepted_per_position and sum(per_pos) == spec.num_accepted_tokens
    rate = samples[("vllm_engine:spec_decode_acceptance_rate", None)]
    assert rate == spec.num_accepted_tokens / spec.num_draft_tokens
    mean_length = samples[("vllm_engine:spec_decode_mean_acceptance_length", None)]
    assert mean_length == 1 + spec.num_accepted_tokens / spec.num_drafts


def test_no_spec_metrics_when_off(tiny_model_dir):
    engine = Engine(model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=128, seed=0, **GPU_POOL)
    assert engine.get_stats().spec_decode is None
    assert "spec_decode" not in ServerMetrics("m", engine.get_stats).render().decode()


def test_step_profile_counts_the_proposed_tokens(tiny_model_dir):
    engine = Engine(model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=128, seed=0, **GPU_POOL,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
                                        "adaptive": False})
    profile = engine.enable_step_profile()
    engine.generate(["One two three four five six seven eight one two three four five six"],
                    SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    assert sum(r["num_draft_tokens"] for r in profile) == engine.get_stats().spec_decode.num_draft_tokens > 0
    assert all(r["num_tokens"] >= r["num_seqs"] + r["num_draft_tokens"] for r in profile)
