"""The NOTIFY sent when a task is enqueued inside a caller's transaction: its one writer
(`send`) and its one reader (`parse`, `listening`).  [PostgreSQL]

Postgres delivers a NOTIFY only if the transaction that sent it commits, so a listener learns of
committed tasks at once. The payload is `type:id:run_at_ms:level`, `run_at_ms` empty unless the
task is delayed, `level` empty unless its type has priorities (then its priority level, whose
ready set it goes to); the parts are split off the right, so a type name may hold a colon.

Migration 0007's trigger writes the same payloads for the dependents it resolves: a released
one (`type:id::`, due now, naming no level: the relay reads the stored priority of one whose
type has priorities) and one it cancelled because an upstream failed (`type:id:cancelled:`:
nothing to publish, only its event).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from conveyor.store.pool import Connection

log = structlog.get_logger("conveyor.store.notify")


@dataclass(frozen=True, slots=True)
class Enqueued:
    """A task committed inside a caller's transaction: to its stream now, or to its delayed set
    until `run_at_ms` (Unix milliseconds); `level`: a type with priorities, its task's level
    (`queue.streams.Publish`)."""

    task_type: str
    task_id: uuid.UUID
    run_at_ms: int | None = None
    level: str | None = None
    cancelled: bool = False  # a dependent cancelled by its upstream's failure: not to publish


CANCELLED = "cancelled"


def payload(task: Enqueued) -> str:
    at_ms = CANCELLED if task.cancelled else "" if task.run_at_ms is None else str(task.run_at_ms)
    return f"{task.task_type}:{task.task_id}:{at_ms}:{task.level or ''}"


def parse(text: str) -> Enqueued:
    """The task a payload names; ValueError if it is not one `payload` writes."""
    rest, sep, level = text.rpartition(":")
    rest, sep2, at_ms = rest.rpartition(":")
    task_type, sep3, raw_id = rest.rpartition(":")
    try:
        if not sep or not sep2 or not sep3 or not task_type:
            raise ValueError("too few parts")
        if level and not level.isidentifier():
            raise ValueError(f"no level {level[:20]!r}")
        if at_ms == CANCELLED:
            return Enqueued(task_type, uuid.UUID(raw_id), None, level or None, cancelled=True)
        return Enqueued(task_type, uuid.UUID(raw_id), int(at_ms) if at_ms else None,
                        level or None)
    except ValueError as exc:
        raise ValueError(f"not a type:id:run_at_ms:level payload ({exc}): {text[:200]!r}"
                         ) from exc


async def send(conn: Connection, channel: str, task: Enqueued) -> None:
    """Queue the NOTIFY on `conn`'s transaction; Postgres delivers it on commit only."""
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload(task))


@contextlib.asynccontextmanager
async def listening(
    conn: Connection, channel: str, deliver: Callable[[Enqueued], None]
) -> AsyncIterator[asyncio.Event]:
    """LISTEN on `conn` while inside; `deliver` gets each task notified (a malformed payload is
    logged and skipped). Yields an event set if the connection is lost.

    Only commits after the LISTEN took effect are delivered: a caller taking over from another
    listener needs a backstop for what was sent in between.
    """
    lost = asyncio.Event()

    def on_notify(_conn: object, _pid: int, _channel: str, text: object) -> None:
        try:
            task = parse(str(text))
        except ValueError as exc:
            log.warning("notify.malformed", payload=str(text)[:200], error=str(exc))
            return
        deliver(task)

    def on_lost(_conn: object) -> None:
        lost.set()

    conn.add_termination_listener(on_lost)
    await conn.add_listener(channel, on_notify)
    try:
        yield lost
    finally:
        conn.remove_termination_listener(on_lost)
        if not conn.is_closed():
            await conn.remove_listener(channel, on_notify)
