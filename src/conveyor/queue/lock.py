"""A Redis lock with an owner token and a TTL: only its owner releases or extends it.

Good for "one process at a time runs this tick"; a holder that dies frees it after the TTL. Held
longer, renewed with `extend`, it is a lease: `held()` says, by the local clock, whether it is
surely still ours (the TTL counted from before the request that set it was sent).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

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

    def __init__(
        self, redis: Redis, key: str, ttl_ms: int, *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)
        self._clock = clock
        self._release = redis.register_script(_RELEASE)
        self._extend = redis.register_script(_EXTEND)
        # Local-clock time until which the key is surely ours; 0 when not held.
        self._held_until = 0.0

    async def acquire(self) -> bool:
        sent = self._clock()
        with translate("lock.acquire"):
            ok = bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))
        self._held_until = sent + self.ttl_ms / 1000 if ok else 0.0
        return ok

    async def extend(self) -> bool:
        """Reset the TTL if the lock is still ours; False (and no longer held) otherwise."""
        sent = self._clock()
        with translate("lock.extend"):
            ok = bool(await self._extend(keys=[self.key], args=[self.token, self.ttl_ms]))
        self._held_until = sent + self.ttl_ms / 1000 if ok else 0.0
        return ok

    async def release(self) -> bool:
        self._held_until = 0.0
        with translate("lock.release"):
            return bool(await self._release(keys=[self.key], args=[self.token]))

    def held(self, margin_s: float = 0.0) -> bool:
        """True while the lock is ours for at least `margin_s` more, by the local clock (a
        failed or unanswered extend does not extend it)."""
        return self._clock() + margin_s < self._held_until
