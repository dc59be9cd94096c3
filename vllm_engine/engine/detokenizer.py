r"""Incremental detokenization: new token ids -> the new text, in O(1) amortized work per token.

Decoding only the new token is wrong in two ways: a byte-level BPE token may hold part of a UTF-8
character (decoded alone it gives U+FFFD), and sentencepiece tokenizers decide a token's leading
space from its neighbours (the "▁" of the first token of a text is stripped). So, as vLLM does, we
decode a small window twice:

    ids:   ... | prefix_offset ........ read_offset ........ len(ids)
                 \__ already emitted __/\___ not yet emitted ___/

    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):], less a trailing run of U+FFFD

Both decodes start at the same token, so whatever the tokenizer does at the start of a text affects
both the same way and cancels out. The window starts in the prompt's last few tokens, so the first
generated token gets the leading space it would have after the prompt (" Paris", not "Paris").
A trailing U+FFFD is a UTF-8 character whose bytes have not all arrived: it is held back (the text
before it is emitted) and the window does not slide until it completes. Otherwise the window slides
after each step, so each decode covers a handful of tokens.

Invariant (tested): ``output_text == tokenizer.decode(output ids).rstrip("\ufffd")``, except that
after a non-empty prompt a sentencepiece-style tokenizer's first token keeps its leading space
(``output_text`` is then the text that the tokens add to the prompt).
"""

from __future__ import annotations

from typing import Any

# How many prompt tokens give context to the first generated token (as vLLM).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Detokenizes one sequence's generated tokens as they arrive.

    ``tokenizer``: a transformers tokenizer (anything with ``decode(ids, skip_special_tokens=...)``).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        # Fast tokenizers ignore spaces_between_special_tokens; pass it only when it is not the
        # default so tokenizers that do not know the keyword never see it.
        self._decode_kwargs: dict[str, Any] = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self._decode_kwargs["spaces_between_special_tokens"] = False
        # Only the prompt's tail is kept: it is all the context the first window needs.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._num_context = len(self._ids)
        self.prefix_offset = 0
        self.read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)  # decode(ids[prefix_offset:read_offset])
        self._window_emitted = self._prefix_text  # the part of decode(ids[prefix_offset:]) already emitted
        self.output_text = ""
        self._token_text_cache: dict[int, str] = {}

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, **self._decode_kwargs)

    def append(self, token_ids: list[int]) -> str:
        """Adds generated tokens; returns the new text. A trailing U+FFFD (a UTF-8 character not yet
        complete) is held back until a later token completes it, so a delta never ends in one."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        new_text = self._decode(self._ids[self.prefix_offset:])
        complete = new_text.rstrip(_REPLACEMENT_CHAR)
        emitted = self._window_emitted
        if new_text.startswith(emitted):
            start = len(emitted)
        else:
            # The new tokens changed how the window's emitted part decodes (rare: a clean-up rule
            # across the boundary, or a prompt that ends inside a UTF-8 character). Text already
            # streamed cannot be taken back, so go on from the first character that differs.
            start = _common_prefix_len(emitted, new_text)
        delta = complete[start:]
        if delta:
            self.output_text += delta
            self._window_emitted = complete
        if len(complete) == len(new_text) and len(new_text) > len(self._prefix_text):
            # Everything decoded is complete and visible: slide the window so that the tokens just
            # read become the next window's context. (While nothing visible was added, e.g. only
            # skipped special tokens, the window stays so the next token keeps its context.)
            self.prefix_offset = self.read_offset
            self.read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
            self._window_emitted = self._prefix_text
        return delta

    def decode_token(self, token_id: int) -> str:
        """A single token's own text (for logprobs' ``decoded_token``); special tokens are kept."""
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text_cache[token_id] = text
        return text


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
