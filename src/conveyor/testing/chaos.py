"""The chaos run: tasks flow through real worker processes while workers are SIGKILLed, Redis
restarts (once with its data wiped) and Postgres restarts; at the end every task must have
succeeded, and none may have been completed twice.

    python -m conveyor.testing.chaos --tasks 2000 --kills 3 --redis-wipes 1 --pg-restarts 1

It starts its own PostgreSQL and Redis (see `servers.py`), a `conveyor cron` process and
`--workers` `conveyor worker` processes running this module's `app`. Each handler run inserts a
row into `chaos.runs` (its effect, counted as handler runs); a trigger on the tasks table
inserts a row into `chaos.completions` whenever a task becomes `succeeded`, so a completion
recorded twice would show as two rows. Exit status: 0 if nothing was lost or completed twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import BaseModel

from conveyor import logs
from conveyor.application import Conveyor
from conveyor.client import TaskRequest
from conveyor.config import Settings
from conveyor.errors import Unavailable
from conveyor.registry import RetryPolicy, TaskContext
from conveyor.state import AppState, open_state
from conveyor.testing.servers import PostgresServer, RedisServer

SCHEMA = "conveyor"
app = Conveyor()
_pools: dict[int, asyncpg.Pool[asyncpg.Record]] = {}


class Effect(BaseModel):
    n: int
    work_ms: int = 0


@app.task("effect", payload=Effect, max_attempts=100, timeout=30,
          retry=RetryPolicy(base_delay_s=0.2, max_delay_s=2.0))
async def effect(payload: Effect, ctx: TaskContext) -> dict[str, int]:
    """Record this run in chaos.runs, then pretend to work for `work_ms`."""
    loop_id = id(asyncio.get_running_loop())
    if loop_id not in _pools:
        assert ctx.settings.database_url
        _pools[loop_id] = await asyncpg.create_pool(ctx.settings.database_url, min_size=1,
                                                    max_size=4)
    await _pools[loop_id].execute(
        "INSERT INTO chaos.runs (task_id, worker) VALUES ($1, $2)", ctx.task_id, ctx.worker_id
    )
    await asyncio.sleep(payload.work_ms / 1000)
    return {"n": payload.n}


CHAOS_SQL = f"""
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.runs (task_id uuid, worker text, at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS chaos.completions (task_id uuid, at timestamptz DEFAULT now());
CREATE OR REPLACE FUNCTION chaos.note_completion() RETURNS trigger AS $$
BEGIN
  INSERT INTO chaos.completions (task_id) VALUES (NEW.id);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS note_completion ON {SCHEMA}.tasks;
CREATE TRIGGER note_completion AFTER UPDATE OF status ON {SCHEMA}.tasks
  FOR EACH ROW WHEN (NEW.status = 'succeeded' AND OLD.status IS DISTINCT FROM 'succeeded')
  EXECUTE FUNCTION chaos.note_completion();
"""


@dataclass
class Plan:
    tasks: int
    duration_s: float
    workers: int
    kills: int
    redis_restarts: int
    redis_wipes: int
    pg_restarts: int
    work_ms: int
    drain_timeout_s: float
    seed: int


@dataclass
class Report:
    enqueued: int = 0
    succeeded: int = 0
    lost: int = 0
    completed_twice: int = 0
    handler_runs: int = 0
    faults: list[tuple[float, str]] = field(default_factory=list)
    drain_after_last_fault_s: float | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.completed_twice == 0 and self.enqueued > 0

    def lines(self) -> list[str]:
        kinds: dict[str, int] = {}
        for _, kind in self.faults:
            kinds[kind] = kinds.get(kind, 0) + 1
        drain = ("n/a" if self.drain_after_last_fault_s is None
                 else f"{self.drain_after_last_fault_s:.1f} s")
        return [
            f"tasks enqueued           {self.enqueued}",
            f"tasks succeeded          {self.succeeded}",
            f"lost (never succeeded)   {self.lost}",
            f"completed twice          {self.completed_twice}",
            f"handler runs             {self.handler_runs} "
            f"({self.handler_runs - self.succeeded} more than tasks: at-least-once re-runs)",
            "faults injected          " + (", ".join(f"{n} {k}" for k, n in kinds.items())
                                           or "none"),
            f"drain after last fault   {drain}",
            f"elapsed                  {self.elapsed_s:.1f} s",
            "result                   " + ("OK" if self.ok else "FAILED"),
        ]


class Cluster:
    """The servers and Conveyor processes of one chaos run."""

    def __init__(self, base: Path, plan: Plan) -> None:
        self.base = base
        self.plan = plan
        self.pg = PostgresServer(base / "postgres")
        self.redis = RedisServer(base / "redis", persistent=True)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self._spawned = 0

    def settings(self) -> Settings:
        return Settings(database_url=self.pg.dsn, redis_url=self.redis.url, **_TIMINGS)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env.update({"DATABASE_URL": self.pg.dsn, "REDIS_URL": self.redis.url,
                    "CONVEYOR_LOG_FORMAT": "json", "CONVEYOR_LOG_LEVEL": "info"})
        env.update({f"CONVEYOR_{k.upper()}": str(v) for k, v in _TIMINGS.items()})
        return env

    def spawn(self, role: str) -> subprocess.Popen[bytes]:
        self._spawned += 1
        log = open(self.base / f"{role}-{self._spawned}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", role, "--app", "conveyor.testing.chaos:app"],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        (self.workers if role == "worker" else self.others).append(proc)
        return proc

    def start(self) -> None:
        self.pg.start()
        self.redis.start()

    def launch(self) -> None:
        self.spawn("cron")
        for _ in range(self.plan.workers):
            self.spawn("worker")

    def kill_worker(self, rng: random.Random) -> None:
        alive = [w for w in self.workers if w.poll() is None]
        victim = rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        self.workers.remove(victim)
        self.spawn("worker")

    def stop(self) -> None:
        for proc in self.workers + self.others:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers + self.others:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.redis.stop()
        self.pg.stop()


_TIMINGS: dict[str, Any] = {
    "heartbeat_interval": 1.0, "heartbeat_ttl": 3.0, "rebalance_interval": 1.0,
    "relay_interval": 1.0, "relay_grace": 3.0, "read_block": 0.5, "drain_timeout": 10.0,
    "max_deliveries": 100, "concurrency": 10,
}


async def _retrying(op: Any, *args: Any) -> Any:
    """Call `op` until Postgres and Redis let it through."""
    while True:
        try:
            return await op(*args)
        except (Unavailable, asyncpg.PostgresError, OSError):
            await asyncio.sleep(0.2)


async def _enqueue(state: AppState, plan: Plan, report: Report) -> None:
    batch = 20
    began = time.monotonic()
    for start in range(0, plan.tasks, batch):
        requests = [TaskRequest("effect", Effect(n=i, work_ms=plan.work_ms),
                                idempotency_key=f"chaos-{i}")
                    for i in range(start, min(start + batch, plan.tasks))]
        await _retrying(state.client.enqueue_many, requests)
        report.enqueued = min(start + batch, plan.tasks)
        due = began + plan.duration_s * report.enqueued / plan.tasks
        await asyncio.sleep(max(0.0, due - time.monotonic()))


async def _inject(cluster: Cluster, plan: Plan, report: Report, rng: random.Random,
                  began: float) -> None:
    faults = (["worker SIGKILL"] * plan.kills + ["Redis restart"] * plan.redis_restarts
              + ["Redis wipe"] * plan.redis_wipes + ["Postgres restart"] * plan.pg_restarts)
    moments = sorted(rng.uniform(0.1, 0.9) * plan.duration_s for _ in faults)
    rng.shuffle(faults)
    for at, kind in zip(moments, faults, strict=True):
        await asyncio.sleep(max(0.0, began + at - time.monotonic()))
        print(f"[{time.monotonic() - began:6.1f} s] {kind}", flush=True)
        if kind == "worker SIGKILL":
            await asyncio.to_thread(cluster.kill_worker, rng)
        elif kind == "Redis restart":
            await asyncio.to_thread(cluster.redis.restart)
        elif kind == "Redis wipe":
            await asyncio.to_thread(cluster.redis.restart, wipe=True)
        else:
            await asyncio.to_thread(cluster.pg.restart)
        report.faults.append((time.monotonic(), kind))


async def _count(state: AppState, sql: str) -> int:
    value: int = await _retrying(state.pool.fetchval, sql)
    return value


async def _run(cluster: Cluster, plan: Plan) -> Report:
    report = Report()
    rng = random.Random(plan.seed)
    async with open_state(cluster.settings(), app) as state:
        await state.pool.execute(CHAOS_SQL)
        cluster.launch()
        began = time.monotonic()
        await asyncio.gather(_enqueue(state, plan, report),
                             _inject(cluster, plan, report, rng, began))
        report.enqueued = await _count(state, f"SELECT count(*) FROM {SCHEMA}.tasks")
        deadline = time.monotonic() + plan.drain_timeout_s
        succeeded_sql = f"SELECT count(*) FROM {SCHEMA}.tasks WHERE status = 'succeeded'"
        while time.monotonic() < deadline:
            report.succeeded = await _count(state, succeeded_sql)
            if report.succeeded >= report.enqueued:
                break
            await asyncio.sleep(0.25)
        drained = time.monotonic()
        if report.faults and report.succeeded >= report.enqueued:
            report.drain_after_last_fault_s = drained - report.faults[-1][0]
        report.elapsed_s = drained - began
        report.lost = report.enqueued - report.succeeded
        report.completed_twice = await _count(
            state, "SELECT count(*) FROM (SELECT task_id FROM chaos.completions"
                   " GROUP BY task_id HAVING count(*) > 1) twice")
        report.handler_runs = await _count(state, "SELECT count(*) FROM chaos.runs")
    return report


def run(plan: Plan, keep: Path | None = None) -> Report:
    """Start everything, run the plan, stop everything; the report says what happened."""
    base = keep or Path(tempfile.mkdtemp(prefix="conveyor-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    cluster = Cluster(base, plan)
    try:
        cluster.start()
        return asyncio.run(_run(cluster, plan))
    finally:
        cluster.stop()
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds over which tasks are enqueued and faults injected")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3, help="worker SIGKILLs")
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--redis-wipes", type=int, default=1,
                        help="Redis restarts with its data deleted")
    parser.add_argument("--pg-restarts", type=int, default=1)
    parser.add_argument("--work-ms", type=int, default=200, help="handler sleep per task")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep logs and server data in this directory")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    plan = Plan(args.tasks, args.duration, args.workers, args.kills, args.redis_restarts,
                args.redis_wipes, args.pg_restarts, args.work_ms, args.drain_timeout, seed)
    logs.configure("warning", "console")
    print(f"chaos run: {plan}", flush=True)
    report = run(plan, args.keep)
    print("\n".join(report.lines()), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
