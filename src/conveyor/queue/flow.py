"""Flow control on Redis, shared by every worker: concurrency leases and rate allowances per
task type (and per concurrency key), timed by the Redis server's clock.

A concurrency slot is a lease: a token in the type's sorted set scored by its expiry. Taking
slots first drops expired tokens, so a worker that died gives its slots back when their TTL
runs out; a live worker renews what it holds (`renew`) well within the TTL. A rate is a GCRA
(as `ratelimit.py` for API keys) that takes up to n cells at once, and gives back the ones a
read did not use. Every key of a type carries its `{hash tag}`: one Redis Cluster slot.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from conveyor.queue import pubsub
from conveyor.queue.connection import Redis, translate
from conveyor.queue.keys import Keys
from conveyor.registry import TaskRate
from conveyor.runtime.shutdown import Shutdown

# KEYS[1] leases; ARGV[1] limit, ARGV[2] TTL ms, then candidate tokens. Drops expired tokens,
# adds as many candidates as the limit leaves room for; returns how many (the first ones).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local granted = 0
for i = 3, #ARGV do
  if granted >= room then break end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  granted = granted + 1
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return granted
"""

# KEYS: one lease set per token; ARGV[1] limit per key, ARGV[2] TTL ms, then the tokens.
# Returns 1 or 0 per token: taken, or its key is at its limit.
_ACQUIRE_KEYED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) < tonumber(ARGV[1]) then
    redis.call('ZADD', key, now + tonumber(ARGV[2]), ARGV[i + 2])
    redis.call('PEXPIRE', key, tonumber(ARGV[2]) * 2)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: lease sets; ARGV[1] TTL ms, ARGV[2..] "<index of KEYS>:<token>". Pushes the expiry of
# the tokens of handlers still running, and puts back any Redis lost (a wipe, a failover, an
# outage longer than the TTL): they are still in use. The set may so hold more than its limit
# for a while; the acquire grants nothing until it is below it again.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  local sep = string.find(ARGV[i], ':')
  local key = KEYS[tonumber(string.sub(ARGV[i], 1, sep - 1))]
  redis.call('ZADD', key, now + ttl, string.sub(ARGV[i], sep + 1))
  redis.call('PEXPIRE', key, ttl * 2)
end
return 0
"""

# KEYS[1] TAT (µs of Redis TIME); ARGV[1] interval µs, ARGV[2] tolerance µs, ARGV[3] wanted,
# ARGV[4] lead µs. Takes as many cells as the burst allows, up to the wanted count, including
# cells due within the lead (the caller starts each when it is due: the n-th taken is due
# (n-1) intervals after the first, so time between a cell coming due and the next request is
# not lost to the rate). Returns {taken, µs until the first is due (<= 0: now), the state it
# set} or {0, µs until one would be taken}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local lead = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local room = math.floor((tolerance + lead - (tat - now)) / interval) + 1
if room <= 0 then
  return {0, tat - tolerance - lead - now}
end
local taken = math.min(room, tonumber(ARGV[3]))
local next_tat = string.format('%.0f', tat + taken * interval)
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil((tonumber(next_tat) - now) / 1000) + 1)
return {taken, tat - tolerance - now, next_tat}
"""

# KEYS[1] TAT; ARGV[1] interval µs, ARGV[2] cells to give back (taken, then not used), ARGV[3]
# the state the take set. Given back only if no one took since (else the state given back
# would free cells another worker's take already counted on: a burst past the rate); returns
# 1 if given back.
_REFUND = """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[3] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(current)
local back = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if back <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', back), 'PX', math.ceil((back - now) / 1000) + 1)
end
return 1
"""



@dataclass(frozen=True, slots=True)
class Allowance:
    taken: int
    retry_after_s: float  # nothing taken: when to ask again
    # Something taken: seconds until the first cell is due (<= 0: now) and between the next.
    first_due_s: float = 0.0
    interval_s: float = 0.0
    state: str | None = None  # the rate state this take set (what `refund` expects to find)

    def due_s(self, n: int) -> float:
        """Seconds from the take until the n-th cell taken (from 0) is due."""
        return max(0.0, self.first_due_s + n * self.interval_s)


LEAD_US = 100_000  # cells may be taken this long before they are due (started when due)


def _gcra_args(rate: TaskRate) -> tuple[int, int]:
    interval_us = rate.period_s * 1_000_000 / rate.count
    return math.ceil(interval_us), math.floor((rate.burst - 1) * interval_us)


class FlowRedis:
    """Leases and allowances of every type, on one Redis client."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._acquire = redis.register_script(_ACQUIRE)
        self._acquire_keyed = redis.register_script(_ACQUIRE_KEYED)
        self._renew = redis.register_script(_RENEW)
        self._take = redis.register_script(_TAKE)
        self._refund = redis.register_script(_REFUND)

    def key_set(self, task_type: str, key: str) -> str:
        return self.keys.leases(task_type, key)

    async def acquire(self, task_type: str, limit: int, tokens: Sequence[str], ttl_ms: int
                      ) -> int:
        """Take up to len(tokens) of the type's slots; how many (the first tokens are held)."""
        with translate("flow.acquire"):
            granted = await self._acquire(keys=[self.keys.leases(task_type)],
                                          args=[limit, ttl_ms, *tokens])
        return int(granted)

    async def acquire_keyed(self, task_type: str, limit: int,
                            wanted: Sequence[tuple[str, str]], ttl_ms: int) -> list[bool]:
        """For each (concurrency key, token): whether it got one of its key's slots."""
        if not wanted:
            return []
        with translate("flow.acquire_keyed"):
            got = await self._acquire_keyed(
                keys=[self.key_set(task_type, k) for k, _ in wanted],
                args=[limit, ttl_ms, *(token for _, token in wanted)])
        return [bool(x) for x in got]

    async def release(self, held: Sequence[tuple[str, str]]) -> None:
        """Give back (lease set key, token) pairs."""
        if not held:
            return
        with translate("flow.release"):
            if len(held) == 1:
                await self.redis.zrem(held[0][0], held[0][1])
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, token in held:
                    pipe.zrem(key, token)
                await pipe.execute()

    async def renew(self, held: Sequence[tuple[str, str]], ttl_ms: int) -> None:
        """Push the expiry of (lease set key, token) pairs this worker still holds, putting
        back those Redis lost; one script call per type (a type's keys share a slot). (A
        token given back while a renewal is on its way may come back: it expires a TTL
        later.)"""
        by_tag: dict[str, list[tuple[str, str]]] = {}
        for key, token in held:
            by_tag.setdefault(key[key.index("{"):key.index("}")], []).append((key, token))
        with translate("flow.renew"):
            for pairs in by_tag.values():
                sets = sorted({k for k, _ in pairs})
                index = {k: i + 1 for i, k in enumerate(sets)}
                await self._renew(keys=sets,
                                  args=[ttl_ms, *(f"{index[k]}:{t}" for k, t in pairs)])

    async def take(self, pace_key: str, rate: TaskRate, wanted: int, *, ahead: bool = False
                   ) -> Allowance:
        """Take up to `wanted` cells; `ahead`: including cells due within a short lead
        (`due_in_s` says how long to wait before using them)."""
        interval, tolerance = _gcra_args(rate)
        lead = LEAD_US if ahead else 0
        with translate("flow.take"):
            reply = await self._take(keys=[pace_key], args=[interval, tolerance, wanted, lead])
        taken, wait_us = int(reply[0]), int(reply[1])
        if taken:
            state = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
            return Allowance(taken, 0.0, wait_us / 1_000_000, interval / 1_000_000, state)
        return Allowance(0, wait_us / 1_000_000)

    async def refund(self, pace_key: str, rate: TaskRate, cells: int, allowance: Allowance
                     ) -> bool:
        """Give back `cells` of `allowance` not used, if no take came after it (else they
        are kept: the rate is met a little early, never exceeded); whether given back."""
        if cells <= 0 or allowance.state is None:
            return False
        interval, _ = _gcra_args(rate)
        with translate("flow.refund"):
            back = await self._refund(keys=[pace_key], args=[interval, cells, allowance.state])
        return bool(back)

    async def in_use(self, task_types: Sequence[str]) -> dict[str, int]:
        """Unexpired leases per type (for GET /v1/queues)."""
        with translate("flow.in_use"):
            seconds, micros = await self.redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            async with self.redis.pipeline(transaction=False) as pipe:
                for t in task_types:
                    pipe.zcount(self.keys.leases(t), f"({now_ms}", "+inf")
                counts = await pipe.execute()
        return {t: int(c) for t, c in zip(task_types, counts, strict=True)}

    async def nudge(self, task_type: str) -> None:
        """Tell every worker to reload its flow settings now."""
        with translate("flow.nudge"):
            await self.redis.publish(self.keys.flow(), task_type)

    async def nudges(self, stop: Shutdown) -> AsyncIterator[str]:
        """Types whose settings changed, as published, until `stop` begins; reconnects by
        itself (one missed meanwhile is made up for by the periodic reload)."""
        async for message in pubsub.messages(self.redis, self.keys.flow(), stop, op="flow.nudges",
                                             outage="worker.flow.nudges"):
            yield message
