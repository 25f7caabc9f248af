"""Conveyor as `bench.peers.Peer`s: one subclass per door a task comes in by.

`bench.harness.run_once` drives them exactly like the peers: it FLUSHDBs Redis, calls
`enqueue(n)` (which returns the start and end time of the enqueue loop alone) and starts the
worker from `worker_argv()`, the real `conveyor worker --app bench.app:app --concurrency 10`.

Postgres is reset together with Redis: every `enqueue` first looks for `RESET_MARK` in Redis;
when it is missing (Redis was flushed since the last reset), it TRUNCATEs the tasks table and
sets the mark, before its clock starts. So each phase of `run_once` starts from empty Redis and
Postgres, as each peer's phase starts from an empty Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from bench import harness as bp
from bench.app import SPEC, TYPE, Noop, app
from bench.httpload import build_request, post_all, run_fast
from conveyor.client import TaskRequest
from conveyor.config import Settings
from conveyor.queue.connection import Redis
from conveyor.state import open_state
from conveyor.store.pool import Pool

RESET_MARK = "bench:conveyor:pg-reset"
NOOP = Noop()  # the throughput phases' payload: nothing (stored as {"t": null})


@dataclass
class Context:
    """What the doors share: the Conveyor settings of this run, the running API (HTTP doors)."""

    settings: Settings
    timeout: float = 120.0
    http_connections: int = 8
    api: tuple[str, int] | None = None  # host, port of the running `conveyor api`
    # Where the API is while a `bench.deploy.Deployment` decides it (`conveyor run`): returns
    # the address of an API that is ready.
    api_provider: Callable[[], tuple[str, int]] | None = None

    def api_address(self) -> tuple[str, int]:
        if self.api_provider is not None:
            return self.api_provider()
        if self.api is None:
            raise RuntimeError("the HTTP doors need a running `conveyor api`")
        return self.api

    @property
    def tasks_table(self) -> str:
        return f"{self.settings.database_schema}.tasks"


async def reset_if_flushed(ctx: Context, db: Pool | asyncpg.Connection[asyncpg.Record],
                           redis: Redis) -> bool:
    """TRUNCATE the tasks table if Redis was flushed since the last reset; True if it did."""
    if await redis.exists(RESET_MARK):
        return False
    with contextlib.suppress(asyncpg.UndefinedTableError):  # not migrated yet: nothing to reset
        await db.execute(f"TRUNCATE {ctx.tasks_table} CASCADE")  # with task_edges
    await redis.set(RESET_MARK, "1")
    return True


async def reset_now(ctx: Context) -> None:
    """Reset Postgres if Redis was flushed, on connections of our own."""
    assert ctx.settings.database_url
    assert ctx.settings.redis_url
    conn = await asyncpg.connect(ctx.settings.database_url)
    redis = aioredis.Redis.from_url(ctx.settings.redis_url)
    try:
        await reset_if_flushed(ctx, conn, redis)
    finally:
        await redis.aclose()
        await conn.close()


async def analyze(ctx: Context) -> None:
    """ANALYZE the tasks table (its column statistics outlive TRUNCATE)."""
    assert ctx.settings.database_url
    conn = await asyncpg.connect(ctx.settings.database_url)
    try:
        await conn.execute(f"ANALYZE {ctx.tasks_table}")
    finally:
        await conn.close()


async def status_counts(ctx: Context) -> dict[str, int]:
    """Tasks per status in Postgres."""
    assert ctx.settings.database_url
    conn = await asyncpg.connect(ctx.settings.database_url)
    try:
        rows = await conn.fetch(
            f"SELECT status, count(*) FROM {ctx.tasks_table} GROUP BY status ORDER BY status")
    finally:
        await conn.close()
    return {str(r[0]): int(r[1]) for r in rows}


DEPLOYMENTS = {
    "split": "separate `conveyor api` + `conveyor worker` + `conveyor cron` processes",
    "run": "`conveyor run`: API, worker and cron in one process",
}


class Door(bp.Peer):
    """A Conveyor row: a door tasks come in by, in a deployment (`split`: `conveyor worker`
    beside `conveyor api` and `conveyor cron`; `run`: `conveyor run`, all in one process, see
    `bench.deploy`); subclasses say how tasks are enqueued."""

    dist = "conveyor"
    concurrency = "--concurrency {c} (asyncio on uvloop; default 5)"
    key = ""
    backend = "postgres+redis"

    def __init__(self, ctx: Context, deployment: str = "split") -> None:
        self.ctx = ctx
        self.deployment = deployment
        self.port = 0  # `conveyor run`'s API port, chosen as each one starts

    def _label(self, key: str, door: str) -> None:
        """Key and name: the split deployment's rows keep the plain keys."""
        self.key = key if self.deployment == "split" else key.replace("conveyor-",
                                                                       "conveyor-run-", 1)
        self.name = f"conveyor {self.deployment} ({door})"

    def worker_argv(self) -> list[str]:
        c = str(bp.SETUP.concurrency)
        if self.deployment == "run":
            return [str(bp.BIN / "conveyor"), "run", "--app", SPEC, "--concurrency", c,
                    "--host", "127.0.0.1", "--port", str(self.port or "<free port>")]
        return [str(bp.BIN / "conveyor"), "worker", "--app", SPEC, "--concurrency", c]

    @property
    def http(self) -> bool:
        return False

    def requests_for(self, n: int) -> int:
        """How many client calls / HTTP requests enqueue `n` tasks."""
        return n


class ClientDoor(Door):
    """`conveyor.client.Client`, as a library user holds it (`open_state` builds it)."""

    def __init__(self, ctx: Context, batch: int, deployment: str = "split") -> None:
        super().__init__(ctx, deployment)
        self.batch = batch
        if batch == 1:
            self._label("conveyor-client", "client: enqueue, 1 by 1")
            self.enqueue_api = ("`Client.enqueue()` per task, awaited in turn (one INSERT+COMMIT "
                                "and one XADD each)")
        else:
            self._label("conveyor-bulk", f"client: enqueue_many, {batch} per call")
            self.enqueue_api = (f"`Client.enqueue_many()` (bulk: one transaction and one "
                                f"pipeline per {batch} tasks)")

    def requests_for(self, n: int) -> int:
        return -(-n // self.batch)

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        async with open_state(self.ctx.settings, app) as state:  # not timed
            await reset_if_flushed(self.ctx, state.pool, state.redis)
            # A backstop to the harness's SIGALRM deadline, which a running loop may swallow.
            async with asyncio.timeout(self.ctx.timeout):
                t0 = time.time()
                if self.batch == 1:
                    for _ in range(n):
                        await state.client.enqueue(TYPE, NOOP)
                else:
                    for i in range(0, n, self.batch):
                        await state.client.enqueue_many(
                            [TaskRequest(TYPE, NOOP) for _ in range(min(self.batch, n - i))])
                return t0, time.time()


class HttpDoor(Door):
    """POSTs to the deployment's API from `connections` keep-alive connections (default:
    `ctx.http_connections`)."""

    def __init__(self, ctx: Context, batch: int, deployment: str = "split",
                 connections: int | None = None) -> None:
        super().__init__(ctx, deployment)
        self.batch = batch
        self.connections = connections or ctx.http_connections
        k = self.connections
        conns = f"{k} connection{'s' if k != 1 else ''}"
        if batch == 1:
            self.path = "/v1/tasks"
            self._label("conveyor-http", f"HTTP POST /v1/tasks, {conns}")
            self.enqueue_api = f"`POST /v1/tasks`, one task per request, {conns}"
        else:
            self.path = "/v1/tasks/batch"
            key = "conveyor-http-batch" + ("" if batch == bp.BATCH else str(batch))
            if connections is not None and connections == 1:
                key += "-1c"
            self._label(key, f"HTTP POST /v1/tasks/batch, {batch} per request, {conns}")
            self.enqueue_api = (f"`POST /v1/tasks/batch`, {batch} tasks per request, "
                                f"{conns}" + (" in turn" if k == 1 else " at once"))

    @property
    def http(self) -> bool:
        return True

    def requests_for(self, n: int) -> int:
        return -(-n // self.batch)

    def bodies(self, n: int) -> list[bytes]:
        one = {"type": TYPE, "payload": {}}
        if self.batch == 1:
            return [json.dumps(one).encode()] * n
        out = []
        for i in range(0, n, self.batch):
            out.append(json.dumps({"tasks": [one] * min(self.batch, n - i)}).encode())
        return out

    def enqueue(self, n: int) -> tuple[float, float]:
        host, port = self.ctx.api_address()  # waits until it is ready; not timed
        requests: Sequence[bytes] = [build_request(host, port, self.path, b)
                                     for b in self.bodies(n)]

        async def go() -> tuple[float, float]:
            await reset_now(self.ctx)  # not timed
            return await post_all(host, port, requests, connections=self.connections,
                                  timeout=self.ctx.timeout)

        return run_fast(go)


def make_doors(ctx: Context) -> dict[str, Door]:
    """Every Conveyor row: each door in each deployment."""
    doors: list[Door] = []
    for deployment in DEPLOYMENTS:
        doors += [ClientDoor(ctx, bp.BATCH, deployment), ClientDoor(ctx, 1, deployment),
                  HttpDoor(ctx, 1, deployment),
                  HttpDoor(ctx, bp.BATCH, deployment),
                  HttpDoor(ctx, bp.BATCH, deployment, connections=1),
                  HttpDoor(ctx, 500, deployment),
                  HttpDoor(ctx, 500, deployment, connections=1)]
    return {d.key: d for d in doors}
