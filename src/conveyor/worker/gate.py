"""Gate: a worker's side of flow control (README, Flow control). Before a consumer reads, the
gate says how many messages of its type may be read now: the type is not paused, it got that
many concurrency leases (global, in Redis) and rate cells. A worker so never reads a message
it cannot run, and a type at its limit holds no slot another type of the worker could use.

Per-key limits need the payload, which a worker first sees when it starts the task: a started
task whose key is at its limit is put back (queued again, due a little later, the attempt not
counted) rather than run, so one busy key never stops the others.

The limits in force are the declared ones with the `queue_settings` row over them, reloaded
when the API nudges (pub/sub) and every `reload_s` in case a nudge was missed. Leases held
are renewed every third of their TTL; a worker that dies stops renewing, and its leases expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence

import structlog

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.flow import Allowance, FlowRedis
from conveyor.registry import Limits, TaskType
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.queue_settings import QueueSettingsStore
from conveyor.store.tasks import Started

log = structlog.get_logger("conveyor.gate")

WAIT_MOST_S = 1.0  # a consumer at a limit looks again at least this often (limits may change)
SPARE_S = 0.05  # how long a lease a handler gave back waits for the type's next read here


class Gate:
    """Flow limits of one worker's types, and the leases it holds."""

    def __init__(
        self, types: Sequence[TaskType], flow: FlowRedis, queue_settings: QueueSettingsStore,
        worker_id: str, *, lease_ttl_s: float, reload_s: float, poll_s: float,
        defer_s: float,
    ) -> None:
        self.declared = {t.name: t.limits for t in types}
        self.limits: dict[str, Limits] = dict(self.declared)
        self.flow = flow
        self.queue_settings = queue_settings
        self.worker_id = worker_id
        self.ttl_ms = max(1, int(lease_ttl_s * 1000))
        self.reload_s = reload_s
        self.poll_s = poll_s
        self.defer_s = defer_s
        self._seq = itertools.count()
        self._held: dict[str, list[str]] = {t.name: [] for t in types}  # global lease tokens
        # Leases a finished handler gave back, kept (and renewed) for this worker's next read
        # of the type for up to SPARE_S, then given back to Redis: a type with a backlog
        # so does not pay a release and an acquire per task, nor lose its slots between them.
        self._spare: dict[str, list[tuple[str, float]]] = {t.name: [] for t in types}
        # Only leases taken under the limits in force are kept: those taken before a change
        # (tokens numbered below this) go back to Redis, so a lower limit holds at once.
        self._keep_from = {t.name: 0 for t in types}
        self._freed = {t.name: asyncio.Event() for t in types}  # some of its leases given back
        self._keyed: dict[uuid.UUID, tuple[str, str]] = {}  # task id: (lease set, token)
        self._to_release: list[tuple[str, str]] = []
        self._released_types: set[str] = set()  # types of the leases in _to_release
        self._release_wake = asyncio.Event()
        # Set by every reload, then replaced (no waiter clears what another waits on), and
        # the reloads counted: a consumer that last looked at its limits before a reload
        # does not wait for the next one.
        self._changed = asyncio.Event()
        self._generation = 0
        self._seen = {t.name: 0 for t in types}  # the generation each type's admit saw
        self._reload_now = asyncio.Event()
        self._outage = Outage("worker.flow")

    def _token(self) -> str:
        return f"{self.worker_id}:{next(self._seq)}"

    def of(self, task_type: str) -> Limits:
        return self.limits[task_type]

    # -- before a read ---------------------------------------------------------------------

    async def admit(self, task_type: str, want: int
                    ) -> tuple[int, float, str | None, Allowance | None]:
        """Take leases and cells for up to `want` messages: (how many; if none, seconds to wait
        and the limit that holds them back; the rate cells taken, which say when each may
        start). Unavailable when Redis does not answer."""
        limits = self.limits[task_type]
        self._seen[task_type] = self._generation
        if limits.paused:
            return 0, WAIT_MOST_S, "paused", None
        granted = want
        tokens: list[str] = []
        if limits.max_concurrency is not None:
            spare = self._spare[task_type]
            reused = [token for token, _ in spare[:want]]
            del spare[:len(reused)]
            candidates = [self._token() for _ in range(want - len(reused))]
            got = await self.flow.acquire(task_type, limits.max_concurrency, candidates,
                                          self.ttl_ms) if candidates else 0
            tokens = reused + candidates[:got]
            granted = len(tokens)
            self._held[task_type].extend(tokens)
            if granted == 0:
                return 0, self.poll_s, "concurrency", None
        if limits.rate_limit is not None:
            try:
                allowance = await self.flow.take(self.flow.keys.pace(task_type),
                                                 limits.rate_limit, granted, ahead=True)
            except Unavailable:
                self.release(task_type, len(tokens))
                raise
            if allowance.taken < granted:
                self.release(task_type, granted - allowance.taken)
            if allowance.taken == 0:
                return 0, min(WAIT_MOST_S, max(0.001, allowance.retry_after_s)), "rate", None
            return allowance.taken, 0.0, None, allowance
        return granted, 0.0, None, None

    async def unused(self, task_type: str, count: int, limits: Limits,
                     allowance: Allowance | None) -> None:
        """A read came back `count` short of what `admit` allowed: give those back (the rate
        cells only if no one took any since, see `FlowRedis.refund`)."""
        if count <= 0:
            return
        if limits.max_concurrency is not None:
            self.release(task_type, count)
        if limits.rate_limit is not None and allowance is not None:
            await self.flow.refund(self.flow.keys.pace(task_type), limits.rate_limit, count,
                                   allowance)

    async def wait(self, task_type: str, seconds: float) -> None:
        """Sleep `seconds` at most, less if the limits are reloaded or some of the type's
        leases given back (by this worker) meanwhile."""
        if self._seen[task_type] != self._generation:
            return  # reloaded since this type's last admit: look again at once
        freed = self._freed[task_type]
        freed.clear()  # one consumer per type in a worker: its own
        waits = [asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(freed.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def release(self, task_type: str, count: int, *, keep: bool = False) -> None:
        """Give back `count` of the type's leases (in the background, batched); `keep`:
        kept for this worker's next read of the type for SPARE_S first (a handler done)."""
        held = self._held[task_type]
        count = min(count, len(held))
        if count <= 0:
            return
        tokens, held[:] = held[:count], held[count:]
        if keep:
            now = time.monotonic()
            first = self._keep_from[task_type]
            kept = [t for t in tokens if int(t.rpartition(":")[2]) >= first]
            self._spare[task_type].extend((t, now) for t in kept)
            tokens = [t for t in tokens if int(t.rpartition(":")[2]) < first]
            self._freed[task_type].set()  # a consumer at the limit reads now, with these
            self._release_wake.set()  # and gives back what is still unused after SPARE_S
            if not tokens:
                return
        key = self.flow.keys.leases(task_type)
        self._to_release.extend((key, t) for t in tokens)
        self._released_types.add(task_type)
        self._release_wake.set()

    def _expire_spares(self, *, every: bool = False) -> float | None:
        """Give back spare leases older than SPARE_S (`every`: all of them); seconds until
        the next one is due, None if none is left."""
        now = time.monotonic()
        soonest: float | None = None
        for task_type, spare in self._spare.items():
            due = [t for t, at in spare if every or now - at >= SPARE_S]
            if due:
                spare[:] = [(t, at) for t, at in spare if t not in set(due)]
                key = self.flow.keys.leases(task_type)
                self._to_release.extend((key, t) for t in due)
                self._released_types.add(task_type)
            for _, at in spare:
                left = SPARE_S - (now - at)
                soonest = left if soonest is None else min(soonest, left)
        return soonest

    # -- after a start ---------------------------------------------------------------------

    def keyed(self, task_type: str) -> bool:
        return self.limits[task_type].keyed

    async def admit_keyed(self, task_type: str, started: list[Started]
                          ) -> tuple[list[Started], list[tuple[Started, float, str]]]:
        """Which started tasks may run under their key's limits; the others with how long
        they should wait, and the limit that holds them back."""
        limits = self.limits[task_type]
        keys = {t.id: limits.key_of(t.payload) for t in started}
        allowed = [t for t in started if keys[t.id] is None]
        candidates = [t for t in started if keys[t.id] is not None]
        deferred: list[tuple[Started, float, str]] = []
        if limits.max_concurrency_per_key is not None and candidates:
            tokens = [self._token() for _ in candidates]
            got = await self.flow.acquire_keyed(
                task_type, limits.max_concurrency_per_key,
                [(keys[t.id] or "", tok) for t, tok in zip(candidates, tokens, strict=True)],
                self.ttl_ms)
            passed = []
            # A key's n-th task put back in this batch waits n/limit defers more: a busy key's
            # backlog comes back spread out, about as fast as its slots could take it, rather
            # than all at once (to be put back again, in the way of the other keys).
            waiting: dict[str, int] = defaultdict(int)
            per_key = limits.max_concurrency_per_key
            for task, token, ok in zip(candidates, tokens, got, strict=True):
                if ok:
                    self._keyed[task.id] = (self.flow.key_set(task_type, keys[task.id] or ""),
                                            token)
                    passed.append(task)
                else:
                    n = waiting[keys[task.id] or ""]
                    waiting[keys[task.id] or ""] = n + 1
                    deferred.append((task, self.defer_s * (1 + random.random() + n / per_key),
                                     "key_concurrency"))
            candidates = passed
        if limits.rate_limit_per_key is not None:
            rate = limits.rate_limit_per_key
            interval_s = rate.period_s / rate.count
            # A key out of cells is not asked again in this batch: its n-th task put back is
            # due at the key's next cell plus n intervals (jittered within one), so the
            # put-backs come due one by one as cells do, not all at once to be put back again.
            behind: dict[str, tuple[float, int]] = {}  # key: (its next cell, tasks put back)
            for task in candidates:
                key = keys[task.id] or ""
                if key not in behind:
                    pace = self.flow.keys.pace(task_type, keys[task.id])
                    allowance = await self.flow.take(pace, rate, 1)
                    if allowance.taken:
                        allowed.append(task)
                        continue
                    behind[key] = (allowance.retry_after_s, 0)
                next_s, n = behind[key]
                behind[key] = (next_s, n + 1)
                self.release_keyed(task.id)
                deferred.append((task, next_s + (n + random.random()) * interval_s,
                                 "key_rate"))
        else:
            allowed += candidates
        for _, _, limit in deferred:
            metrics.FLOW_DEFERRED.labels(task_type, limit).inc()
        return allowed, deferred

    def release_keyed(self, task_id: uuid.UUID) -> None:
        held = self._keyed.pop(task_id, None)
        if held is not None:
            self._to_release.append(held)
            self._release_wake.set()

    # -- background ------------------------------------------------------------------------

    async def run(self, stop: Shutdown) -> None:
        """Reload the limits, renew and give back leases, until `stop` begins (then the
        leases still held are given back, as far as Redis lets)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._listen(stop))
            group.create_task(self._reloads(stop))
            group.create_task(self._renewals(stop))
            group.create_task(self._releases(stop))

    async def reload(self) -> None:
        overrides = await self.queue_settings.all()
        changed = {}
        for name, declared in self.declared.items():
            row = overrides.get(name)
            # A row that cannot apply (the API checks its own: one written by hand) leaves the
            # declared limits, with a warning: it never stops a worker.
            changed[name] = row.over_or_declared(declared, name) if row is not None \
                else declared
        if changed != self.limits:
            log.info("flow.limits.reloaded", changed=[n for n in changed
                                                      if changed[n] != self.limits[n]])
        for name, limits in changed.items():
            if limits != self.limits[name]:
                self._keep_from[name] = next(self._seq)
            if limits != self.limits[name] and self._spare[name]:
                # Kept under the old limit: given back, so a lower one holds at once.
                key = self.flow.keys.leases(name)
                self._to_release.extend((key, t) for t, _ in self._spare[name])
                self._spare[name].clear()
                self._release_wake.set()
        self.limits = changed
        self._generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _listen(self, stop: Shutdown) -> None:
        async for task_type in self.flow.nudges(stop):
            if task_type in self.declared or task_type == "*":
                self._reload_now.set()

    async def _reloads(self, stop: Shutdown) -> None:
        stop.when_begun(self._reload_now.set)
        while not stop.begun:
            try:
                await self.reload()
                self._outage.recovered()
            except Unavailable as exc:
                await self._outage.failed(exc, stop)
                continue
            self._reload_now.clear()
            await _woken(self._reload_now, self.reload_s)  # or by the stop

    def _all_held(self) -> list[tuple[str, str]]:
        held = [(self.flow.keys.leases(t), tok) for t, tokens in self._held.items()
                for tok in tokens]
        spare = [(self.flow.keys.leases(t), tok) for t, tokens in self._spare.items()
                 for tok, _ in tokens]
        return held + spare + list(self._keyed.values())

    async def _renewals(self, stop: Shutdown) -> None:
        every_s = self.ttl_ms / 3000
        while not stop.begun:
            await stop.wait(every_s)
            held = self._all_held()
            if held:
                try:
                    await self.flow.renew(held, self.ttl_ms)
                except Unavailable as exc:
                    log.warning("flow.renew.failed", leases=len(held), error=str(exc))

    async def _releases(self, stop: Shutdown) -> None:
        stop.when_begun(self._release_wake.set)
        while True:
            next_spare_s = self._expire_spares(every=stop.begun)
            if not self._to_release:
                if stop.begun:
                    return
                self._release_wake.clear()
                await _woken(self._release_wake, next_spare_s)  # or by the stop
                continue
            batch, self._to_release = self._to_release, []
            types, self._released_types = self._released_types, set()
            try:
                await self.flow.release(batch)
                for task_type in types:  # a consumer waiting at the limit may try now
                    self._freed[task_type].set()
            except Unavailable as exc:  # they expire by themselves
                log.warning("flow.release.failed", leases=len(batch), error=str(exc))
                if stop.begun:
                    return
                await stop.wait(0.1)


async def _woken(event: asyncio.Event, timeout_s: float | None) -> None:
    """Wait until `event` is set (a stop sets it too: `Shutdown.when_begun`), at most
    `timeout_s`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
