"""GGUF: our torch dequantizers against gguf-py's numpy reference, our header parser against gguf's
GGUFReader/GGUFWriter, and the real SmolLM2 GGUF against HF transformers loading the same file."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from vllm_engine.model_loader.gguf_loader import dequantize, open_gguf, unpermute_qk

RNG = np.random.default_rng(0)


def _ours(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    return dequantize(raw, qtype.name, (rows, cols)).numpy()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequant_matches_gguf_on_quantized_random_data(name):
    qtype = GGMLQuantizationType[name]
    x = (RNG.standard_normal((8, 128)) * 0.05).astype(np.float32)
    raw = quants.quantize(x, qtype)
    ref = quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(_ours(raw, qtype, 8, 128), ref)
    assert np.abs(ref - x).max() < 0.02  # the round trip is a real quantization, not garbage


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_dequant_matches_gguf_on_random_blocks(name):
    """gguf-py cannot quantize K types: random bytes, with the float scale fields set to sane values."""
    qtype = GGMLQuantizationType[name]
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    n = 16
    raw = RNG.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    if name in ("Q4_K", "Q5_K"):  # d, dmin: float16 at bytes 0..3
        raw[:, 0:4] = (RNG.random((n, 2)) * 0.01).astype(np.float16).view(np.uint8)
    else:  # Q6_K: d float16 at the end
        raw[:, -2:] = (RNG.random((n, 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw = raw.reshape(2, -1)
    ref = quants.dequantize(raw, qtype)
    np.testing.assert_allclose(_ours(raw, qtype, 2, n * block_values // 2), ref, rtol=1e-6, atol=1e-7)


def test_q8_k_dequant_by_hand():
    """gguf-py has no Q8_K dequantizer: block = d (float32), 256 x int8, 16 x int16 sums; x = d * q."""
    d = np.array([0.5, -0.25], dtype=np.float32)
    q = RNG.integers(-128, 128, size=(2, 256), dtype=np.int8)
    bsums = q.reshape(2, 16, 16).sum(-1).astype(np.int16)
    raw = np.concatenate([d.view(np.uint8).reshape(2, 4), q.view(np.uint8), bsums.view(np.uint8).reshape(2, 32)], 1)
    assert raw.shape == (2, 292)
    want = q.astype(np.float64) * d[:, None].astype(np.float64)
    np.testing.assert_array_equal(dequantize(raw, "Q8_K", (2, 256)).numpy(), want.astype(np.float32))


@pytest.mark.parametrize("name,np_dtype", [("F32", np.float32), ("F16", np.float16)])
def test_plain_types(name, np_dtype):
    x = RNG.standard_normal((3, 32)).astype(np_dtype)
    got = dequantize(x.view(np.uint8), name, (3, 32))
    np.testing.assert_array_equal(got.numpy(), x.astype(np.float32))


def test_bf16():
    x = torch.randn(4, 16).to(torch.bfloat16)
    raw = x.view(torch.uint8).numpy()
    assert torch.equal(dequantize(raw, "BF16", (4, 16), dtype=torch.bfloat16), x)


def test_unsupported_type_is_named():
    with pytest.raises(ValueError, match="IQ2_XS"):
        dequantize(np.zeros(66, dtype=np.uint8), "IQ2_XS", (256,))


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's convert script: reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)."""
    n_head, hd, cols = 3, 8, 5
    w = torch.randn(n_head * hd, cols)
    permuted = w.reshape(n_head, 2, hd // 2, cols).transpose(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_qk(permuted, n_head), w)


def test_header_parser_matches_gguf_writer_and_reader(tmp_path):
    path = tmp_path / "t.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 1e4)
    w.add_string("general.name", "tiny")
    w.add_bool("some.flag", True)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "<s>"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    tensors = {"a.weight": RNG.standard_normal((4, 64)).astype(np.float32),
               "b.weight": quants.quantize(RNG.standard_normal((2, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)}
    w.add_tensor("a.weight", tensors["a.weight"])
    w.add_tensor("b.weight", tensors["b.weight"], raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = open_gguf(path)
    ref = GGUFReader(str(path))
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            got, want = ours.metadata[key], field.contents()
            assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(ours.tensors, ref.tensors):
        assert t.type_name == r.tensor_type.name
        assert t.shape == tuple(int(d) for d in reversed(r.shape))
        np.testing.assert_array_equal(t.data, np.asarray(r.data).reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(dequantize(ours.tensors[0].data, "F32", (4, 64)).numpy(), tensors["a.weight"])


def test_truncated_gguf_is_a_clear_error(smollm2_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(50_000_000))
    with pytest.raises(ValueError, match="Truncated GGUF"):
        open_gguf(bad)
    head = tmp_path / "head.gguf"
    head.write_bytes(bad.read_bytes()[:5000])  # cut inside the metadata
    with pytest.raises(ValueError, match="Corrupt or truncated"):
        open_gguf(head)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello world, not a gguf")
    with pytest.raises(ValueError, match="bad magic"):
        open_gguf(notgguf)


def test_smollm2_real_tensors_match_gguf_reference(smollm2_gguf):
    """Real Q4_1, Q8_0 and F32 tensors of the file, against gguf-py on the same bytes."""
    f = open_gguf(smollm2_gguf)
    by_name = {t.name: t for t in f.tensors}
    for name in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.7.attn_q.weight", "output_norm.weight"):
        t = by_name[name]
        ref = quants.dequantize(np.asarray(t.data).reshape(t.shape[0], -1), GGMLQuantizationType[t.type_name])
        np.testing.assert_array_equal(dequantize(t.data, t.type_name, t.shape).numpy(), ref.reshape(t.shape))
    assert {t.type_name for t in f.tensors} == {"Q4_1", "Q8_0", "F32"}
