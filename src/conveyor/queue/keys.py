"""Every Redis key name Conveyor uses, and nothing else builds one.

Per-type keys carry the type in a `{hash tag}`, so a type's stream, delayed set and dead-letter
stream share one Redis Cluster slot and one Lua script may touch them together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

GROUP = "workers"  # the one consumer group of every task stream
MAX_KEY_CHARS = 200  # a concurrency key longer than this is named by its hash


def _concurrency_key(key: str) -> str:
    """A concurrency key as part of a Redis key name: as it is, or past MAX_KEY_CHARS its
    start and a hash of all of it (two long keys sharing a start stay apart)."""
    if len(key) <= MAX_KEY_CHARS:
        return key
    return f"{key[:64]}~{hashlib.sha256(key.encode()).hexdigest()}"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "conveyor"

    def stream(self, task_type: str) -> str:
        """Stream of messages `{id, r}` ready to run (r: times re-queued by rebalance)."""
        return f"{self.prefix}:{{{task_type}}}:stream"

    def delayed(self, task_type: str) -> str:
        """Sorted set of task ids scored by run_at in Unix ms: delayed tasks and retries."""
        return f"{self.prefix}:{{{task_type}}}:delayed"

    def dead(self, task_type: str) -> str:
        """Dead-letter stream: `{id, reason}` for every message that gave up."""
        return f"{self.prefix}:{{{task_type}}}:dead"

    def events(self) -> str:
        """Stream of every task transition, capped (see `queue.events`)."""
        return f"{self.prefix}:events"

    def cancels(self) -> str:
        """Pub/sub channel of cancel requests for running tasks (payload: the task id)."""
        return f"{self.prefix}:cancels"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    def ready(self, task_type: str, level: str) -> str:
        """Sorted set of a priority level's tasks waiting to enter the stream (a type declared
        with priorities), scored by when they were published (`TaskStreams.read_ranked`)."""
        return f"{self.prefix}:{{{task_type}}}:ready:{level}"

    def levels(self, task_type: str) -> str:
        """Hash of the priority level (`high`, `low`) of the delayed tasks of a type declared
        with priorities that are not `default`: where the forwarder moves each when due."""
        return f"{self.prefix}:{{{task_type}}}:levels"

    def bell(self, task_type: str) -> str:
        """Capped stream with an entry per task put in a ready set: what idle consumers of a
        type with priorities wait on."""
        return f"{self.prefix}:{{{task_type}}}:bell"

    def turns(self, task_type: str) -> str:
        """Hash of the priority levels' current weights (smooth weighted round robin)."""
        return f"{self.prefix}:{{{task_type}}}:turns"

    def leases(self, task_type: str, key: str | None = None) -> str:
        """Sorted set of a type's concurrency leases (or one concurrency key's), each a token
        scored by its expiry in Redis ms (`queue.flow`)."""
        return f"{self.prefix}:{{{task_type}}}:leases" + (
            "" if key is None else f":k:{_concurrency_key(key)}")

    def pace(self, task_type: str, key: str | None = None) -> str:
        """A type's rate-limit state (GCRA: its theoretical arrival time in µs), or a key's."""
        return f"{self.prefix}:{{{task_type}}}:pace" + (
            "" if key is None else f":k:{_concurrency_key(key)}")

    def flow(self) -> str:
        """Pub/sub channel nudging workers to reload flow settings (payload: the type)."""
        return f"{self.prefix}:flow"

    def rate(self, principal: str) -> str:
        """An API key's rate-limit state (GCRA: its theoretical arrival time), one key each."""
        return f"{self.prefix}:rate:{principal}"


def consumer_name(worker_id: str, task_type: str) -> str:
    """A consumer per (process, stream): never shared between streams or processes."""
    return f"{worker_id}/{task_type}"


def worker_of(consumer: str) -> str:
    return consumer.rsplit("/", 1)[0]
