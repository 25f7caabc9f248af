"""A Redis lock with an owner token and a TTL: only its owner releases or extends it.

Good for "one process at a time runs this tick"; a holder that dies frees it after the TTL.
"""

from __future__ import annotations

import secrets

from conveyor.queue.connection import Redis, translate

# KEYS[1] lock key; ARGV[1] owner token. Deletes the key only if the token matches; returns 1/0.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] lock key; ARGV[1] owner token, ARGV[2] TTL ms. Extends only if the token matches.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class Lock:
    """`SET key token NX PX ttl`; release and extend compare the token first."""

    def __init__(self, redis: Redis, key: str, ttl_ms: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)
        self._release = redis.register_script(_RELEASE)
        self._extend = redis.register_script(_EXTEND)

    async def acquire(self) -> bool:
        with translate("lock.acquire"):
            return bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def extend(self) -> bool:
        with translate("lock.extend"):
            return bool(await self._extend(keys=[self.key], args=[self.token, self.ttl_ms]))

    async def release(self) -> bool:
        with translate("lock.release"):
            return bool(await self._release(keys=[self.key], args=[self.token]))
