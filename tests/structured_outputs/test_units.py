"""Pieces without a model: StructuredOutputsParams checks, the bitmask against a Python reference,
a grammar walked over a real tokenizer's tokens, the scheduler holding back a compiling request,
and the tool-call parsers (whole and streamed) on hand-written replies."""

from __future__ import annotations

import json
from concurrent.futures import Future

import pytest
import torch

from vllm_engine.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from vllm_engine.serving.tool_parsers import ToolCallParser
from vllm_engine.structured_output.bitmask import apply_token_bitmask, bitmask_width


# ---- params ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    ({}, "structured_outputs"),
    ({"json": {"type": "object"}, "regex": "a+"}, "structured_outputs"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": 3}, "structured_outputs.json"),
    ({"regex": ""}, "structured_outputs.regex"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", 1]}, "structured_outputs.choice"),
    ({"grammar": 5}, "structured_outputs.grammar"),
    ({"json_object": "yes"}, "structured_outputs.json_object"),
])
def test_bad_structured_outputs_name_the_field(kwargs, param):
    with pytest.raises(SamplingParamsError) as e:
        StructuredOutputsParams(**kwargs)
    assert e.value.param == param and str(e.value).startswith(param)


def test_structured_outputs_key_keeps_property_order_and_dicts_convert():
    a = StructuredOutputsParams(json='{"b": 1, "a": 2}')
    assert a.json == {"b": 1, "a": 2} and a.key == ("json", '{"b": 1, "a": 2}')
    assert StructuredOutputsParams(json={"a": 2, "b": 1}).key != a.key
    p = SamplingParams(structured_outputs={"choice": ["x", "y"]})
    assert p.structured_outputs.kind == "choice" and p.clone().structured_outputs.key == ("choice", '["x", "y"]')
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(structured_outputs={"jsonn": {}})
    assert e.value.param == "structured_outputs"


def test_min_tokens_cannot_hold_a_constraint_open():
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a"))
    assert e.value.param == "min_tokens"


# ---- bitmask -----------------------------------------------------------------------------------------------
def test_apply_token_bitmask_matches_a_reference_and_leaves_other_rows():
    gen = torch.Generator().manual_seed(0)
    vocab, width = 70, bitmask_width(70)
    assert width == 3
    logits = torch.randn(4, vocab, generator=gen)
    allowed = torch.rand(2, vocab, generator=gen) < 0.3
    allowed[:, 69] = True  # the last id: bit 5 of the third word
    allowed[0, 31] = True  # bit 31: the sign bit of a word
    bitmask = torch.zeros(2, width, dtype=torch.int64)
    for r in range(2):
        for t in allowed[r].nonzero().flatten().tolist():
            bitmask[r, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(bitmask >= 2**31, bitmask - 2**32, bitmask).to(torch.int32)
    rows = torch.tensor([3, 1])
    before = logits.clone()
    out = apply_token_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, before)  # out of place
    for r, row in enumerate(rows.tolist()):
        ref = torch.where(allowed[r], before[row], torch.tensor(float("-inf")))
        assert torch.equal(out[row], ref)
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])


def test_a_bitmask_narrower_than_the_logits_blocks_the_rest():
    """A model's padding past the grammars' vocabulary (70 tokenizer ids, 100 logits): the masks' 3
    words cover ids 0..95; every id past them is -inf in the constrained rows, others untouched."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, bitmask_width(70)), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    for rows, lg in ((torch.tensor([2, 0]), logits), (torch.arange(2), logits[:2])):  # some rows, every row
        out = apply_token_bitmask(lg, bitmask, rows)
        for r, row in enumerate(rows.tolist()):
            for t in range(100):
                bit = t < 96 and (int(bitmask[r, t // 32]) >> (t % 32)) & 1
                assert out[row, t].item() == (lg[row, t].item() if bit else float("-inf")), (row, t)
    out = apply_token_bitmask(logits, bitmask, torch.tensor([2, 0]))
    assert torch.equal(out[1], logits[1])  # the unconstrained row


def test_a_padded_vocabulary_masks_only_the_tokenizers_tokens(smollm2_gguf):
    """A model whose logits are wider than its tokenizer (Qwen-style padding): the grammars and their
    masks cover the tokenizer's ids only; the same walk is allowed token for token as without the
    padding, and terminated rows allow EOS alone."""
    pytest.importorskip("xgrammar")
    import numpy as np

    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager

    tok = get_tokenizer(str(smollm2_gguf))
    eos = tok.eos_token_id
    plain = StructuredOutputManager(tok, len(tok), [eos])
    padded = StructuredOutputManager(tok, len(tok) + 1000, [eos])
    assert padded.grammar_vocab_size == plain.grammar_vocab_size == len(tok)
    assert padded.bitmask_width == plain.bitmask_width == bitmask_width(len(tok))
    assert np.array_equal(padded.stop_row, plain.stop_row)
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})
    grammars = [m.new_grammar(spec) for m in (plain, padded)]
    out: list[int] = []
    for t in tok.encode('{"s": "padded vocabularies"}', add_special_tokens=False):
        masks = []
        for g, m in zip(grammars, (plain, padded)):
            g.advance(out)
            mask = np.zeros((1, m.bitmask_width), dtype=np.int32)
            g.fill_bitmask(mask, 0)
            masks.append(mask)
        assert np.array_equal(*masks) and (int(masks[0][0, t // 32]) >> (t % 32)) & 1
        out.append(t)


def test_grammar_allows_exactly_the_walk_of_a_valid_instance(smollm2_gguf):
    """Walking a valid instance's tokens, each next token is allowed by the mask; a token that breaks
    the schema is not; after the last token only EOS is, and once EOS is taken only EOS stays."""
    pytest.importorskip("xgrammar")
    import numpy as np

    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager

    tok = get_tokenizer(str(smollm2_gguf))
    eos = tok.eos_token_id
    manager = StructuredOutputManager(tok, len(tok), [eos])
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                                                "maximum": 9}},
                                         "required": ["n"], "additionalProperties": False})
    grammar = manager.new_grammar(spec)
    ids = tok.encode('{"n": 7}', add_special_tokens=False)
    mask = np.zeros((1, manager.bitmask_width), dtype=np.int32)

    def allowed(t: int) -> bool:
        return bool((int(mask[0, t // 32]) >> (t % 32)) & 1)

    out: list[int] = []
    for t in ids:
        grammar.advance(out)
        grammar.fill_bitmask(mask, 0)
        assert allowed(t) and not allowed(eos)
        out.append(t)
    grammar.advance(out)
    grammar.fill_bitmask(mask, 0)
    assert allowed(eos) and int(np.count_nonzero(mask)) == 1
    assert bin(int(mask[0, eos // 32]) & 0xFFFFFFFF).count("1") == 1  # EOS alone
    grammar.advance(out + [eos])
    assert grammar.is_terminated and grammar.rejected is None
    grammar.fill_bitmask(mask, 0)
    assert allowed(eos) and int(np.count_nonzero(mask)) == 1
    bad = manager.new_grammar(spec)
    bad.advance(tok.encode('{"m"', add_special_tokens=False))
    assert bad.rejected is not None


def test_batch_filler_gives_each_grammars_own_rows(smollm2_gguf):
    """The batched step path (one accept call, threaded masks) against advance + fill_bitmask per
    grammar, over grammars at different points: fresh, one token behind, several behind, terminated."""
    pytest.importorskip("xgrammar")
    import numpy as np

    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager
    from vllm_engine.structured_output.manager import BatchFiller

    tok = get_tokenizer(str(smollm2_gguf))
    eos = tok.eos_token_id
    manager = StructuredOutputManager(tok, len(tok), [eos])
    spec = StructuredOutputsParams(regex="(abc|abd)[0-9]{2}")
    ids = tok.encode("abd42", add_special_tokens=False) + [eos]
    filler = BatchFiller()
    for outputs in ([[], ids[:1], ids[:2], ids[:1]], [ids[:1], ids[:2], ids[:3], ids]):
        a = [manager.new_grammar(spec) for _ in outputs]
        b = [manager.new_grammar(spec) for _ in outputs]
        for g_a, g_b, out in zip(a, b, outputs):  # both sets one token behind their outputs
            g_a.advance(out[:-1])
            g_b.advance(out[:-1])
        got = np.zeros((len(outputs), manager.bitmask_width), dtype=np.int32)
        want = np.zeros_like(got)
        filler.fill(a, outputs, got)
        for k, (g, out) in enumerate(zip(b, outputs)):
            g.advance(out)
            g.fill_bitmask(want, k)
        assert np.array_equal(got, want)
        assert [g.num_accepted for g in a] == [len(o) for o in outputs]
    assert a[-1].is_terminated and int(np.count_nonzero(got[-1])) == 1
    multi = [manager.new_grammar(spec)]
    filler.fill(multi, [ids[:3]], got[:1])  # several new tokens at once (a prompt of outputs after preemption)
    single = manager.new_grammar(spec)
    single.advance(ids[:3])
    single.fill_bitmask(want, 0)
    assert np.array_equal(got[0], want[0])


def test_draft_bitmasks_for_speculative_decoding(smollm2_gguf):
    """Row j is the mask after the first j draft tokens (as a fresh grammar advanced that far gives),
    a refused draft freezes the rows after it, and the grammar ends where it started."""
    pytest.importorskip("xgrammar")
    import numpy as np

    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager

    tok = get_tokenizer(str(smollm2_gguf))
    eos = tok.eos_token_id
    manager = StructuredOutputManager(tok, len(tok), [eos])
    spec = StructuredOutputsParams(regex="(abc|abd)[0-9]{2}")
    ids = tok.encode("abd42", add_special_tokens=False) + [eos]

    def reference(prefix: list[int]) -> np.ndarray:
        g = manager.new_grammar(spec)
        g.advance(prefix)
        row = np.zeros((1, manager.bitmask_width), dtype=np.int32)
        g.fill_bitmask(row, 0)
        return row[0]

    grammar = manager.new_grammar(spec)
    grammar.advance(ids[:1])
    drafts = ids[1:]  # the rest, EOS included: the grammar terminates on the last draft
    got = np.zeros((len(drafts) + 1, manager.bitmask_width), dtype=np.int32)
    grammar.fill_draft_bitmasks(drafts, got, 0)
    for j in range(len(drafts) + 1):
        assert np.array_equal(got[j], reference(ids[: 1 + j])), j
    after = np.zeros((1, manager.bitmask_width), dtype=np.int32)
    grammar.fill_bitmask(after, 0)
    assert np.array_equal(after[0], reference(ids[:1])) and not grammar.is_terminated
    bad = [ids[1], tok.encode("zz", add_special_tokens=False)[0], ids[2]]  # the second draft is refused
    got = np.zeros((4, manager.bitmask_width), dtype=np.int32)
    grammar.fill_draft_bitmasks(bad, got, 0)
    assert np.array_equal(got[1], reference(ids[:2]))
    assert np.array_equal(got[2], got[1]) and np.array_equal(got[3], got[1])
    grammar.fill_bitmask(after, 0)
    assert np.array_equal(after[0], reference(ids[:1]))


def test_compile_errors_name_the_field(smollm2_gguf):
    pytest.importorskip("xgrammar")
    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager

    tok = get_tokenizer(str(smollm2_gguf))
    manager = StructuredOutputManager(tok, len(tok), [tok.eos_token_id])
    for spec, param in ((StructuredOutputsParams(regex="[a-"), "structured_outputs.regex"),
                        (StructuredOutputsParams(json={"type": "nonsense"}), "structured_outputs.json"),
                        (StructuredOutputsParams(grammar="root ::= "), "structured_outputs.grammar")):
        with pytest.raises(SamplingParamsError) as e:
            manager.compile(spec)
        assert e.value.param == param and "/project/" not in str(e.value)
    a = manager.submit(StructuredOutputsParams(regex="[0-9]+"))
    assert manager.submit(StructuredOutputsParams(regex="[0-9]+")) is a  # cached by its text


def test_the_grammar_cache_keeps_to_its_byte_budget(smollm2_gguf):
    pytest.importorskip("xgrammar")
    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager

    tok = get_tokenizer(str(smollm2_gguf))
    small, big = StructuredOutputsParams(regex="[0-9]+"), StructuredOutputsParams(regex="[a-z]{0,300}")
    probe = StructuredOutputManager(tok, len(tok), [tok.eos_token_id])
    big_bytes = probe.compile(big).memory_size_bytes
    manager = StructuredOutputManager(tok, len(tok), [tok.eos_token_id], cache_bytes=big_bytes)
    first = manager.submit(small)
    first.result()
    manager.compile(big)  # together over the budget: the older one goes
    assert manager.submit(big).done() and manager.submit(small) is not first


# ---- the scheduler holds back a request whose grammar compiles ---------------------------------------------
def test_scheduler_runs_others_while_a_grammar_compiles():
    from vllm_engine.config import CacheConfig, SchedulerConfig
    from vllm_engine.core.scheduler import Scheduler
    from vllm_engine.engine.request import Request

    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=64),
                      CacheConfig(block_size=4), num_gpu_blocks=64)
    compiling: Future = Future()
    first = Request("constrained", [1, 2, 3], SamplingParams(max_tokens=4))
    first.grammar_future = compiling
    sched.add_request(first)
    sched.add_request(Request("plain", [4, 5, 6], SamplingParams(max_tokens=4)))
    out = sched.schedule()
    assert [r.request_id for r in out.scheduled_requests] == ["plain"]
    sched.advance(out)
    compiling.set_result(object())
    out = sched.schedule()
    assert [r.request_id for r in out.scheduled_requests] == ["plain", "constrained"]


# ---- tool-call parsers ---------------------------------------------------------------------------------------
def _stream(parser: ToolCallParser, text: str, step: int = 3) -> tuple[str, list[dict]]:
    """Feeds ``text`` in pieces of ``step`` characters; returns the content and the calls the deltas build."""
    content, calls = "", []
    for end in list(range(step, len(text), step)) + [len(text)]:
        c, deltas = parser.delta(text[:end], final=end == len(text))
        content += c
        for d in deltas:
            if "id" in d:
                assert d["index"] == len(calls) and d["function"]["arguments"] == ""
                calls.append({"id": d["id"], "name": d["function"]["name"], "arguments": ""})
            else:
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, calls


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
          '</tool_call>\n<tool_call>\n{"arguments": {"q": "a \\"}\\" b"}, "name": "search"}\n</tool_call>')


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_hermes_calls_whole_and_streamed_agree(step):
    content, calls = ToolCallParser("hermes").parse(HERMES)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": [1, 2]}), ("search", {"q": 'a "}" b'})]
    s_content, s_calls = _stream(ToolCallParser("hermes"), HERMES, step)
    assert s_content.strip() == "Let me check."
    assert [(c["name"], c["arguments"]) for c in s_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_hermes_without_calls_is_content_and_a_held_back_tag_start_comes_out_at_the_end():
    parser = ToolCallParser("hermes")
    assert parser.parse("Just text <tool") == ("Just text <tool", [])
    content, calls = _stream(ToolCallParser("hermes"), "Just text <tool", 1)
    assert content == "Just text <tool" and calls == []
    # a malformed call: the reply stays text
    assert ToolCallParser("hermes").parse('<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>')[1] == []


def test_llama3_json_form():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "time", "parameters": {}}'
    content, calls = ToolCallParser("llama3_json").parse(text)
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("time", {})]
    assert _stream(ToolCallParser("llama3_json"), text, 2)[1][0]["arguments"] == '{"city": "Oslo"}'
    assert ToolCallParser("llama3_json").parse("The weather is fine.") == ("The weather is fine.", [])


def test_auto_format_follows_the_chat_template():
    from vllm_engine.serving.tool_parsers import parser_for_template

    llama31 = "{%- if message.role == 'ipython' %}<|python_tag|>{{ x }}{%- endif %}"
    assert parser_for_template(llama31) == "llama3_json"
    assert parser_for_template("{% for tool in tools %}<tool_call>{% endfor %}") == "hermes"
    assert parser_for_template(None) == "hermes"  # no tool support: this server's Hermes prompt


def test_required_array_and_named_arguments():
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": [2]}}]'
    content, calls = ToolCallParser("required").parse(text)
    assert content is None and [c["function"]["arguments"] for c in calls] == ['{"x": 1}', '{"y": [2]}']
    assert [(c["name"], c["arguments"]) for c in _stream(ToolCallParser("required"), text, 5)[1]] == [
        ("a", '{"x": 1}'), ("b", '{"y": [2]}')]
    content, calls = ToolCallParser("named", "f").parse('{"city": "Rome"}')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"city": "Rome"}'}
    streamed = _stream(ToolCallParser("named", "f"), '{"city": "Rome"}', 3)[1]
    assert [(c["name"], c["arguments"]) for c in streamed] == [("f", '{"city": "Rome"}')]
    # a reply cut short (max_tokens) has no calls: it stays text
    assert ToolCallParser("required").parse('[{"name": "a", "parameters": {"x"')[1] == []


# ---- the tools in the prompt -------------------------------------------------------------------------------
# The tool parts of Qwen2.5's template, shortened: tools listed in the system turn, calls written with tojson.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for tc in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def _history():
    from vllm_engine.serving.protocol import ChatMessage

    return [ChatMessage.model_validate(m) for m in (
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3 degrees"})]


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def test_a_tool_aware_template_renders_the_tools_and_calls_itself(tmp_path):
    from conftest import build_tiny_tokenizer

    from vllm_engine.serving.chat_tools import conversation, template_supports_tools

    tok = build_tiny_tokenizer(tmp_path)
    assert template_supports_tools(QWEN_STYLE_TEMPLATE) and not template_supports_tools(tok.chat_template)
    convo = conversation(_history(), [TOOL], native_tools=True)
    text = tok.apply_chat_template(convo, tools=[TOOL], chat_template=QWEN_STYLE_TEMPLATE, tokenize=False,
                                   add_generation_prompt=True)
    assert json.dumps(TOOL) in text  # the template's own tool list
    # the call's arguments reach the template as an object (tojson writes an object, not a string)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n3 degrees\n</tool_response>" in text and "You are a function calling" not in text


def test_a_template_without_tools_gets_the_hermes_prompt_and_text_calls(tmp_path):
    from conftest import build_tiny_tokenizer

    from vllm_engine.serving.chat_tools import conversation

    tok = build_tiny_tokenizer(tmp_path)
    convo = conversation(_history(), [TOOL], native_tools=False)
    assert convo[0]["role"] == "system" and json.dumps(TOOL) in convo[0]["content"]
    assert convo[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert convo[3] == {"role": "tool", "content": "<tool_response>\n3 degrees\n</tool_response>"}
    text = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert "<tools>" in text and "<tool_call>" in text


def test_verify_masks_cover_each_constrained_requests_rows(smollm2_gguf):
    """A verifying step: request 0 (unconstrained, 1 proposal) owns rows 0-1, request 1 (constrained,
    2 proposals) rows 2-4: exactly those get its grammar's masks after 0, 1 and 2 proposals."""
    pytest.importorskip("xgrammar")
    import numpy as np

    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager
    from vllm_engine.structured_output.worker import WorkerGrammars
    from vllm_engine.worker.request_states import CachedRequestState
    from vllm_engine.worker.staging import HostStaging

    tok = get_tokenizer(str(smollm2_gguf))
    eos = tok.eos_token_id
    manager = StructuredOutputManager(tok, len(tok), [eos])
    spec = StructuredOutputsParams(regex="(abc|abd)[0-9]{2}")
    ids = tok.encode("abd42", add_special_tokens=False)
    reqs = [CachedRequestState(rid, [1, 2], SamplingParams(), 0, frozenset([eos]), 2, token_ids=[1, 2] + out,
                               output_token_ids=list(out)) for rid, out in (("plain", [7]), ("json", ids[:1]))]
    grammars = WorkerGrammars(None, manager)
    grammars.grammars["json"] = manager.new_grammar(spec)
    drafts = {"plain": [8], "json": ids[1:3]}
    mask, rows = grammars.fill_verify(reqs, [1, 2], drafts, HostStaging(torch.device("cpu")), lambda: None, {})
    assert rows.tolist() == [2, 3, 4]
    want = np.zeros((3, manager.bitmask_width), dtype=np.int32)
    reference = manager.new_grammar(spec)
    reference.advance(ids[:1])
    reference.fill_draft_bitmasks(ids[1:3], want, 0)
    assert np.array_equal(mask.numpy(), want)
    assert grammars.grammars["json"].num_accepted == 1  # proposals are not taken in: verification decides
