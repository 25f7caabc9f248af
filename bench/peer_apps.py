"""What the peers' worker commands import: each peer's app, broker or settings, with the
workload's no-op task registered on it (`arq bench.peer_apps.ArqWorker`, `celery -A
bench.peer_apps:celery_app`, ...), and the raw redis-py baseline's consumer
(`python -m bench.peer_apps --consume stream`).

The peers' libraries are optional: nothing here imports one at module level. Each object is
built on first access (a module `__getattr__`, PEP 562), so a worker imports only its own peer
and the driver (`bench.peers`) imports none of them. The peers are untyped: their objects are
`Any` here, and this module is the only one that handles them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from bench.workload import (
    BATCH,
    DONE_KEY,
    QUEUE,
    SETUP,
    amark_done,
    async_redis,
    mark_done,
    sync_redis,
)

GROUP = "bench"  # the raw stream baseline's consumer group
TASK = "bench_noop"

# arq logs every job at INFO; the peers all run at WARNING.
ARQ_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"arq": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["arq"], "level": "WARNING"}},
}


async def arq_noop(ctx: Any) -> None:
    await amark_done(async_redis())


async def saq_noop(ctx: Any) -> None:
    await amark_done(async_redis())


def rq_noop() -> None:
    from rq import get_current_job

    job = get_current_job()
    mark_done(job.connection if job is not None else sync_redis())  # rq's own connection


def _arq_worker() -> Any:
    from arq.connections import RedisSettings

    return type("ArqWorker", (), {"functions": [arq_noop], "max_jobs": SETUP.concurrency,
                                  "redis_settings": RedisSettings.from_dsn(SETUP.redis_url)})


def _saq_settings() -> Any:
    from saq import Queue

    return {"queue": Queue.from_url(SETUP.redis_url, name=QUEUE), "functions": [saq_noop],
            "concurrency": SETUP.concurrency}


def taskiq(kind: str) -> tuple[Any, Any]:
    """A taskiq broker (`list` or `stream`) and its no-op task."""
    from taskiq_redis import ListQueueBroker, RedisStreamBroker

    broker = (ListQueueBroker if kind == "list" else RedisStreamBroker)(
        SETUP.redis_url, queue_name=QUEUE)

    async def noop() -> None:
        await amark_done(async_redis())

    return broker, broker.task(task_name=TASK)(noop)


def streaq() -> tuple[Any, Any]:
    """A streaQ worker and its no-op task (silent: its CLI has no log level, and logs every
    task at INFO otherwise)."""
    from streaq import Worker

    worker = Worker(redis_url=SETUP.redis_url, queue_name=QUEUE,
                    concurrency=SETUP.concurrency)

    async def noop() -> None:
        await amark_done(async_redis())

    return worker, worker.task(name=TASK, silent=True)(noop)


def celery() -> tuple[Any, Any]:
    """A Celery app and its no-op task."""
    from celery import Celery

    app = Celery("bench", broker=SETUP.redis_url)
    app.conf.broker_connection_retry_on_startup = True  # only silences a start-up warning

    def noop() -> None:
        mark_done(sync_redis())

    return app, app.task(name="bench.noop")(noop)


def dramatiq() -> tuple[Any, Any]:
    """A Dramatiq Redis broker (made the global one, as actors need) and its no-op actor."""
    import dramatiq as dq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=SETUP.redis_url)
    dq.set_broker(broker)

    def noop() -> None:
        mark_done(sync_redis())

    return broker, dq.actor(actor_name=TASK)(noop)


_BUILDERS: dict[str, Callable[[], Any]] = {
    "ArqWorker": _arq_worker,
    "saq_settings": _saq_settings,
    "taskiq_list_broker": lambda: taskiq("list")[0],
    "taskiq_stream_broker": lambda: taskiq("stream")[0],
    "streaq_worker": lambda: streaq()[0],
    "celery_app": lambda: celery()[0],
    "dramatiq_broker": lambda: dramatiq()[0],
}


def __getattr__(name: str) -> Any:
    """Build a peer's object the first time its worker command asks for it."""
    try:
        build = _BUILDERS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    built = globals()[name] = build()
    return built


async def ensure_group(client: aioredis.Redis) -> None:
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
        await client.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)


async def consume(kind: str) -> None:
    """The raw baseline's worker: one consumer, batches of up to BATCH, until SIGTERM/SIGINT.

    `stream`: XREADGROUP COUNT BATCH, then XACK and INCRBY in one pipeline; `list`: BRPOP one,
    RPOP the rest of a batch, one INCRBY; `list1`: BRPOP and INCR per job."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    client = aioredis.Redis.from_url(SETUP.redis_url)
    try:
        if kind == "stream":
            await ensure_group(client)
        while not stopping.is_set():
            if kind == "stream":
                reply: Any = await client.xreadgroup(GROUP, "c1", {QUEUE: ">"}, count=BATCH,
                                                     block=500)
                if not reply:
                    continue
                ids = [entry_id for entry_id, _ in reply[0][1]]
                pipe = client.pipeline(transaction=False)
                pipe.xack(QUEUE, GROUP, *ids)
                pipe.incrby(DONE_KEY, len(ids))
                _, count = await pipe.execute()
                await amark_done(client, len(ids), int(count))
                continue
            popped = await client.brpop([QUEUE], timeout=0.5)
            if popped is None:
                continue
            more = [] if kind == "list1" else (await client.rpop(QUEUE, BATCH - 1) or [])
            await amark_done(client, 1 + len(more))
    finally:
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the raw redis-py baseline's worker")
    parser.add_argument("--consume", choices=("stream", "list", "list1"), required=True)
    asyncio.run(consume(parser.parse_args().consume))
