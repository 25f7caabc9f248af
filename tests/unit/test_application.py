"""`Conveyor.task` and `Conveyor.cron`: what registering a handler puts in the registry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.errors import ConfigError
from conveyor.registry import CronJob, CronTick, RetryPolicy, TaskContext


class Resize(BaseModel):
    width: int


def context(task_type: str = "t") -> TaskContext:
    return TaskContext(
        task_id=str(uuid.uuid4()),
        task_type=task_type,
        attempt=1,
        max_attempts=1,
        run_at=datetime.now(UTC),
        worker_id="w-1",
        settings=Settings(database_url="postgresql://x", redis_url="redis://x"),
    )


# -- task --------------------------------------------------------------------------------------


def test_async_handler_runs_in_loop_and_decorator_returns_it() -> None:
    app = Conveyor()

    async def resize(payload: Resize, ctx: TaskContext) -> int:
        return payload.width

    decorated = app.task("resize", payload=Resize)(resize)
    assert decorated is resize
    registered = app.registry.get("resize")
    assert registered.run_in == "loop"
    assert registered.handler is resize
    assert registered.payload_model is Resize


def test_sync_handler_runs_in_thread() -> None:
    app = Conveyor()

    @app.task("resize", payload=Resize)
    def resize(payload: Resize, ctx: TaskContext) -> int:
        return payload.width

    assert app.registry.get("resize").run_in == "thread"
    assert app.registry.get("resize").handler is resize
    assert resize(Resize(width=3), context()) == 3  # still the plain function


def test_sync_handler_with_process_runs_in_process() -> None:
    app = Conveyor()

    def resize(payload: Resize, ctx: TaskContext) -> int:
        return payload.width

    assert app.task("resize", payload=Resize, process=True)(resize) is resize
    assert app.registry.get("resize").run_in == "process"


def test_async_handler_with_process_is_rejected() -> None:
    app = Conveyor()

    async def resize(payload: Resize, ctx: TaskContext) -> int:
        return payload.width

    with pytest.raises(ConfigError, match="process handlers must be plain functions"):
        app.task("resize", payload=Resize, process=True)(resize)
    assert len(app.registry) == 0


def test_options_are_carried_to_the_task_type() -> None:
    app = Conveyor()
    policy = RetryPolicy(base_delay_s=2.0, max_delay_s=20.0)

    @app.task("resize", payload=Resize, max_attempts=7, timeout=12.5, retry=policy,
              description="Resize an image.")
    async def resize(payload: Resize, ctx: TaskContext) -> None:
        return None

    registered = app.registry.get("resize")
    assert registered.max_attempts == 7
    assert registered.timeout_s == 12.5
    assert registered.retry is policy
    assert registered.description == "Resize an image."


def test_description_defaults_to_docstring_then_empty() -> None:
    app = Conveyor()

    @app.task("documented", payload=Resize)
    async def documented(payload: Resize, ctx: TaskContext) -> None:
        """Shrinks pictures."""

    @app.task("bare", payload=Resize)
    async def bare(payload: Resize, ctx: TaskContext) -> None:
        return None

    assert app.registry.get("documented").description == "Shrinks pictures."
    assert app.registry.get("bare").description == ""
    assert app.registry.get("bare").max_attempts is None
    assert app.registry.get("bare").timeout_s is None


def test_registering_a_name_twice_fails() -> None:
    app = Conveyor()

    async def one(payload: Resize, ctx: TaskContext) -> None:
        return None

    app.task("resize", payload=Resize)(one)
    with pytest.raises(ConfigError, match="twice"):
        app.task("resize", payload=Resize)(one)


def test_invalid_name_fails() -> None:
    app = Conveyor()

    async def one(payload: Resize, ctx: TaskContext) -> None:
        return None

    with pytest.raises(ConfigError):
        app.task("Resize Images", payload=Resize)(one)


async def test_enqueue_without_bound_client_fails() -> None:
    app = Conveyor()
    with pytest.raises(ConfigError, match="running Conveyor process"):
        await app.enqueue(None, "resize", {"width": 1})  # type: ignore[arg-type]


# -- cron --------------------------------------------------------------------------------------


async def test_async_cron_registers_a_type_and_a_job() -> None:
    app = Conveyor()
    seen: list[TaskContext] = []

    async def cleanup(ctx: TaskContext) -> str:
        """Removes old rows."""
        seen.append(ctx)
        return "done"

    assert app.cron("0 */5 * * * *")(cleanup) is cleanup
    registered = app.registry.get("cleanup")
    assert registered.payload_model is CronTick
    assert registered.run_in == "loop"
    assert registered.max_attempts == 1
    assert registered.timeout_s is None
    assert registered.description == "Removes old rows."
    assert app.registry.cron_jobs == {"cleanup": CronJob("cleanup", "0 */5 * * * *")}

    ctx = context("cleanup")
    result = await registered.handler(CronTick(scheduled_at=datetime.now(UTC)), ctx)
    assert result == "done"
    assert seen == [ctx]


def test_sync_cron_runs_in_thread_and_adapts_the_call() -> None:
    app = Conveyor()

    def report(ctx: TaskContext) -> str:
        return ctx.task_type

    app.cron("*/10 * * * * *", name="nightly-report", timeout=3.0, max_attempts=2)(report)
    registered = app.registry.get("nightly-report")
    assert registered.run_in == "thread"
    assert registered.timeout_s == 3.0
    assert registered.max_attempts == 2
    assert registered.description == "cron job */10 * * * * *"
    assert "report" not in app.registry.types
    assert app.registry.cron_jobs["nightly-report"].expression == "*/10 * * * * *"
    tick = CronTick(scheduled_at=datetime.now(UTC))
    assert registered.handler(tick, context("nightly-report")) == "nightly-report"


def test_cron_rejects_five_field_expression() -> None:
    app = Conveyor()

    async def every_minute(ctx: TaskContext) -> None:
        return None

    with pytest.raises(ConfigError, match="six-field"):
        app.cron("* * * * *")(every_minute)
    assert len(app.registry) == 0
    assert app.registry.cron_jobs == {}


def test_cron_and_task_share_the_name_space() -> None:
    app = Conveyor()

    async def tick(payload: Any, ctx: TaskContext) -> None:
        return None

    async def tick_cron(ctx: TaskContext) -> None:
        return None

    app.task("tick", payload=Resize)(tick)
    with pytest.raises(ConfigError, match="twice"):
        app.cron("* * * * * *", name="tick")(tick_cron)
    assert app.registry.cron_jobs == {}
