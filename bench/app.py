"""The benchmark's Conveyor app: one task type, `noop`, the peers' workload.

Its handler does what every peer's task does (`bench.workload.amark_done`), i.e.
INCR `bench:done` and stamp `bench:first` / `bench:last`, on a redis-py client of its own.
Only in the latency phase does the payload carry `t`, the enqueue time (`time.time()` in the
producer); the handler then also RPUSHes `now - t` to `LATENCY_KEY`.

    conveyor worker --app bench.app:app --concurrency 10
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from bench import workload
from conveyor import Conveyor, TaskContext

TYPE = "noop"
SPEC = "bench.app:app"
LATENCY_KEY = "bench:latency"

app = Conveyor()


class Noop(BaseModel):
    t: float | None = None  # enqueue time, set only in the latency phase


@app.task(TYPE, payload=Noop, description="No-op: INCR the peers' done counter.")
async def noop(payload: Noop, ctx: TaskContext) -> None:
    now = time.time()
    redis = workload.async_redis()
    if payload.t is not None:
        await redis.rpush(LATENCY_KEY, now - payload.t)
    await workload.amark_done(redis)
