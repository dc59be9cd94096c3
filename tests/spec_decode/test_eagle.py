"""EAGLE-1 heads (spec_decode/eagle.py): the head in the published layout against a float64
reference of its definition; the features it is fed are the target's hidden states at the right
positions (against HF transformers); a head that can predict (a bigram target) gets its proposals
accepted; greedy tokens equal plain decoding through chunked prefill, preemption, prefix caching,
async scheduling; bad heads name the field."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.spec_decode.test_engine_spec import GPU_POOL, HEAD_SETTINGS, PROMPTS, check_engine_state, check_lossless, \
    token_ids
from vllm_engine import Engine, SamplingParams

COMMON = dict(dtype="float32", max_model_len=256, seed=0, **GPU_POOL)


def eagle_spec(head, k: int = 3) -> dict:
    return {"method": "eagle", "model": str(head), "num_speculative_tokens": k, "adaptive": False}


def head_tensors(cfg: dict, seed: int = 3) -> dict[str, torch.Tensor]:
    """An EAGLE-1 head's tensors under their published names, random."""
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    return {"fc.weight": r(H, 2 * H), "fc.bias": r(H), "embed_tokens.weight": r(V, H),
            "layers.0.self_attn.q_proj.weight": r(nh * hd, H), "layers.0.self_attn.k_proj.weight": r(nkv * hd, H),
            "layers.0.self_attn.v_proj.weight": r(nkv * hd, H), "layers.0.self_attn.o_proj.weight": r(H, nh * hd),
            "layers.0.mlp.gate_proj.weight": r(inter, H), "layers.0.mlp.up_proj.weight": r(inter, H),
            "layers.0.mlp.down_proj.weight": r(H, inter), "layers.0.post_attention_layernorm.weight": 1 + r(H)}


def save_head(out, cfg: dict, tensors: dict, as_bin: bool = False, **fields):
    """The head's directory: ``cfg`` with one layer (and ``fields``), its tensors as safetensors or
    as a pytorch_model.bin."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1, **fields}))
    if as_bin:
        torch.save(tensors, out / "pytorch_model.bin")
    else:
        save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def target_cfg(target):
    return json.loads((target / "config.json").read_text())


@pytest.fixture(scope="module")
def head(target_cfg, tmp_path_factory):
    return save_head(tmp_path_factory.mktemp("eagle"), target_cfg, head_tensors(target_cfg))


@pytest.fixture(scope="module")
def baseline(target):
    return Engine(model=str(target), **COMMON)


# ---- the head against its definition -----------------------------------------------------------------
def reference_attention(x: torch.Tensor, d: dict, prefix: str, cfg: dict) -> torch.Tensor:
    """Causal rope GQA attention over one sequence from position 0, float64, before o_proj: [T, heads
    x head_dim], with the q/k/v projections ``d[prefix + "q_proj.weight"]``..."""
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, T = H // nh, x.shape[0]
    q = (x @ d[prefix + "q_proj.weight"].T).view(T, nh, hd)
    k = (x @ d[prefix + "k_proj.weight"].T).view(T, nkv, hd)
    v = (x @ d[prefix + "v_proj.weight"].T).view(T, nkv, hd)
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]  # transformers 4.x / 5.x spelling
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rope(z):
        return z * cos + torch.cat([-z[..., hd // 2:], z[..., : hd // 2]], dim=-1) * sin

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, nh * hd)


def reference_head(t: dict, cfg: dict, embed: torch.Tensor, ids: list[int], feats: torch.Tensor) -> torch.Tensor:
    """EAGLE-1's forward from its definition, float64: x = fc([embed; feature]); x + attn(x) (no input
    norm, causal, rope, GQA); then + mlp(rmsnorm(.)). One sequence from position 0."""
    d = {k: v.double() for k, v in t.items()}
    x = torch.cat([embed.double()[ids], feats.double()], dim=-1) @ d["fc.weight"].T + d["fc.bias"]
    attn = reference_attention(x, d, "layers.0.self_attn.", cfg)
    x = x + attn @ d["layers.0.self_attn.o_proj.weight"].T
    n = x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg["rms_norm_eps"])
    n = n * d["layers.0.post_attention_layernorm.weight"]
    gate, up = n @ d["layers.0.mlp.gate_proj.weight"].T, n @ d["layers.0.mlp.up_proj.weight"].T
    return x + (torch.nn.functional.silu(gate) * up) @ d["layers.0.mlp.down_proj.weight"].T


@pytest.mark.parametrize("as_bin, with_bias", [(False, True), (True, True), (False, False)],
                         ids=["safetensors", "pytorch_model.bin", "no-fc-bias"])
def test_head_matches_its_definition(target, target_cfg, tmp_path, as_bin, with_bias):
    from tests.conftest import paged_metadata
    from vllm_engine.distributed import IntermediateTensors

    tensors = head_tensors(target_cfg, seed=4)
    if not with_bias:
        del tensors["fc.bias"]
    path = save_head(tmp_path / "head", target_cfg, tensors, as_bin=as_bin)
    engine = Engine(model=str(target), speculative_config=eagle_spec(path), block_size=4, device="cpu", **COMMON)
    head = engine.model_runner.drafter.model
    ids = [5, 17, 3, 99, 42, 7, 250, 11, 64]
    feats = torch.randn(len(ids), target_cfg["hidden_size"], generator=torch.Generator().manual_seed(1))
    cache = torch.zeros(2, 8, 4, target_cfg["num_key_value_heads"], 16)
    meta = paged_metadata([0], [len(ids)], [list(range(8))])
    with torch.no_grad():
        out = head(torch.tensor(ids), torch.arange(len(ids)), [cache], meta, IntermediateTensors(feats, feats))
    embed = load_file(str(next(target.glob("*.safetensors"))))["model.embed_tokens.weight"]
    tensors.setdefault("fc.bias", torch.zeros(target_cfg["hidden_size"]))
    ref = reference_head(tensors, target_cfg, embed, ids, feats)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


# ---- a head that can predict -----------------------------------------------------------------------
def transparent_copy(target, out) -> dict[str, torch.Tensor]:
    """``target``'s checkpoint in ``out`` with layers that add nothing (o_proj, down_proj zero) and a
    unit final-norm gain: its next token depends on the last token only. Returns its tensors."""
    for f in target.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(next(target.glob("*.safetensors"))))
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
    tensors["model.norm.weight"] = torch.ones_like(tensors["model.norm.weight"])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def check_head_predicts(engine: Engine) -> None:
    """``engine``'s head, built to predict its target, gets nearly every proposal kept, and the
    outputs equal the same engine's plain decoding."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    got = engine.generate(PROMPTS[:3], params, use_tqdm=False)
    stats = engine.get_stats().spec_decode
    assert stats.num_draft_tokens > 30 and stats.acceptance_rate > 0.98, stats
    engine.proposer = None  # the same engine decoding plainly
    assert token_ids(got) == token_ids(engine.generate(PROMPTS[:3], params, use_tqdm=False))
    check_engine_state(engine)


HEAD_PREDICTS_SETTINGS = pytest.mark.parametrize(
    "kwargs", [{}, {"max_num_batched_tokens": 8, "max_num_seqs": 2, "block_size": 4}], ids=["default", "chunked"])


@pytest.fixture(scope="module")
def bigram(target, target_cfg, tmp_path_factory):
    """A target whose layers add nothing (o_proj, down_proj zero) and whose final norm has unit gain:
    its next token depends on the last token only, argmax of lm_head(e(t)). The head x = fc([e; h])
    = e(t_(p+1)) with a layer that adds nothing predicts exactly that: every greedy proposal is kept
    if the head runs at the right positions over the right tokens."""
    out = tmp_path_factory.mktemp("bigram")
    transparent_copy(target, out)
    H = target_cfg["hidden_size"]
    head = head_tensors(target_cfg)
    head["fc.weight"] = torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1)
    head["fc.bias"] = torch.zeros(H)
    for name in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
        head[name] = torch.zeros_like(head[name])
    return out, save_head(tmp_path_factory.mktemp("bigram-head"), target_cfg, head)


@HEAD_PREDICTS_SETTINGS
def test_a_head_that_predicts_gets_accepted(bigram, kwargs):
    model, head = bigram
    check_head_predicts(Engine(model=str(model), speculative_config=eagle_spec(head, k=4), **{**COMMON, **kwargs}))


# ---- the features it is fed ------------------------------------------------------------------------
def test_features_are_the_targets_hidden_states(bigram):
    """Every position the head runs at in a step's forward reads (h_p, token p + 1), h from HF
    transformers over the final sequence; every position but the last is covered; each proposal
    starts at position L - 2 from h_(L-2) and token L - 1, also after verifying steps that kept
    proposals (the bigram head's are kept). Chunked prefill, decodes and verifying steps."""
    from transformers import AutoModelForCausalLM

    from vllm_engine.spec_decode.eagle import EagleProposer

    model, head = bigram
    engine = Engine(model=str(model), speculative_config=eagle_spec(head), block_size=4,
                    max_num_batched_tokens=8, max_num_seqs=2, **COMMON)
    proposer = engine.model_runner.drafter
    joint, first = [], []
    run_head, first_hidden = EagleProposer._run_head, EagleProposer._first_hidden

    def record_run(self, inputs, hidden, states, *args):
        # The head's inputs as given to its forward, eager or a CUDA graph's replay alike.
        forward = self._run

        def spy(input_ids, positions, meta, feats):
            joint.append((positions.tolist(), input_ids.tolist(), feats.float().cpu().clone()))
            return forward(input_ids, positions, meta, feats)

        self._run = spy
        try:
            return run_head(self, inputs, hidden, states, *args)
        finally:
            del self._run

    def record_first(self, props, ctx):
        h = first_hidden(self, props, ctx)
        first.append(([(st.num_computed_tokens, st.token_ids[st.num_computed_tokens]) for st in props],
                      ctx.pos0.copy(), h.float().cpu().clone(), ctx.no_first_write.copy()))
        return h

    proposer._run_head = record_run.__get__(proposer)
    proposer._first_hidden = record_first.__get__(proposer)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    out = engine.generate(PROMPTS[0], params, use_tqdm=False)
    assert engine.get_stats().spec_decode.acceptance_rate > 0.9
    seq = out.prompt_token_ids + out.outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        h = hf.model(torch.tensor([seq])).last_hidden_state[0]
    tol = 1e-4 if engine.model_runner.device.type == "cpu" else 5e-3  # Triton's float32 dots may use TF32
    covered = set()
    for positions, ids, feats in joint:
        for p, t, f in zip(positions, ids, feats):
            if seq[p + 1] != t:
                continue  # a rejected proposal's row (its next step runs this position again)
            torch.testing.assert_close(f, h[p], rtol=tol, atol=tol)
            covered.add(p)
    assert covered >= set(range(len(seq) - 3))
    assert len(first) > 3
    for props, pos0, feats, skipped in first:
        for (computed, token), p, f, skip in zip(props, pos0, feats, skipped):
            assert (token, p, skip) == (seq[computed], computed - 1, False)
            torch.testing.assert_close(f, h[computed - 1], rtol=tol, atol=tol)
    engine.proposer = None
    assert out.outputs[0].token_ids == engine.generate(PROMPTS[0], params, use_tqdm=False).outputs[0].token_ids
    check_engine_state(engine)


# ---- the engine ------------------------------------------------------------------------------------
@HEAD_SETTINGS
def test_greedy_tokens_equal_plain_decoding(target, head, baseline, kwargs):
    engine = Engine(model=str(target), speculative_config=eagle_spec(head), **{**COMMON, **kwargs})
    check_lossless(engine, baseline, kwargs)


def test_prefix_cache_second_round(bigram):
    """Prompts that hit blocks cached in a first round start the head from positions whose
    features it never saw in this request: outputs unchanged, proposals still mostly kept."""
    model, head = bigram
    check_second_round(Engine(model=str(model), speculative_config=eagle_spec(head), block_size=4, **COMMON))


def check_second_round(engine: Engine) -> None:
    """``engine`` (a predicting head, block size 4) reruns two prompts extended by their outputs: they
    hit the prefix cache, over 90% of the new proposals are kept, and the outputs equal the same
    engine's plain decoding."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    first = engine.generate(PROMPTS[:2], params, use_tqdm=False)
    second = [{"prompt_token_ids": o.prompt_token_ids + o.outputs[0].token_ids} for o in first]
    before = engine.get_stats().spec_decode
    got = engine.generate(second, params, use_tqdm=False)
    assert all(o.num_cached_tokens > 20 for o in got)
    after = engine.get_stats().spec_decode
    assert after.num_accepted_tokens - before.num_accepted_tokens > \
        0.9 * (after.num_draft_tokens - before.num_draft_tokens) > 0
    engine.proposer = None
    assert token_ids(got) == token_ids(engine.generate(second, params, use_tqdm=False))
    check_engine_state(engine)


def test_bad_heads_name_the_field(target, target_cfg, tmp_path):
    from vllm_engine.config import EngineArgs

    two_layers = tmp_path / "two"
    save_head(two_layers, target_cfg, head_tensors(target_cfg))
    (two_layers / "config.json").write_text(json.dumps(dict(target_cfg, num_hidden_layers=2)))
    wide = tmp_path / "wide"
    save_head(wide, dict(target_cfg, hidden_size=96), {})
    incomplete = tmp_path / "incomplete"
    tensors = head_tensors(target_cfg)
    del tensors["layers.0.mlp.up_proj.weight"]
    save_head(incomplete, target_cfg, tensors)
    for path, match in ((two_layers, "one"), (wide, "hidden_size"), (tmp_path / "none", "cannot be loaded")):
        with pytest.raises(ValueError, match=rf"speculative_config\.model .*{match}"):
            EngineArgs(model=str(target), speculative_config=eagle_spec(path)).create_engine_config()
    with pytest.raises(ValueError, match=r"speculative_config\.model.*up_proj"):
        Engine(model=str(target), speculative_config=eagle_spec(incomplete), **COMMON)
