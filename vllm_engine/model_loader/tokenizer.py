"""Tokenizer loading (HF directory, hub id, or the vocabulary inside a GGUF) and the set of EOS ids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional

logger = logging.getLogger(__name__)


def gguf_tokenizer_cache(gguf_path: Path) -> Path:
    """Where the tokenizer converted from a GGUF is saved: next to the file."""
    return gguf_path.parent / f"{gguf_path.stem}.tokenizer"


def get_tokenizer(model_config_or_source: Any, gguf_file: Optional[str] = None) -> Any:
    """A transformers fast tokenizer.

    ``model_config_or_source``: a ModelConfig (its ``tokenizer`` source is used), a directory, a hub id,
    or a ``.gguf`` file. For a GGUF, transformers converts the vocabulary, merges and chat template
    (a few seconds); the result is saved next to the file and reused on later starts.
    """
    from transformers import AutoTokenizer

    source = getattr(model_config_or_source, "tokenizer", model_config_or_source)
    if source is None:
        raise ValueError("This model has no tokenizer source.")
    source = str(source)
    if gguf_file is None and source.endswith(".gguf"):
        gguf_file = source
    if gguf_file is not None:
        path = Path(gguf_file) if Path(gguf_file).is_absolute() or Path(gguf_file).exists() else Path(source) / gguf_file
        cached = gguf_tokenizer_cache(path)
        # Reused unless the GGUF was replaced after the cache was written.
        if (cached / "tokenizer.json").is_file() and \
                (cached / "tokenizer.json").stat().st_mtime >= path.resolve().stat().st_mtime:
            try:
                return AutoTokenizer.from_pretrained(str(cached))
            except Exception as e:  # a stale or partial cache: convert again
                logger.warning("ignoring the cached tokenizer %s: %s", cached, e)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        try:
            tok.save_pretrained(str(cached))
        except OSError as e:  # a read-only model directory: convert on every start
            logger.info("cannot cache the GGUF tokenizer in %s: %s", cached, e)
        return tok
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise ValueError(f"Cannot load a tokenizer from {source!r}: {e}") from None


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return {int(v) for v in value if v is not None}
    return set()


def get_eos_token_ids(tokenizer: Any, hf_config: Any, generation_config: Optional[dict]) -> set[int]:
    """Union of the tokenizer's, the model config's and generation_config's EOS ids (ints or lists)."""
    ids = _ids(getattr(hf_config, "eos_token_id", None)) if hf_config is not None else set()
    ids |= _ids((generation_config or {}).get("eos_token_id"))
    if tokenizer is not None:
        ids |= _ids(getattr(tokenizer, "eos_token_id", None))
    return ids
