"""SamplingParams: how one request's tokens are chosen, and when its generation stops.

Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` naming the field,
so the offline API and the HTTP server report the same message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

_SAMPLING_EPS = 1e-5
# torch.Generator.manual_seed takes any value that fits in 64 bits, signed or unsigned.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_N = 1024  # a hard ceiling; the engine's ``max_n`` (default 128, as OpenAI) is usually lower
MAX_LOGPROBS = 20
# The sampler divides float32 logits by the temperature and the repetition penalty (or multiplies by
# the penalty): these bounds keep logits of up to ~1e4 finite and a tiny top_p nonzero in float32.
MAX_TEMPERATURE = 1e6
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2
MIN_TOP_P = 1e-9


class SamplingParamsError(ValueError):
    """A field out of range: ``param`` is the field's name, the message starts with it.

    The server reports ``param`` as the client spelled the field (``renamed``), e.g. chat's
    ``max_completion_tokens`` for ``max_tokens``.
    """

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(f"{param} {detail}")
        self.param, self.detail = param, detail

    def renamed(self, param: str) -> "SamplingParamsError":
        return self if param == self.param else SamplingParamsError(param, self.detail)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(value: Any, name: str, lo: int, hi: Optional[int], what: str) -> None:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise SamplingParamsError(name, f"must be {what} {bound}, got {value!r}.")


def _check_float(value: Any, name: str, lo: float, hi: float) -> None:
    """A real number in [lo, hi] (NaN and the infinities fail)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise SamplingParamsError(name, f"must be a number in [{lo:g}, {hi:g}], got {value!r}.")


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (set exactly one field), as vLLM's ``StructuredOutputsParams``.

    json: a JSON Schema (dict or JSON text); regex: a regular expression the whole output matches;
    choice: the output is one of these strings; grammar: an EBNF grammar (xgrammar's dialect, rule
    ``root``); json_object: any JSON object. Checked here for shape; the grammar library checks the
    content when the engine compiles it (an error there names ``structured_outputs.<field>`` too).
    """

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None

    def __post_init__(self) -> None:
        import json as _json

        set_fields = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False)]
        if len(set_fields) != 1:
            kinds = ", ".join(STRUCTURED_OUTPUT_KINDS)
            raise SamplingParamsError("structured_outputs",
                                      f"must set exactly one of {kinds}, got {set_fields or 'none'}.")
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as e:
                raise SamplingParamsError("structured_outputs.json", f"is not valid JSON: {e}.") from e
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise SamplingParamsError("structured_outputs.json", f"must be a JSON Schema object, got {self.json!r}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SamplingParamsError(f"structured_outputs.{name}", f"must be a non-empty string, got {value!r}.")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise SamplingParamsError("structured_outputs.choice", f"must be a non-empty list of non-empty "
                                                                       f"strings, got {self.choice!r}.")
            self.choice = list(self.choice)
        if self.json_object not in (None, True):
            raise SamplingParamsError("structured_outputs.json_object", f"must be true, got {self.json_object!r}.")

    @property
    def kind(self) -> str:
        """The one field set: json, regex, choice, grammar or json_object."""
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what compiled grammars are cached by. JSON keys keep their order (it is the
        order the grammar emits properties in)."""
        import json as _json

        kind = self.kind
        value = getattr(self, kind)
        text = value if isinstance(value, str) else _json.dumps(value, ensure_ascii=False)
        return kind, text


STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k filtering
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None
    max_tokens: Optional[int] = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # number of top logprobs per generated token (plus the sampled one)
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None

    # Filled by the engine (not the user): the model's EOS ids, used unless ignore_eos.
    _all_stop_token_ids: set = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise SamplingParamsError("logit_bias", f"must map token ids to numbers, got {self.logit_bias!r}.") from e
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:  # an unknown key
                raise SamplingParamsError("structured_outputs", f"has an unknown field: {e}.") from e
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs", f"must be StructuredOutputsParams, got "
                                                            f"{type(self.structured_outputs).__name__}.")
        self._verify()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        """Every field in a range the code after it can handle (the sampler computes in float32)."""
        _check_int(self.n, "n", 1, MAX_N, "an integer")
        _check_float(self.temperature, "temperature", 0.0, MAX_TEMPERATURE)
        _check_float(self.top_p, "top_p", MIN_TOP_P, 1.0)
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k != -1):
            raise SamplingParamsError("top_k", f"must be -1 (disable), or at least 1, got {self.top_k!r}.")
        _check_float(self.min_p, "min_p", 0.0, 1.0)
        if self.seed is not None:
            if not _is_int(self.seed):
                raise SamplingParamsError("seed", f"must be an integer, got {self.seed!r}.")
            # Sample i draws from a generator seeded with seed + i: all of them must fit its 64 bits.
            if not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1):
                raise SamplingParamsError(
                    "seed", f"must be in [{SEED_MIN}, {SEED_MAX - (self.n - 1)}] (seed + n - 1 must fit in 64 "
                            f"bits), got {self.seed}.")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(getattr(self, name), name, -2.0, 2.0)
        _check_float(self.repetition_penalty, "repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens", 1, None, "an integer")
        _check_int(self.min_tokens, "min_tokens", 0, None, "an integer")
        if self.min_tokens and self.structured_outputs is not None:
            # The grammar alone decides where the output ends: banning EOS could leave no token allowed.
            raise SamplingParamsError("min_tokens", "cannot be combined with structured_outputs (the constraint "
                                                    "decides where the output ends).")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _check_int(v, name, 0, MAX_LOGPROBS, "an integer")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise SamplingParamsError("stop", f"must be a non-empty string or a list of non-empty strings, "
                                              f"got {self.stop!r}.")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids!r}.")
        if self.logit_bias is not None:
            for tok, bias in self.logit_bias.items():
                if tok < 0:
                    raise SamplingParamsError("logit_bias", f"keys must be non-negative token ids, got {tok}.")
                if not -100.0 <= bias <= 100.0:  # also false for NaN
                    raise SamplingParamsError("logit_bias", f"values must be in [-100, 100], got {bias} for token "
                                                            f"{tok}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def verify_vocab(self, vocab_size: int) -> None:
        """Checks the fields that name token ids against the model's vocabulary."""
        if self.logit_bias:
            bad = [t for t in self.logit_bias if t >= vocab_size]
            if bad:
                raise SamplingParamsError("logit_bias", f"contains token id {bad[0]} outside the vocabulary (size "
                                                        f"{vocab_size}).")
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError("stop_token_ids", f"contains token id {bad[0]} outside the vocabulary (size "
                                                        f"{vocab_size}).")

    def clone(self) -> "SamplingParams":
        import copy

        return copy.deepcopy(self)
