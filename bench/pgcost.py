"""Postgres CPU per task of the worker's write path, each statement alone: the enqueue insert,
the start (queued → running) and the outcome (running → succeeded), in batches of a given size,
on a private **durable** PostgreSQL (its defaults: fsync, synchronous_commit, full_page_writes).

No Redis, no worker, no handler: `TaskStore.insert`, `mark_running` and `record` are called in
a loop, one batch in flight at a time, as the starter and recorder call them; the CPU of the
postmaster and its backends (/proc) is read around each step. What a batch size costs per task
here is what the worker pays at that batch size, without the noise of the rest of the machine.

    python -m bench.pgcost                       # N=10000, batches 1, 10, 50, 100
    python -m bench.pgcost --n 20000 --batch 10 --batch 100
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import cpu_delta, postmaster_pid, tree_cpu_seconds
from conveyor.store.migrate import migrate
from conveyor.store.pool import Pool, open_pool
from conveyor.store.tasks import NewTask, Outcome, TaskStore, new_task_id
from conveyor.testing.servers import PostgresServer

WORKER = "pgcost-worker"


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    batch: int
    tasks: int
    pg_s: float
    wall_s: float

    @property
    def pg_us(self) -> float:
        return self.pg_s / self.tasks * 1e6

    @property
    def rate(self) -> float:
        return self.tasks / self.wall_s


async def _measure(postmaster: int, name: str, batch: int, n: int,
                   call: Callable[[int, int], Awaitable[None]]) -> Step:
    before = tree_cpu_seconds(postmaster)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        await call(start, min(start + batch, n))
    wall = time.perf_counter() - t0
    return Step(name, batch, n, cpu_delta(before, tree_cpu_seconds(postmaster)), wall)


async def one_size(pool: Pool, store: TaskStore, postmaster: int, n: int, batch: int,
                   insert_batch: int) -> list[Step]:
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {store.table} CASCADE")
    tasks = [NewTask(new_task_id(), "noop", "{}", 3) for _ in range(n)]
    ids = [t.id for t in tasks]

    async def insert(a: int, b: int) -> None:
        await store.insert(tasks[a:b])

    async def start(a: int, b: int) -> None:
        started, rest = await store.mark_running(ids[a:b], WORKER)
        assert len(started) == b - a, (len(started), rest[:1])
        assert not rest

    async def record(a: int, b: int) -> None:
        recorded = await store.record(
            [Outcome(i, "noop", 1, "succeeded", "null") for i in ids[a:b]], WORKER)
        assert len(recorded) == b - a

    out = [await _measure(postmaster, "insert", insert_batch, n, insert)]
    async with pool.acquire() as conn:
        await conn.execute(f"ANALYZE {store.table}")
    # As a worker does: each batch is started, then its outcomes recorded, so that only one
    # batch is running at a time; each statement's CPU is summed apart.
    spent = {"start": 0.0, "outcome": 0.0}
    wall = {"start": 0.0, "outcome": 0.0}
    for a in range(0, n, batch):
        b = min(a + batch, n)
        for name, call in (("start", start), ("outcome", record)):
            before = tree_cpu_seconds(postmaster)
            t0 = time.perf_counter()
            await call(a, b)
            wall[name] += time.perf_counter() - t0
            spent[name] += cpu_delta(before, tree_cpu_seconds(postmaster))
    out += [Step(name, batch, n, spent[name], wall[name]) for name in ("start", "outcome")]
    return out


async def main_async(args: argparse.Namespace) -> list[Step]:
    with tempfile.TemporaryDirectory(prefix="conveyor-pgcost-") as tmp:
        server = PostgresServer(Path(tmp), durable=not args.pg_unsafe)
        server.start()
        try:
            pid = postmaster_pid(server.data_dir)
            assert pid is not None
            pool = await open_pool(server.dsn, min_size=1, max_size=2)
            try:
                await migrate(pool, "conveyor")
                store = TaskStore(pool, "conveyor")
                steps: list[Step] = []
                for batch in args.batch or [1, 10, 50, 100]:
                    n = min(args.n, max(batch * 200, 1000)) if batch == 1 else args.n
                    steps += await one_size(pool, store, pid, n, batch, args.insert_batch)
                return steps
            finally:
                await pool.close()
        finally:
            server.stop()


def render(steps: list[Step], durable: bool) -> str:
    lines = [f"Postgres ({'durable defaults' if durable else 'fsync OFF: not durable'}); "
             "one statement in flight at a time",
             "", "| step | batch | tasks | Postgres µs/task | tasks/s |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.batch} | {s.tasks} | {s.pg_us:,.0f} | {s.rate:,.0f} |"
              for s in steps]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="tasks per batch size")
    parser.add_argument("--batch", type=int, action="append",
                        help="start/outcome batch size (repeatable; default 1, 10, 50, 100)")
    parser.add_argument("--insert-batch", type=int, default=100,
                        help="tasks per insert (default 100, as enqueue_many)")
    parser.add_argument("--pg-unsafe", action="store_true",
                        help="fsync, synchronous_commit, full_page_writes off (NOT durable)")
    args = parser.parse_args()
    print(render(asyncio.run(main_async(args)), not args.pg_unsafe))


if __name__ == "__main__":
    main()

