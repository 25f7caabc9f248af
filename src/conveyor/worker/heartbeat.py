"""Heartbeat: every interval, the worker's record (what it is doing) in Redis with a TTL, and a
reset of the idle time of every message it still holds.  [heartbeat]

The TTL is a small multiple of the interval: long enough to survive a late beat, short enough
that a dead worker soon disappears. Resetting idle times keeps a long task on a live worker
from looking abandoned to the rebalancer, which only takes messages idle for a whole TTL.
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import structlog

from conveyor.errors import Unavailable
from conveyor.queue.connection import Redis, translate
from conveyor.queue.keys import Keys
from conveyor.queue.streams import TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.worker.consumer import InFlight

log = structlog.get_logger("conveyor.heartbeat")
_REPORTED_TASKS = 50  # task ids listed in the record; the count is always exact


class Heartbeat:
    """Writes `keys.worker(worker_id)` every `interval_s` with TTL `ttl_s`."""

    def __init__(
        self,
        redis: Redis,
        streams: TaskStreams,
        keys: Keys,
        worker_id: str,
        *,
        interval_s: float,
        ttl_s: float,
        types: list[str],
        concurrency: int,
        in_flight: Mapping[tuple[str, bytes], InFlight],
        counters: Callable[[], dict[str, int]],
    ) -> None:
        self.redis = redis
        self.streams = streams
        self.keys = keys
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.types = types
        self.concurrency = concurrency
        self.in_flight = in_flight
        self.counters = counters
        self.started_at = time.time()
        self._outage = Outage("worker.heartbeat")

    async def run(self, stop: Shutdown) -> None:
        """Beat until `stop` begins, then delete the record (unless forced)."""
        while True:
            ok = await self.tick()
            # After a failed beat, try again soon: the record must be back before its TTL ends.
            if await stop.wait(self.interval_s if ok else min(self.interval_s, 1.0)):
                break
        if not stop.forced:
            try:
                await self.remove()
            except Unavailable as exc:
                log.warning("heartbeat.remove.failed", error=str(exc))

    async def tick(self) -> bool:
        """One beat; False if Redis did not take it (logged once per outage)."""
        try:
            await self.beat()
        except Unavailable as exc:
            self._outage.note(exc)
            return False
        self._outage.recovered()
        return True

    def record(self) -> dict[str, Any]:
        """What the worker is doing, as stored in Redis and shown by GET /v1/workers."""
        held = list(self.in_flight.values())
        return {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "types": self.types,
            "concurrency": self.concurrency,
            "in_flight": len(held),
            "tasks": [h.task_id for h in held[:_REPORTED_TASKS]],
            "started_at": self.started_at,
            "last_beat": time.time(),
            **self.counters(),
        }

    async def beat(self) -> None:
        by_consumer: dict[tuple[str, str], list[bytes]] = defaultdict(list)
        for held in list(self.in_flight.values()):
            by_consumer[(held.task_type, held.consumer)].append(held.stream_id)
        for (task_type, consumer), ids in by_consumer.items():
            await self.streams.refresh(task_type, consumer, ids)
        with translate("heartbeat.beat"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.worker(self.worker_id), orjson.dumps(self.record()),
                         px=int(self.ttl_s * 1000))
                pipe.sadd(self.keys.workers, self.worker_id)
                await pipe.execute()

    async def remove(self) -> None:
        with translate("heartbeat.remove"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.keys.worker(self.worker_id))
                pipe.srem(self.keys.workers, self.worker_id)
                await pipe.execute()
