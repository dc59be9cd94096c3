"""Which JSON Schema features are refused (structured_output/schema_support.py), checked against what
xgrammar really enforces, with the ``jsonschema`` package as the judge of what an instance breaks.

Each refused case is one xgrammar lets through: its grammar accepts an instance ``jsonschema`` says
breaks the schema (so the refusal is needed; a newer xgrammar that enforces it fails here, and the
refusal can go). Each supported case is enforced: the grammar accepts a valid instance and rejects
the invalid one, and the check lets it pass.
"""

from __future__ import annotations

import json

import pytest

from vllm_engine.sampling_params import SamplingParamsError, StructuredOutputsParams
from vllm_engine.structured_output.schema_support import unsupported_schema_feature

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

OBJ_A = {"type": "object", "properties": {"k": {"const": "a"}, "x": {"type": "integer"}}, "required": ["k", "x"]}
OBJ_B = {"type": "object", "properties": {"k": {"const": "b"}, "y": {"type": "string"}}, "required": ["k", "y"]}

# (name, schema, an instance that breaks it, the words the refusal names)
REFUSED = [
    ("not", {"not": {"type": "integer"}}, "1", "'not'"),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]", "'contains'"),
    ("multipleOf on a number", {"type": "number", "multipleOf": 0.5}, "0.3", "'multipleOf'"),
    ("multipleOf untyped", {"multipleOf": 2}, "3", "'multipleOf'"),
    ("allOf of ranges", {"allOf": [{"type": "integer", "minimum": 3}, {"type": "integer", "maximum": 5}]}, "7",
     "'allOf'"),
    ("overlapping oneOf", {"oneOf": [{"type": "object", "properties": {"x": {"type": "integer"}}},
                                     {"type": "object", "properties": {"y": {"type": "integer"}}}]}, "{}", "'oneOf'"),
    ("oneOf integer or number", {"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1", "'oneOf'"),
    ("lookahead in a pattern", {"type": "string", "pattern": "(?=a)[a-z]+"}, '"b"', "lookahead"),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]", "'uniqueItems'"),
    ("if then", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                 "if": {"properties": {"a": {"const": 1}}, "required": ["a"]}, "then": {"required": ["b"]}},
     '{"a":1}', "'if'"),
    ("dependentRequired", {"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}},
     '{"a":1}', "'dependentRequired'"),
    ("dependentSchemas", {"type": "object", "properties": {"a": {}, "b": {}},
                          "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a":1}', "'dependentSchemas'"),
    ("allOf of objects", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                    {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     '{"a":1}', "'allOf'"),
    ("required but not a property", {"type": "object", "required": ["q"], "additionalProperties": True}, "{}",
     "'required'"),
]
# (name, schema, valid instance, invalid instance)
SUPPORTED = [
    ("lengths", {"type": "string", "minLength": 2, "maxLength": 3}, '"ab"', '"a"'),
    ("pattern", {"type": "string", "pattern": "^a+$"}, '"aa"', '"b"'),
    ("integer range", {"type": "integer", "minimum": 3, "exclusiveMaximum": 5}, "4", "5"),
    ("integer multipleOf", {"type": "integer", "multipleOf": 3}, "6", "4"),
    ("item counts", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, "[1]", "[]"),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "string"}], "items": False}, '["a"]', '["a","b"]'),
    ("required and closed", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                             "additionalProperties": False}, '{"a":1}', '{"a":1,"b":2}'),
    ("property counts", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                         "minProperties": 1, "maxProperties": 1}, '{"a":1}', '{"a":1,"b":2}'),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"}}, '{"b":1}',
     '{"b":"x"}'),
    ("nested required", {"type": "object", "properties": {"o": {"type": "object", "properties": {
        "i": {"type": "integer"}}, "required": ["i"]}}, "required": ["o"]}, '{"o":{"i":1}}', '{"o":{}}'),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                           "additionalProperties": False}, '{"x":1}', '{"x":"s"}'),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"s"'),
    ("oneOf of types", {"oneOf": [{"type": "string"}, {"type": "integer"}]}, "3", "true"),
    ("discriminated oneOf", {"oneOf": [OBJ_A, OBJ_B]}, '{"k":"a","x":1}', '{"k":"a","y":"s"}'),
    ("discriminated oneOf by $ref", {"$defs": {"A": OBJ_A, "B": OBJ_B},
                                     "oneOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}]},
     '{"k":"b","y":"s"}', '{"k":"b","x":1}'),
    ("format", {"type": "string", "format": "date"}, '"2024-01-31"', '"yesterday"'),
    ("const and enum", {"type": "object", "properties": {"c": {"const": "x"}, "e": {"enum": [1, 2]}}},
     '{"c":"x","e":2}', '{"c":"x","e":3}'),
    ("recursive $ref", {"$defs": {"N": {"type": "object", "properties": {
        "c": {"type": "array", "items": {"$ref": "#/$defs/N"}}}, "additionalProperties": False}},
        "$ref": "#/$defs/N"}, '{"c":[{"c":[]}]}', '{"c":[{"c":1}]}'),
]


@pytest.fixture(scope="module")
def compiler():
    return xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False)


def grammar_accepts(compiler, schema: dict, text: str) -> bool:
    """Whether xgrammar's grammar for ``schema`` takes the JSON ``text`` whole, written as the grammar
    writes JSON (``json.dumps``' separators)."""
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False),
                                 terminate_without_stop_token=True)
    return matcher.accept_string(json.dumps(json.loads(text))) and matcher.is_completed()


def schema_allows(schema: dict, text: str) -> bool:
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).is_valid(
        json.loads(text))


@pytest.mark.parametrize("name, schema, bad, words", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_features_are_ones_the_grammar_lets_through(compiler, name, schema, bad, words):
    assert not schema_allows(schema, bad)
    assert grammar_accepts(compiler, schema, bad)  # the grammar would let the output break the schema
    problem = unsupported_schema_feature(schema)
    assert problem is not None and words in problem


@pytest.mark.parametrize("name, schema, good, bad", SUPPORTED, ids=[c[0] for c in SUPPORTED])
def test_supported_features_are_enforced_and_let_through(compiler, name, schema, good, bad):
    assert schema_allows(schema, good) and not schema_allows(schema, bad)
    assert grammar_accepts(compiler, schema, good) and not grammar_accepts(compiler, schema, bad)
    assert unsupported_schema_feature(schema) is None


def test_the_refusal_names_where_the_feature_is():
    schema = {"type": "object", "properties": {"a/b": {"type": "array", "items": {"not": {"const": 1}}}}}
    assert unsupported_schema_feature(schema) == (
        "'not' (at #/properties/a~1b/items) is not supported: the output could not be held to it.")
    assert "another document" in unsupported_schema_feature({"$ref": "https://example.com/s.json"})
    deep: dict = {"not": {"type": "null"}}
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = {"type": "array", "items": deep}
    assert unsupported_schema_feature(deep).startswith("'not' (at #/items/items/")


def test_the_manager_refuses_before_compiling(smollm2_gguf):
    from vllm_engine.model_loader.tokenizer import get_tokenizer
    from vllm_engine.structured_output import StructuredOutputManager

    tok = get_tokenizer(str(smollm2_gguf))
    manager = StructuredOutputManager(tok, len(tok), [tok.eos_token_id])
    try:
        with pytest.raises(SamplingParamsError) as info:
            manager.compile(StructuredOutputsParams(json={"not": {"type": "null"}}))
        assert info.value.param == "structured_outputs.json" and "'not'" in str(info.value)
        assert manager.compile(StructuredOutputsParams(json={"type": "integer"})) is not None
    finally:
        manager.shutdown()
