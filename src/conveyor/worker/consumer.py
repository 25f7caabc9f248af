"""Consumer: one per task type; reads its stream through the group and hands what it read to
the type's dispatcher (`dispatcher.py`).  [consumers A, B]

Each read asks for no more messages than there are free slots (`slots.py` says how they are
shared). A consumer alone in its worker blocks in XREADGROUP on the slots it took. With several
types, a read never blocks: one that came back short is followed by a wait, holding no slot,
for an entry newer than the stream's last one at that read (`TaskStreams.wait_new`, at most
`read_block`), so an idle stream never sits on a slot a busy one could use. A new entry wakes
every idle consumer of its type in every such worker: one read gets it, the others get nothing
and wait again. A read that found a full batch of more than one message is followed by
another once the consumer has gathered every slot but those of handlers that have run for long
already, or has waited `CONVEYOR_READ_LINGER` for them (`Slots.gather`): under load a read and
its start statement carry a batch, not the one or two tasks that finished since the last read.
A type under flow limits does not gather.

A type under flow limits (`gate.py`) reads only what the gate admits, never blocking (a
blocked read would sit on leases and rate cells); at a limit its consumer gives its slots back
and waits, holding nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.flow import Allowance
from conveyor.queue.keys import consumer_name
from conveyor.queue.streams import Message, TaskStreams
from conveyor.registry import PRIORITIES, PRIORITY_WEIGHTS, Limits, TaskType
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.worker.dispatcher import Dispatcher
from conveyor.worker.gate import Gate
from conveyor.worker.slots import Slots

# A handler held for this many read lingers is not waited for: its slot is not about to return.
LONG_RUNS = 10


class Consumer:
    """Reads one type's stream within the worker's slots."""

    def __init__(
        self,
        task_type: TaskType,
        *,
        worker_id: str,
        streams: TaskStreams,
        slots: Slots,
        dispatcher: Dispatcher,
        spawn: Callable[[asyncio.Future[None]], None],
        block_ms: int,
        solo: bool,
        linger_s: float = 0.0,
        gate: Gate | None = None,
    ) -> None:
        self.task_type = task_type
        self.name = consumer_name(worker_id, task_type.name)
        self.streams = streams
        self.slots = slots
        self.dispatcher = dispatcher
        self.spawn = spawn
        self.block_ms = block_ms
        self.linger_s = linger_s
        self.solo = solo
        self.gate = gate
        self._waited_at = 0.0  # when the waiting-on-limit gauge was last read
        self._waiting_shown = False  # the gauge shows a figure above 0 for this type
        self._read_outage = Outage(f"consumer.{task_type.name}.read")

    async def run(self, shutdown: Shutdown) -> None:
        """Read and dispatch until shutdown begins (the slots close); a read in progress
        finishes and what it returned is run as part of the drain, a wait for new entries
        (which holds no slot and claims nothing) is cut short."""
        name = self.task_type.name
        # blocking: the last read came back short, the stream is drained; full: the messages
        # of the last read if it came back full (the stream has a backlog), else 0
        blocking, full = True, 0
        # shared slots: wait, holding none, for entries past this (and the bell's, ranked)
        mark: bytes | tuple[bytes, bytes] | None = None
        ranked = self.task_type.priorities
        while not shutdown.begun:
            want = self.slots.capacity
            if mark is not None:
                try:  # claims nothing, so it ends at once when the slots close
                    arrived = await self.slots.idle(
                        self.streams.wait_new(name, mark, self.block_ms))
                except Unavailable as exc:
                    await self._read_outage.failed(exc, shutdown)
                    arrived = True
                # nothing arrived: read anyway, for one slot, as a safety net (a group lost
                # with Redis's data is recreated by the read)
                want = want if arrived else 1
                mark = None
            taken = await self._take(want, full)
            if taken == 0:
                return
            limits = self.gate.of(name) if self.gate is not None else None
            cells: tuple[float, Allowance] | None = None  # rate cells: when each is due
            if limits is not None and limits.limited:
                taken, cells = await self._admit(taken, shutdown)
                if taken == 0:
                    continue
            else:
                self._unlimited(limits)
                limits = None
            last: bytes | tuple[bytes, bytes] | None = None
            try:
                if ranked:
                    messages, last = await self.streams.read_ranked(
                        name, self.name, taken, PRIORITIES, PRIORITY_WEIGHTS)
                elif self.solo and limits is None:  # no one else needs the slots: block
                    messages = await self.streams.read(name, self.name, taken,
                                                       self.block_ms if blocking else None)
                else:
                    messages, last = await self.streams.read_marked(name, self.name, taken)
                self._read_outage.recovered()
            except Unavailable as exc:
                self.slots.give(taken)
                if limits is not None and self.gate is not None:
                    await self._unused(taken, limits, cells)
                await self._read_outage.failed(exc, shutdown)
                continue
            if len(messages) < taken:
                self.slots.give(taken - len(messages))
                if limits is not None:
                    await self._unused(taken - len(messages), limits, cells)
            blocking = len(messages) < taken
            full = 0 if blocking else len(messages)
            mark = last if blocking else None
            if messages:
                self._dispatch(messages, shutdown, leased=limits is not None, cells=cells)

    async def _take(self, want: int, full: int) -> int:
        """Slots for the next read (0: closed). After a full read of `full` > 1 messages (the
        stream has a backlog), a little wait for the slots handlers are about to free, so this
        read and its start statement carry more: not for those of handlers that have run for
        `LONG_RUNS` lingers already (they are not about to end). A type under flow limits
        does not gather: its reads are cut to what the gate admits."""
        taken = await self.slots.take(want)
        if not (full > 1 and 0 < taken < want and self.linger_s > 0):
            return taken
        if self.gate is not None and self.gate.of(self.task_type.name).limited:
            return taken
        target = want - self.dispatcher.in_flight.held_longer(self.linger_s * LONG_RUNS)
        if taken >= target:
            return taken
        try:
            taken += await self.slots.gather(target - taken, self.linger_s)
        except BaseException:
            self.slots.give(taken)
            raise
        if self.slots.closed:  # shutdown began meanwhile: no new read
            self.slots.give(taken)
            return 0
        return taken

    def _dispatch(self, messages: list[Message], shutdown: Shutdown, *, leased: bool,
                  cells: tuple[float, Allowance] | None) -> None:
        """Started alongside the next read, so starts can share a statement; under a rate,
        each when its cell is due."""
        if cells is None:
            self.spawn(asyncio.ensure_future(
                self.dispatcher.dispatch(self.name, messages, shutdown, leased=leased)))
            return
        taken_at, allowance = cells
        for i, message in enumerate(messages):
            self.spawn(asyncio.ensure_future(
                self._paced(taken_at + allowance.due_s(i), message, shutdown)))

    async def _admit(self, taken: int, shutdown: Shutdown
                     ) -> tuple[int, tuple[float, Allowance] | None]:
        """Of `taken` slots, keep as many as the gate admits (0: it held the type back, and
        this waited), and the rate cells taken for them with when (monotonic) the reply
        came."""
        assert self.gate is not None
        name = self.task_type.name
        try:
            granted, wait_s, limit, allowance = await self.gate.admit(name, taken)
        except Unavailable as exc:
            self.slots.give(taken)
            await self._read_outage.failed(exc, shutdown)
            return 0, None
        if granted < taken:
            self.slots.give(taken - granted)
        if granted == 0:
            await self._hold(limit or "concurrency", wait_s)
            return 0, None
        metrics.TASKS_WAITING_ON_LIMIT.labels(name).set(0)
        # The cells' due times count from Redis's clock at the take: from the reply's arrival
        # here, not the request's, they are never early (at most a round trip late).
        replied_at = time.monotonic()
        return granted, (replied_at, allowance) if allowance is not None else None

    def _unlimited(self, limits: Limits | None) -> None:
        """The type reads without the gate: a waiting figure shown under a limit since
        lifted goes back to 0."""
        if limits is not None and self._waiting_shown:
            metrics.TASKS_WAITING_ON_LIMIT.labels(self.task_type.name).set(0)
            self._waiting_shown = False

    async def _paced(self, at: float, message: Message, shutdown: Shutdown) -> None:
        """Start `message` once its rate cell is due (at most the gate's lead from now)."""
        wait_s = at - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        await self.dispatcher.dispatch(self.name, [message], shutdown, leased=True)

    async def _unused(self, count: int, limits: Limits,
                      cells: tuple[float, Allowance] | None) -> None:
        assert self.gate is not None
        # Cells taken and not used, if Redis is away: the rate is met a little early, never
        # exceeded.
        with contextlib.suppress(Unavailable):
            await self.gate.unused(self.task_type.name, count, limits,
                                   cells[1] if cells is not None else None)

    async def _hold(self, limit: str, wait_s: float) -> None:
        """Wait, holding no slot, until the gate may admit again (or the slots close)."""
        assert self.gate is not None
        name = self.task_type.name
        gauge = metrics.FLOW_LIMITED.labels(name, limit)
        gauge.inc()
        try:
            now = time.monotonic()
            if now - self._waited_at >= 1.0:
                self._waited_at = now
                with contextlib.suppress(Unavailable):
                    lag = await self.streams.lag(name)
                    metrics.TASKS_WAITING_ON_LIMIT.labels(name).set(lag)
                    self._waiting_shown = True
            await self.slots.idle(self.gate.wait(name, wait_s))
        finally:
            gauge.dec()
