"""Slots: the process-wide limit on messages in flight (read and not yet acked).

A consumer takes slots before it reads, so XREADGROUP never asks for more messages than there
is room for, and gives them back when a message is settled. Slots go to waiting consumers in
arrival order: a consumer that gives a slot back and asks again queues behind the others, and
slots freed together are split among the waiters, so no stream starves while several are busy.

Only a read that may deliver messages holds slots. A worker with several types would lose
slots to its idle ones if each held one through a blocking XREADGROUP: the busy type runs
with fewer than `capacity`. So there an idle consumer waits in `idle()` instead, on a read
that claims nothing (a plain XREAD for entries newer than what its last read saw), holding no
slot, and takes slots only once its stream has something, for a read that does not block. (A
worker of one type still blocks in XREADGROUP on its slots: nobody else needs them.) Other
designs set aside: one XREADGROUP over every type's stream cannot be bounded by the free slots
(COUNT applies per stream) nor span types on Redis Cluster (each type has its own hash slot);
a blocking read that gives its slot back when another consumer asks must interrupt a command
in flight, and cancelling it can lose the race with a delivery (the message is left pending
here, unread), while CLIENT UNBLOCK needs a known connection per consumer, which a pooled
client does not give.

A consumer whose last read came back full (its stream is busy) may `gather()` more slots as
they come free, for a bounded linger, before it reads again: under load one read and one start
statement then carry many tasks instead of the one or two freed since the last read (each
costs a round trip and a statement whatever it carries). An idle stream never waits: a read
that came back short is not delayed, a consumer does not wait for the slots of handlers that
have run for long already, and a gathering ends once another consumer waits for slots.

`close()` ends every read loop at shutdown: waiters in `take()` get 0, and reads waiting in
`idle()` are cancelled (they claim nothing, so nothing is lost).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from conveyor import metrics

T = TypeVar("T")


@dataclass(slots=True)
class _Gathering:
    """A consumer's gathering: slots given back go to it until it has what it wants."""

    done: asyncio.Future[None]
    wanted: int
    got: int = 0


class Slots:
    """`capacity` slots shared by every consumer of one worker."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiters: collections.deque[tuple[asyncio.Future[int], int]] = collections.deque()
        self._idle: set[asyncio.Future[Any]] = set()
        self._handing = False  # a hand-out to the waiters is scheduled
        self._turn = 0  # where the next split's odd slots begin
        self._closed = False
        self._gathering: _Gathering | None = None  # the consumer gathering slots, if one is
        metrics.WORKER_IN_FLIGHT.set_function(lambda: self.in_use)  # read at scrape time

    @property
    def in_use(self) -> int:
        return self.capacity - self.free

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        """Consumers queued for a slot."""
        return len(self._waiters)

    async def take(self, most: int) -> int:
        """Wait for at least one free slot and take up to `most`; 0 once closed."""
        if self._closed:
            return 0
        if self.free > 0 and not self._waiters:
            taken = min(self.free, most)
            self.free -= taken
            return taken
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, most))
        self._end_gathering()  # another consumer waits: the gathering one reads now
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(waiter.result())
            else:
                self._waiters = collections.deque(w for w in self._waiters if w[0] is not waiter)
            raise

    async def gather(self, most: int, within_s: float) -> int:
        """Take up to `most` more slots as they come free, for at most `within_s`: how many
        it took. It returns as soon as it has them all, the slots close, or another consumer
        waits for slots (two gathering would each wait out the linger for slots the other
        holds). One consumer gathers at a time; another only takes what is free. Cancelled,
        it gives back what it took."""
        if most <= 0 or self._closed or self._waiters:
            return 0
        got = min(self.free, most)
        self.free -= got
        if got == most or within_s <= 0 or self._gathering is not None:
            return got
        loop = asyncio.get_running_loop()
        gathering = _Gathering(loop.create_future(), most - got)
        self._gathering = gathering
        timer = loop.call_later(within_s, self._end_gathering, gathering)
        try:
            await gathering.done
        except BaseException:  # cancelled: what it gathered goes back, as take() does
            self._end_gathering(gathering)
            self.give(got + gathering.got)
            raise
        finally:
            timer.cancel()
        return got + gathering.got

    def _end_gathering(self, gathering: _Gathering | None = None) -> None:
        """The gathering (by default the current one) stops taking what is given back, and
        its consumer reads."""
        gathering = gathering or self._gathering
        if gathering is None:
            return
        if gathering is self._gathering:
            self._gathering = None
        if not gathering.done.done():
            gathering.done.set_result(None)

    def give(self, count: int = 1) -> None:
        if count <= 0:
            return
        self.free += count
        gathering = self._gathering
        if gathering is not None and not self._waiters:  # one timer, no future per slot
            taken = min(self.free, gathering.wanted)
            self.free -= taken
            gathering.got += taken
            gathering.wanted -= taken
            if gathering.wanted == 0:
                self._end_gathering()
        if self._handing or not self._waiters:
            return
        if len(self._waiters) == 1:  # served at once: the single-type worker's hot path
            waiter, most = self._waiters.popleft()
            if not waiter.done():
                taken = min(self.free, most)
                self.free -= taken
                waiter.set_result(taken)
        else:  # on the loop's next turn, with whatever else is given back in this one
            self._handing = True
            asyncio.get_running_loop().call_soon(self._hand_out)

    def _hand_out(self) -> None:
        """Split the free slots among the waiters (each up to what it asked for): one each,
        oldest first, then the rest one at a time in turn, from where the last split left off.
        Slots freed in one turn of the loop are so shared, rather than all going to the first
        waiter (which then reads first, asks first, and takes them all again turn after turn),
        and no waiter is always the one that gets the odd slot."""
        self._handing = False
        waiters = [(w, most) for w, most in self._waiters if not w.done()]
        grants = [0] * len(waiters)
        for i in range(min(self.free, len(waiters))):
            grants[i] = 1
        self.free -= sum(grants)
        wanting = [i for i, (_, most) in enumerate(waiters) if grants[i] < most]
        while self.free > 0 and wanting:
            i = wanting[self._turn % len(wanting)]
            self._turn += 1
            grants[i] += 1
            self.free -= 1
            if grants[i] == waiters[i][1]:
                wanting.remove(i)
        self._waiters = collections.deque(
            waiter for waiter, granted in zip(waiters, grants, strict=True) if not granted)
        for (waiter, _), granted in zip(waiters, grants, strict=True):
            if granted:
                waiter.set_result(granted)

    async def idle(self, read: Coroutine[Any, Any, T]) -> T | None:
        """Run `read`, which must claim no message, holding no slot: its result, or None if
        the slots close first (which cancels it)."""
        if self._closed:
            read.close()
            return None
        task = asyncio.ensure_future(read)
        self._idle.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._closed or (current is not None and current.cancelling()):
                raise  # our own cancellation (awaiting `task` has cancelled it too)
            return None
        finally:
            self._idle.discard(task)

    def close(self) -> None:
        """Stop handing out slots: consumers waiting in take() get 0 and stop reading, and
        reads waiting in idle() are cancelled."""
        self._closed = True
        self._end_gathering()
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(0)
        for task in self._idle:
            task.cancel()
