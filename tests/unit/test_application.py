"""`Conveyor.task` and `Conveyor.cron`: what registering a handler puts in the registry."""

from __future__ import annotations

import functools
import multiprocessing
import pickle
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import Any, assert_type

import pytest
from pydantic import BaseModel

from conveyor.application import Conveyor, TaskDefinition
from conveyor.config import Settings
from conveyor.errors import ConfigError
from conveyor.registry import CronJob, CronTick, RetryPolicy, TaskContext
from conveyor.store.tasks import TaskRecord


class Resize(BaseModel):
    width: int


class Color(BaseModel):
    name: str


_APP = Conveyor()


@_APP.task("crunch", payload=Resize, process=True)
def crunch(payload: Resize, ctx: TaskContext) -> int:
    return payload.width * 2


def square(payload: Resize, ctx: TaskContext) -> int:
    return payload.width ** 2


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


async def test_async_handler_runs_in_loop_and_decorator_returns_its_definition() -> None:
    app = Conveyor()

    async def resize(payload: Resize, ctx: TaskContext) -> int:
        """Shrinks."""
        return payload.width

    decorated = app.task("resize", payload=Resize)(resize)
    assert isinstance(decorated, TaskDefinition)
    assert decorated.handler is resize
    assert (decorated.name, decorated.payload_model) == ("resize", Resize)
    assert decorated.__module__ == __name__
    assert decorated.__doc__ == "Shrinks."
    assert await decorated(Resize(width=4), context()) == 4  # callable as the handler
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
    assert app.registry.get("resize").handler is resize.handler
    assert resize(Resize(width=3), context()) == 3  # still callable as the plain function


def test_sync_handler_with_process_runs_in_process() -> None:
    app = Conveyor()

    def resize(payload: Resize, ctx: TaskContext) -> int:
        return payload.width

    definition = app.task("resize", payload=Resize, process=True)(resize)
    assert definition.handler is resize
    assert app.registry.get("resize").run_in == "process"
    assert app.registry.get("resize").handler is definition


def test_a_decorated_process_handler_pickles_by_its_module_level_name() -> None:
    pickled = pickle.dumps(functools.partial(crunch, Resize(width=2)))
    assert b"crunch" in pickled
    assert b"TaskDefinition" not in pickled
    restored = pickle.loads(pickled)
    assert restored.func is crunch
    assert restored(context()) == 4


def test_a_process_handler_registered_by_call_pickles_as_the_plain_function() -> None:
    definition = Conveyor().task("square", payload=Resize, process=True)(square)
    restored = pickle.loads(pickle.dumps(definition))
    assert restored is square


def test_a_decorated_process_handler_runs_in_a_spawned_process() -> None:
    handler = _APP.registry.get("crunch").handler
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        assert pool.submit(handler, Resize(width=5), context()).result(timeout=60) == 10


async def test_enqueue_without_connections_says_how_to_get_them() -> None:
    with pytest.raises(ConfigError, match="Producer"):
        await crunch.enqueue(Resize(width=1))
    with pytest.raises(ConfigError, match="Producer"):
        crunch.enqueue_sync(Resize(width=1))


def typed_payloads(wrong: Color) -> None:
    """Never called: mypy checks it (a needless ignore is an error under strict mypy)."""
    assert_type(crunch.enqueue_sync(Resize(width=1)), TaskRecord)
    crunch.enqueue_sync(wrong)  # type: ignore[arg-type]
    crunch.enqueue_sync({"width": 1})  # type: ignore[arg-type]
    assert_type(crunch(Resize(width=1), context()), int)
    crunch(wrong, context())  # type: ignore[arg-type]

    async def handler(payload: Color, ctx: TaskContext) -> None:
        return None

    Conveyor().task("mismatch", payload=Resize)(handler)  # type: ignore[arg-type]


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
