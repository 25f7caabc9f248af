"""`_field_path`: validation error locations without FastAPI's `body` root or the union tag."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from conveyor.api.models import request_models
from conveyor.api.problems import _field_path
from conveyor.application import Conveyor
from conveyor.registry import TaskContext

TYPES = {"webhook", "thumbnail"}


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("body", "webhook", "payload", "url"), ["payload", "url"]),
        (("body", "tasks", 0, "thumbnail", "payload", "width"), ["tasks", 0, "payload", "width"]),
        (("body", "tasks", 12, "webhook", "delay_seconds"), ["tasks", 12, "delay_seconds"]),
        (("body", "payload", "n"), ["payload", "n"]),
        (("body",), []),
        ((), []),
        (("query", "limit"), ["query", "limit"]),
        (("path", "task_id"), ["path", "task_id"]),
    ],
)
def test_drops_body_root_and_union_tag(loc: tuple[Any, ...], expected: list[Any]) -> None:
    assert _field_path(loc, TYPES) == expected


def test_type_names_elsewhere_in_the_path_are_kept() -> None:
    # a payload field that happens to be named like a task type is not a union tag
    assert _field_path(("body", "webhook", "payload", "webhook"), TYPES) == ["payload", "webhook"]
    assert _field_path(("body", "payload", "thumbnail", 0), TYPES) == [
        "payload", "thumbnail", 0,
    ]


def test_body_is_only_dropped_at_the_root() -> None:
    assert _field_path(("body", "payload", "body"), TYPES) == ["payload", "body"]


def test_without_registered_types_nothing_but_body_is_dropped() -> None:
    assert _field_path(("body", "webhook", "payload"), set()) == ["webhook", "payload"]


class Resize(BaseModel):
    width: int
    height: int


class Ping(BaseModel):
    url: str


def _app() -> Conveyor:
    app = Conveyor()

    async def resize(payload: Resize, ctx: TaskContext) -> None:
        return None

    async def ping(payload: Ping, ctx: TaskContext) -> None:
        return None

    app.task("resize", payload=Resize)(resize)
    app.task("ping", payload=Ping)(ping)
    return app


def test_paths_of_real_pydantic_errors_for_a_single_request() -> None:
    app = _app()
    single, _ = request_models(app.registry)
    with pytest.raises(ValidationError) as info:
        TypeAdapter(single).validate_python({"type": "resize", "payload": {"width": "x"}})
    paths = sorted(
        _field_path(("body", *e["loc"]), {"resize", "ping"}) for e in info.value.errors()
    )
    assert paths == [["payload", "height"], ["payload", "width"]]


def test_paths_of_real_pydantic_errors_for_a_batch() -> None:
    app = _app()
    _, batch = request_models(app.registry)
    with pytest.raises(ValidationError) as info:
        batch.model_validate(
            {"tasks": [{"type": "ping", "payload": {"url": "u"}},
                       {"type": "ping", "payload": {}}]}
        )
    paths = [_field_path(("body", *e["loc"]), {"resize", "ping"}) for e in info.value.errors()]
    assert paths == [["tasks", 1, "payload", "url"]]
