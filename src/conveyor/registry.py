"""Task types and cron jobs as registered by an application, and what a handler receives.

A `TaskType` ties a name to its payload model, handler, retry policy and where the handler runs
(`loop` for coroutines, `thread` for blocking functions, `process` for CPU-bound ones).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
import re
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson
from croniter import croniter
from pydantic import BaseModel, ConfigDict

from conveyor.config import Settings
from conveyor.egress.client import OutboundHttp
from conveyor.errors import ConfigError, UnknownTaskType
from conveyor.validation import validate_json_value

TYPE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
RunIn = Literal["loop", "thread", "process"]
Handler = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits base·2^(n-1), capped, then jittered.

    `jitter` is the share of the delay that is random: 0.5 waits between half and all of it.
    """

    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    jitter: float = 0.5

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before the attempt after `attempt` (1-based) failed."""
        raw = min(self.max_delay_s, self.base_delay_s * 2 ** min(max(0, attempt - 1), 64))
        spread = raw * self.jitter
        return float(raw - spread + (rng or random).random() * spread)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long a type's finished tasks are kept, in seconds, by status (by finished_at); 0
    keeps them forever, None takes the global `CONVEYOR_RETENTION_*` setting."""

    succeeded: float | None = None
    cancelled: float | None = None
    dead: float | None = None

    def __post_init__(self) -> None:
        for status in ("succeeded", "cancelled", "dead"):
            value = getattr(self, status)
            if value is not None and value < 0:
                raise ConfigError(f"retention {status}={value!r}: must be >= 0 (0 keeps forever)")

    @classmethod
    def of(cls, value: Retention | float | None) -> Retention:
        """`retention=` as given to `@app.task`: a Retention, or seconds for every status."""
        if value is None:
            return cls()
        if isinstance(value, Retention):
            return value
        return cls(float(value), float(value), float(value))

    def resolved(self, settings: Settings) -> dict[str, float]:
        """Seconds per finished status, this type's where set, else the global settings."""
        return {
            "succeeded": (self.succeeded if self.succeeded is not None
                          else settings.retention_succeeded),
            "cancelled": (self.cancelled if self.cancelled is not None
                          else settings.retention_cancelled),
            "dead": self.dead if self.dead is not None else settings.retention_dead,
        }


ProgressSink = Callable[[str, int, dict[str, Any]], None]  # (task id, attempt, progress)
_child_sink: dict[str, ProgressSink] = {}  # in a process-pool child: where progress goes


def set_process_sink(sink: ProgressSink | None) -> None:
    """In a process-pool child: send the progress of the handlers it runs to `sink`."""
    _child_sink.clear()
    if sink is not None:
        _child_sink["sink"] = sink


def _child_lease() -> Lease:
    return Lease(_child_sink.get("sink"))


class Lease:
    """What the worker tells the attempt it runs, and hears from it. The heartbeat sets `lost`
    when Postgres says the task was taken from it (re-queued while the worker looked dead); a
    cancel request sets `cancel_requested`; `report` takes the handler's progress."""

    __slots__ = ("_event", "_flag", "cancel_requested", "lost", "report")

    def __init__(self, report: ProgressSink | None = None) -> None:
        self.lost = False
        self.cancel_requested = False
        self.report = report
        self._flag = threading.Event()  # for thread handlers
        self._event: asyncio.Event | None = None  # for coroutines, made on first wait

    def request_cancel(self) -> None:
        """Ask the handler to stop (called on the worker's loop)."""
        self.cancel_requested = True
        self._flag.set()
        if self._event is not None:
            self._event.set()

    async def wait_cancelled(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
            if self.cancel_requested:
                self._event.set()
        await self._event.wait()

    def wait_cancelled_sync(self, timeout_s: float | None) -> bool:
        return self._flag.wait(timeout_s)

    def __reduce__(self) -> tuple[object, ...]:
        # A process handler gets a copy that is never updated (its outcome is discarded by the
        # worker instead, see TaskContext.lease_lost; a cancel terminates its process), whose
        # progress goes to the child's sink.
        return (_child_lease, ())


class Cancelled:
    """`ctx.cancelled`: true once a cancel of the task was requested. `await ctx.cancelled`
    waits for it (coroutines); `ctx.cancelled.wait(timeout_s)` does too (thread handlers)."""

    __slots__ = ("_lease",)

    def __init__(self, lease: Lease) -> None:
        self._lease = lease

    def __bool__(self) -> bool:
        return self._lease.cancel_requested

    def __await__(self) -> Generator[Any, None, None]:
        return self._lease.wait_cancelled().__await__()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until a cancel is requested (True) or `timeout_s` passes (False)."""
        return self._lease.wait_cancelled_sync(timeout_s)


class _Reported:
    """What `ctx.progress()` returns: awaitable (and done at once), so a coroutine may write
    `await ctx.progress(...)` and a thread or process handler `ctx.progress(...)`."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


_REPORTED = _Reported()


class Relatives(Protocol):
    """A running task's view of the tasks around it (its upstreams, its children), given to
    its context by the worker (`conveyor.client.TaskRelatives`)."""

    async def upstream(self, task_id: str) -> list[Any]: ...

    async def enqueue(self, parent_id: str, type_: str, payload: Any, *,
                      depends_on: Sequence[Any] = (), idempotency_key: str | None = None,
                      delay_s: float = 0.0, max_attempts: int | None = None) -> Any: ...

    async def wait_children(self, parent_id: str, timeout_s: float | None) -> list[Any]: ...


class _NoRelatives:
    """What a process handler's context has (the worker's connections stay in the worker)."""

    def _refuse(self) -> Any:
        raise RuntimeError("ctx.upstream, ctx.enqueue and ctx.wait_children are for loop and "
                           "thread handlers, not process ones")

    async def upstream(self, task_id: str) -> list[Any]:
        return self._refuse()  # type: ignore[no-any-return]

    async def enqueue(self, parent_id: str, type_: str, payload: Any, *,
                      depends_on: Sequence[Any] = (), idempotency_key: str | None = None,
                      delay_s: float = 0.0, max_attempts: int | None = None) -> Any:
        return self._refuse()

    async def wait_children(self, parent_id: str, timeout_s: float | None) -> list[Any]:
        return self._refuse()  # type: ignore[no-any-return]

    def __reduce__(self) -> tuple[object, ...]:
        return (_NoRelatives, ())


def _no_relatives() -> Relatives:
    return _NoRelatives()


def child_key(parent_id: str, n: int, task_type: str, payload: Any) -> str:
    """The default idempotency key of a parent's `n`th child (see `TaskContext.enqueue`)."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    digest = hashlib.blake2b(orjson.dumps([task_type, data], option=orjson.OPT_SORT_KEYS),
                             digest_size=8).hexdigest()
    return f"child:{parent_id}:{n}:{digest}"


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a handler learns about the run it is in. Picklable, so process handlers get it too."""

    task_id: str
    task_type: str
    attempt: int
    max_attempts: int
    run_at: datetime
    worker_id: str
    settings: Settings
    lease: Lease = field(default_factory=Lease, repr=False, compare=False)
    # The worker's pooled outbound client under the egress policy (`await ctx.http.client
    # .post(...)`): use it, do not close it.
    http: OutboundHttp = field(default_factory=OutboundHttp, repr=False, compare=False)
    # Upstreams and children (workflows): see `upstream`, `enqueue`, `wait_children`.
    relatives: Relatives = field(default_factory=_no_relatives, repr=False, compare=False)
    # How many children this run enqueued so far (the default keys of `enqueue`).
    _children: list[int] = field(default_factory=lambda: [0], init=False, repr=False,
                                 compare=False)

    async def upstream(self, key: str | None = None) -> Any:
        """The tasks this one depends on, finished: a dict by workflow key (or by id, for a
        task outside a workflow) of `Upstream` (id, key, type, status, result, error); with
        `key` (a key or an id), that one alone (KeyError if it is none of them)."""
        found = await self.relatives.upstream(self.task_id)
        by_key = {(u.key or str(u.id)): u for u in found}
        if key is None:
            return by_key
        if key in by_key:
            return by_key[key]
        for u in found:
            if str(u.id) == key:
                return u
        raise KeyError(f"task {self.task_id} has no upstream {key!r}")

    async def enqueue(self, task: Any, payload: Any, *, depends_on: Sequence[Any] = (),
                      idempotency_key: str | None = None, delay_s: float = 0.0,
                      max_attempts: int | None = None) -> Any:
        """Enqueue a child of this task (a type's name or definition and its payload): its
        record names this task as `parent_id`. Returns the child's `TaskRecord`.

        Without an `idempotency_key`, the child's key is made from this task, the child's
        place among this run's enqueues and its type and payload: a retried parent that
        enqueues the same children again gets the first ones back, not copies."""
        name = task if isinstance(task, str) else task.name
        self._children[0] += 1
        if idempotency_key is None:
            idempotency_key = child_key(self.task_id, self._children[0], name, payload)
        return await self.relatives.enqueue(
            self.task_id, name, payload, depends_on=depends_on,
            idempotency_key=idempotency_key, delay_s=delay_s, max_attempts=max_attempts)

    async def wait_children(self, timeout_s: float | None = None) -> list[Any]:
        """Wait until every child of this task is final (TimeoutError after `timeout_s`);
        returns their records, oldest first. The attempt holds its slot meanwhile."""
        return await self.relatives.wait_children(self.task_id, timeout_s)

    def progress(self, fraction: float, message: str | None = None, **data: Any) -> _Reported:
        """Report how far the attempt has got: `fraction` from 0 to 1, an optional message and
        JSON-serialisable data. The latest report is on the task and in its events; writes are
        throttled, so calling this in a tight loop costs little."""
        if not (isinstance(fraction, int | float) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"progress fraction must be a number from 0 to 1, not {fraction!r}")
        orjson.dumps(data)  # TypeError here, in the handler, for data that cannot be sent
        report = self.lease.report
        if report is not None:
            report(self.task_id, self.attempt, {
                "fraction": float(fraction), "message": message, "data": data,
                "at": datetime.now(UTC).isoformat(),
            })
        return _REPORTED

    @property
    def cancelled(self) -> Cancelled:
        """A cancel was requested (see `Cancelled`): a coroutine is cancelled anyway; a thread
        handler should check it and return, or it is abandoned after the grace period."""
        return Cancelled(self.lease)

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    @property
    def lease_lost(self) -> bool:
        """True once this attempt was taken from the worker (it stalled past the heartbeat
        TTL and the task was handed to another). A coroutine handler is cancelled then; a
        thread handler should check this and stop; its outcome is discarded either way."""
        return self.lease.lost


PRIORITIES: tuple[str, ...] = ("high", "default", "low")  # highest first
# Shares of reads among levels that all have tasks waiting (README, Flow control: priorities).
PRIORITY_WEIGHTS: tuple[int, ...] = (9, 3, 1)
_TASK_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*(?:[,;]?\s*burst\s*=?\s*(\d+))?\s*$")
_PERIOD_S = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True, slots=True)
class TaskRate:
    """A task type's rate limit: `count` starts per `period_s` seconds, at most `burst` of them
    at once (1, the default, spaces them evenly: one every period/count)."""

    count: int
    period_s: int
    burst: int = 1

    def __str__(self) -> str:
        unit = {1: "s", 60: "m", 3600: "h"}[self.period_s]
        return f"{self.count}/{unit}" + (f" burst={self.burst}" if self.burst != 1 else "")

    @property
    def interval_s(self) -> float:
        return self.period_s / self.count


def parse_task_rate(text: str) -> TaskRate:
    """`100/s`, `6000/m`, `20000/h`, optionally with a burst (`100/s burst=20`); ValueError
    naming the form otherwise."""
    match = _TASK_RATE.match(text)
    if not match or int(match[1]) < 1 or (match[3] is not None and int(match[3]) < 1):
        raise ValueError(f"{text!r} is not a rate: write N/s, N/m or N/h with N >= 1, "
                         "optionally followed by burst=B with B >= 1")
    return TaskRate(int(match[1]), _PERIOD_S[match[2]], int(match[3] or 1))


@dataclass(frozen=True, slots=True)
class Limits:
    """A type's flow control (docs: README, Flow control): global and per-key concurrency and
    rate, as declared in code or overridden at run time; None is no limit. `concurrency_key`
    is a dotted path into the payload (`payload.tenant_id`), whose value names the key."""

    max_concurrency: int | None = None
    concurrency_key: str | None = None
    max_concurrency_per_key: int | None = None
    rate_limit: TaskRate | None = None
    rate_limit_per_key: TaskRate | None = None
    paused: bool = False

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_concurrency_per_key"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value!r}: must be >= 1 (None: no limit)")
        if self.concurrency_key is not None and not re.match(
                r"^payload(\.[A-Za-z0-9_-]+)+$", self.concurrency_key):
            raise ConfigError(f"concurrency_key={self.concurrency_key!r}: write a payload "
                              "path such as 'payload.tenant_id'")

    @property
    def limited(self) -> bool:
        """Reads of the type must pass the gate (a global limit, or paused)."""
        return self.paused or self.max_concurrency is not None or self.rate_limit is not None

    @property
    def keyed(self) -> bool:
        return self.concurrency_key is not None and (
            self.max_concurrency_per_key is not None or self.rate_limit_per_key is not None)

    def key_of(self, payload: Any) -> str | None:
        """The concurrency key of a payload (a JSON value): its value there, as JSON; None
        when it has none."""
        if self.concurrency_key is None:
            return None
        value = payload
        for part in self.concurrency_key.split(".")[1:]:
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        if value is None:
            return None
        # As JSON, so `true` and `"true"`, `7` and `"7"` are different keys.
        return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class TaskType:
    """One registered kind of task."""

    name: str
    payload_model: type[BaseModel]
    handler: Handler
    run_in: RunIn = "loop"
    max_attempts: int | None = None
    timeout_s: float | None = None
    retry: RetryPolicy | None = None
    description: str = ""
    strict: bool = True
    retention: Retention = field(default_factory=Retention)
    limits: Limits = field(default_factory=Limits)  # as declared; overridable at run time
    priorities: bool = False  # tasks carry a priority (PRIORITIES), one stream per level

    def validate_payload(self, payload: Any) -> BaseModel:
        """`payload` (a JSON value: what an HTTP request carries, or a mapping from Python) as
        this type's model, validated as JSON: strictly (no `"3"` or `true` for an integer)
        unless the type opted out with `strict=False`. Raises ValidationError."""
        return validate_json_value(self.payload_model, payload, strict=self.strict)


class CronTick(BaseModel):
    """Payload of a task enqueued by a cron job: the slot it was fired for."""

    model_config = ConfigDict(extra="forbid")
    scheduled_at: datetime


@dataclass(frozen=True, slots=True)
class CronJob:
    """A cron expression (six fields, seconds first) that enqueues one task per slot."""

    name: str
    expression: str

    def next_after(self, moment: datetime) -> datetime:
        it = croniter(self.expression, moment, second_at_beginning=True)
        nxt: datetime = it.get_next(datetime)
        return nxt


@dataclass
class Registry:
    """Task types and cron jobs by name."""

    types: dict[str, TaskType] = field(default_factory=dict)
    cron_jobs: dict[str, CronJob] = field(default_factory=dict)

    def add(self, task_type: TaskType) -> None:
        if not TYPE_NAME.match(task_type.name):
            raise ConfigError(
                f"task type name {task_type.name!r} must match {TYPE_NAME.pattern}"
            )
        if task_type.name in self.types:
            raise ConfigError(f"task type {task_type.name!r} is registered twice")
        if task_type.run_in == "loop" and not inspect.iscoroutinefunction(task_type.handler):
            raise ConfigError(f"task type {task_type.name!r}: loop handlers must be async")
        if task_type.run_in != "loop" and inspect.iscoroutinefunction(task_type.handler):
            raise ConfigError(
                f"task type {task_type.name!r}: {task_type.run_in} handlers must be plain functions"
            )
        self.types[task_type.name] = task_type

    def add_cron(self, job: CronJob, task_type: TaskType) -> None:
        expression_fields = job.expression.split()
        if len(expression_fields) != 6 or not croniter.is_valid(
            job.expression, second_at_beginning=True
        ):
            raise ConfigError(
                f"cron job {job.name!r}: {job.expression!r} is not a six-field cron expression "
                "(seconds minutes hours day-of-month month day-of-week)"
            )
        self.add(task_type)
        self.cron_jobs[job.name] = job

    def get(self, name: str) -> TaskType:
        try:
            return self.types[name]
        except KeyError:
            raise UnknownTaskType(name) from None

    def __iter__(self) -> Iterator[TaskType]:
        return iter(self.types.values())

    def __len__(self) -> int:
        return len(self.types)
