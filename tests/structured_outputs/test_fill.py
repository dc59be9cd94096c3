"""The per-step grammar path (WorkerGrammars.fill: BatchFiller, the stop-token rows, the staged rows)
against xgrammar's own single matchers, each fed the same tokens and asked for its mask alone; and the
bitmask applied to every row at once against a reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vllm_engine.engine.request import PLACEHOLDER_TOKEN_ID
from vllm_engine.sampling_params import SamplingParams, StructuredOutputsParams
from vllm_engine.structured_output.bitmask import apply_token_bitmask, bitmask_width

from .schemas import SCHEMAS

OPEN = {"type": "object", "properties": {"id": {"type": "integer"}, "text": {"type": "string", "maxLength": 40}},
        "required": ["id", "text"], "additionalProperties": False}
SPECS = [StructuredOutputsParams(json=OPEN), StructuredOutputsParams(regex="(abc|abd)[0-9]{2}"),
         StructuredOutputsParams(choice=["yes", "no", "maybe"]), None,  # None: an unconstrained request
         *(StructuredOutputsParams(json=s) for _, s, _ in SCHEMAS[::6])]


class Meta:
    grammar_bitmask = grammar_rows = None


class Request:
    """One request of the replay: its worker state, and its own xgrammar matcher as the reference."""

    def __init__(self, rid: str, spec, manager, length: int) -> None:
        import xgrammar as xgr

        from vllm_engine.worker.request_states import CachedRequestState

        self.state = CachedRequestState(rid, [1], SamplingParams(structured_outputs=spec), 0, frozenset(), 1)
        self.reference = xgr.GrammarMatcher(manager.compile(spec)) if spec is not None else None
        self.length = length  # output tokens before it leaves (it ignores EOS)
        self.pending = PLACEHOLDER_TOKEN_ID  # its last token while that is still "on the device"

    def reference_row(self, width: int, stops: list[int]) -> np.ndarray:
        row = np.zeros((1, width), dtype=np.int32)
        if self.reference.is_terminated():  # only the stop tokens, set bit by bit
            for t in stops:
                row.view(np.uint32)[0, t // 32] |= np.uint32(1 << (t % 32))
        else:
            self.reference.fill_next_token_bitmask(row, 0)
        return row[0]

    def take(self, token: int) -> None:
        if self.reference is not None and not self.reference.is_terminated():
            assert self.reference.accept_token(token)


def allowed_tokens(row: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab])


@pytest.mark.parametrize("parts", [1, 3])
def test_step_masks_match_single_matchers(smollm2_gguf, parts):
    """300 steps of a batch of up to 10 requests of 7 constraints (and unconstrained ones) that join
    and leave, some joining with outputs already (several tokens to take in at once, as after
    preemption), tokens drawn at random from each row's reference mask and first written as
    placeholders (async scheduling); grammars terminate and run on with EOS. Every step's staged
    rows and masks equal the reference matchers'."""
    pytest.importorskip("xgrammar")
    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager
    from vllm_engine.structured_output.manager import BatchFiller
    from vllm_engine.structured_output.worker import WorkerGrammars
    from vllm_engine.worker.staging import HostStaging

    tok = get_tokenizer(str(smollm2_gguf))
    vocab, eos = len(tok), tok.eos_token_id
    manager = StructuredOutputManager(tok, vocab, [eos])
    width = manager.bitmask_width
    grammars = WorkerGrammars(None, manager, BatchFiller(max_parts=parts, rows_per_part=2))
    staging = HostStaging(torch.device("cpu"))
    rng = np.random.default_rng(parts)
    active: list[Request] = []
    joined = terminated = multi = reads = 0

    def join() -> None:
        nonlocal joined, multi
        spec = SPECS[joined % len(SPECS)]
        req = Request(f"r{joined}", spec, manager, int(rng.integers(2, 60)))
        joined += 1
        if spec is not None:
            grammars.grammars[req.state.req_id] = manager.new_grammar(spec)
            if joined % 5 == 0:  # resumed with outputs the grammar has not seen
                for _ in range(int(rng.integers(2, 5))):
                    token = int(rng.choice(allowed_tokens(req.reference_row(width, [eos]), vocab)))
                    req.take(token)
                    req.state.output_token_ids.append(token)
                multi += 1
        active.append(req)

    def read_pending() -> None:
        nonlocal reads
        reads += 1
        for req in active:
            if req.state.output_token_ids[-1:] == [PLACEHOLDER_TOKEN_ID]:
                req.state.output_token_ids[-1] = req.pending

    for step in range(300):
        target = int(rng.integers(4, 11))
        while len(active) < target:
            join()
        meta, failed = Meta(), {}
        grammars.fill([r.state for r in active], meta, staging, read_pending, failed)
        assert not failed and all(r.state.output_token_ids[-1:] != [PLACEHOLDER_TOKEN_ID] for r in active)
        constrained = [i for i, r in enumerate(active) if r.reference is not None]
        assert meta.grammar_rows.tolist() == constrained
        got = meta.grammar_bitmask.numpy()
        for k, i in enumerate(constrained):
            want = active[i].reference_row(width, [eos])
            assert np.array_equal(got[k], want), (step, active[i].state.req_id)
        for i, req in enumerate(active):  # sample: a token the reference allows, on the host at the next fill
            if req.reference is None:
                req.state.output_token_ids.append(int(rng.integers(0, vocab)))
                continue
            token = int(rng.choice(allowed_tokens(got[constrained.index(i)], vocab)))
            terminated += token == eos and not req.reference.is_terminated()
            req.take(token)
            req.pending = token
            req.state.output_token_ids.append(PLACEHOLDER_TOKEN_ID)
        leaving = [r for r in active if len(r.state.output_token_ids) >= r.length or rng.random() < 0.02]
        grammars.finish(r.state.req_id for r in leaving)
        active = [r for r in active if r not in leaving]
    assert joined > 60 and terminated > 20 and multi > 5 and reads > 250


def test_batch_filler_parts_give_the_same_rows(smollm2_gguf):
    """Masks filled in parts on worker threads equal those filled in one, at any row count."""
    pytest.importorskip("xgrammar")
    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager
    from vllm_engine.structured_output.manager import BatchFiller

    tok = get_tokenizer(str(smollm2_gguf))
    manager = StructuredOutputManager(tok, len(tok), [tok.eos_token_id])
    texts = [json.dumps(instance) for _, _, instance in SCHEMAS]
    for n in (1, 7, 30):
        outputs = [tok.encode(texts[k][: 3 + k], add_special_tokens=False) for k in range(n)]
        rows = []
        for filler in (BatchFiller(max_parts=1), BatchFiller(max_parts=4, rows_per_part=1)):
            grammars = [manager.new_grammar(StructuredOutputsParams(json=s)) for _, s, _ in SCHEMAS[:n]]
            mask = np.full((n + 2, manager.bitmask_width), 7, dtype=np.int32)
            filler.fill(grammars, outputs, mask)
            assert all(g.rejected is None for g in grammars) and np.all(mask[n:] == 7)
            rows.append(mask[:n])
        assert np.array_equal(rows[0], rows[1])


def test_apply_token_bitmask_to_every_row():
    """R == B: the mask covers all rows in order (three kernels, ``rows`` not read)."""
    gen = torch.Generator().manual_seed(1)
    vocab = 100
    logits = torch.randn(3, vocab, generator=gen)
    allowed = torch.rand(3, vocab, generator=gen) < 0.4
    allowed[:, 31] = allowed[:, 63] = True  # sign bits
    bits = torch.zeros(3, bitmask_width(vocab) * 32, dtype=torch.bool)
    bits[:, :vocab] = allowed
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    words = (bits.view(3, -1, 32).to(torch.int64) * weights).sum(-1)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    before = logits.clone()
    out = apply_token_bitmask(logits, bitmask, torch.arange(3))
    assert torch.equal(logits, before)
    assert torch.equal(out, torch.where(allowed, before, torch.tensor(float("-inf"))))


def test_host_benchmark_runs_and_compares_variants(smollm2_gguf, tmp_path):
    """structured_host.py at a tiny size: two variants of the current code replay the same outputs
    with identical masks (the benchmark asserts it) and the JSON has their per-step times."""
    pytest.importorskip("xgrammar")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import structured_host

    out = tmp_path / "host.json"
    assert structured_host.main(["--tokenizer", str(smollm2_gguf), "--batch", "32", "--steps", "12", "--repeats", "1",
                                 "--baseline-rev", "", "--max-parts", "1", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["workloads"]
    assert set(res) == {"open", "text", "schemas"}
    for rows in res.values():
        assert rows["current-p1"]["steps"] == 12 and rows["current-p2"]["step_us"]["p50"] > 0
