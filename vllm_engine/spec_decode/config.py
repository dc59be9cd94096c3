"""SpeculativeConfig: the user's ``speculative_config``, parsed and checked as vLLM does.

Accepted forms (a dict, its JSON text for ``--speculative-config``, or None for off)::

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    {"model": "path/to/draft", "num_speculative_tokens": 4}            # method "draft_model"
    {"method": "eagle" | "eagle3", "model": "path/to/heads", "num_speculative_tokens": 3}

As in vLLM, ``method`` may be left out: ``model`` "ngram" / "[ngram]" means n-gram lookup, a model
whose name holds "eagle3" / "eagle" means EAGLE-3 / EAGLE heads, any other model a draft model.
n-gram defaults: both lookup bounds unset -> 5 and 5; one set -> the other takes its value.
Every bad value is a ``ValueError`` naming the field (``speculative_config.<field>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

METHODS = ("ngram", "draft_model", "eagle", "eagle3")
_NGRAM_MODEL_NAMES = ("ngram", "[ngram]")
_DEFAULT_LOOKUP = 5  # vLLM's prompt_lookup_min / _max when neither is given
_FIELDS = ("method", "num_speculative_tokens", "model", "prompt_lookup_max", "prompt_lookup_min",
           "disable_by_batch_size", "draft_tensor_parallel_size", "adaptive")


def _error(field: str, detail: str) -> ValueError:
    return ValueError(f"speculative_config.{field} {detail}")


def _positive_int(value: Any, field: str, lo: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise _error(field, f"must be an integer >= {lo}, got {value!r}.")
    return value


@dataclass(frozen=True)
class SpeculativeConfig:
    """A checked speculative-decoding setup.

    ``num_speculative_tokens``: k, the most tokens proposed per request and step (each step then
    verifies up to k + 1 query tokens per request). ``prompt_lookup_min/max``: n-gram sizes tried,
    longest first (n-gram only). ``disable_by_batch_size``: no proposals in a step with more running
    requests than this (None: never off for that reason). ``adaptive`` (this engine's own field,
    default true): each step proposes only where measured step times and each request's acceptance
    say it pays (spec_decode/adaptive.py).
    """

    method: str
    num_speculative_tokens: int
    model: Optional[str] = None
    prompt_lookup_max: Optional[int] = None
    prompt_lookup_min: Optional[int] = None
    disable_by_batch_size: Optional[int] = None
    draft_tensor_parallel_size: Optional[int] = None
    adaptive: bool = True  # this engine's: propose only where it pays (spec_decode/adaptive.py)
    # The draft model, resolved (method "draft_model", set by ``with_draft_model``): a ModelConfig.
    draft_model_config: Optional[Any] = field(default=None, compare=False, repr=False)

    @classmethod
    def from_user(cls, value: Union[None, str, dict, "SpeculativeConfig"]) -> Optional["SpeculativeConfig"]:
        """None, a dict, its JSON text (the CLI's ``--speculative-config``) or a SpeculativeConfig."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}.") from e
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object (dict), got {type(value).__name__}.")
        return cls.from_dict(value)

    @classmethod
    def from_dict(cls, d: dict) -> "SpeculativeConfig":
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise _error(unknown[0], f"is not a known field (known: {', '.join(_FIELDS)}).")
        model = d.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise _error("model", f"must be a non-empty string, got {model!r}.")
        method = _resolve_method(d.get("method"), model)
        if "num_speculative_tokens" not in d or d["num_speculative_tokens"] is None:
            raise _error("num_speculative_tokens", "is required.")
        k = _positive_int(d["num_speculative_tokens"], "num_speculative_tokens")
        lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
        if method == "ngram":
            lo, hi = _lookup_bounds(lo, hi)
            model = None
        elif lo is not None or hi is not None:
            field = "prompt_lookup_min" if lo is not None else "prompt_lookup_max"
            raise _error(field, f"applies to method 'ngram' only (method is {method!r}).")
        elif model is None:
            raise _error("model", f"is required for method {method!r}.")
        batch = d.get("disable_by_batch_size")
        if batch is not None:
            _positive_int(batch, "disable_by_batch_size", lo=2)
        tp = d.get("draft_tensor_parallel_size")
        if tp is not None:
            _positive_int(tp, "draft_tensor_parallel_size")
        adaptive = d.get("adaptive", True)
        if not isinstance(adaptive, bool):
            raise _error("adaptive", f"must be true or false, got {adaptive!r}.")
        return cls(method, k, model, hi, lo, batch, tp, adaptive)

    @property
    def is_ngram(self) -> bool:
        return self.method == "ngram"

    def with_draft_model(self, target: Any, device: Any) -> "SpeculativeConfig":
        """This config with ``draft_model_config``: the draft checkpoint (or EAGLE head) at ``model``
        resolved as the target ``target`` (a ModelConfig) is: its dtype, max_model_len and seed;
        dummy weights when the target has them. ValueError naming ``speculative_config.model`` when
        it cannot be found, does not share the target's vocabulary (an EAGLE head: or its hidden
        size, or has other than one layer), or is too short for max_model_len."""
        from vllm_engine.config import ModelConfig
        from vllm_engine.model_loader.resolve import resolve_model
        from vllm_engine.quantization import get_quant_config, resolve_quantization

        eagle = self.method == "eagle"
        # An EAGLE head's weights are read by its own loader (spec_decode/eagle.py): the config only here.
        load_format = "dummy" if target.load_format == "dummy" or eagle else "auto"
        try:
            resolved = resolve_model(self.model, load_format=load_format)
        except ValueError as e:
            raise _error("model", f"cannot be loaded as a draft model: {e}") from e
        hf = resolved.hf_config
        if hf.vocab_size != target.vocab_size:
            raise _error("model", f"{self.model!r} has vocab_size {hf.vocab_size}, the target "
                                  f"{target.model!r} {target.vocab_size}: a draft model must share the target's "
                                  "tokenizer.")
        max_len = getattr(hf, "max_position_embeddings", None) or 2048
        if max_len < target.max_model_len:
            raise _error("model", f"{self.model!r} has max_position_embeddings {max_len} < max_model_len "
                                  f"{target.max_model_len}: lower max_model_len.")
        if eagle:
            _check_eagle_head(self.model, hf, target)
            return replace(self, draft_model_config=ModelConfig(
                model=self.model, model_path=resolved.model_path,
                load_format="dummy" if target.load_format == "dummy" else "eagle", hf_config=hf, dtype=target.dtype,
                max_model_len=target.max_model_len, seed=target.seed, served_model_name=self.model))
        _check_same_tokenizer(self.model, resolved.tokenizer, target.tokenizer, target.vocab_size)
        quantization = resolve_quantization(None, hf, resolved.load_format)
        if quantization is not None and quantization != "gguf":
            get_quant_config(hf, device, quantization)
        draft = ModelConfig(model=self.model, model_path=resolved.model_path, load_format=resolved.load_format,
                            hf_config=hf, dtype=target.dtype, max_model_len=target.max_model_len, seed=target.seed,
                            served_model_name=self.model, tokenizer=resolved.tokenizer,
                            gguf_file=resolved.gguf_file, quantization=quantization)
        return replace(self, draft_model_config=draft)

    def to_dict(self) -> dict:
        """The fields that are set, as a user would write them (benchmark JSON, logs)."""
        return {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None}


def _resolve_method(method: Any, model: Optional[str]) -> str:
    if method is not None:
        if method == "[ngram]":
            method = "ngram"
        if method not in METHODS:
            raise _error("method", f"must be one of {', '.join(METHODS)}, got {method!r}.")
        return method
    if model is None:
        raise _error("method", "is required when no model is given (e.g. \"ngram\").")
    if model in _NGRAM_MODEL_NAMES:
        return "ngram"
    name = model.lower()
    if "eagle3" in name:
        return "eagle3"
    if "eagle" in name:
        return "eagle"
    return "draft_model"


def _check_eagle_head(model: str, hf: Any, target: Any) -> None:
    """An EAGLE-1 head: one Llama-style layer over features of the target's hidden size."""
    if getattr(hf, "model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise _error("model", f"{model!r} is a {hf.model_type!r} head: EAGLE heads are Llama layers.")
    if hf.num_hidden_layers != 1:
        raise _error("model", f"{model!r} has {hf.num_hidden_layers} layers: an EAGLE-1 head has one.")
    if hf.hidden_size != target.hf_config.hidden_size:
        raise _error("model", f"{model!r} has hidden_size {hf.hidden_size}, the target {target.model!r} "
                              f"{target.hf_config.hidden_size}: an EAGLE head reads the target's hidden states.")


def _check_same_tokenizer(model: str, draft_source: Optional[str], target_source: Optional[str],
                          vocab_size: int) -> None:
    """The draft's and the target's tokenizers map the same strings to the same ids below
    ``vocab_size`` (the ids the models read and write), when both have a tokenizer."""
    if draft_source is None or target_source is None or str(draft_source) == str(target_source):
        return
    from vllm_engine.model_loader.tokenizer import get_tokenizer

    def vocab(source: str) -> dict:
        return {t: i for t, i in get_tokenizer(source).get_vocab().items() if i < vocab_size}

    if vocab(draft_source) != vocab(target_source):
        raise _error("model", f"{model!r} has a different tokenizer vocabulary from the target's: a draft model "
                              "must share the target's tokenizer.")


def _lookup_bounds(lo: Any, hi: Any) -> tuple[int, int]:
    if lo is None and hi is None:
        return _DEFAULT_LOOKUP, _DEFAULT_LOOKUP
    if lo is not None:
        _positive_int(lo, "prompt_lookup_min")
    if hi is not None:
        _positive_int(hi, "prompt_lookup_max")
    lo = hi if lo is None else lo
    hi = lo if hi is None else hi
    if lo > hi:
        raise _error("prompt_lookup_min", f"({lo}) must be <= prompt_lookup_max ({hi}).")
    return lo, hi
