"""What flow control costs and gives, on real PostgreSQL and Redis: a worker's throughput on a
type with no limit (this tree, and with `--before PATH` a tree without flow control, rounds
alternating in one run), and the throughput of types at their limits (a rate, a global
concurrency, priorities).

    python -m bench --flow [--flow-n 5000] [--runs 3] [--flow-before /work/main]
    python -m bench.flow --n 5000 --rounds 3 --before /work/main

Each round enqueues n no-op tasks first (batches of 1000), then times one worker (concurrency
10) draining them, so the figure is the worker's path: read, start, run, record, ack; the rate
is that of the steady state (the starts between the 10th and the 90th percentile, the worker's
start-up and the last stragglers left out). Results go to BENCHMARKS.md between the flow
markers, and print, with each tree's spread over its rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench import sections
from conveyor.application import Conveyor
from conveyor.client import TaskRequest
from conveyor.config import Settings
from conveyor.registry import TaskContext
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import open_state
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker

REPO = Path(__file__).resolve().parents[1]
RATE = 200  # the rate-limited type's limit, per second
app = Conveyor()


class Nothing(BaseModel):
    pass


@app.task("noop", payload=Nothing)
async def noop(payload: Nothing, ctx: TaskContext) -> None:
    return None


def _limited() -> None:
    """Types under limits (declared only where this tree knows flow control)."""
    try:
        @app.task("paced", payload=Nothing, rate_limit=f"{RATE}/s")
        async def paced(payload: Nothing, ctx: TaskContext) -> None:
            return None

        @app.task("narrow", payload=Nothing, max_concurrency=4)
        async def narrow(payload: Nothing, ctx: TaskContext) -> None:
            await asyncio.sleep(0.01)

        @app.task("ranked", payload=Nothing, priorities=True)
        async def ranked(payload: Nothing, ctx: TaskContext) -> None:
            return None
    except TypeError:  # a tree without flow control
        pass


_limited()


async def drain(settings: Settings, task_type: str, n: int, *, steady: bool = False,
                **options: Any) -> float:
    """Tasks per second one worker runs, n of `task_type` queued before it starts (`steady`:
    the rate of starts in the middle 80 % of them, the worker's start-up left out)."""
    schema = f"b_{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(update={"database_schema": schema, "key_prefix": schema})
    async with open_state(settings, app) as state:
        for start in range(0, n, 1000):
            await state.client.enqueue_many(
                [TaskRequest(task_type, {}, **options) for _ in range(min(1000, n - start))])
        table = f"{schema}.tasks"
        stop = Shutdown(10)
        began = time.perf_counter()
        worker = asyncio.create_task(Worker(state, types=[task_type]).run(stop))
        await _until(state.pool, table, n)
        rate = n / (time.perf_counter() - began)
        if steady:  # starts per second between the 10th and the 90th percentile start
            row: Any = await state.pool.fetchrow(
                f"SELECT percentile_disc(0.1) WITHIN GROUP (ORDER BY started_at),"
                f" percentile_disc(0.9) WITHIN GROUP (ORDER BY started_at) FROM {table}")
            first, last = row
            rate = 0.8 * n / max(1e-9, (last - first).total_seconds())
        stop.begin("bench over")
        await worker
        await state.pool.execute(f"DROP SCHEMA {schema} CASCADE")
        await state.redis.flushdb()
    return rate


async def _until(pool: Any, table: str, count: int) -> None:
    sql = f"SELECT count(*) FROM {table} WHERE status = 'succeeded'"
    while True:
        if await pool.fetchval(sql) >= count:
            return
        await asyncio.sleep(0.01)


def _settings(database_url: str, redis_url: str) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url, concurrency=10,
                    log_level="warning", log_format="json")


def _quiet() -> None:
    import logging

    from conveyor import logs
    logs.configure("warning", "json")
    logging.getLogger().setLevel(logging.WARNING)


def _child(tree: Path, database_url: str, redis_url: str, n: int) -> float:
    """One unlimited round in a fresh interpreter with `tree`'s code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(REPO)]),
           "PYTHONDONTWRITEBYTECODE": "1"}  # the other tree is only read
    out = subprocess.run(
        [sys.executable, "-m", "bench.flow", "--child", "--n", str(n),
         "--database-url", database_url, "--redis-url", redis_url],
        env=env, cwd=REPO, check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rate"])


async def _limited_rows(settings: Settings, n: int) -> list[tuple[str, float, str]]:
    rows = []
    paced_n = min(n, RATE * 5)
    rows.append((f"rate_limit={RATE}/s, starts/s ({paced_n} tasks)",
                 await drain(settings, "paced", paced_n, steady=True), f"{RATE}"))
    rows.append(("max_concurrency=4, 10 ms handlers, starts/s",
                 await drain(settings, "narrow", min(n, 2000), steady=True),
                 "400 (4 / 10 ms)"))
    rows.append(("priorities, all `low`, drained", await drain(settings, "ranked", n,
                                                               priority="low"), "-"))
    return rows


def run(n: int, rounds: int, before: Path | None) -> str:
    base = Path(tempfile.mkdtemp(prefix="conveyor-bench-flow-"))
    base.chmod(0o755)
    postgres, redis = PostgresServer(base / "pg"), RedisServer(base / "redis")
    postgres.start()
    redis.start()
    try:
        trees = {"this tree": REPO, **({"before": before} if before else {})}
        rates: dict[str, list[float]] = {t: [] for t in trees}
        for i in range(rounds):  # ABBA: what one round leaves behind (a dropped schema's
            # cleanup) falls on each tree alike
            order = list(trees.items())
            for label, tree in order if i % 2 == 0 else order[::-1]:
                rates[label].append(_child(tree, postgres.dsn, redis.url, n))
        limited = asyncio.run(_limited_rows(_settings(postgres.dsn, redis.url), n))
    finally:
        redis.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)
    command = f"python -m bench --flow --flow-n {n} --runs {rounds}" + (
        f" --flow-before {before}" if before else "")
    lines = [f"`{command}`", "",
             f"One worker (concurrency 10) draining {n:,} queued no-op tasks, {rounds} rounds "
             "alternating between trees (ABBA); starts/s in the steady state (10th to 90th "
             "percentile start), median, the spread over the rounds (interquartile range "
             "as a share of the median; min to max), every round:", "",
             "| type | tasks/s | IQR | min to max | rounds |", "|---|---:|---:|---|---|"]
    for label, values in rates.items():
        median = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (median,) * 3
        lines.append(f"| unlimited, {label} | {median:,.0f} | {(q3 - q1) / median:.0%} | "
                     f"{min(values):,.0f} to {max(values):,.0f} | "
                     + ", ".join(f"{v:,.0f}" for v in values) + " |")
    if "before" in rates:
        change = statistics.median(rates["this tree"]) / statistics.median(rates["before"]) - 1
        spread = max((statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0])
                     / statistics.median(v) for v in rates.values()) if rounds > 1 else 0.0
        verdict = ("within the rounds' spread: no difference they can show"
                   if abs(change) <= spread else "larger than the rounds' spread")
        lines += ["", f"Unlimited type, this tree against before ({before}): {change:+.1%} "
                  f"({verdict})."]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Load average at the end: {load} on {os.cpu_count()} CPUs (the rounds' "
              "spread is the machine's, not the code's)."]
    lines += ["", "Types at their limits (one round, one worker):", "",
              "| type | tasks/s | limit |", "|---|---:|---|"]
    lines += [f"| {name} | {rate:,.1f} | {limit} |" for name, rate, limit in limited]
    lines += ["", "The concurrency-limited type holds a slot from its read to its handler's "
              "end: each task's start statement and read (a few ms on this machine) count "
              "against its 4 slots, so it runs below 4 / 10 ms. A lease a handler gives back "
              "is kept for the next read (no release and acquire per task)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flow",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="tasks per round (default 5000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", type=Path, help="a checkout without flow control to compare")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--database-url", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    _quiet()
    if args.child:
        rate = asyncio.run(drain(_settings(args.database_url, args.redis_url), "noop", args.n,
                                 steady=True))
        print(json.dumps({"rate": rate}))
        return 0
    body = run(args.n, args.rounds, args.before)
    print(body)
    sections.put(args.out, "flow", "## Flow control\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
