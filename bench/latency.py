"""Enqueue→start latency, and the enqueue-and-wait round trip, under a steady load below the
maximum.

A paced (open-loop) producer enqueues `count` tasks at `rate` per second through
`Client.enqueue` (or `enqueue_many` of the tasks due at each tick with `batch` > 1), each without
waiting for the previous one, at most `max_in_flight` at a time. Each payload carries
`t = time.time()` taken just before its enqueue call; the handler RPUSHes `now - t` to
`bench.app.LATENCY_KEY`. One warm worker consumes meanwhile.

The wait phase paces the same way, each call an `enqueue` then `Client.wait` for the task's
end (fed by the events stream): the round trip is from before the enqueue to the wait's answer.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from bench import harness as bp
from bench.app import LATENCY_KEY, TYPE, Noop, app
from bench.doors import Context, Door, reset_if_flushed
from bench.procs import ForeignLoad, peak_rss_mb
from conveyor.cli import tune_gc
from conveyor.client import TaskRequest
from conveyor.state import open_state


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (0 < q <= 100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


async def paced_enqueue(ctx: Context, rate: float, count: int, *, batch: int = 1,
                        max_in_flight: int = 64, wait: bool = False
                        ) -> tuple[float, float, list[float], list[float]]:
    """Enqueue `count` stamped tasks at `rate`/s; (t_start, t_end) of the producer, how long
    each enqueue call took (seconds; with `wait`, until the task's end was seen) and, with
    `wait`, how long after its completion each waiter had the task (from its `finished_at`,
    Postgres's clock on the same machine, taken before the outcome's commit)."""
    async with open_state(ctx.settings, app) as state:
        await reset_if_flushed(ctx, state.pool, state.redis)
        gate = asyncio.Semaphore(max_in_flight)
        calls: set[asyncio.Task[Any]] = set()  # in flight only: done ones are dropped
        durations: list[float] = []
        lags: list[float] = []

        async def one(k: int) -> None:
            try:
                t = time.time()
                if k == 1:
                    inserted = await state.client.enqueue(TYPE, Noop(t=t))
                    if wait:
                        done = await state.client.wait(inserted.record.id, 60,
                                                       known=inserted.record)
                        if done.status != "succeeded" or done.finished_at is None:
                            raise RuntimeError(f"waited for {done.id}: {done.status}")
                        lags.append(time.time() - done.finished_at.timestamp())
                else:
                    await state.client.enqueue_many([TaskRequest(TYPE, Noop(t=t))
                                                     for _ in range(k)])
                durations.append(time.time() - t)
            finally:
                gate.release()

        # The producer stands for a client application, tuned as Conveyor's own processes are
        # (`conveyor.cli.tune_gc`): otherwise its garbage-collector pauses, between a task's
        # commit and its publish, would show up as the queue's latency.
        tune_gc()
        async with asyncio.timeout(ctx.timeout):
            t0 = time.time()
            start = time.perf_counter()
            sent = 0
            while sent < count:
                due = min(count, int((time.perf_counter() - start) * rate) + 1)
                while sent < due:
                    k = min(batch, due - sent)
                    await gate.acquire()
                    call = asyncio.create_task(one(k))
                    calls.add(call)
                    call.add_done_callback(calls.discard)
                    sent += k
                await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
            await asyncio.gather(*calls)
            return t0, time.time(), durations, lags


def run_latency(ctx: Context, door: Door, rate: float, seconds: float, log_path: Any, *,
                batch: int = 1, wait: bool = False) -> dict[str, Any]:
    """One warm `conveyor worker`, `rate` * `seconds` paced tasks; latency figures and the
    worker's peak RSS."""
    import redis

    count = max(50, round(rate * seconds))
    r = redis.Redis.from_url(bp.SETUP.redis_url)
    res: dict[str, Any] = {"rate": rate, "count": count, "batch": batch}
    try:
        r.flushdb()
        proc = bp.start_worker(door, count, log_path)
        try:
            with bp.deadline(ctx.timeout, "latency warm-up"):
                door.enqueue(1)
                while not r.exists(bp.FIRST_KEY):
                    if proc.poll() is not None:
                        raise RuntimeError(f"worker exited with {proc.returncode} in warm-up")
                    time.sleep(0.01)
            r.delete(bp.DONE_KEY, bp.FIRST_KEY, bp.LAST_KEY, LATENCY_KEY)
            load0 = ForeignLoad.now()
            with bp.deadline(ctx.timeout, "latency producer"):
                t0, t1, calls, lags = asyncio.run(paced_enqueue(ctx, rate, count, batch=batch,
                                                          wait=wait))
            bp.wait_done(r, proc, ctx.timeout)
            res["foreign_pct"] = ForeignLoad.now().pct_since(load0)
            time.sleep(0.2)  # duplicates, if any, show up in the counter
            res["worker_hwm_mb"] = peak_rss_mb(proc.pid)
        finally:
            res["clean_stop"] = bp.stop_worker(proc)
        values = [float(v) for v in r.lrange(LATENCY_KEY, 0, -1)]
        res.update({
            "achieved_rate": count / (t1 - t0),
            "done": int(r.get(bp.DONE_KEY) or 0),
            "samples": len(values),
            "p50_ms": 1000 * percentile(values, 50),
            "p90_ms": 1000 * percentile(values, 90),
            "p99_ms": 1000 * percentile(values, 99),
            "max_ms": 1000 * max(values),
            "enqueue_p50_ms": 1000 * percentile(calls, 50),
            "enqueue_p99_ms": 1000 * percentile(calls, 99),
        })
        if lags:
            res.update({"wake_p50_ms": 1000 * percentile(lags, 50),
                        "wake_p99_ms": 1000 * percentile(lags, 99)})
    finally:
        r.flushdb()
        r.close()
    return res
