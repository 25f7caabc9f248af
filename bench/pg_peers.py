"""The PostgreSQL-only peers as the driver sees them: PgQueuer (capped and at its fastest) and
Procrastinate, `bench.peers.Peer`s like the Redis peers, on the benchmark's own Postgres.

Each peer gets a database of its own on that server (`bench.pg_peer_apps.database_url`),
created afresh and given its schema by the peer's own tool (`pgq install` + `pgq autovac`,
`procrastinate schema --apply`) on first use. The workload is the same no-op task (INCR
`bench:done`), so a job counts once its task body ran, as for every row. Postgres is reset with
Redis, as for Conveyor's rows: each `enqueue` first looks for the peer's mark in Redis and,
if it is gone (Redis was FLUSHDB-ed), TRUNCATEs the peer's tables and sets it, before its clock
starts. `seed_statistics(n)` gives the tables the planner statistics of a live queue (ANALYZE
with n jobs queued, then TRUNCATE; column statistics survive), as the harness does for
Conveyor's table.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench.peers import BIN, Peer
from bench.pg_peer_apps import DATABASES, TASK, URL_ENV, database_url
from bench.workload import BATCH, SETUP

APPS = "bench.pg_peer_apps"
TABLES = {
    "pgqueuer": "pgqueuer, pgqueuer_log, pgqueuer_statistics",
    "procrastinate": ("procrastinate_jobs, procrastinate_events, procrastinate_workers, "
                      "procrastinate_periodic_defers"),
}


class PgPeer(Peer):
    """A peer whose queue is PostgreSQL: a database of its own, reset with Redis."""

    backend = "postgres"
    lib = ""  # key of DATABASES / TABLES
    _installed: set[str] = set()  # noqa: RUF012 - one set for the whole driver

    @property
    def url(self) -> str:
        return database_url(self.lib)

    def install_argv(self) -> list[list[str]]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create the peer's database afresh and install its schema (once per benchmark)."""
        if self.lib in self._installed:
            return
        base = os.environ.get(URL_ENV)
        if not base:
            raise RuntimeError(f"{URL_ENV} is not set")

        async def create() -> None:
            conn = await asyncpg.connect(base)
            try:
                await conn.execute(f"DROP DATABASE IF EXISTS {DATABASES[self.lib]}")
                await conn.execute(f"CREATE DATABASE {DATABASES[self.lib]}")
            finally:
                await conn.close()

        asyncio.run(create())
        for argv in self.install_argv():
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                  check=False, env={**os.environ, **SETUP.env(0)})
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: "
                                   f"{(done.stdout + done.stderr)[-800:]}")
        self._installed.add(self.lib)

    async def reset_if_flushed(self) -> None:
        """TRUNCATE the peer's tables if Redis was flushed since the last reset."""
        mark = f"bench:{self.lib}:pg-reset"
        r = aioredis.Redis.from_url(SETUP.redis_url)
        try:
            if await r.exists(mark):
                return
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(f"TRUNCATE {TABLES[self.lib]} CASCADE")
            finally:
                await conn.close()
            await r.set(mark, "1")
        finally:
            await r.aclose()

    def seed_statistics(self, n: int) -> None:
        """n jobs queued, ANALYZE, TRUNCATE: the statistics of a live queue."""
        self.prepare()
        self.enqueue(n)

        async def analyze() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(f"ANALYZE {TABLES[self.lib]}")
                await conn.execute(f"TRUNCATE {TABLES[self.lib]} CASCADE")
            finally:
                await conn.close()

        asyncio.run(analyze())

    def enqueue(self, n: int) -> tuple[float, float]:
        self.prepare()
        return asyncio.run(self._timed(n))

    async def _timed(self, n: int) -> tuple[float, float]:
        await self.reset_if_flushed()  # not timed
        return await self._aenqueue(n)


class PgQueuer(PgPeer):
    """PgQueuer: what `pgq run` runs (its supervisor and QueueManager, on uvloop) on one
    asyncpg connection, PgQueuer's own set-up."""

    dist, module, lib = "pgqueuer", "pgqueuer", "pgqueuer"
    enqueue_api = (f"`Queries.enqueue(entrypoints, payloads, priorities)` (bulk: one INSERT "
                   f"per {BATCH} jobs)")

    def __init__(self, capped: bool) -> None:
        self.capped = capped
        if capped:
            self.name = "pgqueuer (max_concurrent_tasks=10)"
            self.concurrency = ("--max-concurrent-tasks {c} (which needs --batch-size ≤ c/2: "
                                "5; default: no cap, batch 10)")
        else:
            self.name = "pgqueuer (batch_size=10, its fastest)"
            self.concurrency = ("--batch-size {c}, no cap (jobs in flight ≤ one batch; "
                                "default batch 10)")

    def worker_argv(self) -> list[str]:
        c = SETUP.concurrency
        limits = (["--max-concurrent-tasks", str(c), "--batch-size", str(max(1, c // 2))]
                  if self.capped else ["--batch-size", str(c)])
        return [sys.executable, "-m", APPS, *limits]

    def install_argv(self) -> list[list[str]]:
        pgq = str(BIN / "pgq")
        return [[pgq, "--pg-dsn", self.url, "install"],  # durability: durable (its default)
                [pgq, "--pg-dsn", self.url, "autovac"]]  # its documented tuning

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(self.url)
        try:
            queries = Queries(AsyncpgDriver(conn))
            calls = [min(BATCH, n - i) for i in range(0, n, BATCH)]
            started = time.time()
            for k in calls:
                await queries.enqueue([TASK] * k, [None] * k, [0] * k)
            return started, time.time()
        finally:
            await conn.close()


class Procrastinate(PgPeer):
    """Procrastinate: its `worker` command, asyncio, LISTEN/NOTIFY, psycopg's default pool."""

    name = dist = module = lib = "procrastinate"
    concurrency = "--concurrency {c} (asyncio; default 1)"
    enqueue_api = f"`task.batch_defer_async()` (bulk: one call per {BATCH} jobs)"

    def worker_argv(self) -> list[str]:
        return [str(BIN / "procrastinate"), "--app", f"{APPS}.procrastinate_app",
                "--log-level", "warning", "worker", "--concurrency", str(SETUP.concurrency)]

    def install_argv(self) -> list[list[str]]:
        return [[str(BIN / "procrastinate"), "--app", f"{APPS}.procrastinate_app", "schema",
                 "--apply"]]

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        from bench import pg_peer_apps

        app: Any = pg_peer_apps.procrastinate_app
        task = app.tasks[TASK]
        async with app.open_async():
            calls = [min(BATCH, n - i) for i in range(0, n, BATCH)]
            started = time.time()
            for k in calls:
                await task.batch_defer_async(*({} for _ in range(k)))
            return started, time.time()


def pg_peers() -> dict[str, Peer]:
    return {"pgqueuer": PgQueuer(capped=True), "pgqueuer-fast": PgQueuer(capped=False),
            "procrastinate": Procrastinate()}
