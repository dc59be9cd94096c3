"""EAGLE-3 heads (spec_decode/eagle3.py) on an 8-layer tiny Llama target: the target's auxiliary
hidden states against HF transformers' ``output_hidden_states``; every proposal of a random head in
the published layout (draft vocabulary smaller than the target's, a non-trivial d2t) against a
float64 reference of the head's definition fed HF's hidden states; a head that can predict (a
bigram target) gets its proposals accepted; greedy tokens equal plain decoding through chunked
prefill, preemption, prefix caching and async scheduling; bad heads name the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.spec_decode.test_engine_spec import GPU_POOL, HEAD_SETTINGS, PROMPTS, check_engine_state, check_lossless, \
    token_ids
from tests.spec_decode.test_eagle import HEAD_PREDICTS_SETTINGS, check_head_predicts, reference_attention, \
    transparent_copy
from tests.spec_decode.test_eagle import check_second_round
from tests.spec_decode.test_eagle import save_head as save_eagle_head
from vllm_engine import Engine, SamplingParams

COMMON = dict(dtype="float32", max_model_len=256, seed=0, **GPU_POOL)
NUM_LAYERS = 8  # vLLM's default auxiliary layers: (2, 4, 5)


def eagle3_spec(head, k: int = 3) -> dict:
    return {"method": "eagle3", "model": str(head), "num_speculative_tokens": k, "adaptive": False}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random Llama of 8 layers with the tiny tokenizer (vocab 320)."""
    from tests.conftest import build_tiny_tokenizer, save_random_hf_model, tiny_config

    out = tmp_path_factory.mktemp("eagle3-target")
    tok = build_tiny_tokenizer(out)
    config = tiny_config("llama", len(tok), tok.bos_token_id, tok.eos_token_id)
    config.num_hidden_layers = NUM_LAYERS
    save_random_hf_model(config, out, seed=5)
    return out


@pytest.fixture(scope="module")
def target_cfg(target):
    return json.loads((target / "config.json").read_text())


@pytest.fixture(scope="module")
def hf_target(target):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()


def draft_ids(vocab: int, draft_vocab: int, seed: int) -> torch.Tensor:
    """A sorted random subset of the target ids: the draft vocabulary (as published heads' d2t)."""
    return torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values


def head_tensors(cfg: dict, ids: torch.Tensor, seed: int = 3, own_embed: bool = False) -> dict[str, torch.Tensor]:
    """An EAGLE-3 head's tensors under their published names, random; ``ids``: the target id of
    each draft id (d2t = ids - arange)."""
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, Vd = H // nh, ids.numel()
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    t = {"fc.weight": r(H, 3 * H), "midlayer.input_layernorm.weight": 1 + r(H), "midlayer.hidden_norm.weight": 1 + r(H),
         "midlayer.self_attn.q_proj.weight": r(nh * hd, 2 * H), "midlayer.self_attn.k_proj.weight": r(nkv * hd, 2 * H),
         "midlayer.self_attn.v_proj.weight": r(nkv * hd, 2 * H), "midlayer.self_attn.o_proj.weight": r(H, nh * hd),
         "midlayer.post_attention_layernorm.weight": 1 + r(H), "midlayer.mlp.gate_proj.weight": r(inter, H),
         "midlayer.mlp.up_proj.weight": r(inter, H), "midlayer.mlp.down_proj.weight": r(H, inter),
         "norm.weight": 1 + r(H), "lm_head.weight": r(Vd, H, scale=0.5), "d2t": ids - torch.arange(Vd), "t2d": t2d}
    if own_embed:
        t["embed_tokens.weight"] = r(V, H)
    return t


def save_head(out, cfg: dict, tensors: dict, as_bin: bool = False, **fields):
    """The head's directory: the target's config with one layer, the EAGLE-3 architecture,
    ``draft_vocab_size`` from lm_head (and ``fields``), and its tensors."""
    draft_vocab = tensors["lm_head.weight"].shape[0] if "lm_head.weight" in tensors else cfg["vocab_size"]
    return save_eagle_head(out, cfg, tensors, as_bin,
                           **{"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": draft_vocab, **fields})


@pytest.fixture(scope="module")
def head(target_cfg, tmp_path_factory):
    ids = draft_ids(target_cfg["vocab_size"], 200, seed=1)
    return save_head(tmp_path_factory.mktemp("eagle3"), target_cfg, head_tensors(target_cfg, ids))


@pytest.fixture(scope="module")
def baseline(target):
    return Engine(model=str(target), **COMMON)


# ---- the target's auxiliary hidden states ----------------------------------------------------------
def test_target_keeps_the_residual_stream_entering_the_chosen_layers(target, target_cfg, head, hf_target):
    """The buffer rows of a forward = HF's output_hidden_states[i] (i = 2, 4, 5: the residual stream
    entering layer i) for each token; the final hidden states are the plain model's, and the plain
    model (no EAGLE-3) keeps nothing."""
    from tests.conftest import paged_metadata

    engine = Engine(model=str(target), speculative_config=eagle3_spec(head), device="cpu", **COMMON)
    model, plain = engine.model_runner.model, Engine(model=str(target), device="cpu", **COMMON).model_runner.model
    assert engine.model_runner.drafter.aux_layer_ids == (2, 4, 5)
    assert plain.base_model.aux_hidden is None
    ids = [1, 17, 3, 99, 42, 7, 250, 11, 64, 5]
    H, nkv, hd = target_cfg["hidden_size"], target_cfg["num_key_value_heads"], 16
    outs = []
    for m in (model, plain):
        caches = [torch.zeros(2, 8, 4, nkv, hd) for _ in range(NUM_LAYERS)]
        with torch.no_grad():
            outs.append(m(torch.tensor(ids), torch.arange(len(ids)), caches, paged_metadata([0], [len(ids)],
                                                                                            [list(range(8))])))
    with torch.no_grad():
        hs = hf_target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    aux = model.base_model.aux_hidden[: len(ids)]
    for j, layer in enumerate((2, 4, 5)):
        torch.testing.assert_close(aux[:, j * H: (j + 1) * H], hs[layer][0], rtol=1e-5, atol=1e-5)
    assert model.base_model.aux_hidden[len(ids):].abs().sum() == 0  # rows past the forward's tokens untouched
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


# ---- every proposal against the head's definition ---------------------------------------------------
def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference_layer(d: dict, cfg: dict, embeds: torch.Tensor, feats: torch.Tensor, norm_before_residual: bool
                    ) -> torch.Tensor:
    """The head's output g over one sequence from position 0, float64 (module docstring of eagle3.py):
    x = [rmsnorm(e); rmsnorm(h)] -> causal rope GQA attention -> + residual -> + mlp(rmsnorm(.))."""
    eps = cfg["rms_norm_eps"]
    normed = rms(feats, d["midlayer.hidden_norm.weight"], eps)
    x = torch.cat([rms(embeds, d["midlayer.input_layernorm.weight"], eps), normed], dim=-1)
    attn = reference_attention(x, d, "midlayer.self_attn.", cfg)
    r = attn @ d["midlayer.self_attn.o_proj.weight"].T + (normed if norm_before_residual else feats)
    n = rms(r, d["midlayer.post_attention_layernorm.weight"], eps)
    gate, up = n @ d["midlayer.mlp.gate_proj.weight"].T, n @ d["midlayer.mlp.up_proj.weight"].T
    return r + (torch.nn.functional.silu(gate) * up) @ d["midlayer.mlp.down_proj.weight"].T


def reference_drafts(t: dict, cfg: dict, embed: torch.Tensor, hidden_states, aux: tuple[int, ...],
                     tokens: list[int], k: int, norm_before_residual: bool
                     ) -> tuple[list[int], torch.Tensor, list[float]]:
    """The head's k greedy drafts after ``tokens`` (L of them), float64, its output g of each
    drafting row and the gap between the two largest logits of each: rows p = 0 .. L - 2 read
    (fc([a_i(p) for i in aux]), token p + 1), a_i from HF's ``hidden_states`` of the target; row
    L - 1 + j reads (g of the row before, draft j); each draft is the argmax of lm_head(norm(g))
    over the draft vocabulary, as target id (+ d2t)."""
    d = {name: x.double() for name, x in t.items() if x.is_floating_point()}
    L = len(tokens)
    feats = torch.cat([hidden_states[i][0, : L - 1].double() for i in aux], dim=-1) @ d["fc.weight"].T
    ids = list(tokens[1:])
    drafts, gs, gaps = [], [], []
    for _ in range(k):
        g = reference_layer(d, cfg, embed.double()[ids], feats, norm_before_residual)[-1]
        logits = rms(g, d["norm.weight"], cfg["rms_norm_eps"]) @ d["lm_head.weight"].T
        best = int(logits.argmax())
        top2 = logits.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        drafts.append(best + int(t["d2t"][best]))
        gs.append(g)
        feats, ids = torch.cat([feats, g[None]]), ids + [drafts[-1]]
    return drafts, torch.stack(gs), gaps


def record_proposals(proposer) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """(the request's known tokens, its drafts, the head's outputs g that gave them) of every
    ``propose`` call from now on (one request at a time)."""
    records = []
    propose, compute_logits = proposer.propose, proposer.model.compute_logits

    def spy(states, spec, host_tables, seeded):
        outputs = []
        proposer.model.compute_logits = lambda g: (outputs.append(g[0].double().cpu()), compute_logits(g))[1]
        try:
            drafts, probs = propose(states, spec, host_tables, seeded)
        finally:
            del proposer.model.compute_logits
        for st in states:
            if st.req_id in drafts:
                records.append((list(st.token_ids[: st.num_computed_tokens + 1]), drafts[st.req_id],
                                torch.stack(outputs)))
        return drafts, probs

    proposer.propose = spy
    return records


@pytest.mark.parametrize("case", ["default", "own-embedding-layers-0-3-7-norm-before-residual-bin"])
def test_proposals_match_the_heads_definition(target, target_cfg, hf_target, tmp_path, case):
    """Every proposal (chunked prefill, decodes, verifying steps) against ``reference_drafts`` over
    the request's tokens at that moment: the same target ids and outputs g within 1e-4. The head's
    K/V of earlier positions come from the steps' forwards, so their features (fc of the aux
    states) are checked too. (On a GPU, float32 dots may be TF32: looser, and each request's drafts
    compared up to the first whose reference logits are within 0.05 of a tie.)"""
    ids = draft_ids(target_cfg["vocab_size"], 150, seed=2)
    default = case == "default"
    tensors = head_tensors(target_cfg, ids, seed=7, own_embed=not default)
    aux = (2, 4, 5) if default else (0, 3, 7)
    fields = {} if default else {"eagle_aux_hidden_state_layer_ids": list(aux), "norm_before_residual": True}
    path = save_head(tmp_path / "head", target_cfg, tensors, as_bin=not default, **fields)
    engine = Engine(model=str(target), speculative_config=eagle3_spec(path), block_size=4, max_num_batched_tokens=8,
                    max_num_seqs=2, **COMMON)
    records = record_proposals(engine.model_runner.drafter)
    engine.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    embed = tensors.get("embed_tokens.weight")
    if embed is None:
        embed = load_file(str(next(target.glob("*.safetensors"))))["model.embed_tokens.weight"]
    cpu = engine.model_runner.device.type == "cpu"
    tol, near_tie = (1e-4, 0.0) if cpu else (5e-3, 0.05)
    assert len(records) >= 5
    for tokens, drafts, outputs in records:
        with torch.no_grad():
            hidden_states = hf_target.model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        want, gs, gaps = reference_drafts(tensors, target_cfg, embed, hidden_states, aux, tokens, len(drafts),
                                          norm_before_residual=not default)
        m = next((j for j, gap in enumerate(gaps) if gap < near_tie), len(drafts))
        assert drafts[:m] == want[:m]
        torch.testing.assert_close(outputs[: m + 1], gs[: m + 1], rtol=tol, atol=tol)
    assert any(d not in range(150) for _, drafts, _ in records for d in drafts)  # target ids, not draft ids


# ---- a head that can predict -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bigram(target, target_cfg, tmp_path_factory):
    """A target whose layers add nothing (o_proj, down_proj zero) and whose final norm has unit gain:
    its next token after t is f(t) = argmax lm_head(rmsnorm(e(t))), and every auxiliary state at
    position p is e(t_p). A head with fc = [I 0 0] and a layer that adds nothing outputs g = e(t_p);
    its LM head, one row per token of the image of f o f (the draft vocabulary, smaller than the
    target's), is the sum of rmsnorm(e(t)) over the t it should answer: it predicts t_(p+2) =
    f(f(t_p)) from position p (for all but a few tokens, counted here), if it reads the right
    auxiliary states at the right positions and maps its ids back to the target's."""
    out = tmp_path_factory.mktemp("eagle3-bigram")
    tensors = transparent_copy(target, out)
    eps = target_cfg["rms_norm_eps"]
    e = rms(tensors["model.embed_tokens.weight"].double(), 1.0, eps)
    f = (e @ tensors["lm_head.weight"].double().T).argmax(-1)
    ff = f[f]
    ids = ff.unique().sort().values
    H = target_cfg["hidden_size"]
    head = head_tensors(target_cfg, ids)
    head["fc.weight"] = torch.cat([torch.eye(H), torch.zeros(H, 2 * H)], dim=1)
    head["norm.weight"] = torch.ones(H)
    for name in ("midlayer.self_attn.o_proj.weight", "midlayer.mlp.down_proj.weight"):
        head[name] = torch.zeros_like(head[name])
    rows = torch.zeros(ids.numel(), H, dtype=torch.float64)
    rows.index_add_(0, torch.searchsorted(ids, ff), e)
    head["lm_head.weight"] = rows.float()
    predicted = ids[(e @ rows.T).argmax(-1)]
    assert ids.numel() < target_cfg["vocab_size"] and (predicted == ff).double().mean() > 0.8
    return out, save_head(tmp_path_factory.mktemp("eagle3-bigram-head"), target_cfg, head)


@HEAD_PREDICTS_SETTINGS
def test_a_head_that_predicts_gets_accepted(bigram, kwargs):
    """One proposal a step (the head's own output g = e(t_p) does not predict further): nearly all
    kept, and the outputs are plain decoding's."""
    model, head = bigram
    check_head_predicts(Engine(model=str(model), speculative_config=eagle3_spec(head, k=1), **{**COMMON, **kwargs}))


# ---- the engine ------------------------------------------------------------------------------------
@HEAD_SETTINGS
def test_greedy_tokens_equal_plain_decoding(target, head, baseline, kwargs):
    engine = Engine(model=str(target), speculative_config=eagle3_spec(head), **{**COMMON, **kwargs})
    check_lossless(engine, baseline, kwargs)


def test_prefix_cache_second_round(bigram):
    """Prompts that hit blocks cached in a first round: outputs unchanged, proposals still mostly kept."""
    model, head = bigram
    check_second_round(Engine(model=str(model), speculative_config=eagle3_spec(head, k=1), block_size=4, **COMMON))


def test_dummy_weights(target, head):
    """A target with dummy weights gets a dummy head (its d2t zero: the first draft_vocab_size ids)."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine = Engine(model=str(target), load_format="dummy", speculative_config=eagle3_spec(head), **COMMON)
    plain = Engine(model=str(target), load_format="dummy", **COMMON)
    assert token_ids(engine.generate(PROMPTS[:2], params, use_tqdm=False)) == \
        token_ids(plain.generate(PROMPTS[:2], params, use_tqdm=False))
    assert engine.get_stats().spec_decode.num_draft_tokens > 0
    check_engine_state(engine)


# ---- bad heads -------------------------------------------------------------------------------------
def test_bad_heads_name_the_field(target, target_cfg, tmp_path):
    from vllm_engine.config import EngineArgs

    ids = draft_ids(target_cfg["vocab_size"], 100, seed=3)
    H = target_cfg["hidden_size"]

    def variant(name, change=None, **fields):
        tensors = head_tensors(target_cfg, ids)
        if change is not None:
            change(tensors)
        return save_head(tmp_path / name, target_cfg, tensors, **fields)

    at_config = [
        (variant("two", num_hidden_layers=2), "num_hidden_layers 2"),
        (variant("wide", hidden_size=96), "hidden_size 96"),
        (variant("target-width", target_hidden_size=32), "target_hidden_size 32"),
        (variant("big-draft-vocab", draft_vocab_size=10_000), "draft_vocab_size 10000"),
        (variant("aux-8", eagle_aux_hidden_state_layer_ids=[1, 4, 8]), "eagle_aux_hidden_state_layer_ids"),
        (tmp_path / "none", "cannot be loaded"),
    ]
    for path, match in at_config:
        with pytest.raises(ValueError, match=rf"speculative_config\.model .*{match}"):
            EngineArgs(model=str(target), speculative_config=eagle3_spec(path)).create_engine_config()
    at_load = [
        (variant("fc-2h", lambda t: t.update({"fc.weight": torch.zeros(H, 2 * H)})), r"fc\.weight .*\[64, 192\]"),
        (variant("no-d2t", lambda t: t.pop("d2t")), "lacks d2t"),
        (variant("d2t-length", lambda t: t.update({"d2t": t["d2t"][:-1]})), "d2t has shape"),
        (variant("d2t-range", lambda t: t.update({"d2t": t["d2t"] + 1000})), "d2t maps"),
        (variant("no-hidden-norm", lambda t: t.pop("midlayer.hidden_norm.weight")), "hidden_norm"),
    ]
    for path, match in at_load:
        with pytest.raises(ValueError, match=rf"speculative_config\.model.*{match}"):
            Engine(model=str(target), speculative_config=eagle3_spec(path), **COMMON)
