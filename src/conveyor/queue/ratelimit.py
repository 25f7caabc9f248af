"""Per-API-key rate limits shared by every API process: GCRA (the generic cell rate algorithm)
in one single-key Lua script, timed by the Redis server's clock so the processes' clocks need
not agree.

A rate of N per period allows a burst of N at once, then one request every period/N. Only the
theoretical arrival time (TAT) is stored, in one key per API key that expires as soon as the
key's allowance is full again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from conveyor.config import Rate
from conveyor.queue.connection import Redis, translate
from conveyor.queue.keys import Keys

# KEYS[1] the API key's TAT, in microseconds of Redis TIME; ARGV[1] emission interval µs
# (period / count), ARGV[2] burst tolerance µs (period - interval). Allowed when the TAT is no
# more than the tolerance ahead of now: the TAT moves one interval on, and the key expires when
# it would be in the past. Returns {1, 0} when allowed, {0, µs until one would be}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, tat - tolerance - now}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat),
           'PX', math.ceil((next_tat - now) / 1000))
return {1, 0}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after_s: float  # 0 when allowed


class RateLimiter:
    """`check(principal, rate)` takes one request from `principal`'s allowance."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.keys = keys
        self._gcra = redis.register_script(_GCRA)

    async def check(self, principal: str, rate: Rate) -> Verdict:
        """Count one request; Unavailable when Redis does not answer."""
        interval_us = rate.period_s * 1_000_000 / rate.count
        tolerance_us = rate.period_s * 1_000_000 - interval_us
        with translate("ratelimit.check"):
            allowed, wait_us = await self._gcra(
                keys=[self.keys.rate(principal)],
                args=[math.ceil(interval_us), math.floor(tolerance_us)],
            )
        return Verdict(bool(allowed), int(wait_us) / 1_000_000)
