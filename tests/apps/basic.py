"""A test app whose handlers record what they do in `probe` (in-process workers only)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.errors import Fail
from conveyor.registry import RetryPolicy, TaskContext


class Probe:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.runs: Counter[str] = Counter()
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()


probe = Probe()
app = Conveyor()


class Echo(BaseModel):
    value: Any = None


class Flaky(BaseModel):
    failures: int


class Sleep(BaseModel):
    seconds: float


@app.task("echo", payload=Echo)
async def echo(payload: Echo, ctx: TaskContext) -> dict[str, Any]:
    probe.runs[ctx.task_id] += 1
    return {"echo": payload.value, "attempt": ctx.attempt}


@app.task("flaky", payload=Flaky, max_attempts=5,
          retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
async def flaky(payload: Flaky, ctx: TaskContext) -> dict[str, int]:
    probe.runs[ctx.task_id] += 1
    if ctx.attempt <= payload.failures:
        raise RuntimeError(f"planned failure {ctx.attempt}")
    return {"attempts": ctx.attempt}


@app.task("doomed", payload=Echo, max_attempts=3,
          retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
async def doomed(payload: Echo, ctx: TaskContext) -> None:
    probe.runs[ctx.task_id] += 1
    raise RuntimeError("always fails")


@app.task("refuse", payload=Echo)
async def refuse(payload: Echo, ctx: TaskContext) -> None:
    probe.runs[ctx.task_id] += 1
    raise Fail("not doing this")


@app.task("sleep", payload=Sleep, timeout=30)
async def sleep(payload: Sleep, ctx: TaskContext) -> dict[str, int]:
    probe.runs[ctx.task_id] += 1
    probe.running += 1
    probe.peak = max(probe.peak, probe.running)
    try:
        await asyncio.sleep(payload.seconds)
    finally:
        probe.running -= 1
    return {"peak": probe.peak}


@app.task("blocking", payload=Sleep)
def blocking(payload: Sleep, ctx: TaskContext) -> dict[str, float]:
    began = time.monotonic()
    time.sleep(payload.seconds)
    return {"slept": round(time.monotonic() - began, 3)}


@app.task("timeout", payload=Sleep, timeout=0.2, max_attempts=2,
          retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
async def too_slow(payload: Sleep, ctx: TaskContext) -> None:
    await asyncio.sleep(payload.seconds)


@app.cron("* * * * * *")
async def every_second(ctx: TaskContext) -> str:
    probe.runs[f"cron:{ctx.run_at.isoformat()}"] += 1
    return ctx.run_at.isoformat()


@app.task("poison", payload=Echo, max_attempts=2,
          retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
async def poison(payload: Echo, ctx: TaskContext) -> Any:
    """Fails with, or returns, what Postgres cannot store: NUL characters."""
    probe.runs[ctx.task_id] += 1
    if payload.value == "raise":
        raise RuntimeError("bad\x00byte")
    if payload.value == "cancel":
        cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        cancelled.cancel()
        await cancelled  # a cancellation of the handler's own making, not of the run
    return {"text": "nul\x00inside"}
