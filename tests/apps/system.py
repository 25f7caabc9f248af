"""A test app for subprocess tests: handlers record each run in Redis, where the test reads it.

Keys: `<prefix>:test:runs:<task id>` (INCR per run), `<prefix>:test:running` (gauge),
`<prefix>:test:cron:<slot>` (INCR per cron run).
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.queue.connection import Redis, open_redis
from conveyor.registry import TaskContext

app = Conveyor()
_clients: dict[int, Redis] = {}


def _redis(ctx: TaskContext) -> Redis:
    """A client of the worker's Redis (one node, a cluster or through sentinels)."""
    loop_id = id(asyncio.get_running_loop())
    if loop_id not in _clients:
        _clients[loop_id] = open_redis(ctx.settings, max_connections=16)
    return _clients[loop_id]


def runs_key(prefix: str, task_id: str) -> str:
    return f"{prefix}:test:runs:{task_id}"


class Work(BaseModel):
    seconds: float = 0.0


@app.task("work", payload=Work, max_attempts=5, timeout=120)
async def work(payload: Work, ctx: TaskContext) -> dict[str, str]:
    redis = _redis(ctx)
    prefix = ctx.settings.key_prefix
    await redis.incr(runs_key(prefix, ctx.task_id))
    await redis.incr(f"{prefix}:test:running")
    try:
        await asyncio.sleep(payload.seconds)
    finally:
        await redis.decr(f"{prefix}:test:running")
    return {"worker": ctx.worker_id}


@app.cron("* * * * * *")
async def tick(ctx: TaskContext) -> None:
    await _redis(ctx).incr(f"{ctx.settings.key_prefix}:test:cron:{ctx.run_at.isoformat()}")


class Stall(BaseModel):
    first_attempt_s: float
    later_attempts_s: float = 0.5


@app.task("stall", payload=Stall, max_attempts=5, timeout=120)
async def stall(payload: Stall, ctx: TaskContext) -> dict[str, str]:
    """Long on its first attempt, short on the next: a run to take over from a stalled
    worker, finished soon by the one that takes it."""
    redis = _redis(ctx)
    await redis.incr(runs_key(ctx.settings.key_prefix, ctx.task_id))
    await asyncio.sleep(payload.first_attempt_s if ctx.attempt == 1 else payload.later_attempts_s)
    return {"worker": ctx.worker_id}
