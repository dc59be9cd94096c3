"""Incremental detokenizer tests: random token streams (multi-byte UTF-8, special tokens), fed in
random chunks, must stream exactly the text of a full ``tokenizer.decode`` and never a half character."""

from __future__ import annotations

import json
import random

import pytest

from vllm_engine.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello, my name is Ada and I like to write small programs.",
    "The capital of France is Paris, a city on the Seine.",
    "日本語のテキストを少し書きます。東京は大きな都市です。",
    "中文文本：你好，世界！我们今天学习分词。",
    "Emoji time 😀🎉🚀 and more 👍🏽 ❤️ in a sentence.",
    "naïve café — déjà vu, Ωμέγα, Привет мир!",
    "def f(x):\n    return x * 2  # code   with   spaces\n",
] * 3
# Texts the streams are built from: mostly outside what the small vocab merged, so multi-byte
# characters are split over several tokens.
STREAM_TEXTS = [
    "Hello 世界! 😀🎉 naïve café — 日本語のテキスト 🚀👍🏽 end.",
    "Привет, 你好, こんにちは ❤️ Ωμέγα 🤖 done",
    "  spaces   and\nnew lines\t😀 ",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_end|>"]


def _byte_level_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_end|>"])
    fast.save_pretrained(str(tmp_path / "bytelevel"))
    return AutoTokenizer.from_pretrained(str(tmp_path / "bytelevel"))


def _sentencepiece_style_tokenizer(tmp_path):
    """Llama-2 style: "▁" for spaces (prepended to the text), byte fallback for rare characters,
    and a decoder that strips the leading space of the decoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, limit_alphabet=50, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    # Add the 256 byte tokens (ordinary, not special, as in Llama-2) so byte fallback has targets.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_end|>"])
    fast.save_pretrained(str(tmp_path / "spm"))
    return AutoTokenizer.from_pretrained(str(tmp_path / "spm"))


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    return _byte_level_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return _sentencepiece_style_tokenizer(tmp_path_factory.mktemp("tok"))


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feeds ``ids`` in random chunks of 1-3 tokens; returns the deltas."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.append(ids[i: i + n]))
        i += n
    return deltas


def _text_stream(tok, rng: random.Random) -> list[int]:
    """A valid stream: encoded texts, with special tokens sprinkled between them."""
    ids: list[int] = []
    for _ in range(rng.randint(1, 3)):
        ids += tok.encode(rng.choice(STREAM_TEXTS), add_special_tokens=False)
        if rng.random() < 0.5:
            ids.append(rng.choice(tok.all_special_ids))
    return ids


def _check_valid_streams(tok, rng, prompt_texts=("",)):
    for trial in range(60):
        ids = _text_stream(tok, rng)
        skip = trial % 2 == 0
        prompt = tok.encode(rng.choice(prompt_texts), add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        deltas = _stream(detok, ids, rng)
        # Text built from whole characters never needs a replacement character anywhere.
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == detok.output_text
        yield ids, prompt, skip, detok.output_text


def test_byte_level_valid_streams_match_full_decode(byte_level):
    rng = random.Random(0)
    # Check the test is meaningful: some characters are really split over several tokens.
    assert any(byte_level.decode([t]).endswith("\ufffd") for t in byte_level.encode(STREAM_TEXTS[0]))
    prompts = ("", "Hello, my name is", "你好", "😀 ")
    for ids, prompt, skip, text in _check_valid_streams(byte_level, rng, prompts):
        assert text == byte_level.decode(ids, skip_special_tokens=skip)


def test_byte_level_random_streams(byte_level):
    """Arbitrary ids (partial UTF-8 sequences, specials anywhere): deltas never end in a half
    character, and the text is the full decode less any trailing incomplete character."""
    rng = random.Random(1)
    V = len(byte_level)
    for trial in range(150):
        ids = [rng.randrange(V) for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(V) for _ in range(rng.randint(0, 8))]
        skip = trial % 2 == 0
        detok = IncrementalDetokenizer(byte_level, prompt, skip_special_tokens=skip)
        deltas = _stream(detok, ids, rng)
        assert not any(d.endswith("\ufffd") for d in deltas)
        full = byte_level.decode(ids, skip_special_tokens=skip)
        if not byte_level.decode(prompt).endswith("\ufffd"):  # a prompt ending mid-character may merge
            assert "".join(deltas) == full.rstrip("\ufffd")


def test_emoji_held_back_until_complete(byte_level):
    ids = byte_level.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(byte_level, [])
    deltas = [detok.append([t]) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "😀"


def test_special_tokens_skipped_or_kept(byte_level):
    eos = byte_level.eos_token_id
    ids = byte_level.encode("Hello", add_special_tokens=False) + [eos] + byte_level.encode(" world", add_special_tokens=False)
    for skip, expect in ((True, "Hello world"), (False, "Hello</s> world")):
        detok = IncrementalDetokenizer(byte_level, [1], skip_special_tokens=skip)
        assert "".join(detok.append([t]) for t in ids) == expect


def test_sentencepiece_style_streams(spm):
    rng = random.Random(2)
    # Byte fallback really happens (the CJK characters are outside the small alphabet).
    assert any(t.startswith("<0x") for t in spm.convert_ids_to_tokens(spm.encode(STREAM_TEXTS[0])))
    for ids, prompt, skip, text in _check_valid_streams(spm, rng):  # no prompt: same as a full decode
        assert text == spm.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_first_token_keeps_its_space_after_prompt(spm):
    """After a prompt, the text is what the tokens add to the prompt: " Paris", not "Paris"."""
    rng = random.Random(3)
    prompts = ("The capital of France is", "Hello, my name", "東京")
    for ids, prompt, skip, text in _check_valid_streams(spm, rng, prompts):
        if not skip:
            continue
        ids = [t for t in ids if t not in spm.all_special_ids]
        detok = IncrementalDetokenizer(spm, prompt)
        detok.append(ids)
        whole, head = spm.decode(prompt + ids), spm.decode(prompt)
        assert whole.startswith(head)
        assert detok.output_text == whole[len(head):]
    detok = IncrementalDetokenizer(spm, spm.encode("The capital of France is", add_special_tokens=False))
    assert detok.append(spm.encode("Paris", add_special_tokens=False)).startswith(" ")


def test_decode_token(byte_level):
    detok = IncrementalDetokenizer(byte_level, [])
    for t in (5, 100, byte_level.eos_token_id):
        assert detok.decode_token(t) == byte_level.decode([t])


def test_window_stays_small(byte_level):
    """O(1) per token: the decoded window does not grow with the output."""
    ids = byte_level.encode(" ".join(STREAM_TEXTS) * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_level, [1, 2])
    widest = 0
    for t in ids:
        detok.append([t])
        widest = max(widest, len(detok.output_token_ids) + detok._num_context - detok.prefix_offset)
    assert widest <= 8
    assert detok.output_text == byte_level.decode(ids)


@pytest.mark.slow
def test_smollm2_tokenizer(request):
    """The real SmolLM2 tokenizer (byte-level BPE, 49k vocab), when its GGUF is at hand."""
    try:
        path = request.getfixturevalue("smollm2_gguf")
    except pytest.FixtureLookupError:
        pytest.skip("no smollm2_gguf fixture")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rng = random.Random(4)
    prompts = ("", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    for ids, prompt, skip, text in _check_valid_streams(tok, rng, prompts):
        assert text == tok.decode(ids, skip_special_tokens=skip)
    for trial in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(30)]
        detok = IncrementalDetokenizer(tok, [1])
        deltas = _stream(detok, ids, rng)
        assert not any(d.endswith("\ufffd") for d in deltas)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
