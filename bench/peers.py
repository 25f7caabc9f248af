"""The peers as the driver sees them: a worker command line and an enqueue loop each.

`Peer.enqueue(n)` enqueues n jobs with the peer's ordinary client API and returns the start
and end time of the loop alone (client set-up is not timed); a bulk API where the peer has
one (rq, streaQ: one call per BATCH jobs), else one call per job, awaited in turn for the
asyncio clients. `worker_argv()` is the peer's own worker command, run from this Python's
`bin/` with the concurrency of `SETUP` (10 by default) and logs at WARNING.

A peer whose library is missing from this Python is reported by `missing()` and skipped by
the driver; `pip install -r bench/requirements-peers.txt` installs all of them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import redis
import redis.asyncio as aioredis

from bench.workload import BATCH, QUEUE, SETUP

BIN = Path(sys.executable).parent  # the console scripts (arq, celery, ...) of this Python
APPS = "bench.peer_apps"  # what the worker commands import


class Peer:
    """A row of the table. Subclasses set the labels and one of enqueue / _aenqueue."""

    name = ""
    dist = ""  # the distribution whose version the report names
    module = "redis"  # importable when the peer is installed
    concurrency = ""  # what one worker process runs at once ({c}: SETUP.concurrency)
    enqueue_api = ""
    backend = "redis"  # where its queue lives: "redis", or "postgres" (bench.pg_peers)

    def worker_argv(self) -> list[str]:
        raise NotImplementedError

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None."""
        if importlib.util.find_spec(self.module) is None:
            return f"its package {self.dist} is not installed"
        command = Path(self.worker_argv()[0])
        if not command.exists():
            return f"its worker command {command} does not exist"
        return None

    def enqueue(self, n: int) -> tuple[float, float]:
        return asyncio.run(self._aenqueue(n))

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        raise NotImplementedError


def _timed_calls(n: int, call: Any) -> tuple[float, float]:
    started = time.time()
    for _ in range(n):
        call()
    return started, time.time()


class Arq(Peer):
    name = dist = module = "arq"
    concurrency = "max_jobs={c} (asyncio; default 10)"
    enqueue_api = "`ArqRedis.enqueue_job()` per job, awaited in turn (no bulk API)"

    def worker_argv(self) -> list[str]:
        return [str(BIN / "arq"), "--custom-log-dict", f"{APPS}.ARQ_LOG_CONFIG",
                f"{APPS}.ArqWorker"]

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        from arq import create_pool
        from arq.connections import RedisSettings

        pool = await create_pool(RedisSettings.from_dsn(SETUP.redis_url))
        try:
            started = time.time()
            for _ in range(n):
                await pool.enqueue_job("arq_noop")
            return started, time.time()
        finally:
            await pool.aclose()


class Saq(Peer):
    name = dist = module = "saq"
    concurrency = "concurrency={c} (asyncio; default 10)"
    enqueue_api = "`Queue.enqueue()` per job, awaited in turn (no bulk API)"

    def worker_argv(self) -> list[str]:
        return [str(BIN / "saq"), f"{APPS}.saq_settings", "--workers", "1"]

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        from saq import Queue

        queue = Queue.from_url(SETUP.redis_url, name=QUEUE)
        await queue.connect()
        try:
            started = time.time()
            for _ in range(n):
                await queue.enqueue("saq_noop")
            return started, time.time()
        finally:
            await queue.disconnect()


class Taskiq(Peer):
    dist, module = "taskiq", "taskiq_redis"
    concurrency = "--workers 1 --max-async-tasks {c} (asyncio; defaults 2 procs x 100)"
    enqueue_api = "`task.kiq()` per job, awaited in turn (no bulk API)"

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"taskiq ({'ListQueueBroker' if kind == 'list' else 'RedisStreamBroker'})"

    def worker_argv(self) -> list[str]:
        return [str(BIN / "taskiq"), "worker", f"{APPS}:taskiq_{self.kind}_broker",
                "--workers", "1", "--max-async-tasks", str(SETUP.concurrency),
                "--log-level", "WARNING"]

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        from bench.peer_apps import taskiq

        broker, noop = taskiq(self.kind)
        await broker.startup()  # the stream broker creates its consumer group here
        try:
            started = time.time()
            for _ in range(n):
                await noop.kiq()
            return started, time.time()
        finally:
            await broker.shutdown()


class Streaq(Peer):
    name = dist = module = "streaq"
    concurrency = "concurrency={c} (asyncio; default 16)"
    enqueue_api = f"`Worker.enqueue_many()` (bulk, one pipeline per {BATCH} jobs)"

    def worker_argv(self) -> list[str]:
        return [str(BIN / "streaq"), "run", f"{APPS}:streaq_worker", "--workers", "1"]

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        from bench.peer_apps import streaq

        worker, noop = streaq()
        async with worker:  # connects, loads streaQ's Lua library
            started = time.time()
            for done in range(0, n, BATCH):
                await worker.enqueue_many([noop.enqueue() for _ in range(min(BATCH, n - done))])
            return started, time.time()


class Celery(Peer):
    dist = module = "celery"
    enqueue_api = ("`task.apply_async()` per job (no bulk publish; `group()` also sends one "
                   "message per task)")

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.name = f"celery ({pool})"
        self.concurrency = f"-P {pool} -c {{c}} (default: prefork, -c nproc)"

    def worker_argv(self) -> list[str]:
        return [str(BIN / "celery"), "-A", f"{APPS}:celery_app", "worker", "-P", self.pool,
                "-c", str(SETUP.concurrency), "-l", "WARNING"]

    def enqueue(self, n: int) -> tuple[float, float]:
        from bench.peer_apps import celery

        app, noop = celery()  # a fresh app: kombu caches queue declarations per connection
        try:
            return _timed_calls(n, noop.apply_async)
        finally:
            app.close()


class Dramatiq(Peer):
    name = dist = module = "dramatiq"
    concurrency = "--processes 1 --threads {c} (defaults 2 procs x 8 threads)"
    enqueue_api = "`actor.send()` per job (no bulk API)"

    def worker_argv(self) -> list[str]:
        return [str(BIN / "dramatiq"), f"{APPS}:dramatiq_broker", "--processes", "1",
                "--threads", str(SETUP.concurrency)]

    def enqueue(self, n: int) -> tuple[float, float]:
        from bench.peer_apps import dramatiq

        broker, noop = dramatiq()
        try:
            return _timed_calls(n, noop.send)
        finally:
            broker.close()


class Rq(Peer):
    dist = module = "rq"
    enqueue_api = f"`Queue.enqueue_many()` (bulk, one pipeline per {BATCH} jobs)"

    def __init__(self, worker_class: str) -> None:
        self.worker_class = worker_class
        self.name = f"rq ({worker_class})"
        self.concurrency = ("1 job at a time, fork per job (not configurable in one process)"
                            if worker_class == "Worker" else "1 job at a time, no fork")

    def worker_argv(self) -> list[str]:
        return [str(BIN / "rq"), "worker", "-u", SETUP.redis_url, "-w",
                f"rq.worker.{self.worker_class}", "--logging_level", "WARNING", QUEUE]

    def enqueue(self, n: int) -> tuple[float, float]:
        from rq import Queue

        conn = redis.Redis.from_url(SETUP.redis_url)
        try:
            queue = Queue(QUEUE, connection=conn)
            started = time.time()
            for done in range(0, n, BATCH):
                queue.enqueue_many([Queue.prepare_data(f"{APPS}.rq_noop")
                                    for _ in range(min(BATCH, n - done))])
            return started, time.time()
        finally:
            conn.close()


class RawRedis(Peer):
    """The physical-limit baseline: redis-py (asyncio, hiredis), no queue library."""

    dist = "redis"
    KINDS: ClassVar[dict[str, tuple[str, str, str]]] = {
        "stream": ("raw redis-py: stream", "XADD, pipelines of {b}",
                   "1 consumer: XREADGROUP COUNT {b}, then XACK+INCRBY per batch"),
        "list": ("raw redis-py: list, batched", "LPUSH, pipelines of {b}",
                 "1 consumer: BRPOP + RPOP {b1} (batch <= {b}), then INCRBY per batch"),
        "list1": ("raw redis-py: list, 1 by 1", "LPUSH, pipelines of {b}",
                  "1 consumer: BRPOP 1 job, then INCR per job"),
    }

    def __init__(self, kind: str) -> None:
        self.kind = kind
        name, api, concurrency = self.KINDS[kind]
        self.name = name
        self.enqueue_api = api.format(b=BATCH)
        self.concurrency = concurrency.format(b=BATCH, b1=BATCH - 1)

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", APPS, "--consume", self.kind]

    async def _aenqueue(self, n: int) -> tuple[float, float]:
        from bench.peer_apps import ensure_group

        client = aioredis.Redis.from_url(SETUP.redis_url)
        try:
            if self.kind == "stream":
                await ensure_group(client)
            started = time.time()
            for done in range(0, n, BATCH):
                pipe = client.pipeline(transaction=False)
                for _ in range(min(BATCH, n - done)):
                    if self.kind == "stream":
                        pipe.xadd(QUEUE, {"task": "noop"})
                    else:
                        pipe.lpush(QUEUE, "noop")
                await pipe.execute()
            return started, time.time()
        finally:
            await client.aclose()


def all_peers() -> dict[str, Peer]:
    """Every peer by its key on the command line (`--peers`): the Redis peers, then the
    PostgreSQL ones (`bench.pg_peers`)."""
    from bench.pg_peers import pg_peers

    return {
        "raw-stream": RawRedis("stream"), "raw-list": RawRedis("list"),
        "raw-list1": RawRedis("list1"), "arq": Arq(), "saq": Saq(),
        "taskiq-list": Taskiq("list"), "taskiq-stream": Taskiq("stream"), "streaq": Streaq(),
        "celery-threads": Celery("threads"), "celery-prefork": Celery("prefork"),
        "dramatiq": Dramatiq(), "rq-simple": Rq("SimpleWorker"), "rq": Rq("Worker"),
        **pg_peers(),
    }
