"""Workflow benchmark: a fan-out/fan-in workflow of N nodes (a root, N-2 middle nodes, one
callback that reads every middle node's result with `ctx.upstream()`) against N independent
tasks, in the same run, on the same servers and the same warm worker.

    python -m bench --workflows [--workflow-nodes 10000] [--runs 3]

Wall time: for the independent tasks, the first enqueue to the last completion (enqueued
1000 per call); for the workflow, its creation (one transaction) to its callback's
completion. Per-node overhead: the difference divided by N. One process runs the worker
(concurrency 10) and the relay that publishes released dependents; Postgres is a durable
private cluster (or --database-url). The figures go to BENCHMARKS.md between
`<!-- workflows:start -->` and `<!-- workflows:end -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import statistics
import time
from typing import Any

from pydantic import BaseModel

from bench import sections
from conveyor.application import Conveyor
from conveyor.client import NodeRequest, TaskRequest
from conveyor.config import Settings
from conveyor.cron.relay import Relay
from conveyor.registry import TaskContext
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.store.workers import Liveness, confirmation_s, watch_gap_s
from conveyor.worker.worker import Worker

app = Conveyor()


class Empty(BaseModel):
    pass


@app.task("wf.noop", payload=Empty)
async def noop(payload: Empty, ctx: TaskContext) -> None:
    return None


@app.task("wf.callback", payload=Empty)
async def callback(payload: Empty, ctx: TaskContext) -> dict[str, int]:
    return {"upstreams": len(await ctx.upstream())}


async def _finished(state: AppState, type_: str) -> int:
    found: int = await state.pool.fetchval(
        f"SELECT count(*) FROM {state.store.table} WHERE type = $1 AND status = 'succeeded'",
        type_)
    return found


async def independent(state: AppState, n: int) -> float:
    await state.pool.execute(f"DELETE FROM {state.store.table} WHERE type = 'wf.noop'")
    started = time.perf_counter()
    for first in range(0, n, 1000):
        await state.client.enqueue_many(
            [TaskRequest("wf.noop", Empty()) for _ in range(min(1000, n - first))])
    while await _finished(state, "wf.noop") < n:  # noqa: ASYNC110 - Postgres is the truth
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


async def fan(state: AppState, n: int) -> float:
    await state.pool.execute(f"DELETE FROM {state.store.table} WHERE type = 'wf.noop'")
    mids = [NodeRequest(f"m{i}", TaskRequest("wf.noop", Empty()), ("root",))
            for i in range(n - 2)]
    nodes = [NodeRequest("root", TaskRequest("wf.noop", Empty())), *mids,
             NodeRequest("done", TaskRequest("wf.callback", Empty()),
                         tuple(m.key for m in mids))]
    started = time.perf_counter()
    created = await state.client.create_workflow(nodes, "bench", max_nodes=n)
    last = {t.workflow_key: t.id for t in created.tasks}["done"]
    while (record := await state.client.get(last)).status not in (  # noqa: ASYNC110
            "succeeded", "dead", "cancelled"):
        await asyncio.sleep(0.02)
    assert record.result == {"upstreams": n - 2}, record
    return time.perf_counter() - started


async def measure(settings: Settings, n: int, runs: int) -> dict[str, Any]:
    async with open_state(settings, app) as state:
        stop = Shutdown(10)
        liveness = Liveness(state.workers, ttl_s=settings.heartbeat_ttl,
                            confirm_s=confirmation_s(settings.heartbeat_interval),
                            watch_gap_s=watch_gap_s(settings.rebalance_interval,
                                                    settings.relay_interval))
        relay = Relay(state.redis, state.keys, state.streams, state.store,
                      list(app.registry.types), liveness=liveness,
                      interval_s=settings.relay_interval, grace_s=settings.relay_grace,
                      ttl_s=settings.heartbeat_ttl, events=state.events)
        services = [asyncio.create_task(s.run(stop)) for s in (Worker(state), relay)]
        try:
            while not relay.listening:  # noqa: ASYNC110 - the relay exposes it as a flag
                await asyncio.sleep(0.05)
            await independent(state, min(n, 1000))  # warm-up
            plain, flow = [], []
            for _ in range(runs):
                plain.append(await independent(state, n))
                flow.append(await fan(state, n))
        finally:
            stop.begin("bench over")
            for task in services:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 30)
            await state.pool.execute(f"DROP SCHEMA {settings.database_schema} CASCADE")
    return {"plain": plain, "flow": flow}


DASH = "\u2013"


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}{DASH}{max(values):.2f}"


def render(n: int, figures: dict[str, Any], command: str, note: str) -> str:
    plain, flow = statistics.median(figures["plain"]), statistics.median(figures["flow"])
    return "\n".join([
        "## Workflows: fan-out/fan-in against independent tasks",
        "",
        f"`{command}` on {dt.date.today().isoformat()}; {note}. A root, {n - 2:,} middle "
        f"nodes and a callback that reads all their results ({n:,} nodes, created in one "
        f"transaction), against {n:,} independent no-op tasks enqueued 1000 per call; one "
        f"warm worker (concurrency 10) and the relay in one process; median (min{DASH}max) of "
        f"{len(figures['plain'])} runs, alternating.",
        "",
        "| run | wall time (s) | tasks/s | per-node overhead |",
        "|---|---|---|---|",
        f"| {n:,} independent tasks | {plain:.2f} ({spread(figures['plain'])}) | "
        f"{n / plain:,.0f} | {DASH} |",
        f"| {n:,}-node fan-out/fan-in workflow | {flow:.2f} ({spread(figures['flow'])}) | "
        f"{n / flow:,.0f} | {(flow - plain) / n * 1e6:+,.0f} µs |",
        "",
        "The overhead is the workflow's wall time less the independent tasks', per node: the "
        "edges and counters written at creation, each completion's trigger decrementing the "
        "callback's count (every middle node updates that one row), the release NOTIFYs and "
        f"the relay's publish of the {n - 2:,} released nodes, and the callback's read of "
        "its upstreams.",
    ])


def main(args: argparse.Namespace, servers: dict[str, Any], command: str, note: str) -> int:
    settings = Settings(
        database_url=servers["database_url"], redis_url=servers["redis_url"],
        database_schema="conveyor_bench_wf", key_prefix="conveyor_bench_wf",
        concurrency=10, pg_pool_max=12, relay_interval=1.0, log_format="json",
        log_level="warning")
    figures = asyncio.run(measure(settings, args.workflow_nodes, args.runs))
    load = os.getloadavg()[1]
    note += (f"; the machine's load average over the run's last 5 minutes: {load:.1f} on "
             f"{os.cpu_count()} cores (other processes included)")
    block = render(args.workflow_nodes, figures, command, note)
    print(block)
    sections.put(args.out, "workflows", block)
    return 0
