"""The in-flight table: every message a worker holds, from its read until it is settled, and
the handler and lease of those whose task is running. This class is its one owner: the
dispatchers, the recorder's callback, the heartbeat and the drain go through its methods.

The heartbeat refreshes the idle time of everything held (so the rebalancer leaves it alone),
checks the leases of what runs, and reports the table; the drain hands back what is left.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from conveyor.queue.streams import Message
from conveyor.registry import Lease, RunIn

Key = tuple[str, bytes]  # (task type, stream id)


@dataclass(slots=True)
class Held:
    """One message held by this worker. `attempt`, `handler` and `lease` are set once its task
    is running here."""

    task_type: str
    consumer: str
    message: Message
    since: float
    attempt: int | None = None
    handler: asyncio.Future[None] | None = None
    lease: Lease | None = None
    run_in: RunIn = "loop"  # a coroutine ("loop") is cancelled when its lease is lost
    submitted: bool = False  # its outcome is with the recorder: no lease left to check

    @property
    def cancellable(self) -> bool:
        return self.run_in == "loop"

    @property
    def key(self) -> Key:
        return (self.task_type, self.message.stream_id)

    @property
    def task_id(self) -> str:
        return str(self.message.task_id) if self.message.task_id else ""


class InFlight:
    """(type, stream id) → Held, for one worker."""

    def __init__(self) -> None:
        self._held: dict[Key, Held] = {}
        self._tasks: dict[uuid.UUID, int] = {}  # task id → messages of it held

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Held]:
        return iter(list(self._held.values()))

    def hold(self, task_type: str, consumer: str, messages: Iterable[Message]) -> list[Message]:
        """Messages just read: held until released. Returns those newly held; a message
        already held (the very entry delivered again, after its group was recreated at id 0)
        is left to the holder it has."""
        now = time.monotonic()
        fresh = []
        for m in messages:
            key = (task_type, m.stream_id)
            if key not in self._held:
                self._held[key] = Held(task_type, consumer, m, now)
                if m.task_id is not None:
                    self._tasks[m.task_id] = self._tasks.get(m.task_id, 0) + 1
                fresh.append(m)
        return fresh

    def held_longer(self, seconds: float) -> int:
        """Messages held for more than `seconds` whose outcome is not yet handed over: their
        slots are not about to come back."""
        cutoff = time.monotonic() - seconds
        return sum(1 for h in self._held.values() if not h.submitted and h.since < cutoff)

    def holding(self, task_id: uuid.UUID) -> int:
        """How many messages of `task_id` are held here."""
        return self._tasks.get(task_id, 0)

    def running(
        self, task_type: str, stream_id: bytes, attempt: int, handler: asyncio.Future[None],
        lease: Lease, *, run_in: RunIn,
    ) -> None:
        """The message's task is running here, at `attempt`, in `handler`."""
        held = self._held.get((task_type, stream_id))
        if held is not None:
            held.attempt, held.handler, held.lease, held.run_in = attempt, handler, lease, run_in

    def submitted(self, key: Key) -> None:
        """The handler finished and its outcome is with the recorder (to be settled)."""
        held = self._held.get(key)
        if held is not None:
            held.submitted = True

    def release(self, keys: Iterable[Key]) -> None:
        """Stop holding these messages (settled, handed back, or left pending)."""
        for key in keys:
            held = self._held.pop(key, None)
            task_id = held.message.task_id if held is not None else None
            if task_id is not None:
                left = self._tasks[task_id] - 1
                if left:
                    self._tasks[task_id] = left
                else:
                    del self._tasks[task_id]

    def by_consumer(self) -> dict[tuple[str, str], list[bytes]]:
        """Stream ids held, per (type, consumer): what the heartbeat refreshes."""
        out: dict[tuple[str, str], list[bytes]] = defaultdict(list)
        for held in self._held.values():
            out[(held.task_type, held.consumer)].append(held.message.stream_id)
        return out

    def leases(self) -> list[tuple[uuid.UUID, int]]:
        """(task id, attempt) of every task whose handler runs here: what the lease check
        asks about."""
        return [(h.message.task_id, h.attempt) for h in self._held.values()
                if h.attempt is not None and h.message.task_id is not None and not h.submitted]

    def held_ids(self, *, exclude: Iterable[Key] = ()) -> set[uuid.UUID]:
        """Every task id this worker holds a message of, in any state, but for the messages
        `exclude`."""
        skip = set(exclude)
        return {h.message.task_id for k, h in self._held.items()
                if h.message.task_id and k not in skip}

    def running_task(self, task_id: uuid.UUID, attempt: int | None = None) -> list[Held]:
        """The held messages of `task_id` whose handler runs here (at `attempt`, if given)
        and has not handed over its outcome yet."""
        return [h for h in self._held.values()
                if h.message.task_id == task_id and h.handler is not None and not h.submitted
                and (attempt is None or h.attempt == attempt)]

    def lose(
        self, asked: Iterable[tuple[uuid.UUID, int]], owned: set[tuple[uuid.UUID, int]]
    ) -> list[Held]:
        """Of the (task id, attempt) pairs `asked` about, those not `owned` any more: mark
        their lease lost, cancel coroutine handlers (others run on, their outcome discarded),
        return them."""
        gone = {pair for pair in asked if pair not in owned}
        lost = []
        for held in self._held.values():
            if held.lease is None or held.lease.lost or held.submitted:
                continue
            if (held.message.task_id, held.attempt) not in gone:
                continue
            held.lease.lost = True
            if held.cancellable and held.handler is not None:
                held.handler.cancel()
            lost.append(held)
        return lost
