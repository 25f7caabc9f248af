"""HTTP clients of the Conveyor API for services that reach only the API (no Postgres or Redis):
`Client` (blocking) and `AsyncClient`, on httpx.

    with Client("http://conveyor:8080", api_key=key) as conveyor:
        task = conveyor.enqueue("resize", {"url": u, "width": 128}, idempotency_key="order-7")
        conveyor.get(task.id).status

Answers are `Task` records; problem+json errors become the `ApiError` subclass named for what
the caller can do (`TaskNotFound`, `InvalidTransition`, `PayloadInvalid`, `Unavailable`, ...).
With `retries=n`, a 503 is retried up to n times, after its `Retry-After` (capped at
`max_retry_wait_s`). A 503 means the API stored nothing; pass an idempotency key anyway, so
that a retry after a lost answer cannot enqueue twice.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from conveyor import tracing
from conveyor.errors import ConveyorError

Status = Literal["waiting", "queued", "running", "succeeded", "dead", "cancelled"]


# -- answers -----------------------------------------------------------------------------------


class Progress(BaseModel):
    """The latest progress a handler reported."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    fraction: float
    message: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    at: datetime


class Attempt(BaseModel):
    """One attempt: `outcome` is None while it runs, else succeeded, failed, timed_out,
    lease_lost, cancelled or worker_lost."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    number: int
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: str | None = None
    error: str | None = None


class Task(BaseModel):
    """A task as the API returns it; `payload` and `result` are None where a listing's
    summary leaves them out. Fields the API adds later are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: uuid.UUID
    type: str
    status: Status
    payload: Any = None
    idempotency_key: str | None = None
    attempts: int
    max_attempts: int
    result: Any = None
    last_error: str | None = None
    worker: str | None = None
    created_at: datetime
    run_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested: bool = False
    progress: Progress | None = None
    attempt_history: list[Attempt] = Field(default_factory=list)
    depends_on: list[uuid.UUID] = Field(default_factory=list)
    dependents: list[uuid.UUID] = Field(default_factory=list)
    on_upstream_failure: Literal["cancel", "run"] = "cancel"
    workflow_id: uuid.UUID | None = None
    workflow_key: str | None = None
    parent_id: uuid.UUID | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL


class Workflow(BaseModel):
    """A workflow: `status` is running, succeeded, failed or cancelled; `tasks` its nodes
    (each with its `key`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: uuid.UUID
    name: str | None = None
    status: Literal["running", "succeeded", "failed", "cancelled"]
    created_at: datetime
    cancelled_at: datetime | None = None
    tasks: list[Task] = Field(default_factory=list)

    def node(self, key: str) -> Task:
        """The node of this key (KeyError if none)."""
        for task in self.tasks:
            if task.workflow_key == key:
                return task
        raise KeyError(key)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of a workflow to create: its key, task and the keys it depends on."""

    key: str
    type: str
    payload: BaseModel | Mapping[str, Any]
    depends_on: Sequence[str] = ()
    on_upstream_failure: Literal["cancel", "run"] = "cancel"
    max_attempts: int | None = None
    delay_s: float = 0.0


def _workflow_body(nodes: Sequence[NodeSpec], name: str | None) -> dict[str, Any]:
    tasks = []
    for n in nodes:
        body = _task_body(TaskSpec(n.type, n.payload, None, n.delay_s, n.max_attempts))
        body.update(key=n.key, depends_on=list(n.depends_on),
                    on_upstream_failure=n.on_upstream_failure)
        tasks.append(body)
    return {"tasks": tasks} if name is None else {"name": name, "tasks": tasks}


FINAL = frozenset({"succeeded", "dead", "cancelled"})


class TaskEvent(BaseModel):
    """One event of a task's stream: `kind` is `state` (the task as it is, in `task`: the
    first event of a stream, and again after the server may have missed some), queued,
    started, progress, retrying, succeeded, dead, cancelled or cancel_requested; the event's
    details (attempt, worker, error, run_at, result, progress, ...) are extra fields."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str | None = None
    kind: str
    task_id: uuid.UUID
    status: Status
    task: Task | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL and self.kind != "progress"


def _event_from(kind: str, data: str, event_id: str | None) -> TaskEvent:
    body = json.loads(data)
    if kind == "state":
        task = Task.model_validate(body)
        return TaskEvent(id=event_id, kind="state", task_id=task.id, status=task.status,
                         task=task)
    return TaskEvent.model_validate({**body, "id": event_id, "kind": kind})


class _Frames:
    """Server-Sent Events frames from lines: (event, data, id) once a blank line ends one."""

    def __init__(self) -> None:
        self.kind, self.data = "message", ""
        self.id: str | None = None

    def feed(self, line: str) -> tuple[str, str, str | None] | None:
        if not line:
            if not self.data:
                return None
            out = (self.kind, self.data, self.id)
            self.kind, self.data = "message", ""
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.kind = value
        elif name == "data":
            self.data = f"{self.data}\n{value}" if self.data else value
        elif name == "id":
            self.id = value
        return None


WAIT_CHUNK_S = 60.0  # the longest wait one request may ask for
_RECONNECT_S = (0.1, 0.2, 0.5, 1.0, 2.0)


def _reconnect_delay(failures: int) -> float:
    return _RECONNECT_S[min(failures, len(_RECONNECT_S) - 1)]


class TaskPage(BaseModel):
    """One page of `list_tasks`; pass `next_cursor` back as `cursor` for the next one."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tasks: list[Task]
    next_cursor: str | None = None


class Batch(BaseModel):
    """The answer to `enqueue_many`: the tasks in request order, and how many are new."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tasks: list[Task]
    created: int


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task of a batch."""

    type: str
    payload: BaseModel | Mapping[str, Any]
    idempotency_key: str | None = None
    delay_s: float = 0.0
    max_attempts: int | None = None
    priority: str | None = None
    unique_for: float | None = None
    unique_key: str | None = None
    depends_on: Sequence[uuid.UUID | str] = ()  # ids of tasks it waits for
    on_upstream_failure: Literal["cancel", "run"] = "cancel"


# -- errors ------------------------------------------------------------------------------------


class FieldError(BaseModel):
    """One failing field of a 422: `path` such as `payload.width`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    path: str = ""
    message: str = ""
    type: str = ""
    loc: list[str | int] = Field(default_factory=list)


class ApiError(ConveyorError):
    """The API answered with an error (problem+json): `status`, `title`, `detail`,
    `request_id` (quote it when asking for help) and the whole `problem` body."""

    def __init__(self, status: int, problem: Mapping[str, Any],
                 headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.problem = dict(problem)
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", ""))
        self.request_id: str | None = problem.get("request_id")
        self.headers = dict(headers or {})
        super().__init__(f"{status} {self.title}: {self.detail}" if self.detail
                         else f"{status} {self.title}")


class BadRequest(ApiError):
    """400: the request could not be read (malformed JSON, for instance)."""


class Unauthorized(ApiError):
    """401: the API key is missing or wrong."""


class NotFound(ApiError):
    """404 for something other than a task (a path this API does not have)."""


class TaskNotFound(NotFound):
    """404: no task has this id."""


class Conflict(ApiError):
    """409: the request conflicts with the task's state or an earlier request."""


class InvalidTransition(Conflict):
    """409: the task's status (`status_now`) does not allow a cancel or retry."""

    @property
    def status_now(self) -> str | None:
        value = self.problem.get("status_now")
        return str(value) if value is not None else None


class InvalidRequest(ApiError):
    """422: the request is well-formed JSON but invalid; `errors` lists the failing fields."""

    @property
    def errors(self) -> list[FieldError]:
        found = self.problem.get("errors")
        return [FieldError.model_validate(e) for e in found] if isinstance(found, list) else []


class UnknownTaskType(InvalidRequest):
    """422: no task type of that name is registered (the detail lists those that are)."""


class PayloadInvalid(InvalidRequest):
    """422: the payload does not match its type's model."""


class TooLarge(ApiError):
    """413: the body is over the API's `MAX_BODY_BYTES`."""


class Unavailable(ApiError):
    """503: the API cannot take the request now (a backing service is down, or it is
    overloaded); nothing was stored. `retry_after_s` is its `Retry-After`, if sent."""

    @property
    def retry_after_s(self) -> float | None:
        return _retry_after_s(self.headers.get("retry-after"))


def _retry_after_s(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 413: TooLarge,
    422: InvalidRequest, 503: Unavailable,
}


def error_from(response: httpx.Response) -> ApiError:
    """The `ApiError` for an error response, chosen by status and the problem's contents."""
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: dict[str, Any] = body if isinstance(body, dict) else {
        "title": response.reason_phrase, "detail": response.text[:500]}
    kind = _BY_STATUS.get(response.status_code, ApiError)
    title = str(problem.get("title", ""))
    if kind is NotFound and title == "Task not found":
        kind = TaskNotFound
    elif kind is Conflict and "status_now" in problem:
        kind = InvalidTransition
    elif kind is InvalidRequest:
        found = problem.get("errors")
        errors = [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []
        if title == "Unknown task type" or any(_names_unknown_type(e) for e in errors):
            kind = UnknownTaskType
        elif title == "Invalid payload" or (errors and all(
                _in_payload(str(e.get("path", ""))) for e in errors)):
            kind = PayloadInvalid
    return kind(response.status_code, problem, response.headers)


def _names_unknown_type(error: Mapping[str, Any]) -> bool:
    # Validation of the request's `type` against the registered ones: the discriminated union
    # rejects the tag, or (with one type registered) its literal does.
    path = str(error.get("path", ""))
    return error.get("type") == "union_tag_invalid" or (
        error.get("type") == "literal_error" and path.rsplit(".", 1)[-1] == "type")


def _in_payload(path: str) -> bool:
    """`payload.x` or `tasks.3.payload.x`: a field of a payload."""
    parts = path.split(".")
    return parts[0] == "payload" or (len(parts) > 2 and parts[0] == "tasks"
                                     and parts[2] == "payload")


# -- clients -----------------------------------------------------------------------------------


def _task_body(spec: TaskSpec) -> dict[str, Any]:
    payload = spec.payload
    body: dict[str, Any] = {
        "type": spec.type,
        "payload": payload.model_dump(mode="json") if isinstance(payload, BaseModel)
        else dict(payload),
    }
    if spec.idempotency_key is not None:
        body["idempotency_key"] = spec.idempotency_key
    if spec.delay_s:
        body["delay_seconds"] = spec.delay_s
    if spec.max_attempts is not None:
        body["max_attempts"] = spec.max_attempts
    if spec.depends_on:
        body["depends_on"] = [str(d) for d in spec.depends_on]
    if spec.on_upstream_failure != "cancel":
        body["on_upstream_failure"] = spec.on_upstream_failure
    for name in ("priority", "unique_for", "unique_key"):
        if getattr(spec, name) is not None:
            body[name] = getattr(spec, name)
    return body


def _list_params(type_: str | None, status: Status | None, limit: int | None,
                 cursor: str | None) -> dict[str, str]:
    given = {"type": type_, "status": status, "limit": limit, "cursor": cursor}
    return {k: str(v) for k, v in given.items() if v is not None}


def _traced() -> dict[str, str] | None:
    """The caller's trace context as headers, with tracing on (`conveyor.tracing`): the API's
    span for the request, and the task's attempts, continue the caller's trace."""
    return tracing.current_context()


class _Base:
    """What both clients share: options, headers, and the decision to retry a 503."""

    def __init__(self, base_url: str, *, api_key: str | None, retries: int,
                 max_retry_wait_s: float) -> None:
        if retries < 0:
            raise ValueError("retries must be ≥ 0")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self.headers = {"accept": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    def _wait_before_retry(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying `response`, or None to give up."""
        if response.status_code != 503 or attempt > self.retries:
            return None
        after = _retry_after_s(response.headers.get("retry-after"))
        fallback = min(2.0 ** (attempt - 1) * 0.5, self.max_retry_wait_s)
        return min(after if after is not None else fallback, self.max_retry_wait_s)

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise error_from(response)
        return response.json()


class Client(_Base):
    """Blocking client of the Conveyor API. `transport` replaces httpx's (for tests)."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout_s: float = 10.0,
        retries: int = 0, max_retry_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key=api_key, retries=retries,
                         max_retry_wait_s=max_retry_wait_s)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers,
                                 timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            attempt += 1
            response = self.http.request(method, path, headers=_traced(), **kwargs)
            wait_s = self._wait_before_retry(response, attempt)
            if wait_s is None:
                return self._decode(response)
            time.sleep(wait_s)

    def enqueue(
        self, type_: str, payload: BaseModel | Mapping[str, Any], *,
        idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> Task:
        """Enqueue one task; with an idempotency key already used, the first task."""
        body = _task_body(TaskSpec(type_, payload, idempotency_key, delay_s, max_attempts,
                                       priority, unique_for, unique_key))
        return Task.model_validate(self._request("POST", "/v1/tasks", json=body))

    def enqueue_many(self, specs: Sequence[TaskSpec]) -> Batch:
        """Enqueue up to 1000 tasks in one transaction: one invalid task rejects them all."""
        body = {"tasks": [_task_body(s) for s in specs]}
        return Batch.model_validate(self._request("POST", "/v1/tasks/batch", json=body))

    def get(self, task_id: uuid.UUID | str) -> Task:
        return Task.model_validate(self._request("GET", f"/v1/tasks/{task_id}"))

    def list_tasks(
        self, *, type_: str | None = None, status: Status | None = None,
        limit: int | None = None, cursor: str | None = None,
    ) -> TaskPage:
        """One page of tasks, newest first."""
        params = _list_params(type_, status, limit, cursor)
        return TaskPage.model_validate(self._request("GET", "/v1/tasks", params=params))

    def iter_tasks(self, *, type_: str | None = None, status: Status | None = None,
                   page_size: int | None = None) -> Iterator[Task]:
        """Every matching task, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = self.list_tasks(type_=type_, status=status, limit=page_size, cursor=cursor)
            yield from page.tasks
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, task_id: uuid.UUID | str) -> Task:
        """queued → cancelled; running → its worker stops it (`cancel_requested`, status
        still running: `wait` for the end); InvalidTransition once final."""
        return Task.model_validate(self._request("POST", f"/v1/tasks/{task_id}/cancel"))

    def wait(self, task_id: uuid.UUID | str, timeout_s: float = 60.0) -> Task:
        """The task once final (succeeded, dead, cancelled), or as it is after `timeout_s`;
        across retries, and across API restarts (it asks again)."""
        deadline = time.monotonic() + timeout_s
        failures = 0
        while True:
            remaining = deadline - time.monotonic()
            chunk = min(WAIT_CHUNK_S, max(remaining, 0.001))
            try:
                task = Task.model_validate(self._request(
                    "GET", f"/v1/tasks/{task_id}", params={"wait": f"{chunk:.3f}"},
                    timeout=chunk + self.http.timeout.read if self.http.timeout.read else None))
                failures = 0
            except (httpx.TransportError, Unavailable):
                if deadline - time.monotonic() <= 0:
                    raise
                time.sleep(_reconnect_delay(failures))
                failures += 1
                continue
            if task.final or deadline - time.monotonic() <= 0:
                return task
            if deadline - time.monotonic() > remaining - chunk + 0.5:
                time.sleep(_reconnect_delay(0))  # answered early: the server is stopping

    def events(self, task_id: uuid.UUID | str) -> Iterator[TaskEvent]:
        """The task's events, from its current state (`state`) to its final event;
        reconnects (starting again from the state) if the connection drops."""
        failures = 0
        while True:
            try:
                with self.http.stream("GET", f"/v1/tasks/{task_id}/events",
                                      headers={"accept": "text/event-stream"},
                                      timeout=httpx.Timeout(self.http.timeout.connect,
                                                            read=None)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise error_from(response)
                    frames = _Frames()
                    for line in response.iter_lines():
                        frame = frames.feed(line)
                        if frame is None:
                            continue
                        failures = 0
                        e = _event_from(*frame)
                        yield e
                        if e.final:
                            return
            except (httpx.TransportError, Unavailable):
                time.sleep(_reconnect_delay(failures))
                failures += 1

    def retry(self, task_id: uuid.UUID | str) -> Task:
        """dead | cancelled → queued; InvalidTransition otherwise."""
        return Task.model_validate(self._request("POST", f"/v1/tasks/{task_id}/retry"))

    def create_workflow(self, nodes: Sequence[NodeSpec], *, name: str | None = None
                        ) -> Workflow:
        """Create a workflow of up to 1000 nodes in one transaction; InvalidRequest for an
        unknown key, a cycle or a bad node."""
        body = _workflow_body(nodes, name)
        return Workflow.model_validate(self._request("POST", "/v1/workflows", json=body))

    def get_workflow(self, workflow_id: uuid.UUID | str) -> Workflow:
        return Workflow.model_validate(self._request("GET", f"/v1/workflows/{workflow_id}"))

    def cancel_workflow(self, workflow_id: uuid.UUID | str) -> Workflow:
        return Workflow.model_validate(
            self._request("POST", f"/v1/workflows/{workflow_id}/cancel"))

    def retry_workflow(self, workflow_id: uuid.UUID | str) -> Workflow:
        """Queue the failed nodes again; the rest of the graph follows."""
        return Workflow.model_validate(
            self._request("POST", f"/v1/workflows/{workflow_id}/retry"))


class AsyncClient(_Base):
    """Async client of the Conveyor API; the same methods as `Client`, awaited."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout_s: float = 10.0,
        retries: int = 0, max_retry_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key=api_key, retries=retries,
                         max_retry_wait_s=max_retry_wait_s)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers,
                                      timeout=timeout_s, transport=transport)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            attempt += 1
            response = await self.http.request(method, path, headers=_traced(), **kwargs)
            wait_s = self._wait_before_retry(response, attempt)
            if wait_s is None:
                return self._decode(response)
            await asyncio.sleep(wait_s)

    async def enqueue(
        self, type_: str, payload: BaseModel | Mapping[str, Any], *,
        idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> Task:
        """Enqueue one task; with an idempotency key already used, the first task."""
        body = _task_body(TaskSpec(type_, payload, idempotency_key, delay_s, max_attempts,
                                       priority, unique_for, unique_key))
        return Task.model_validate(await self._request("POST", "/v1/tasks", json=body))

    async def enqueue_many(self, specs: Sequence[TaskSpec]) -> Batch:
        """Enqueue up to 1000 tasks in one transaction: one invalid task rejects them all."""
        body = {"tasks": [_task_body(s) for s in specs]}
        return Batch.model_validate(await self._request("POST", "/v1/tasks/batch", json=body))

    async def get(self, task_id: uuid.UUID | str) -> Task:
        return Task.model_validate(await self._request("GET", f"/v1/tasks/{task_id}"))

    async def list_tasks(
        self, *, type_: str | None = None, status: Status | None = None,
        limit: int | None = None, cursor: str | None = None,
    ) -> TaskPage:
        """One page of tasks, newest first."""
        params = _list_params(type_, status, limit, cursor)
        return TaskPage.model_validate(await self._request("GET", "/v1/tasks", params=params))

    async def iter_tasks(self, *, type_: str | None = None, status: Status | None = None,
                         page_size: int | None = None) -> AsyncIterator[Task]:
        """Every matching task, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = await self.list_tasks(type_=type_, status=status, limit=page_size,
                                         cursor=cursor)
            for task in page.tasks:
                yield task
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, task_id: uuid.UUID | str) -> Task:
        """queued → cancelled; running → its worker stops it (`cancel_requested`, status
        still running: `wait` for the end); InvalidTransition once final."""
        return Task.model_validate(await self._request("POST", f"/v1/tasks/{task_id}/cancel"))

    async def wait(self, task_id: uuid.UUID | str, timeout_s: float = 60.0) -> Task:
        """The task once final (succeeded, dead, cancelled), or as it is after `timeout_s`;
        across retries, and across API restarts (it asks again)."""
        deadline = time.monotonic() + timeout_s
        failures = 0
        while True:
            remaining = deadline - time.monotonic()
            chunk = min(WAIT_CHUNK_S, max(remaining, 0.001))
            try:
                task = Task.model_validate(await self._request(
                    "GET", f"/v1/tasks/{task_id}", params={"wait": f"{chunk:.3f}"},
                    timeout=chunk + self.http.timeout.read if self.http.timeout.read else None))
                failures = 0
            except (httpx.TransportError, Unavailable):
                if deadline - time.monotonic() <= 0:
                    raise
                await asyncio.sleep(_reconnect_delay(failures))
                failures += 1
                continue
            if task.final or deadline - time.monotonic() <= 0:
                return task
            if deadline - time.monotonic() > remaining - chunk + 0.5:
                await asyncio.sleep(_reconnect_delay(0))  # answered early: it is stopping

    async def events(self, task_id: uuid.UUID | str) -> AsyncIterator[TaskEvent]:
        """The task's events, from its current state (`state`) to its final event;
        reconnects (starting again from the state) if the connection drops."""
        failures = 0
        while True:
            try:
                async with self.http.stream(
                    "GET", f"/v1/tasks/{task_id}/events",
                    headers={"accept": "text/event-stream"},
                    timeout=httpx.Timeout(self.http.timeout.connect, read=None),
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise error_from(response)
                    frames = _Frames()
                    async for line in response.aiter_lines():
                        frame = frames.feed(line)
                        if frame is None:
                            continue
                        failures = 0
                        e = _event_from(*frame)
                        yield e
                        if e.final:
                            return
            except (httpx.TransportError, Unavailable):
                await asyncio.sleep(_reconnect_delay(failures))
                failures += 1

    async def retry(self, task_id: uuid.UUID | str) -> Task:
        """dead | cancelled → queued; InvalidTransition otherwise."""
        return Task.model_validate(await self._request("POST", f"/v1/tasks/{task_id}/retry"))

    async def create_workflow(self, nodes: Sequence[NodeSpec], *, name: str | None = None
                              ) -> Workflow:
        """See `Client.create_workflow`."""
        body = _workflow_body(nodes, name)
        return Workflow.model_validate(await self._request("POST", "/v1/workflows", json=body))

    async def get_workflow(self, workflow_id: uuid.UUID | str) -> Workflow:
        return Workflow.model_validate(
            await self._request("GET", f"/v1/workflows/{workflow_id}"))

    async def cancel_workflow(self, workflow_id: uuid.UUID | str) -> Workflow:
        return Workflow.model_validate(
            await self._request("POST", f"/v1/workflows/{workflow_id}/cancel"))

    async def retry_workflow(self, workflow_id: uuid.UUID | str) -> Workflow:
        return Workflow.model_validate(
            await self._request("POST", f"/v1/workflows/{workflow_id}/retry"))
