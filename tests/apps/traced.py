"""A test app for tracing: plain tasks, a flaky one, and parents that enqueue a child from the
loop and from a thread."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.registry import RetryPolicy, TaskContext

app = Conveyor()


class Echo(BaseModel):
    value: Any = None


class Flaky(BaseModel):
    failures: int


@app.task("echo", payload=Echo)
async def echo(payload: Echo, ctx: TaskContext) -> dict[str, Any]:
    return {"echo": payload.value}


@app.task("flaky", payload=Flaky, max_attempts=5,
          retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
async def flaky(payload: Flaky, ctx: TaskContext) -> dict[str, int]:
    if ctx.attempt <= payload.failures:
        raise RuntimeError(f"planned failure {ctx.attempt}")
    return {"attempts": ctx.attempt}


@app.task("parent", payload=Echo)
async def parent(payload: Echo, ctx: TaskContext) -> str:
    """Enqueues a child from the event loop."""
    return str((await echo.enqueue(Echo(value=ctx.task_id))).id)


@app.task("parent_thread", payload=Echo)
def parent_thread(payload: Echo, ctx: TaskContext) -> str:
    """Enqueues a child from a thread."""
    return str(echo.enqueue_sync(Echo(value=ctx.task_id)).id)
