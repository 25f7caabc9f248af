"""How input is checked before it reaches PostgreSQL: strictly typed, and storable.

Storable: PostgreSQL's `text` and `jsonb` cannot hold a NUL character (U+0000), a string with
a lone surrogate (U+D800..U+DFFF unpaired, which JSON's `\\ud800` escape can spell) is not
UTF-8, and JSON has no NaN or Infinity (Python's `json` reads them anyway). `StorableStr` is
the type of every string field and parameter of the API that reaches SQL; `json_flaws` finds
such values anywhere in a payload, keys included.

Strict: a payload given as JSON is validated in pydantic's strict mode, so the JSON schema the
API documents is the whole truth: no `"3"` or `true` for an integer, no `1` for a string. The
one liberty taken back is JSON Schema's own: `3.0` is an integer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticSerializationError, to_json

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]

NO_NUL_PATTERN = "^[^\\u0000]*$"  # JSON Schema (ECMA-262) spelling of "no NUL anywhere"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_ERROR_TYPE = "string_unstorable"


def text_flaw(text: str) -> str | None:
    """Why PostgreSQL cannot store `text`, or None if it can."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
    return (f"contains a lone surrogate (\\u{ord(found.group()):04x}), which is not "
            "valid Unicode")


def _no_flaw(text: str) -> str:
    flaw = text_flaw(text)
    if flaw is not None:
        raise PydanticCustomError(_ERROR_TYPE, "String " + flaw)
    return text


StorableStr = Annotated[
    str, AfterValidator(_no_flaw), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})
]
"""A string PostgreSQL can store; its schema says so (a pattern without NUL)."""


def _integral_float(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


INTEGRAL_FLOATS = BeforeValidator(_integral_float)
"""For a strict integer field: an integer as JSON Schema reads one, 3 or 3.0 (never 3.5, "3"
or true). Put it last: `Annotated[int, Field(ge=1), INTEGRAL_FLOATS]` (constraints after it
would be lost from the JSON schema)."""


def json_flaws(value: Any, loc: Loc = ()) -> Iterator[tuple[Loc, str, Any]]:
    """(location, why, value) for each string (keys included) or number in a JSON value that
    PostgreSQL cannot store."""
    if isinstance(value, str):
        flaw = text_flaw(value)
        if flaw is not None:
            yield loc, "String " + flaw, value
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield loc, f"{value} is not a JSON number", value
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (flaw := text_flaw(key)) is not None:
                yield (*loc, key), "Key " + flaw, key
            yield from json_flaws(item, (*loc, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from json_flaws(item, (*loc, index))


def json_text_flaw(text: str) -> str | None:
    """What of a JSON text (a payload as serialised) PostgreSQL cannot store, naming where:
    a NUL (`\\u0000`, which JSON escapes), or None."""
    if "\\u0000" not in text:  # the common case, without parsing
        return None
    found = next(json_flaws(orjson.loads(text)), None)
    if found is None:  # a backslash followed by "u0000", as text
        return None
    loc, why, _ = found
    return f"{'.'.join(map(str, loc)) or '(value)'}: {why}"


def _errors(title: str, found: list[tuple[Loc, str, Any]]) -> ValidationError:
    return ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError(_ERROR_TYPE, why), loc=loc, input=value)
        for loc, why, value in found
    ])


def require_storable(value: Any, title: str = "value") -> None:
    """ValidationError naming each flaw `json_flaws` finds in `value`."""
    found = list(json_flaws(value))
    if found:
        raise _errors(title, found)


def validate_json_value(model: type[M], value: Any, *, strict: bool = True) -> M:
    """`value` (a JSON value: dicts, lists, strings, numbers...) as a `model`, validated as
    the JSON it stands for. Raises ValidationError, located inside `value`."""
    raw = storable_json(value, model.__name__)
    try:
        return model.model_validate_json(raw, strict=strict)
    except ValidationError as exc:
        if not strict:
            raise
        patched = _integers_from_floats(value, exc)
        if patched is None:
            raise
        return model.model_validate_json(storable_json(patched, model.__name__), strict=True)


def storable_json(value: Any, title: str = "value") -> bytes:
    """`value` as JSON, or ValidationError naming each of its flaws (see `json_flaws`).

    The common case costs a serialisation and a comparison: orjson refuses lone surrogates,
    a NUL shows as `\\u0000`, and NaN (written as null) makes the value read back unequal.
    Only then is the value walked, to find and name what is wrong."""
    try:
        raw: bytes | None = orjson.dumps(value)
    except TypeError:  # a lone surrogate, an integer past 64 bits, or no JSON type
        raw = None
    if raw is not None and b"\\u0000" not in raw and orjson.loads(raw) == value:
        return raw
    require_storable(value, title)
    if raw is not None:
        return raw
    try:
        return to_json(value)
    except PydanticSerializationError as exc:  # a mapping from Python holding, say, a socket
        raise _errors(title, [((), f"not a JSON value: {exc}", None)]) from None


def _integers_from_floats(value: Any, exc: ValidationError) -> Any:
    """`value` with each integral float that strict mode refused as an integer made an int,
    or None if the errors name no such float."""
    patched = value
    changed = False
    for error in exc.errors():
        given = error.get("input")
        if error["type"] != "int_type" or not isinstance(given, float) or not given.is_integer():
            continue
        result = _replaced(patched, tuple(error["loc"]), given, int(given))
        if result is not None:
            patched, changed = result, True
    return patched if changed else None


def _replaced(value: Any, loc: Loc, old: float, new: int) -> Any:
    """A copy of `value` with the float `old` at `loc` replaced by `new`, or None if `loc`
    does not lead to it. A part of `loc` that names no item is a union member's tag (`int`
    in `("size", "int")`) and is passed over."""
    if not loc:
        return new if isinstance(value, float) and value == old else None
    head, rest = loc[0], loc[1:]
    if isinstance(value, dict) and head in value:
        inner = _replaced(value[head], rest, old, new)
        return None if inner is None else {**value, head: inner}
    if isinstance(value, list) and isinstance(head, int) and 0 <= head < len(value):
        inner = _replaced(value[head], rest, old, new)
        return None if inner is None else [*value[:head], inner, *value[head + 1:]]
    if isinstance(head, str):
        return _replaced(value, rest, old, new)
    return None


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_ONE = ("additionalProperties", "items", "contains", "not", "if", "then", "else",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_MANY = ("prefixItems", "anyOf", "oneOf", "allOf")
_NAMED = ("properties", "patternProperties", "dependentSchemas", "$defs")
_NO_NUL = {"pattern": NO_NUL_PATTERN}
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated",
                          "readOnly", "writeOnly", "$comment"})


def storable_json_schema(any_ref: str) -> dict[str, Any]:
    """The schema of any JSON value `json_flaws` passes: strings and keys without NUL.
    `any_ref` is the reference under which it is itself kept (it is recursive). One schema
    whose keywords each apply to one type, rather than a union of one branch per type: some
    generators (Schemathesis 4.32) cannot fill an array from the union."""
    return {
        "description": "any JSON value whose strings and keys hold no NUL (\\u0000)",
        "type": ["null", "boolean", "number", "string", "array", "object"],
        **_NO_NUL,
        "items": {"$ref": any_ref},
        "propertyNames": dict(_NO_NUL),
        "additionalProperties": {"$ref": any_ref},
    }


def mark_storable(schema: Any, any_ref: str) -> Any:
    """`schema` (a JSON schema of input) saying, wherever it admits a string or a key, that
    NUL is refused: a pattern on strings and keys, and `any_ref` (see `storable_json_schema`)
    where it admits any value. Changed in place, and returned (a schema may be `true`)."""
    if schema is True:
        return {"$ref": any_ref}
    if not isinstance(schema, dict):
        return schema
    if schema.keys() <= _ANNOTATIONS:  # no constraint: any value
        return {**schema, "$ref": any_ref}
    for keyword in _ONE:
        if keyword in schema:
            schema[keyword] = mark_storable(schema[keyword], any_ref)
    for keyword in _MANY:
        if isinstance(schema.get(keyword), list):
            schema[keyword] = [mark_storable(s, any_ref) for s in schema[keyword]]
    for keyword in _NAMED:
        if isinstance(schema.get(keyword), dict):
            schema[keyword] = {k: mark_storable(s, any_ref) for k, s in schema[keyword].items()}
    types = schema.get("type")
    types = set(types) if isinstance(types, list) else {types}
    fixed = "const" in schema or "enum" in schema or "format" in schema
    if "string" in types and not fixed:
        _add_pattern(schema)
    if "object" in types and schema.get("additionalProperties") is not False:
        if "propertyNames" not in schema:
            schema["propertyNames"] = dict(_NO_NUL)
        if "additionalProperties" not in schema and "patternProperties" not in schema:
            schema["additionalProperties"] = {"$ref": any_ref}
    if "array" in types and "items" not in schema:
        schema["items"] = {"$ref": any_ref}
    return schema


def _add_pattern(schema: dict[str, Any]) -> None:
    own = schema.get("pattern")
    if own is None:
        schema["pattern"] = NO_NUL_PATTERN
    elif own != NO_NUL_PATTERN and _NO_NUL not in schema.get("allOf", []):
        schema.setdefault("allOf", []).append(dict(_NO_NUL))
