"""Strict JSON validation of payloads, the storable-text rule, and the schema that says so."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from conveyor.validation import (
    NO_NUL_PATTERN,
    json_flaws,
    mark_storable,
    text_flaw,
    validate_json_value,
)

REF = "#/components/schemas/StorableJson"


class Box(BaseModel):
    width: int
    ratio: float = 1.0
    label: str = ""
    sizes: list[int] = []
    either: int | str = 0


def locs(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in exc.value.errors()]


def test_text_flaws_name_nul_and_lone_surrogates() -> None:
    assert text_flaw("plain \U0001f600 text") is None
    assert "NUL" in (text_flaw("a\x00b") or "")
    assert "\\udc00" in (text_flaw("x\udc00") or "")


def test_json_flaws_are_found_anywhere_keys_included() -> None:
    value = {"a": ["ok", {"b\x00": 1}], "c": float("inf"), "d": {"e": "\ud800"}}
    assert [(loc, why.split()[0]) for loc, why, _ in json_flaws(value)] == [
        (("a", 1, "b\x00"), "Key"), (("c",), "inf"), (("d", "e"), "String")]
    assert list(json_flaws({"n": 1.5, "s": "fine", "l": [None, True]})) == []


@pytest.mark.parametrize("given", [{"width": True}, {"width": "3"}, {"width": 3.5},
                                   {"width": 1, "label": 5}, {"width": 1, "ratio": False}])
def test_strict_refuses_what_json_schema_refuses(given: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        validate_json_value(Box, given)


def test_strict_takes_json_schema_integers_written_as_floats() -> None:
    box = validate_json_value(Box, {"width": 3.0, "ratio": 2, "sizes": [1, 2.0],
                                    "either": 4.0})
    assert (box.width, box.ratio, box.sizes, box.either) == (3, 2.0, [1, 2], 4)
    assert isinstance(box.width, int)
    # Other errors are still reported, beside the floats made integers.
    with pytest.raises(ValidationError) as found:
        validate_json_value(Box, {"width": 3.0, "sizes": [1.0, "2"]})
    assert locs(found) == [("sizes", 1)]


def test_lax_coerces() -> None:
    box = validate_json_value(Box, {"width": "3", "sizes": ["1"]}, strict=False)
    assert (box.width, box.sizes) == (3, [1])


def test_flaws_are_errors_located_in_the_value() -> None:
    with pytest.raises(ValidationError) as found:
        validate_json_value(Box, {"width": 1, "label": "a\x00"})
    assert locs(found) == [("label",)]
    assert found.value.errors()[0]["type"] == "string_unstorable"


def test_a_mapping_that_is_not_json_is_an_error() -> None:
    with pytest.raises(ValidationError, match="not a JSON value"):
        validate_json_value(Box, {"width": 1, "label": object()})


def test_mark_storable_puts_the_rule_on_strings_keys_and_anything() -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "code": {"type": "string", "pattern": "^[a-z]+$"},
            "url": {"type": "string", "format": "uri"},
            "kind": {"type": "string", "enum": ["a", "b"]},
            "any": {"description": "anything"},
            "map": {"type": "object", "additionalProperties": True},
            "list": {"type": "array"},
        },
        "additionalProperties": False,
    }
    marked = mark_storable(schema, REF)
    props = marked["properties"]
    assert props["name"]["pattern"] == NO_NUL_PATTERN
    assert props["code"] == {"type": "string", "pattern": "^[a-z]+$",
                             "allOf": [{"pattern": NO_NUL_PATTERN}]}
    assert "pattern" not in props["url"]
    assert "pattern" not in props["kind"]
    assert props["any"] == {"description": "anything", "$ref": REF}
    assert props["map"]["additionalProperties"] == {"$ref": REF}
    assert props["map"]["propertyNames"] == {"pattern": NO_NUL_PATTERN}
    assert props["list"]["items"] == {"$ref": REF}
    assert "propertyNames" not in marked  # extras forbidden: the names are the properties
    assert mark_storable(marked, REF) == marked  # idempotent
