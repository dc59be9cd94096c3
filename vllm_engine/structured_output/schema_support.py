"""Which JSON Schema features the grammar can enforce: the rest are refused, never silently dropped.

xgrammar (0.2.9) compiles some keywords without enforcing them (some with a warning in the log):
its grammar then accepts outputs that break the schema the client asked for.
``unsupported_schema_feature`` finds those before the compile, so the request gets a 400 naming the
feature and where it is:

- ``not``, ``contains`` / ``minContains`` / ``maxContains``, ``"uniqueItems": true``, ``if`` /
  ``then`` / ``else``, ``dependentRequired`` / ``dependentSchemas`` / ``dependencies``: ignored;
- ``multipleOf`` outside ``"type": "integer"`` with an integer divisor: ignored;
- ``allOf`` of several schemas: not intersected (an output may meet only one of them);
- ``oneOf`` whose branches are not provably disjoint (different types, or a required property
  with different constant values, as a discriminated union has): compiled as ``anyOf``, which
  lets an output match two branches;
- a ``required`` name that ``properties`` does not define: the grammar lets the object leave it out;
- a lookahead or lookbehind in ``pattern`` or a ``patternProperties`` key: the assertion is
  ignored;
- ``$ref`` outside this document, ``$dynamicRef``, ``$recursiveRef``: not resolved.

The rest is enforced, as tests/structured_outputs/test_schema_support.py checks against the
``jsonschema`` package: lengths, patterns, ranges, formats, items and their counts, ``prefixItems``,
properties, ``required``, ``additionalProperties`` and ``patternProperties``, ``anyOf``, ``const``,
``enum``, local ``$ref``. The grammar is stricter than the schema in one way, as OpenAI's strict
mode is: an object has no properties beyond those the schema names or allows explicitly.
``format`` values the grammar does not know stay annotations, as the JSON Schema specification
makes them.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Optional

# Keywords whose value is one subschema, a list of them, or a map of names to them.
_ONE = ("additionalProperties", "items", "propertyNames", "if", "then", "else", "unevaluatedItems",
        "unevaluatedProperties", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_IGNORED = ("not", "contains", "minContains", "maxContains", "if", "then", "else", "dependentRequired",
            "dependentSchemas", "dependencies", "$dynamicRef", "$recursiveRef")
_LOOKAROUND = re.compile(r"\(\?<?[=!]")
_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")


def unsupported_schema_feature(schema: Any) -> Optional[str]:
    """The first feature of ``schema`` the grammar would not enforce, as a sentence naming it and its
    place (a JSON Pointer); None when every part is enforced."""
    for path, node in _subschemas(schema, "#"):
        problem = _node_problem(node, schema)
        if problem is not None:
            return f"{problem} (at {path}) is not supported: the output could not be held to it."
    return None


def _subschemas(schema: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Every schema object inside ``schema`` (itself first, then depth first), with its JSON Pointer;
    iterative, so that no nesting depth overflows the stack."""
    stack = [(path, schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield path, node
        children = []
        for key in _ONE:
            children.append((f"{path}/{key}", node.get(key)))
        for key in _LIST:
            if isinstance(node.get(key), list):
                children += [(f"{path}/{key}/{i}", sub) for i, sub in enumerate(node[key])]
        for key in _MAP:
            if isinstance(node.get(key), dict):
                children += [(f"{path}/{key}/{_pointer_token(name)}", sub) for name, sub in node[key].items()]
        stack += reversed(children)


def _node_problem(node: dict, root: Any) -> Optional[str]:
    for key in _IGNORED:
        if key in node:
            return f"'{key}'"
    if node.get("uniqueItems") is True:
        return "'uniqueItems'"
    ref = node.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        return f"'$ref' to another document ({ref!r})"
    if "multipleOf" in node and not (node.get("type") == "integer" and _is_int(node["multipleOf"])):
        return "'multipleOf' other than an integer divisor of an integer"
    for pattern in [node.get("pattern"), *_mapping(node, "patternProperties")]:
        if isinstance(pattern, str) and _LOOKAROUND.search(pattern):
            return f"a lookahead or lookbehind in the pattern {pattern!r}"
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        return "'allOf' of several schemas"
    properties = _mapping(node, "properties")
    for name in _required(node):
        if name not in properties:
            return f"a 'required' property ({name!r}) that 'properties' does not define"
    one_of = node.get("oneOf")
    if isinstance(one_of, list):
        branches = [_resolve(s, root) for s in one_of]
        for i, a in enumerate(branches):
            for b in branches[i + 1:]:
                if not _disjoint(a, b):
                    return "'oneOf' whose branches can match the same value (use 'anyOf', or a discriminator)"
    return None


def _disjoint(a: Any, b: Any) -> bool:
    """Whether no value can match both schemas, by their types or a required property's constants."""
    types_a, types_b = _types(a), _types(b)
    if types_a is not None and types_b is not None and not types_a & types_b:
        return True
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    props_a, props_b = _mapping(a, "properties"), _mapping(b, "properties")
    for name in set(_required(a)) & set(_required(b)):
        values_a, values_b = _constants(props_a.get(name)), _constants(props_b.get(name))
        if values_a is not None and values_b is not None and not values_a & values_b:
            return True
    return False


def _types(node: Any) -> Optional[set[str]]:
    """The JSON types a schema allows (integer counted in number), or None when it does not say."""
    t = node.get("type") if isinstance(node, dict) else None
    names = [t] if isinstance(t, str) else t if isinstance(t, list) else None
    if names is None or not all(n in _TYPES for n in names):
        return None
    out = set(names)
    if "integer" in out or "number" in out:
        out |= {"integer", "number"}
    return out


def _constants(node: Any) -> Optional[set[str]]:
    """The values a ``const`` or ``enum`` schema allows (as canonical text), or None."""
    if not isinstance(node, dict):
        return None
    if "const" in node:
        return {json.dumps(node["const"], sort_keys=True)}
    if isinstance(node.get("enum"), list):
        return {json.dumps(v, sort_keys=True) for v in node["enum"]}
    return None


def _resolve(node: Any, root: Any) -> Any:
    """``node`` with a local ``$ref`` followed (a few levels; an unresolvable one stays as it is)."""
    for _ in range(8):
        ref = node.get("$ref") if isinstance(node, dict) else None
        if not (isinstance(ref, str) and ref.startswith("#")):
            return node
        target = root
        for token in ref[2:].split("/") if ref.startswith("#/") else ():
            token = token.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or token not in target:
                return node
            target = target[token]
        node = target
    return node


def _mapping(node: dict, key: str) -> dict:
    value = node.get(key)
    return value if isinstance(value, dict) else {}


def _required(node: dict) -> list[str]:
    value = node.get("required")
    return [name for name in value if isinstance(name, str)] if isinstance(value, list) else []


def _pointer_token(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
