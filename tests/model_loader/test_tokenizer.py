"""Tokenizer loading and EOS ids."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, LlamaConfig

from vllm_engine.model_loader.tokenizer import get_eos_token_ids, get_tokenizer, gguf_tokenizer_cache


def test_directory_tokenizer(tiny_model_dir):
    path = tiny_model_dir("llama")
    tok = get_tokenizer(str(path))
    ref = AutoTokenizer.from_pretrained(str(path))
    for text in ["Hello, my name is", "unseen wordsxyz 123"]:
        assert tok.encode(text) == ref.encode(text)
    assert tok.encode("hi")[0] == tok.bos_token_id


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Cannot load a tokenizer"):
        get_tokenizer(str(tmp_path))


def test_eos_ids_union():
    cfg = LlamaConfig(eos_token_id=2)
    assert get_eos_token_ids(None, cfg, {"eos_token_id": [2, 7]}) == {2, 7}
    assert get_eos_token_ids(None, LlamaConfig(eos_token_id=[5, 6]), {}) == {5, 6}
    assert get_eos_token_ids(None, LlamaConfig(eos_token_id=None), {"eos_token_id": 9}) == {9}


def test_eos_ids_include_the_tokenizers(tiny_model_dir):
    tok = get_tokenizer(str(tiny_model_dir("llama")))
    assert get_eos_token_ids(tok, LlamaConfig(eos_token_id=None), None) == {tok.convert_tokens_to_ids("</s>")}


@pytest.mark.slow
def test_gguf_tokenizer_is_converted_once_and_cached(smollm2_gguf, tmp_path):
    gguf = tmp_path / smollm2_gguf.name
    gguf.symlink_to(smollm2_gguf)
    tok = get_tokenizer(str(gguf))
    assert (gguf_tokenizer_cache(gguf) / "tokenizer.json").is_file()
    cached = get_tokenizer(str(gguf))
    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    for t in (tok, cached):
        for text in ["The capital of France is", "def f(x):\n    return x * 2  # émoji 🙂"]:
            assert t.encode(text) == ref.encode(text)
        assert t.eos_token_id == 2 and len(t) == 49152
        assert t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
