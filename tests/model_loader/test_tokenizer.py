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
    """The first call converts with transformers (``from_pretrained(dir, gguf_file=...)``) and saves the
    result; the second loads the saved copy, which must behave exactly like the conversion."""
    gguf = tmp_path / smollm2_gguf.name
    gguf.symlink_to(smollm2_gguf)
    fresh = get_tokenizer(str(gguf))
    assert (gguf_tokenizer_cache(gguf) / "tokenizer.json").is_file()
    cached = get_tokenizer(str(gguf))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    for text in ["The capital of France is", "def f(x):\n    return x * 2  # émoji 🙂", "<|im_start|>user"]:
        assert cached.encode(text) == fresh.encode(text)
    assert fresh.encode("<|im_start|>") == [1]  # a special token, one id (SmolLM2's vocabulary)
    assert cached.eos_token_id == fresh.eos_token_id == 2 and len(cached) == len(fresh) == 49152
    assert cached.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        fresh.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in cached.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
