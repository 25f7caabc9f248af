"""A test app for flow control: handlers measure themselves in Redis, where the test reads it.

Keys under `<prefix>:test:flow:`: `running:<type>[:<key>]` (a gauge) and `peak:<type>[:<key>]`
(its highest value), `starts:<type>` (a list of start times by Redis's clock, in µs), `order`
(the task ids in the order they started).
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.queue.connection import Redis, open_redis
from conveyor.registry import TaskContext

app = Conveyor()
_clients: dict[int, Redis] = {}

# KEYS[1] gauge, KEYS[2] peak: count one more running, keep the highest seen.
_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""
# KEYS[1] list of start times: push Redis's TIME in µs.
_STAMP = """
local t = redis.call('TIME')
redis.call('RPUSH', KEYS[1], tonumber(t[1]) * 1000000 + tonumber(t[2]))
return 0
"""


def _redis(ctx: TaskContext) -> Redis:
    loop_id = id(asyncio.get_running_loop())
    if loop_id not in _clients:
        _clients[loop_id] = open_redis(ctx.settings, max_connections=16)
    return _clients[loop_id]


def key(prefix: str, *parts: str) -> str:
    return ":".join([prefix, "test", "flow", *parts])


class Job(BaseModel):
    seconds: float = 0.0
    tenant: str = ""
    label: str = ""


async def _measured(ctx: TaskContext, payload: Job, *scopes: str) -> None:
    redis = _redis(ctx)
    prefix = ctx.settings.key_prefix
    await redis.rpush(key(prefix, "order"), payload.label or ctx.task_id)
    await redis.eval(_STAMP, 1, key(prefix, "starts", ctx.task_type))
    for scope in scopes:
        await redis.eval(_ENTER, 2, key(prefix, "running", scope), key(prefix, "peak", scope))
    try:
        await asyncio.sleep(payload.seconds)
    finally:
        for scope in scopes:
            await redis.decr(key(prefix, "running", scope))


@app.task("limited", payload=Job, max_concurrency=3)
async def limited(payload: Job, ctx: TaskContext) -> None:
    await _measured(ctx, payload, "limited")


@app.task("keyed", payload=Job, concurrency_key="payload.tenant", max_concurrency_per_key=2)
async def keyed(payload: Job, ctx: TaskContext) -> None:
    await _measured(ctx, payload, f"keyed:{payload.tenant}")


@app.task("keyed_rate", payload=Job, concurrency_key="payload.tenant", rate_limit_per_key="5/s")
async def keyed_rate(payload: Job, ctx: TaskContext) -> None:
    await _measured(ctx, payload)


@app.task("rated", payload=Job, rate_limit="20/s")
async def rated(payload: Job, ctx: TaskContext) -> None:
    await _measured(ctx, payload)


@app.task("plain", payload=Job)
async def plain(payload: Job, ctx: TaskContext) -> None:
    await _measured(ctx, payload, "plain")


@app.task("ranked", payload=Job, priorities=True)
async def ranked(payload: Job, ctx: TaskContext) -> None:
    await _measured(ctx, payload)
