"""weight_load_bench.py end to end on the CPU with a tiny Llama shape: it writes a sharded checkpoint
the engine's model loads completely, times both paths, finds the staged path's parameters equal to
the per-tensor path's, and reuses the checkpoint on a second run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import weight_load_bench  # noqa: E402

TINY = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}


def test_weight_load_bench_tiny_llama(tmp_path):
    d, out = tmp_path / "ckpt", tmp_path / "wl.json"
    argv = ["--model", "llama-3.1-8b", "--hf-overrides", json.dumps(TINY), "--dir", str(d), "--device", "cpu",
            "--shard-gb", str(300_000 / (1 << 30)), "--staged", "1x2,0.01x1:pread", "--reps", "2", "--out", str(out)]
    assert weight_load_bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert not res["reused_checkpoint"]
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"per_tensor", "staged_1MiBx2_mmap", "staged_0.01MiBx1_pread"}
    assert all(r["matches_per_tensor"] and r["GB_s"] > 0 for r in rows.values())
    # 2 layers of bf16 Llama at hidden 128: ~0.85 MB over 300 kB shards, every shard within its bound
    shards = sorted(d.glob("*.safetensors"))
    assert res["files"] == len(shards) >= 3
    tensors = {k: v for s in shards for k, v in load_file(str(s)).items()}
    assert sum(t.nbytes for t in tensors.values()) == res["checkpoint_bytes"]
    assert tensors["model.embed_tokens.weight"].shape == (512, 128)
    assert abs(tensors["model.layers.1.mlp.down_proj.weight"].float().std().item() - 0.02) < 0.002
    assert weight_load_bench.main(argv) == 0
    assert json.loads(out.read_text())["reused_checkpoint"]
