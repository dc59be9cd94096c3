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

    @property
    def verify_query_len(self) -> int:
        """Query tokens per request of a verifying step: its last token and k proposals."""
        return self.num_speculative_tokens + 1

    def with_draft_model(self, target: Any, device: Any) -> "SpeculativeConfig":
        """This config with ``draft_model_config``: the draft checkpoint (or EAGLE head) at ``model``
        resolved as the target ``target`` (a ModelConfig) is: its dtype, max_model_len and seed;
        dummy weights when the target has them. ValueError naming ``speculative_config.model`` when
        it cannot be found, does not share the target's vocabulary (an EAGLE head: or its hidden
        size, or has other than one layer; an EAGLE-3 head: see ``_check_eagle3_head``), or is too
        short for max_model_len."""
        from vllm_engine.config import ModelConfig
        from vllm_engine.model_loader.resolve import resolve_model
        from vllm_engine.quantization import get_quant_config, resolve_quantization

        eagle = self.method in ("eagle", "eagle3")
        # An EAGLE head's weights are read by its own loader (spec_decode/eagle.py): the config only
        # here; its architecture (LlamaForCausalLMEagle3...) is the head's, not a served model's.
        load_format = "dummy" if target.load_format == "dummy" or eagle else "auto"
        try:
            resolved = resolve_model(self.model, load_format=load_format, check_architecture=not eagle)
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
            _check_eagle_head(self.model, hf, target, eagle3=self.method == "eagle3")
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


def _check_eagle_head(model: str, hf: Any, target: Any, eagle3: bool = False) -> None:
    """An EAGLE head: one Llama-style layer over features of the target's hidden size (EAGLE-3:
    and ``_check_eagle3_head``)."""
    kind = "an EAGLE-3" if eagle3 else "an EAGLE-1"
    if getattr(hf, "model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise _error("model", f"{model!r} is a {hf.model_type!r} head: EAGLE heads are Llama layers.")
    if hf.num_hidden_layers != 1:
        raise _error("model", f"{model!r} has num_hidden_layers {hf.num_hidden_layers}: {kind} head has one.")
    if hf.hidden_size != target.hf_config.hidden_size:
        raise _error("model", f"{model!r} has hidden_size {hf.hidden_size}, the target {target.model!r} "
                              f"{target.hf_config.hidden_size}: an EAGLE head reads the target's hidden states.")
    if eagle3:
        _check_eagle3_head(model, hf, target)


def _check_eagle3_head(model: str, hf: Any, target: Any) -> None:
    """An EAGLE-3 head's own fields: ``target_hidden_size`` (when given) the target's hidden size,
    ``draft_vocab_size`` (when given) in [1, vocab_size], the auxiliary layers (``eagle3_aux_layer_ids``)
    layers of the target, and no ``eagle_config.use_aux_hidden_state`` false (a head without fc)."""
    width = getattr(hf, "target_hidden_size", None)
    if width is not None and width != target.hf_config.hidden_size:
        raise _error("model", f"{model!r} has target_hidden_size {width}, the target {target.model!r} "
                              f"hidden_size {target.hf_config.hidden_size}.")
    draft_vocab = getattr(hf, "draft_vocab_size", None)
    if draft_vocab is not None and (not isinstance(draft_vocab, int) or not 1 <= draft_vocab <= hf.vocab_size):
        raise _error("model", f"{model!r} has draft_vocab_size {draft_vocab!r}: it must be in [1, vocab_size "
                              f"{hf.vocab_size}].")
    eagle_config = getattr(hf, "eagle_config", None) or {}
    if isinstance(eagle_config, dict) and eagle_config.get("use_aux_hidden_state", True) is False:
        raise _error("model", f"{model!r} has eagle_config.use_aux_hidden_state false: only EAGLE-3 heads over "
                              "the target's auxiliary hidden states are served.")
    eagle3_aux_layer_ids(model, hf, target.hf_config.num_hidden_layers)


def eagle3_aux_layer_ids(model: str, hf: Any, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose entering residual stream an EAGLE-3 head reads, low to high: the
    head config's ``eagle_aux_hidden_state_layer_ids`` (top level, or in ``eagle_config``), else
    vLLM's default (2, L // 2, L - 3) for a target of L layers. ValueError naming
    ``speculative_config.model`` unless they are distinct layers in [0, L)."""
    eagle_config = getattr(hf, "eagle_config", None)
    ids = getattr(hf, "eagle_aux_hidden_state_layer_ids", None)
    if ids is None and isinstance(eagle_config, dict):
        ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
    field = "eagle_aux_hidden_state_layer_ids"
    if ids is None:
        L = num_target_layers
        ids, field = (2, L // 2, L - 3), f"the default auxiliary layers (2, L // 2, L - 3) for L = {L}"
    if (not isinstance(ids, (list, tuple)) or not ids or len(set(ids)) != len(ids)
            or not all(isinstance(i, int) and 0 <= i < num_target_layers for i in ids)):
        raise _error("model", f"{model!r}: {field} {list(ids) if isinstance(ids, (list, tuple)) else ids!r} "
                              f"must be distinct layers of the target's {num_target_layers}: set "
                              "eagle_aux_hidden_state_layer_ids in the head's config.json.")
    return tuple(ids)


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
