"""30 JSON schemas (nested objects, enums, arrays, numbers with bounds, required fields), each with
one instance that validates: the structured-output tests constrain the model with each schema and
validate its output with ``jsonschema``; the grammar benchmark walks each instance's tokens.

Sizes stay small (short strings via maxLength, arrays via maxItems) so that a 135M model's greedy
output completes within a few dozen tokens.
"""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 12}
SHORT = {"type": "string", "maxLength": 8}


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict:
    """An object with ``props``, all required unless ``required`` says which, no other keys."""
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required, "additionalProperties": False, **extra}


# (name, schema, a valid instance)
SCHEMAS: list[tuple[str, dict, Any]] = [
    ("person", obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
     {"name": "Ada", "age": 36}),
    ("city", obj({"city": NAME, "country": NAME}), {"city": "Paris", "country": "France"}),
    ("flag", obj({"ok": {"type": "boolean"}}), {"ok": True}),
    ("color_enum", obj({"color": {"enum": ["red", "green", "blue"]}}), {"color": "green"}),
    ("size_enum_int", obj({"size": {"enum": [1, 2, 4, 8]}}), {"size": 4}),
    ("const", obj({"kind": {"const": "event"}, "id": {"type": "integer", "minimum": 1, "maximum": 999}}),
     {"kind": "event", "id": 7}),
    ("bounded_number", obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60}}),
     {"temperature": 21.5}),
    ("bounded_int_exclusive", obj({"score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
     {"score": 9}),
    ("tags_array", obj({"tags": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3}}),
     {"tags": ["a", "b"]}),
    ("int_array", obj({"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                  "minItems": 2, "maxItems": 4}}),
     {"values": [1, 2, 3]}),
    ("nested_address", obj({"name": NAME, "address": obj({"street": NAME, "zip": {"type": "string",
                                                                                  "pattern": "^[0-9]{5}$"}})}),
     {"name": "Bo", "address": {"street": "Main", "zip": "12345"}}),
    ("nested_deep", obj({"a": obj({"b": obj({"c": {"type": "integer", "minimum": 0, "maximum": 5}})})}),
     {"a": {"b": {"c": 3}}}),
    ("array_of_objects", obj({"items": {"type": "array", "maxItems": 2, "minItems": 1,
                                        "items": obj({"sku": SHORT, "qty": {"type": "integer", "minimum": 1,
                                                                            "maximum": 9}})}}),
     {"items": [{"sku": "x1", "qty": 2}]}),
    ("optional_field", obj({"title": NAME, "subtitle": NAME}, required=["title"]), {"title": "Hi"}),
    ("nullable", obj({"middle_name": {"type": ["string", "null"], "maxLength": 8}}), {"middle_name": None}),
    ("any_of", obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}}),
     {"value": 3}),
    ("date_pattern", obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
     {"date": "2024-01-31"}),
    ("email_like", obj({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}}),
     {"email": "ada@lab.org"}),
    ("rgb", obj({"r": {"type": "integer", "minimum": 0, "maximum": 255},
                 "g": {"type": "integer", "minimum": 0, "maximum": 255},
                 "b": {"type": "integer", "minimum": 0, "maximum": 255}}),
     {"r": 1, "g": 2, "b": 3}),
    ("point", obj({"x": {"type": "number", "minimum": -10, "maximum": 10},
                   "y": {"type": "number", "minimum": -10, "maximum": 10}}),
     {"x": 1.5, "y": -2}),
    ("status_with_code", obj({"status": {"enum": ["ok", "error"]},
                              "code": {"type": "integer", "minimum": 100, "maximum": 599}}),
     {"status": "ok", "code": 200}),
    ("weather", obj({"location": NAME, "unit": {"enum": ["celsius", "fahrenheit"]},
                     "days": {"type": "integer", "minimum": 1, "maximum": 7}}),
     {"location": "Oslo", "unit": "celsius", "days": 3}),
    ("book", obj({"title": NAME, "author": NAME, "year": {"type": "integer", "minimum": 1450, "maximum": 2025}}),
     {"title": "Dune", "author": "Herbert", "year": 1965}),
    ("matrix", obj({"rows": {"type": "array", "minItems": 1, "maxItems": 2,
                             "items": {"type": "array", "minItems": 1, "maxItems": 2,
                                       "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}),
     {"rows": [[1, 2], [3]]}),
    ("top_level_array", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                         "minItems": 1, "maxItems": 3},
     [4, 5]),
    ("top_level_enum", {"enum": ["yes", "no", "maybe"]}, "maybe"),
    ("top_level_integer", {"type": "integer", "minimum": 10, "maximum": 20}, 15),
    ("refs", {"type": "object", "$defs": {"pt": obj({"x": {"type": "integer", "minimum": 0, "maximum": 9}})},
              "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}},
              "required": ["start", "end"], "additionalProperties": False},
     {"start": {"x": 1}, "end": {"x": 2}}),
    ("user_profile", obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 99999},
                                       "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]},
                                                 "minItems": 1, "maxItems": 2}}),
                          "active": {"type": "boolean"}}),
     {"user": {"id": 42, "roles": ["dev"]}, "active": False}),
    ("order", obj({"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                   "total": {"type": "number", "minimum": 0, "maximum": 1000},
                   "paid": {"type": "boolean"}}),
     {"order_id": "AB123", "total": 9.99, "paid": True}),
]

assert len(SCHEMAS) == 30
