"""The exception tree: each name says what the caller can do about it.

Handlers raise `Retry` (try again, optionally after a delay) or `Fail` (give up now); any other
exception from a handler is retried under the task type's `RetryPolicy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose."""


class ConfigError(ConveyorError):
    """A setting or a registration is wrong; the message names it and the bad value."""


class SchemaTooNew(ConfigError):
    """The database schema was migrated by a newer Conveyor than this one."""


class Unavailable(ConveyorError):
    """Postgres or Redis did not answer; the operation may be retried once it is back.

    `op` names the operation that failed (`tasks.mark_running`, `streams.read`).
    """

    def __init__(self, op: str, detail: str = "") -> None:
        self.op = op
        self.detail = detail
        super().__init__(f"{op}: {detail}" if detail else op)


class Conflict(Unavailable):
    """Postgres aborted the statement to settle a race (deadlock, serialization failure, lock
    or statement timeout): running it again will most likely succeed. Every loop retries it as
    it retries an outage, with backoff."""


class Failover(Unavailable):
    """The server will not take the statement now (read-only after a failover, shutting down,
    in recovery): the connection is dropped, so the retry reconnects, perhaps to a new
    primary."""


def unavailable_on(
    kinds: tuple[type[BaseException], ...],
    transient: Callable[[BaseException], bool] = lambda exc: False,
) -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """A `translate(op)` context manager that re-raises `kinds`, and other errors for which
    `transient` is true, as `Unavailable(op)`: how store/ and queue/ keep driver exceptions at
    their edge."""

    @contextlib.contextmanager
    def translate(op: str) -> Iterator[None]:
        try:
            yield
        except kinds as exc:
            raise Unavailable(op, f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if transient(exc):
                raise Unavailable(op, f"{type(exc).__name__}: {exc}") from exc
            raise

    return translate


class TaskNotFound(ConveyorError):
    """No task has this id."""


class InvalidTransition(ConveyorError):
    """The task is not in a state that allows the requested change (cancel, retry)."""

    def __init__(self, task_id: str, status: str, action: str, what: str = "task") -> None:
        self.task_id = task_id
        self.status = status
        self.action = action
        super().__init__(f"{what} {task_id} is {status}; cannot {action} it")


class UnknownTaskType(ConveyorError):
    """No task type of this name is registered."""


class PayloadInvalid(ConveyorError):
    """A payload does not match its task type's model."""


@dataclass(frozen=True, slots=True)
class ReusedKey:
    """One task of a request whose idempotency key already names a task with another payload:
    an earlier task (`task_id`) or an earlier task of the same request (`first_index`)."""

    index: int  # position in the request (0 for a single task)
    type: str
    key: str
    task_id: str | None = None
    first_index: int | None = None


class IdempotencyConflict(ConveyorError):
    """An idempotency key was reused with a different payload; nothing was enqueued."""

    def __init__(self, reused: Sequence[ReusedKey]) -> None:
        self.reused = list(reused)
        first = self.reused[0]
        named = (f"task {first.task_id}" if first.task_id is not None
                 else f"task {first.first_index} of this request")
        more = f" (and {len(self.reused) - 1} more)" if len(self.reused) > 1 else ""
        super().__init__(
            f"idempotency key {first.key!r} of type {first.type!r} already names {named}, "
            f"whose payload differs{more}; send the same payload to read that task, or use "
            "a new key for a new task"
        )


class Overloaded(Unavailable):
    """A bound was reached (requests in progress, pooled connections): the service cannot take
    more now; come back after `retry_after_s`. Background loops treat it as an outage."""

    def __init__(self, what: str, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__("overloaded", what)
        self.args = (what,)

    def __str__(self) -> str:
        return self.detail


class KeyNameTaken(ConveyorError):
    """An API key of this name exists already (revoked keys keep their names)."""


class KeyNotFound(ConveyorError):
    """No API key has this name."""


class Unauthorized(ConveyorError):
    """No API key, an unknown one, or one that was revoked or has expired (401); the message
    says which, never anything about other keys."""


class Forbidden(ConveyorError):
    """The API key is valid but lacks a scope, or may not enqueue a task type (403); the
    message names what is missing: `scope`, or the `types` it may not enqueue."""

    def __init__(self, message: str, *, scope: str | None = None,
                 types: Sequence[str] = ()) -> None:
        self.scope = scope
        self.types = list(types)
        super().__init__(message)


class RateLimited(ConveyorError):
    """The API key has used up its rate limit; come back after `retry_after_s` (429)."""

    def __init__(self, key: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"API key {key!r} is over its rate limit; retry after "
                         f"{retry_after_s:.3g} s")


class Retry(Exception):
    """Raised by a handler to be run again, after `delay_s` or the type's backoff if None."""

    def __init__(self, reason: str = "retry requested", *, delay_s: float | None = None) -> None:
        self.reason = reason
        self.delay_s = delay_s
        super().__init__(reason)

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps delay_s when a process-pool handler raises Retry across the process boundary.
        return (_make_retry, (self.reason, self.delay_s))


class Fail(Exception):
    """Raised by a handler to fail the task now, without further attempts."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class EgressDenied(Fail):
    """An outbound request to a destination the egress policy refuses (a non-public address,
    a cloud metadata address, a refused port): permanent, so a handler that lets it out fails
    its task at once. `reason` names the host, the address and the rule."""


def _make_retry(reason: str, delay_s: float | None) -> Retry:
    return Retry(reason, delay_s=delay_s)


class WorkflowInvalid(ConveyorError):
    """A workflow or a task's dependencies cannot be built: unknown keys or task ids, a
    cycle, too many nodes (`what` names the rule broken)."""

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        super().__init__(detail)


class WorkflowNotFound(ConveyorError):
    """No workflow has this id."""
