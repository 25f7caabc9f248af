"""A test app for waiting, progress, attempt history and cancelling: handlers of every kind
(loop, thread, process) that report progress, fail in several ways, or run until stopped.
Process handlers are module-level functions (they are imported by the pool's children)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.registry import RetryPolicy, TaskContext

app = Conveyor()
runs: Counter[str] = Counter()  # in-process handlers: runs per task id
gate = asyncio.Event()  # `gated` tasks finish once it is set


class Empty(BaseModel):
    pass


class Fails(BaseModel):
    failures: int = 0


FAST_RETRY = RetryPolicy(base_delay_s=0.02, max_delay_s=0.05)


@app.task("noop", payload=Empty)
async def noop(payload: Empty, ctx: TaskContext) -> dict[str, int]:
    return {"attempt": ctx.attempt}


@app.task("flaky", payload=Fails, max_attempts=5, retry=FAST_RETRY)
async def flaky(payload: Fails, ctx: TaskContext) -> dict[str, int]:
    runs[ctx.task_id] += 1
    if ctx.attempt <= payload.failures:
        raise RuntimeError(f"planned failure {ctx.attempt}")
    return {"attempts": ctx.attempt}


@app.task("gated", payload=Empty)
async def gated(payload: Empty, ctx: TaskContext) -> str:
    await gate.wait()
    return "opened"


@app.task("three-ways", payload=Empty, max_attempts=5, timeout=5, retry=FAST_RETRY)
async def three_ways(payload: Empty, ctx: TaskContext) -> str:
    """Attempt 1 raises, 2 hangs (until its lease is taken from it), 3 runs past its timeout,
    4 works."""
    runs[ctx.task_id] += 1
    if ctx.attempt == 1:
        raise ValueError("bad input, first time")
    if ctx.attempt in (2, 3):
        await asyncio.sleep(10)
    return "fourth time lucky"


# -- progress -----------------------------------------------------------------------------


@app.task("progress-loop", payload=Empty)
async def progress_loop(payload: Empty, ctx: TaskContext) -> str:
    for step in range(1, 1001):  # a tight loop: throttled, so cheap
        await ctx.progress(step / 1000, "looping", step=step)
    await asyncio.sleep(0.5)
    return "done"


@app.task("progress-thread", payload=Empty)
def progress_thread(payload: Empty, ctx: TaskContext) -> str:
    for step in range(1, 1001):
        ctx.progress(step / 1000, "threading", step=step)
    time.sleep(0.5)
    return "done"


@app.task("progress-process", payload=Empty, process=True)
def progress_process(payload: Empty, ctx: TaskContext) -> str:
    for step in range(1, 1001):
        ctx.progress(step / 1000, "processing", step=step)
    time.sleep(0.5)
    return "done"


# -- cancel -------------------------------------------------------------------------------


@app.task("forever-loop", payload=Empty)
async def forever_loop(payload: Empty, ctx: TaskContext) -> None:
    runs[ctx.task_id] += 1
    await ctx.progress(0.1, "started")
    await asyncio.sleep(3600)


@app.task("forever-thread", payload=Empty)
def forever_thread(payload: Empty, ctx: TaskContext) -> str:
    """Cooperative: returns once asked to stop."""
    runs[ctx.task_id] += 1
    ctx.progress(0.1, "started")
    ctx.cancelled.wait(3600)
    return "stopped"


@app.task("stubborn-thread", payload=Empty)
def stubborn_thread(payload: Empty, ctx: TaskContext) -> str:
    """Ignores the request: abandoned after the grace period."""
    runs[ctx.task_id] += 1
    ctx.progress(0.1, "started")
    time.sleep(3)
    return "finished anyway"


@app.task("forever-process", payload=Empty, process=True)
def forever_process(payload: Empty, ctx: TaskContext) -> None:
    ctx.progress(0.1, "started")
    time.sleep(3600)


def reset() -> None:
    runs.clear()
    gate.clear()

