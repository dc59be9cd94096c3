"""Speculative decoding with a tensor-parallel target (tp = 2, worker processes, gloo on the CPU): a
draft model and EAGLE-1 / EAGLE-3 heads run sharded on the target's ranks.

- greedy tokens equal plain decoding at tp = 1 and tp = 2, through chunked prefill, preemption and
  async scheduling, with proposals both kept and rejected; the block pool is whole afterwards;
- heads that can predict (the bigram targets of test_eagle.py / test_eagle3.py) keep > 98% of their
  proposals at tp = 2: each rank's head reads the whole feature (and auxiliary states), not a shard;
- every rank proposes the same tokens and keeps the same ones: the step messages of a one-rank
  engine replayed on two ranks (greedy, seeded and unseeded sampled requests) give each rank the
  one-rank engine's proposals and tokens, step for step;
- what is not served is a ValueError naming the field (draft_tensor_parallel_size other than the
  target's, a draft whose heads do not split, pipeline parallelism).
"""

from __future__ import annotations

import os
import pickle
import sys
from collections import deque
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.spec_decode.test_draft_model import near_draft  # noqa: F401 - fixture (over this module's target)
from tests.spec_decode.test_eagle import bigram as eagle_bigram  # noqa: F401 - fixture
from tests.spec_decode.test_eagle3 import bigram as eagle3_bigram  # noqa: F401 - fixture
from tests.spec_decode.test_eagle3 import head as eagle3_head  # noqa: F401 - fixture
from tests.spec_decode.test_eagle3 import target, target_cfg  # noqa: F401 - fixtures: an 8-layer tiny Llama
from tests.spec_decode.test_engine_spec import PARAMS, PROMPTS, check_engine_state, token_ids
from vllm_engine import Engine, SamplingParams

K = 3
COMMON = dict(dtype="float32", max_model_len=256, seed=0, device="cpu")
ALL_PROMPTS = PROMPTS + [PROMPTS[0]]


def spec(method: str, model, k: int = K) -> dict:
    # adaptive off: every step proposes, so the counts below do not depend on this machine's timings.
    return {"method": method, "model": str(model), "num_speculative_tokens": k, "adaptive": False}


def run(model, tp: int, params=PARAMS, prompts=ALL_PROMPTS, **kwargs):
    """(outputs, spec-decode stats) of an engine at ``tp``, its block pool checked, then shut down."""
    engine = Engine(model=str(model), tensor_parallel_size=tp, **{**COMMON, **kwargs})
    try:
        outs = engine.generate(prompts, params, use_tqdm=False)
        stats = engine.get_stats()
        check_engine_state(engine)
    finally:
        engine.shutdown()
    return outs, stats


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This process's engines on one thread, as each worker rank is on a 2-core machine: their tiny
    matrices gain nothing from a second OpenMP thread, which only waits for a core while the ranks
    or another test run hold them (10-100x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain(target):
    """Plain greedy decoding of the prompts at tp = 1."""
    return run(target, 1)[0]


# ---- greedy = plain decoding --------------------------------------------------------------------------
SCENARIOS = {
    "default": {},
    # Chunked prefill (proposals cut by the budget) and recompute preemption, async scheduling.
    "async-chunked-preempt": {"async_scheduling": True, "num_gpu_blocks_override": 40, "block_size": 4,
                              "max_num_batched_tokens": 16, "max_num_seqs": 4, "enable_prefix_caching": False},
}


def test_draft_model_greedy_equals_plain_tp1_and_tp2(target, near_draft, plain):  # noqa: F811
    got, stats = run(target, 2, speculative_config=spec("draft_model", near_draft))
    assert token_ids(got) == token_ids(plain)
    assert token_ids(run(target, 2)[0]) == token_ids(plain)  # plain tp = 2
    for a, b in zip(got[1].outputs[0].logprobs, plain[1].outputs[0].logprobs):  # the target's logprobs
        assert a.keys() == b.keys()
        assert [a[t].logprob for t in a] == pytest.approx([b[t].logprob for t in b], abs=1e-4)
    sd = stats.spec_decode
    assert 0 < sd.num_accepted_tokens < sd.num_draft_tokens, sd  # kept and rejected: rollback ran


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "default"])
def test_draft_model_greedy_under_chunking_and_preemption(target, near_draft, plain, name):  # noqa: F811
    got, stats = run(target, 2, speculative_config=spec("draft_model", near_draft), **SCENARIOS[name])
    assert token_ids(got) == token_ids(plain)
    assert 0 < stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens
    assert stats.num_preemptions_total > 0


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_eagle3_head_greedy_equals_plain(target, eagle3_head, plain, name):  # noqa: F811
    got, stats = run(target, 2, speculative_config=spec("eagle3", eagle3_head), **SCENARIOS[name])
    assert token_ids(got) == token_ids(plain)
    assert stats.spec_decode.num_draft_tokens > 0


# ---- heads that predict --------------------------------------------------------------------------------
@pytest.mark.parametrize("method, k", [("eagle", 4), ("eagle3", 1)])
def test_a_head_that_predicts_gets_accepted(eagle_bigram, eagle3_bigram, method, k):  # noqa: F811
    """The bigram heads of test_eagle.py / test_eagle3.py (EAGLE-1 chunked): their proposals are right
    only if each rank's head reads the target's whole features at the right positions."""
    model, head = eagle_bigram if method == "eagle" else eagle3_bigram
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    chunked = dict(max_num_batched_tokens=8, max_num_seqs=2, block_size=4) if method == "eagle" else {}
    got, stats = run(model, 2, params, PROMPTS[:3], speculative_config=spec(method, head, k), **chunked)
    sd = stats.spec_decode
    assert sd.num_draft_tokens > 20 and sd.acceptance_rate > 0.98, sd
    assert token_ids(got) == token_ids(run(model, 1, params, PROMPTS[:3])[0])


# ---- every rank proposes and keeps the same tokens -------------------------------------------------------
REPLAY_KWARGS = dict(COMMON, block_size=4, num_gpu_blocks_override=64, max_num_batched_tokens=32, max_num_seqs=4)
REPLAY_PARAMS = [SamplingParams(temperature=0.0, max_tokens=12),
                 SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12),
                 SamplingParams(temperature=1.0, max_tokens=12, repetition_penalty=1.2)]  # global generators


def _recording(engine: Engine) -> tuple[list, list]:
    """Wraps the engine's executor and drafter: (every launch's pickled step message and every
    collect, in order; each proposal as (request id -> drafts))."""
    events, proposals = [], []
    ex, drafter = engine.executor, engine.model_runner.drafter
    launch, collect, propose = ex.launch, ex.collect, drafter.propose

    def on_launch(request):
        events.append(("launch", pickle.dumps(request)))
        return launch(request)

    def on_collect(handle):
        out = collect(handle)
        events.append(("collect", out.sampled_token_ids))
        return out

    def on_propose(*args, **kwargs):
        drafts, probs = propose(*args, **kwargs)
        proposals.append(dict(drafts))
        return drafts, probs

    ex.launch, ex.collect, drafter.propose = on_launch, on_collect, on_propose
    return events, proposals


def _replay_rank(rank: int, init_file: str, model: str, speculative: dict, blocks: tuple[int, int], events: list,
                 out_dir: str) -> None:
    """Rank ``rank`` of tp = 2: a Worker carrying out the recorded steps; writes (its proposals, the
    sampled tokens of each collect) to ``out_dir``/rank<rank>.pkl."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from vllm_engine.config import EngineArgs
    from vllm_engine.worker.worker import Worker

    config = EngineArgs(model=model, tensor_parallel_size=2, speculative_config=speculative,
                        **REPLAY_KWARGS).create_engine_config()
    worker = Worker(config, rank, local_rank=rank, distributed_init_method=f"file://{init_file}")
    worker.initialize_cache(*blocks)
    drafter, proposals = worker.model_runner.drafter, []
    propose = drafter.propose

    def on_propose(*args, **kwargs):
        drafts, probs = propose(*args, **kwargs)
        proposals.append(dict(drafts))
        return drafts, probs

    drafter.propose = on_propose
    handles, sampled = deque(), []
    for kind, payload in events:
        if kind == "launch":
            handles.append(worker.launch(pickle.loads(payload)))
        else:
            sampled.append(worker.collect(handles.popleft()).sampled_token_ids)
    (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps((proposals, sampled)))
    worker.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/distributed/test_tp_model.py: no interpreter teardown after gloo work


@pytest.fixture(scope="module")
def eagle3_own_embedding(target_cfg, tmp_path_factory):  # noqa: F811
    """An EAGLE-3 head with its own embedding (sharded over the vocabulary at tp = 2), a draft
    vocabulary of 150 (its LM head sharded too) and norm_before_residual."""
    from tests.spec_decode.test_eagle3 import draft_ids, head_tensors, save_head

    ids = draft_ids(target_cfg["vocab_size"], 150, seed=2)
    return save_head(tmp_path_factory.mktemp("eagle3-own-embed"), target_cfg,
                     head_tensors(target_cfg, ids, seed=6, own_embed=True), norm_before_residual=True)


@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_every_rank_proposes_and_keeps_the_same_tokens(target, near_draft, eagle3_own_embedding, tmp_path,  # noqa: F811
                                                       method):
    """Each rank's proposals and tokens are the one-rank engine's: the sharded draft (or head)
    computes what the whole one does, and the ranks agree (a rank that drafted differently would
    keep other tokens, and its request states would part from the others')."""
    draft = near_draft if method == "draft_model" else eagle3_own_embedding
    speculative = spec(method, draft)
    engine = Engine(model=str(target), speculative_config=speculative, **REPLAY_KWARGS)
    events, proposals = _recording(engine)
    engine.generate(ALL_PROMPTS[:3], REPLAY_PARAMS, use_tqdm=False)
    blocks = (engine.num_gpu_blocks, engine.num_cpu_blocks)
    mp.spawn(_replay_rank, args=(str(tmp_path / "init"), str(target), speculative, blocks, events, str(tmp_path)),
             nprocs=2, join=True)
    sampled = [tokens for kind, tokens in events if kind == "collect"]
    num_drafts = sum(len(d) for p in proposals for d in p.values())
    assert num_drafts > 15
    # The near draft's proposals are kept at times (the random head's hardly ever: its kept features
    # at tp = 2 are the bigram test's).
    assert any(len(t) > 1 for s in sampled for t in s) or method == "eagle3"
    for rank in (0, 1):
        got_proposals, got_sampled = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert got_proposals == proposals, rank
        assert got_sampled == sampled, rank


# ---- what is not served ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec_extra, kwargs, match", [
    ({"draft_tensor_parallel_size": 1}, {"tensor_parallel_size": 2}, r"speculative_config\.draft_tensor_parallel_size"),
    ({"draft_tensor_parallel_size": 4}, {"tensor_parallel_size": 2}, r"speculative_config\.draft_tensor_parallel_size"),
    ({"draft_tensor_parallel_size": 2}, {}, r"speculative_config\.draft_tensor_parallel_size"),
    ({}, {"pipeline_parallel_size": 2}, "pipeline_parallel_size"),
    ({}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, "pipeline_parallel_size"),
])
@pytest.mark.parametrize("method", ["draft_model", "eagle", "eagle3"])
def test_refused_layouts_name_the_field(target, near_draft, eagle_bigram, eagle3_head, method,  # noqa: F811
                                        spec_extra, kwargs, match):
    from vllm_engine.config import EngineArgs

    draft = {"draft_model": near_draft, "eagle": eagle_bigram[1], "eagle3": eagle3_head}[method]
    with pytest.raises(ValueError, match=match):
        EngineArgs(model=str(target), speculative_config={**spec(method, draft), **spec_extra},
                   **COMMON, **kwargs).create_engine_config()


def test_accepted_layouts(target, near_draft):  # noqa: F811
    from vllm_engine.config import EngineArgs

    for draft_tp in (None, 2):
        extra = {} if draft_tp is None else {"draft_tensor_parallel_size": draft_tp}
        config = EngineArgs(model=str(target), tensor_parallel_size=2, **COMMON,
                            speculative_config={**spec("draft_model", near_draft), **extra}).create_engine_config()
        assert config.speculative.draft_model_config is not None


def test_draft_whose_heads_do_not_split(target, tmp_path):  # noqa: F811
    """A draft of 3 attention heads cannot be sharded over 2 ranks: named at configuration, not in a worker."""
    import json

    from tests.conftest import build_tiny_tokenizer, save_random_hf_model, tiny_config

    tok = build_tiny_tokenizer(tmp_path)
    config = tiny_config("llama", len(tok), tok.bos_token_id, tok.eos_token_id)
    config.update(dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=3,
                       intermediate_size=64))
    save_random_hf_model(config, tmp_path, seed=5)
    assert json.loads((tmp_path / "config.json").read_text())["num_attention_heads"] == 3
    from vllm_engine.config import EngineArgs

    with pytest.raises(ValueError, match=r"speculative_config\.model: .*3 attention heads"):
        EngineArgs(model=str(target), tensor_parallel_size=2, speculative_config=spec("draft_model", tmp_path),
                   **COMMON).create_engine_config()
    EngineArgs(model=str(target), speculative_config=spec("draft_model", tmp_path), **COMMON).create_engine_config()

