"""SpeculativeConfig: the accepted forms (as vLLM spells them) and a ValueError naming the field for
every bad value."""

from __future__ import annotations

import pytest

from vllm_engine.spec_decode.config import SpeculativeConfig


def parse(value):
    return SpeculativeConfig.from_user(value)


def test_ngram_with_both_bounds():
    c = parse({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 4, 2, 4)
    assert c.model is None and c.is_ngram


@pytest.mark.parametrize("bounds, expected", [
    ({}, (5, 5)),  # vLLM's defaults
    ({"prompt_lookup_max": 3}, (3, 3)),
    ({"prompt_lookup_min": 2}, (2, 2)),
])
def test_ngram_lookup_defaults(bounds, expected):
    c = parse({"method": "ngram", "num_speculative_tokens": 2, **bounds})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == expected


def test_method_from_the_model_name():
    assert parse({"model": "[ngram]", "num_speculative_tokens": 3}).method == "ngram"
    assert parse({"model": "ngram", "num_speculative_tokens": 3}).model is None
    c = parse({"model": "/models/Llama-3.2-1B", "num_speculative_tokens": 4})
    assert (c.method, c.model) == ("draft_model", "/models/Llama-3.2-1B")
    assert parse({"model": "yuhuili/EAGLE-LLaMA3-Instruct-8B", "num_speculative_tokens": 3}).method == "eagle"
    assert parse({"model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", "num_speculative_tokens": 3}).method == "eagle3"
    assert parse({"method": "eagle3", "model": "/x/heads", "num_speculative_tokens": 3}).method == "eagle3"


def test_json_text_and_none():
    c = parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}')
    assert (c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == (3, 4, 4)
    assert parse(None) is None
    assert parse(c) is c
    assert SpeculativeConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("value, field", [
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": -1}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "model"),
    ({"model": "", "num_speculative_tokens": 2}, "model"),
    ({"model": "/m", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1}, "disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 0},
     "draft_tensor_parallel_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, "adaptive"),
])
def test_bad_values_name_the_field(value, field):
    with pytest.raises(ValueError, match=rf"speculative_config\.{field}\b"):
        parse(value)


def test_bad_json_and_bad_type():
    with pytest.raises(ValueError, match="speculative_config is not valid JSON"):
        parse("{method: ngram}")
    with pytest.raises(ValueError, match="speculative_config must be a JSON object"):
        parse("[1, 2]")


# ---- the engine's side: EngineArgs, the CLI flag ----------------------------------------------------
def test_cli_flag_reaches_the_engine_config(tiny_model_dir):
    from vllm_engine.cli import build_parser
    from vllm_engine.config import EngineArgs

    model = str(tiny_model_dir("llama"))
    for command in (["generate", "--model", model], ["serve", model]):
        args = build_parser().parse_args(
            command + ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
                                               '"prompt_lookup_max": 4, "prompt_lookup_min": 2}']
            + (["hi"] if command[0] == "generate" else []))
        config = EngineArgs.from_cli_args(args).create_engine_config()
        assert config.speculative == SpeculativeConfig("ngram", 3, None, 4, 2)
    config = EngineArgs(model=model).create_engine_config()
    assert config.speculative is None


@pytest.mark.parametrize("spec, kwargs, match", [
    ({"model": "/no/draft", "num_speculative_tokens": 2}, {}, r"speculative_config\.model cannot be loaded"),
    ({"model": "/no/draft", "num_speculative_tokens": 2}, {"tensor_parallel_size": 2}, r"speculative_config\.model"),
    ({"method": "eagle3", "model": "/x", "num_speculative_tokens": 2}, {}, r"speculative_config\.model cannot be loaded"),
    # At tp > 1 the head is resolved as at tp = 1 (tests/spec_decode/test_spec_tp.py serves it) ...
    ({"method": "eagle3", "model": "/x", "num_speculative_tokens": 2}, {"tensor_parallel_size": 2},
     r"speculative_config\.model cannot be loaded"),
    # ... on the target's ranks only: draft_tensor_parallel_size unset or the target's.
    ({"method": "eagle3", "model": "/x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
     {"tensor_parallel_size": 2}, r"speculative_config\.draft_tensor_parallel_size must be unset or equal"),
    ({"model": "/x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}, {},
     r"speculative_config\.draft_tensor_parallel_size"),
    ({"method": "ngram", "num_speculative_tokens": 2}, {"pipeline_parallel_size": 2}, "pipeline_parallel_size"),
    ('{"method": "ngram"}', {}, r"speculative_config\.num_speculative_tokens"),
])
def test_engine_refuses_what_it_does_not_serve(tiny_model_dir, spec, kwargs, match):
    from vllm_engine.config import EngineArgs

    with pytest.raises(ValueError, match=match):
        EngineArgs(model=str(tiny_model_dir("llama")), speculative_config=spec, **kwargs).create_engine_config()
