"""The benchmark's workload, shared by every row: a task that only counts itself done.

Each task body INCRs `DONE_KEY`. The call that takes the counter to its first value stamps
`FIRST_KEY` with the time and the count it saw; the call that reaches the target N stamps
`LAST_KEY`. Times are `time.time()` in the worker, right after the INCR: a job counts once its
task body has run, whatever the queue library reports about itself.

The driver and the worker processes agree on the Redis URL, N and the concurrency through
`BENCH_REDIS_URL`, `BENCH_N` and `BENCH_CONCURRENCY`; the driver sets `SETUP` and hands it to
the workers it starts (`harness.start_worker`). Importing this module must stay cheap: every
worker process imports it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

DONE_KEY, FIRST_KEY, LAST_KEY = "bench:done", "bench:first", "bench:last"
QUEUE = "bench"  # the queue, stream or list name of every peer that takes one
BATCH = 100  # jobs per pipeline or bulk call, for the bulk enqueue APIs and the raw baseline


@dataclass
class Setup:
    redis_url: str
    target: int  # N: the job whose completion stamps LAST_KEY
    concurrency: int

    @classmethod
    def from_env(cls) -> Setup:
        return cls(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6399/0"),
                   int(os.environ.get("BENCH_N", "0")),
                   int(os.environ.get("BENCH_CONCURRENCY", "10")))

    def env(self, n: int) -> dict[str, str]:
        """What a worker process for a phase of `n` jobs needs to know."""
        return {"BENCH_REDIS_URL": self.redis_url, "BENCH_N": str(n),
                "BENCH_CONCURRENCY": str(self.concurrency)}


SETUP = Setup.from_env()


def stamps_after(count: int, added: int) -> dict[str, str]:
    """The stamps due once a worker's INCRBY of `added` returned `count`."""
    now = str(time.time())
    due: dict[str, str] = {}
    if count == added:  # this call completed the first job(s)
        due[FIRST_KEY] = f"{now} {count}"
    if count - added < SETUP.target <= count:  # ... and this one the N-th
        due[LAST_KEY] = now
    return due


def mark_done(client: redis.Redis, added: int = 1) -> None:
    due = stamps_after(int(client.incrby(DONE_KEY, added)), added)
    if due:
        client.mset(due)


async def amark_done(client: aioredis.Redis, added: int = 1, count: int | None = None) -> None:
    """`mark_done` on an asyncio client; `count`: the result of an INCRBY already sent."""
    if count is None:
        count = int(await client.incrby(DONE_KEY, added))
    due = stamps_after(count, added)
    if due:
        await client.mset(due)


_clients: dict[str, redis.Redis | aioredis.Redis] = {}


def sync_redis() -> redis.Redis:
    """This process's blocking client (thread-safe; redis-py resets its pool after a fork)."""
    client = _clients.get("sync")
    if not isinstance(client, redis.Redis):
        client = _clients["sync"] = redis.Redis.from_url(SETUP.redis_url)
    return client


def async_redis() -> aioredis.Redis:
    """This process's asyncio client (each worker runs one event loop)."""
    client = _clients.get("async")
    if not isinstance(client, aioredis.Redis):
        client = _clients["async"] = aioredis.Redis.from_url(SETUP.redis_url)
    return client
