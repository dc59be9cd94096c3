"""The grammar-library benchmark runs end to end on the CPU at a tiny size (structured_throughput.py
is a GPU measurement: gpu_suite.sh's structured stage runs it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


def test_grammar_bench_measures_both_libraries(smollm2_gguf, tmp_path):
    pytest.importorskip("xgrammar")
    pytest.importorskip("llguidance")
    import grammar_bench

    out = tmp_path / "grammar.json"
    assert grammar_bench.main(["--tokenizer", str(smollm2_gguf), "--num-schemas", "3", "--repeats", "1",
                               "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["backend"] for r in res["results"]] == ["xgrammar", "llguidance"]
    assert all(r["num_masks"] > 10 and r["mask_ms_p50"] > 0 for r in res["results"])

