"""Topologies mode (`python -m bench --topologies`): drain throughput of 1, 2 and 4
`conveyor worker` processes on one redis-server and on a Redis Cluster of 3 masters and 3
replicas.

Per topology and process count: N queued tasks of a no-op type (spread evenly over
`--topology-types` types, so that on the cluster they may live on several masters), enqueued
through `Client.enqueue_many` before any worker runs; then the worker processes start
together (`--concurrency` each) and the rate is N / (last finish - first start), read from
Postgres's `started_at` and `finished_at`. Every task must end `succeeded`. The handler does
nothing, so the figures are Conveyor's own cost per task (Postgres writes, Redis reads and
acks), which on this machine's 2 cores is shared with Postgres, Redis and the other workers.

The app of the worker processes is this module's `app` (`--app bench.topologies:app`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from conveyor import Conveyor, TaskContext
from conveyor.config import Settings

REPO = Path(__file__).resolve().parents[1]
SPEC = "bench.topologies:app"
app = Conveyor()


class Nothing(BaseModel):
    pass


async def _noop(payload: Nothing, ctx: TaskContext) -> None:
    return None


TYPES = [f"topo{i}" for i in range(8)]
for _name in TYPES:
    app.task(_name, payload=Nothing)(_noop)


@dataclass(frozen=True)
class Row:
    topology: str
    processes: int
    tasks_per_s: float
    seconds: float


def main(args: argparse.Namespace) -> int:
    from conveyor.testing.redis_ha import ClusterServers
    from conveyor.testing.servers import PostgresServer, RedisServer

    counts = [int(p) for p in args.topology_processes.split(",")]
    types = TYPES[:args.topology_types]
    rows: list[Row] = []
    scratch = Path(tempfile.mkdtemp(prefix="conveyor-bench-topologies-"))
    scratch.chmod(0o755)  # Postgres runs as `postgres`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, True)
        pg = PostgresServer(scratch / "postgres")
        stack.callback(pg.stop)
        pg.start()
        single = RedisServer(scratch / "redis")
        stack.callback(single.stop)
        single.start()
        cluster = ClusterServers(scratch / "cluster")
        stack.callback(cluster.stop)
        cluster.start()
        topologies = [("single Redis", single.url, False),
                      ("Redis Cluster 3+3", cluster.url, True)]
        for processes in counts:
            for name, url, is_cluster in topologies:
                row = _measure(args, pg.dsn, url, is_cluster, name, processes, types)
                rows.append(row)
                print(f"{name:<18} {processes} process(es): {row.tasks_per_s:,.0f} tasks/s "
                      f"({args.n} tasks in {row.seconds:.2f} s)", flush=True)
    print(render(rows, args, types))
    return 0


def _measure(args: argparse.Namespace, dsn: str, redis_url: str, is_cluster: bool,
             topology: str, processes: int, types: list[str]) -> Row:
    tag = f"topo{processes}{'c' if is_cluster else 'n'}{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "DATABASE_URL": dsn, "REDIS_URL": redis_url,
        "CONVEYOR_DATABASE_SCHEMA": tag, "CONVEYOR_KEY_PREFIX": tag,
        "CONVEYOR_LOG_LEVEL": "warning", "CONVEYOR_LOG_FORMAT": "json",
        **({"CONVEYOR_REDIS_CLUSTER": "true"} if is_cluster else {}),
    })
    asyncio.run(_enqueue(env, args.n, types))
    args.logdir.mkdir(parents=True, exist_ok=True)
    log_path = args.logdir / f"topologies-{tag}.log"
    procs = []
    with open(log_path, "ab") as log:
        for _ in range(processes):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "conveyor", "worker", "--app", SPEC,
                 "--concurrency", str(args.concurrency)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True))
    try:
        seconds = asyncio.run(_wait_drained(env, args.n, args.timeout))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        asyncio.run(_drop(env))
    return Row(topology, processes, args.n / seconds, seconds)


def _settings(env: dict[str, str]) -> Settings:
    return Settings(
        database_url=env["DATABASE_URL"], redis_url=env["REDIS_URL"],
        redis_cluster=env.get("CONVEYOR_REDIS_CLUSTER") == "true",
        database_schema=env["CONVEYOR_DATABASE_SCHEMA"], key_prefix=env["CONVEYOR_KEY_PREFIX"],
    )


async def _enqueue(env: dict[str, str], n: int, types: list[str]) -> None:
    from conveyor.client import TaskRequest
    from conveyor.state import open_state

    async with open_state(_settings(env), app) as state:
        for t in types:
            await state.streams.ensure_group(t)
        for start in range(0, n, 500):
            size = min(500, n - start)
            await state.client.enqueue_many(
                [TaskRequest(types[(start + i) % len(types)], {}) for i in range(size)])
        await state.pool.execute(f"ANALYZE {state.store.table}")


async def _wait_drained(env: dict[str, str], n: int, timeout_s: float) -> float:
    import asyncpg

    conn = await asyncpg.connect(env["DATABASE_URL"])
    table = f"{env['CONVEYOR_DATABASE_SCHEMA']}.tasks"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            done = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE status = 'succeeded'")
            if done == n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {n} tasks succeeded after {timeout_s} s")
            await asyncio.sleep(0.1)
        span = await conn.fetchval(
            f"SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM {table}")
        return float(span)
    finally:
        await conn.close()


async def _drop(env: dict[str, str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {env['CONVEYOR_DATABASE_SCHEMA']} CASCADE")
    finally:
        await conn.close()


def render(rows: list[Row], args: argparse.Namespace, types: list[str]) -> str:
    counts = sorted({r.processes for r in rows})
    topologies = list(dict.fromkeys(r.topology for r in rows))
    by = {(r.topology, r.processes): r for r in rows}
    head = "| drain, tasks/s | " + " | ".join(f"{p} worker process{'es' * (p > 1)}"
                                               for p in counts) + " |"
    lines = [head, "|---|" + "---|" * len(counts)]
    for t in topologies:
        lines.append(f"| {t} | " + " | ".join(
            f"{by[(t, p)].tasks_per_s:,.0f}" if (t, p) in by else "" for p in counts) + " |")
    cores = os.cpu_count()
    lines.append("")
    lines.append(f"N = {args.n} no-op tasks over {len(types)} type(s), concurrency "
                 f"{args.concurrency} per process, one run each; {cores} CPU cores shared by "
                 "Postgres, Redis (one server, or six cluster nodes) and every worker process, "
                 "so past 2 processes the workers compete for the same cores.")
    return "\n".join(lines)
