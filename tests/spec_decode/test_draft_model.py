"""Speculative decoding with a draft model (spec_decode/draft_model.py): greedy tokens equal plain
decoding through chunked prefill, preemption (recompute and swap), prefix caching, n > 1, stop
strings, max_tokens inside a proposal and async scheduling; the draft = the target accepts
everything, greedy and sampled (so its probabilities reach the rejection sampler); the draft's KV
in blocks cached while speculating is valid; the KV cache is sized with both models; bad configs
name the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import build_tiny_tokenizer, save_random_hf_model, tiny_config
from tests.spec_decode.test_engine_spec import GPU_POOL, PARAMS, PROMPTS, check_engine_state, token_ids
from vllm_engine import Engine, SamplingParams

K = 3
COMMON = dict(dtype="float32", max_model_len=256, seed=0, **GPU_POOL)


def spec(draft, **extra) -> dict:
    # adaptive off: every step proposes, so acceptance counts do not depend on this machine's timings.
    return {"model": str(draft), "num_speculative_tokens": K, "adaptive": False, **extra}


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def near_draft(target, tmp_path_factory):
    """The target with its weights perturbed: it agrees with the target on some tokens, not all
    (proposals accepted and rejected at every position)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("near-draft")
    for f in target.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    gen = torch.Generator().manual_seed(11)
    for f in target.glob("*.safetensors"):
        tensors = {k: v + 0.005 * torch.randn(v.shape, generator=gen) for k, v in load_file(str(f)).items()}
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """Another random model with the same tokenizer and a different shape: 1 layer, 1 KV head of 16."""
    out = tmp_path_factory.mktemp("small-draft")
    tok = build_tiny_tokenizer(out)
    config = tiny_config("llama", len(tok), tok.bos_token_id, tok.eos_token_id)
    config.update(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=64))
    save_random_hf_model(config, out, seed=5)
    return out


@pytest.fixture(scope="module")
def baseline(target):
    return Engine(model=str(target), **COMMON)


@pytest.fixture(scope="module")
def expected(baseline):
    return baseline.generate(PROMPTS + [PROMPTS[0]], PARAMS, use_tqdm=False)


SCENARIOS = {
    "default": {},  # prefix caching on, one step for everything
    "chunked": {"max_num_batched_tokens": 16, "max_num_seqs": 4, "block_size": 4},  # proposals cut short too
    "preempt": {"num_gpu_blocks_override": 40, "block_size": 4, "enable_prefix_caching": False},
    "swap": {"num_gpu_blocks_override": 40, "block_size": 4, "enable_prefix_caching": False,
             "preemption_mode": "swap", "swap_space": 0.01},
    "async": {"async_scheduling": True, "disable_by_batch_size": 4},  # overlapped steps between verifying ones
    "async-chunked-preempt": {"async_scheduling": True, "num_gpu_blocks_override": 40, "block_size": 4,
                              "max_num_batched_tokens": 16, "max_num_seqs": 4, "enable_prefix_caching": False},
    # The adaptive policy on: whatever it decides from this machine's step times (steps without
    # proposals still run the draft), the tokens are the same.
    "adaptive": {"async_scheduling": True, "adaptive": True},
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_greedy_tokens_equal_plain_decoding(target, near_draft, expected, name):
    kwargs = dict(SCENARIOS[name])
    extra = {f: kwargs.pop(f) for f in ("disable_by_batch_size", "adaptive") if f in kwargs}
    engine = Engine(model=str(target), speculative_config=spec(near_draft, **extra), **{**COMMON, **kwargs})
    got = engine.generate(PROMPTS + [PROMPTS[0]], PARAMS, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    for a, b in zip(got[1].outputs[0].logprobs, expected[1].outputs[0].logprobs):  # the target's logprobs
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
    stats = engine.get_stats().spec_decode
    # Proposals both accepted and rejected: the rollback path is exercised.
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens or name == "adaptive"
    assert (engine.adaptive is not None) == (name == "adaptive")
    if "num_gpu_blocks_override" in kwargs:
        assert engine.get_stats().num_preemptions_total > 0
    if name == "swap":
        assert engine.get_stats().num_swaps_total > 0
    check_engine_state(engine)


def test_prefix_cache_after_rejections_holds_only_verified_tokens(target, near_draft, baseline):
    """Second round: each prompt is a first-round sequence, computed while proposals were being
    rejected; a cached block with a rejected proposal's K/V in it (target's or draft's) would change
    the target's tokens here."""
    engine = Engine(model=str(target), speculative_config=spec(near_draft), block_size=4, **COMMON)
    first = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    stats = engine.get_stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    second = [{"prompt_token_ids": o.prompt_token_ids + o.outputs[0].token_ids} for o in first]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    got = engine.generate(second, params, use_tqdm=False)
    assert all(o.num_cached_tokens > 40 for o in got)
    assert token_ids(got) == token_ids(baseline.generate(second, params, use_tqdm=False))
    check_engine_state(engine)


def test_draft_of_another_shape(target, small_draft, expected):
    """A draft with its own layer count and KV heads: its own cache tensors, the same block ids."""
    engine = Engine(model=str(target), speculative_config=spec(small_draft), block_size=4, **COMMON)
    got = engine.generate(PROMPTS + [PROMPTS[0]], PARAMS, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    drafter = engine.model_runner.drafter
    cache = drafter.kv_cache.gpu_caches
    assert len(cache) == 1 and cache[0].shape == (2, engine.num_gpu_blocks, 4, 1, 16)
    assert engine.get_stats().spec_decode.num_draft_tokens > 0
    check_engine_state(engine)


def test_draft_equal_to_target_accepts_everything(target, baseline):
    engine = Engine(model=str(target), speculative_config=spec(target), block_size=4, **COMMON)
    params = SamplingParams(temperature=0.0, max_tokens=30)
    got = engine.generate(PROMPTS, params, use_tqdm=False)
    assert token_ids(got) == token_ids(baseline.generate(PROMPTS, params, use_tqdm=False))
    stats = engine.get_stats().spec_decode
    assert stats.num_draft_tokens > 60 and stats.acceptance_rate > 0.98, stats
    check_engine_state(engine)

    # Second round: each prompt is a first-round sequence, so it starts from blocks cached while
    # speculating. The draft reads its own K/V in them: were it stale, it would stop agreeing.
    second = [{"prompt_token_ids": o.prompt_token_ids + o.outputs[0].token_ids} for o in got]
    before = engine.get_stats().spec_decode
    again = engine.generate(second, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert all(o.num_cached_tokens >= 32 for o in again)
    after = engine.get_stats().spec_decode
    assert (after.num_accepted_tokens - before.num_accepted_tokens) > \
        0.98 * (after.num_draft_tokens - before.num_draft_tokens)
    expected = baseline.generate(second, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert token_ids(again) == token_ids(expected)
    check_engine_state(engine)


def test_sampled_draft_equal_to_target_accepts_everything(target):
    """Random sampling with the draft = the target: q = p, so min(1, p/q) = 1 and every proposal is
    kept (with one-hot q it would be kept with probability p(d) only). Seeded runs reproduce."""
    engine = Engine(model=str(target), speculative_config=spec(target), **COMMON)
    params = [SamplingParams(temperature=0.9, max_tokens=25, seed=i) for i in range(3)] + \
             [SamplingParams(temperature=1.0, max_tokens=25, n=2, seed=9)]
    first = engine.generate(PROMPTS, params, use_tqdm=False)
    stats = engine.get_stats().spec_decode
    assert stats.num_draft_tokens > 50 and stats.acceptance_rate > 0.97, stats
    assert token_ids(engine.generate(PROMPTS, params, use_tqdm=False)) == token_ids(first)
    check_engine_state(engine)


def test_max_tokens_inside_a_proposal(target, baseline):
    """Every proposal is accepted (draft = target), so requests ending 1..5 tokens in end inside
    one; the proposals are capped so that none runs past max_tokens."""
    engine = Engine(model=str(target), speculative_config=spec(target, num_speculative_tokens=4), **COMMON)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (1, 2, 3, 4, 5, 7)]
    got = engine.generate([PROMPTS[0]] * len(params), params, use_tqdm=False)
    exp = baseline.generate([PROMPTS[0]] * len(params), params, use_tqdm=False)
    assert token_ids(got) == token_ids(exp)
    assert [len(o.outputs[0].token_ids) for o in got] == [1, 2, 3, 4, 5, 7]
    assert all(o.outputs[0].finish_reason == "length" for o in got)
    check_engine_state(engine)


def test_stop_strings(target, near_draft, baseline):
    """Stop strings completed at several points of the greedy text, some inside a multi-token step:
    text, tokens and finish reason as in plain decoding."""
    engine = Engine(model=str(target), speculative_config=spec(near_draft), **COMMON)
    probe = baseline.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    text = probe.outputs[0].text
    stops = sorted({text[i: i + 3] for i in range(2, len(text) - 3, 4) if text[i: i + 3].strip()})[:6]
    params = [SamplingParams(temperature=0.0, max_tokens=30, stop=[s]) for s in stops]
    got = engine.generate([PROMPTS[1]] * len(params), params, use_tqdm=False)
    exp = baseline.generate([PROMPTS[1]] * len(params), params, use_tqdm=False)
    assert sum(o.outputs[0].finish_reason == "stop" for o in exp) >= 3
    for a, b in zip(got, exp):
        assert (a.outputs[0].text, a.outputs[0].token_ids, a.outputs[0].finish_reason) == \
            (b.outputs[0].text, b.outputs[0].token_ids, b.outputs[0].finish_reason)
    check_engine_state(engine)


def test_structured_output_requests(target, near_draft, baseline):
    """Constrained requests propose too (the draft knows nothing of the grammar; verification
    masks each row): greedy tokens are plain decoding's, sampled outputs match the constraint."""
    import re

    from vllm_engine.sampling_params import StructuredOutputsParams

    engine = Engine(model=str(target), speculative_config=spec(near_draft), **COMMON)
    greedy = SamplingParams(temperature=0.0, max_tokens=80,
                            structured_outputs=StructuredOutputsParams(regex=r"(The quick brown fox\. ){3}"))
    prompt = "The quick brown fox. The quick"
    got = engine.generate(prompt, greedy, use_tqdm=False)
    assert got.outputs[0].token_ids == baseline.generate(prompt, greedy, use_tqdm=False).outputs[0].token_ids
    pattern = r"(one|two)( (one|two)){5}"
    sampled = SamplingParams(temperature=1.0, max_tokens=80, seed=3,
                             structured_outputs=StructuredOutputsParams(regex=pattern))
    for o in engine.generate(["one two one two one two"] * 3, sampled, use_tqdm=False):
        assert re.fullmatch(pattern, o.outputs[0].text), o.outputs[0].text
    assert engine.get_stats().spec_decode.num_drafts > 10
    check_engine_state(engine)


def test_kv_cache_sized_with_both_models(target, small_draft):
    """The cache space holds the target's and the draft's bytes for every block."""
    space_gib = 0.0002
    engine = Engine(model=str(target), speculative_config=spec(small_draft), cpu_kv_cache_space=space_gib,
                    block_size=4, device="cpu", **{**COMMON, "num_gpu_blocks_override": None})
    runner = engine.model_runner
    per_block = runner.kv_cache_spec().bytes_per_block + runner.drafter.kv_cache_spec().bytes_per_block
    assert engine.num_gpu_blocks == int(space_gib * 2**30) // per_block
    assert runner.drafter.kv_cache.num_blocks == runner.kv_cache.num_blocks == engine.num_gpu_blocks


# ---- configuration ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_vocab_draft(tmp_path_factory, target):
    out = tmp_path_factory.mktemp("other-vocab")
    config = json.loads((target / "config.json").read_text())
    from transformers import LlamaConfig

    save_random_hf_model(LlamaConfig(**{**config, "vocab_size": config["vocab_size"] + 8}), out)
    return out


@pytest.fixture(scope="module")
def other_tokenizer_draft(tmp_path_factory, target):
    """Same vocabulary size, a different token -> id mapping (two tokens swapped)."""
    out = tmp_path_factory.mktemp("other-tokenizer")
    for f in target.iterdir():
        shutil.copy(f, out / f.name)
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


@pytest.mark.parametrize("case, field", [
    ("other_vocab", "model"), ("other_tokenizer", "model"), ("missing", "model"), ("k0", "num_speculative_tokens"),
    ("no_model", "model"),
])
def test_bad_draft_configs_name_the_field(target, other_vocab_draft, other_tokenizer_draft, tmp_path, case, field):
    from vllm_engine.config import EngineArgs

    value = {
        "other_vocab": {"model": str(other_vocab_draft), "num_speculative_tokens": 2},
        "other_tokenizer": {"model": str(other_tokenizer_draft), "num_speculative_tokens": 2},
        "missing": {"model": str(tmp_path / "no-such-draft"), "num_speculative_tokens": 2},
        "k0": {"model": str(target), "num_speculative_tokens": 0},
        "no_model": {"method": "draft_model", "num_speculative_tokens": 2},
    }[case]
    with pytest.raises(ValueError, match=rf"speculative_config\.{field}\b"):
        EngineArgs(model=str(target), speculative_config=value).create_engine_config()


def test_cli_flag_takes_a_draft_model(target, small_draft):
    from vllm_engine.cli import build_parser
    from vllm_engine.config import EngineArgs

    flag = json.dumps({"model": str(small_draft), "num_speculative_tokens": 2})
    for command in (["generate", "--model", str(target)], ["serve", "--model", str(target)]):
        args = build_parser().parse_args(command + ["--speculative-config", flag]
                                         + (["hi"] if command[0] == "generate" else []))
        config = EngineArgs.from_cli_args(args).create_engine_config()
        sc = config.speculative
        assert (sc.method, sc.num_speculative_tokens, sc.model) == ("draft_model", 2, str(small_draft))
        draft = sc.draft_model_config
        assert draft.hf_config.num_hidden_layers == 1 and draft.max_model_len == config.model.max_model_len
        assert draft.dtype == config.model.dtype and draft.load_format == "safetensors"
    config = EngineArgs(model=str(target), speculative_config={"method": "draft_model", "model": str(small_draft),
                                                                "num_speculative_tokens": 4}).create_engine_config()
    assert config.speculative.method == "draft_model"


def test_smollm2_gguf_drafting_for_itself(smollm2_gguf):
    """The real model, quantized GGUF weights, as its own draft: loaded twice from the GGUF, it
    proposes what the target would decode (nearly every proposal accepted), and the greedy tokens
    are plain decoding's."""
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    kwargs = dict(COMMON, max_model_len=256)
    plain = Engine(model=str(smollm2_gguf), **kwargs).chat(msgs, params, use_tqdm=False)
    engine = Engine(model=str(smollm2_gguf), speculative_config=spec(smollm2_gguf), **kwargs)
    got = engine.chat(msgs, params, use_tqdm=False)
    assert got.outputs[0].token_ids == plain.outputs[0].token_ids
    stats = engine.get_stats().spec_decode
    assert stats.num_draft_tokens >= 15 and stats.acceptance_rate > 0.95, stats
    check_engine_state(engine)
