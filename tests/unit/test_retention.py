"""A type's retention as `@app.task(retention=...)` gives it, over the global settings the
janitor otherwise applies (the janitor reads `TaskType.retention`: see cli.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.errors import ConfigError
from conveyor.registry import Retention


class Empty(BaseModel):
    pass


def kept(app: Conveyor, name: str, settings: Settings) -> dict[str, float]:
    [found] = [t for t in app.registry if t.name == name]
    return found.retention.resolved(settings)


def test_a_types_retention_overrides_the_settings_per_status() -> None:
    app = Conveyor()

    @app.task("default", payload=Empty)
    async def default(payload: Empty, ctx: Any) -> None: ...

    @app.task("hour", payload=Empty, retention=3600)
    async def hour(payload: Empty, ctx: Any) -> None: ...

    @app.task("forever", payload=Empty, retention=0)
    async def forever(payload: Empty, ctx: Any) -> None: ...

    @app.task("dead_kept", payload=Empty, retention=Retention(dead=0, cancelled=60))
    async def dead_kept(payload: Empty, ctx: Any) -> None: ...

    settings = Settings(retention_succeeded=10, retention_cancelled=20, retention_dead=30)
    assert kept(app, "default", settings) == {"succeeded": 10, "cancelled": 20, "dead": 30}
    assert kept(app, "hour", settings) == {"succeeded": 3600, "cancelled": 3600, "dead": 3600}
    assert kept(app, "forever", settings) == {"succeeded": 0, "cancelled": 0, "dead": 0}
    assert kept(app, "dead_kept", settings) == {"succeeded": 10, "cancelled": 60, "dead": 0}


def test_the_defaults_keep_a_day_a_day_and_a_week() -> None:
    assert Retention().resolved(Settings()) == {
        "succeeded": 86_400, "cancelled": 86_400, "dead": 604_800}
    assert Settings().idempotency_ttl == 86_400


def test_a_negative_retention_is_refused_naming_it() -> None:
    app = Conveyor()
    with pytest.raises(ConfigError, match=r"retention succeeded=-1\.0"):
        app.task("bad", payload=Empty, retention=-1)
