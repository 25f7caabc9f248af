"""Enqueue and manage tasks: validate, insert and commit, then publish.  Used by the API and by
library users.

Publishing happens after the commit. If Redis cannot take a message at that moment the task is
still accepted: it is durable in Postgres and the relay publishes it later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from conveyor import metrics, tracing
from conveyor.errors import (
    IdempotencyConflict,
    InvalidTransition,
    PayloadInvalid,
    ReusedKey,
    TaskNotFound,
    Unavailable,
    WorkflowInvalid,
    WorkflowNotFound,
)
from conveyor.queue.events import (
    CLOSING,
    FINAL_STATUSES,
    RESYNC,
    Event,
    EventLog,
    Hub,
    cancelled,
    event,
)
from conveyor.queue.streams import Publish, TaskStreams, level_of
from conveyor.registry import PRIORITIES, Registry
from conveyor.runtime.coalescer import Coalescer
from conveyor.store import notify
from conveyor.store.notify import Enqueued
from conveyor.store.pool import Connection, Pinned
from conveyor.store.tasks import (
    Inserted,
    NewTask,
    Status,
    TaskRecord,
    TaskStore,
    UpstreamFailure,
    new_task_id,
)
from conveyor.store.workflows import (
    MAX_NODES,
    NewNode,
    Upstream,
    WorkflowRecord,
    WorkflowStore,
    WorkflowSummary,
    order_nodes,
)
from conveyor.validation import json_text_flaw, text_flaw

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = structlog.get_logger("conveyor.client")
MAX_TASKS_PER_STATEMENT = 2000  # merged enqueues: rows per INSERT (a larger call goes alone)


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """What to enqueue. `payload` is the type's model instance or a mapping to validate."""

    type: str
    payload: BaseModel | Mapping[str, Any]
    idempotency_key: str | None = None
    delay_s: float = 0.0
    max_attempts: int | None = None
    priority: str | None = None  # high, default or low, for a type declared with priorities
    # No second task with the same unique key (default: the payload) while this one is
    # queued or running, or within `unique_for` seconds of its creation.
    unique_for: float | None = None
    unique_key: str | None = None
    # Tasks (ids) it waits for (store/workflows.py), and what an upstream's failure does to
    # it: `cancel` it, or `run` it anyway.
    depends_on: Sequence[uuid.UUID | str] = ()
    on_upstream_failure: UpstreamFailure = "cancel"
    parent_id: uuid.UUID | None = None  # the task whose handler enqueues it (`ctx.enqueue`)


@dataclass(frozen=True, slots=True)
class NodeRequest:
    """One node of a workflow: a task, its key in the workflow and the keys it depends on."""

    key: str
    request: TaskRequest
    depends_on: Sequence[str] = ()


class Client:
    """Enqueue, read, cancel and retry tasks."""

    def __init__(
        self, store: TaskStore, streams: TaskStreams, registry: Registry, *,
        default_max_attempts: int = 3, pinned: Pinned | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.store = store
        self.streams = streams
        self.events = events
        self.hub = Hub(events) if events is not None else None
        self.registry = registry
        self.default_max_attempts = default_max_attempts
        # Concurrent enqueues (HTTP requests, say) share one INSERT and one Redis pipeline.
        self.pinned = pinned
        self._coalescer: Coalescer[list[NewTask], list[Inserted]] = Coalescer(
            self._flush, max_batch=MAX_TASKS_PER_STATEMENT, weight=len
        )
        self.flows = WorkflowStore(store)

    def prepare(self, request: TaskRequest) -> NewTask:
        """Validate the payload against its type's model (a mapping strictly, as JSON: see
        `TaskType.validate_payload`) and check that PostgreSQL can store it and the key;
        raise PayloadInvalid or UnknownTaskType."""
        task_type = self.registry.get(request.type)
        payload = request.payload
        try:
            if not isinstance(payload, task_type.payload_model):
                payload = task_type.validate_payload(payload)
            payload_json = payload.model_dump_json()
        except (ValidationError, PydanticSerializationError) as exc:  # latter: a lone surrogate
            raise PayloadInvalid(f"payload for {request.type!r}: {exc}") from exc
        flaw = json_text_flaw(payload_json)
        if flaw is not None:
            raise PayloadInvalid(f"payload for {request.type!r}: {flaw}")
        key_flaw = text_flaw(request.idempotency_key or "")
        if key_flaw is not None:
            raise PayloadInvalid(f"idempotency key for {request.type!r}: {key_flaw}")
        priority = request.priority
        if priority is not None and priority not in PRIORITIES:
            raise PayloadInvalid(f"priority {priority!r} for {request.type!r}: it is one of "
                                 f"{', '.join(PRIORITIES)}")
        if priority not in (None, "default") and not task_type.priorities:
            raise PayloadInvalid(f"priority {priority!r}: task type {request.type!r} is not "
                                 "declared with priorities")
        unique_key, unique_for = None, request.unique_for
        if unique_for is not None or request.unique_key is not None:
            # A unique key alone holds while its task is queued or running (a window of 0).
            unique_for = unique_for or 0.0
            if not unique_for >= 0:
                raise PayloadInvalid(f"unique_for for {request.type!r}: seconds, 0 or more")
            unique_key = request.unique_key or "payload:" + hashlib.sha256(
                payload_json.encode()).hexdigest()
            key_flaw = text_flaw(unique_key)
            if key_flaw is not None:
                raise PayloadInvalid(f"unique key for {request.type!r}: {key_flaw}")
        return NewTask(
            id=new_task_id(),
            type=request.type,
            payload_json=payload_json,
            max_attempts=request.max_attempts
            or task_type.max_attempts
            or self.default_max_attempts,
            idempotency_key=request.idempotency_key,
            delay_s=max(0.0, request.delay_s),
            trace_context=tracing.current_context(),
            priority=None if priority in (None, "default") else priority,
            unique_key=unique_key,
            unique_for_s=unique_for,
        )

    async def enqueue(
        self, type_: str, payload: BaseModel | Mapping[str, Any], *,
        idempotency_key: str | None = None, delay_s: float = 0.0, max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> Inserted:
        """Enqueue one task; with an idempotency key already used, return the first task
        (IdempotencyConflict if its payload differs); the same with a unique key held."""
        request = TaskRequest(type_, payload, idempotency_key, delay_s, max_attempts, priority,
                              unique_for, unique_key)
        return (await self.enqueue_many([request]))[0]

    async def enqueue_many(self, requests: Sequence[TaskRequest]) -> list[Inserted]:
        """Enqueue tasks in one transaction and one Redis pipeline; results in request order.

        Calls made at the same time are merged into one statement: each call's tasks commit
        together, with those of the calls beside it. A key already naming a task with another
        payload raises IdempotencyConflict; several tasks are checked before anything is
        written, so the call stands or falls whole (short of a concurrent call taking the key
        between that check and the insert, which the check after the insert still reports).
        """
        if tracing.enabled():  # (no `with` of nothing while off: the check is all it costs)
            with tracing.enqueue_span(requests) as span:  # the tasks carry its context
                return await self._enqueue_many(requests, span)
        return await self._enqueue_many(requests, None)

    async def _enqueue_many(
        self, requests: Sequence[TaskRequest], span: Span | None
    ) -> list[Inserted]:
        new = [self.prepare(r) for r in requests]
        if span is not None:
            tracing.enqueued(span, [t.id for t in new])
        if any(r.depends_on or r.parent_id for r in requests):
            return await self._enqueue_nodes([
                NewNode(t, _ids(r.depends_on), r.on_upstream_failure, r.parent_id)
                for t, r in zip(new, requests, strict=True)])
        if len(new) > 1 and any(t.idempotency_key for t in new):
            _refuse_reused_keys(new, await self.store.with_keys(_keys(new)))
        inserted = await self._coalescer.submit(new)
        _refuse_reused_keys(new, [i.record for i in inserted if not i.created])
        return inserted

    async def _flush(self, calls: list[list[NewTask]]) -> list[list[Inserted]]:
        new = [task for call in calls for task in call]
        inserted = await self.store.insert(new, via=self.pinned)
        delayed = {t.id for t in new if t.delay_s > 0}
        levels = {t.id: t.priority for t in new if t.priority is not None}
        await self.publish([i.record for i in inserted if i.created], delayed, levels)
        for i in inserted:
            if i.created:
                metrics.TASKS_ENQUEUED.labels(i.record.type).inc()
        out, start = [], 0
        for call in calls:
            out.append(inserted[start:start + len(call)])
            start += len(call)
        return out

    async def _enqueue_nodes(
        self, nodes: Sequence[NewNode], workflow: tuple[uuid.UUID, str | None] | None = None
    ) -> list[Inserted]:
        """Insert tasks with dependencies (one transaction), then publish those queued."""
        if len(nodes) > 1 and any(n.task.idempotency_key for n in nodes):
            tasks = [n.task for n in nodes]
            _refuse_reused_keys(tasks, await self.store.with_keys(_keys(tasks)))
        inserted = await self.flows.insert(nodes, workflow=workflow)
        _refuse_reused_keys([n.task for n in nodes], [i.record for i in inserted
                                                      if not i.created])
        fresh = [i.record for i in inserted if i.created]
        await self.publish([r for r in fresh if r.status == "queued"],
                           {n.task.id for n in nodes if n.task.delay_s > 0})
        for r in fresh:
            metrics.TASKS_ENQUEUED.labels(r.type).inc()
        return inserted

    # -- workflows -------------------------------------------------------------------------

    async def create_workflow(
        self, nodes: Sequence[NodeRequest], name: str | None = None, *,
        max_nodes: int = MAX_NODES,
    ) -> WorkflowRecord:
        """Create a workflow (a DAG of tasks by key) in one transaction; WorkflowInvalid for
        an empty one, more than `max_nodes` nodes (the API's limit unless a caller in Python
        raises it), an unknown or repeated key, or a cycle."""
        if not nodes:
            raise WorkflowInvalid("empty", "a workflow needs at least one task")
        if len(nodes) > max_nodes:
            raise WorkflowInvalid("too_many_nodes",
                                  f"{len(nodes)} tasks: a workflow has at most {max_nodes}")
        order = order_nodes([n.key for n in nodes], [list(n.depends_on) for n in nodes])
        prepared = [self.prepare(n.request) for n in nodes]
        ids = {n.key: t.id for n, t in zip(nodes, prepared, strict=True)}
        workflow_id = new_task_id()
        batch = [NewNode(prepared[i], tuple(ids[k] for k in dict.fromkeys(nodes[i].depends_on)),
                         nodes[i].request.on_upstream_failure, nodes[i].request.parent_id,
                         nodes[i].key) for i in order]
        await self._enqueue_nodes(batch, (workflow_id, name))
        return await self.get_workflow(workflow_id)

    async def get_workflow(self, workflow_id: uuid.UUID) -> WorkflowRecord:
        found = await self.flows.get(workflow_id)
        if found is None:
            raise WorkflowNotFound(str(workflow_id))
        return found

    async def list_workflows(
        self, *, before: uuid.UUID | None, limit: int
    ) -> list[WorkflowSummary]:
        return await self.flows.page(before=before, limit=limit)

    async def cancel_workflow(self, workflow_id: uuid.UUID) -> WorkflowRecord:
        """Cancel every unfinished node (a running one by its worker); InvalidTransition if
        every node has finished."""
        await self.get_workflow(workflow_id)
        done = await self.flows.cancel(workflow_id)
        if done is None:
            found = await self.get_workflow(workflow_id)
            raise InvalidTransition(str(workflow_id), found.status, "cancel", what="workflow")
        cancelled, running = done
        if self.events is not None:
            try:
                for task_id in running:
                    await self.events.request_cancel(task_id)
                await self.events.publish([
                    event("cancelled", r.id, r.type, "cancelled", finished_at=r.finished_at,
                          outcome="cancelled") for r in cancelled])
            except Unavailable as exc:  # the workers' next beats see the requests
                log.warning("client.cancel.unannounced", workflow_id=str(workflow_id),
                            error=str(exc))
        return await self.get_workflow(workflow_id)

    async def retry_workflow(self, workflow_id: uuid.UUID) -> WorkflowRecord:
        """Queue the failed nodes again; the rest of the graph follows them."""
        await self.get_workflow(workflow_id)
        await self.publish(await self.flows.retry(workflow_id))
        return await self.get_workflow(workflow_id)

    async def publish(
        self, records: Sequence[TaskRecord], delayed: Collection[uuid.UUID] = (),
        levels: Mapping[uuid.UUID, str] | None = None,
    ) -> None:
        """Put committed tasks on Redis (`delayed` ones in their delayed set until run_at; those
        of a type with priorities in their level's ready set, by `levels`, default otherwise);
        if Redis is unavailable the relay will do it later."""
        if not records:
            return
        types = self.registry.types
        items = [
            Publish(r.type, r.id, int(r.run_at.timestamp() * 1000) if r.id in delayed else None,
                    level_of((levels or {}).get(r.id))
                    if r.type in types and types[r.type].priorities else None)
            for r in records
        ]
        events, also = self.events, None
        if events is not None:
            # Lean: a task due now says no more (its run_at is in the task).
            queued = [Event("queued", str(r.id), r.type, "queued") if r.id not in delayed
                      else event("queued", r.id, r.type, "queued", run_at=r.run_at)
                      for r in records]
            also = functools.partial(events.add, events=queued)
        try:
            await self.streams.publish(items, also)
        except Unavailable as exc:
            log.warning("client.publish.deferred", tasks=len(items), error=str(exc))
        except Exception:  # committed already: failing the caller now would invite a duplicate
            log.exception("client.publish.failed", tasks=len(items), deferred_to="relay")

    async def get(self, task_id: uuid.UUID) -> TaskRecord:
        record = await self.store.get(task_id)
        if record is None:
            raise TaskNotFound(str(task_id))
        below = await self.flows.dependents([task_id])
        if below:
            record = dataclasses.replace(record, dependents=below[task_id])
        return record

    async def cancel(self, task_id: uuid.UUID) -> TaskRecord:
        """queued → cancelled; running → its worker is asked to stop it (the record says
        `cancel_requested`; the task ends `cancelled`, never retried); InvalidTransition
        otherwise."""
        record = await self.store.request_cancel(task_id)
        if record is None:
            current = await self.get(task_id)
            raise InvalidTransition(str(task_id), current.status, "cancel")
        if self.events is not None:
            try:
                if record.status == "running":
                    await self.events.request_cancel(record.id)  # every worker hears it now
                    await self.events.publish([event("cancel_requested", record.id,
                                                     record.type, "running")])
                else:
                    await self.events.publish([
                        cancelled(record.id, record.type, record.finished_at)])
            except Unavailable as exc:  # the worker's next beat sees the request
                log.warning("client.cancel.unannounced", task_id=str(task_id), error=str(exc))
        return record

    # -- waiting ---------------------------------------------------------------------------

    async def wait(
        self, task_id: uuid.UUID, timeout_s: float, *, known: TaskRecord | None = None
    ) -> TaskRecord:
        """The task once final (succeeded, dead, cancelled), or its state after `timeout_s`.
        Fed by the events stream (no Postgres query while waiting): the task is read once at
        the start (unless `known`, a record just written), and again only if the events may
        have missed something. TaskNotFound if there is no such task."""
        if self.hub is None:
            raise RuntimeError("this client has no events stream")
        try:
            async with asyncio.timeout(timeout_s):
                async with self.hub.watch(str(task_id)) as queue:
                    record = await self._start_wait(task_id, known)
                    while record.status not in FINAL_STATUSES:
                        e = await queue.get()
                        if e is CLOSING:
                            break
                        if e is RESYNC:
                            record = await self.get(task_id)
                            continue
                        record = apply_event(record, e) or await self.get(task_id)
                    else:
                        return record
        except TimeoutError:
            pass
        return await self.get(task_id)

    async def _start_wait(self, task_id: uuid.UUID, known: TaskRecord | None) -> TaskRecord:
        assert self.hub is not None
        if known is None:
            return await self.get(task_id)
        if known.status in FINAL_STATUSES:
            return known
        recent = self.hub.recent_final(str(task_id))
        if recent is not None:
            return apply_event(known, recent) or await self.get(task_id)
        if self.hub.started_at >= known.created_at.timestamp() - 1.0:
            return await self.get(task_id)  # the hub began after it: it may have missed it
        return known

    async def wait_many(
        self, records: Sequence[TaskRecord], timeout_s: float
    ) -> list[TaskRecord]:
        """`wait` for each of `records` (just written) at once, within one `timeout_s`."""
        return list(await asyncio.gather(*(self.wait(r.id, timeout_s, known=r)
                                           for r in records)))

    def release_waiters(self) -> None:
        """The service stops: every `wait` answers now with the task as it is (and so do
        those that begin later, until `accept_waiters`)."""
        if self.hub is not None:
            self.hub.release()

    def accept_waiters(self) -> None:
        if self.hub is not None:
            self.hub.reopen()

    async def close(self) -> None:
        """Stop the events reader, if one was started."""
        if self.hub is not None:
            await self.hub.close()

    async def retry(self, task_id: uuid.UUID) -> TaskRecord:
        """dead | cancelled → queued, published at once; InvalidTransition otherwise."""
        record = await self.store.retry(task_id)
        if record is None:
            current = await self.get(task_id)
            raise InvalidTransition(str(task_id), current.status, "retry")
        if record.status == "queued":  # (waiting: an upstream is unfinished)
            await self.publish([record])
        return record

    async def list_tasks(
        self, *, type_: str | None, status: Status | None, before: uuid.UUID | None, limit: int
    ) -> list[TaskRecord]:
        records = await self.store.list_tasks(type_=type_, status=status, before=before,
                                              limit=limit)
        below = await self.flows.dependents([r.id for r in records])  # one lookup per page
        return [dataclasses.replace(r, dependents=below[r.id]) if r.id in below else r
                for r in records]


def _moment(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def apply_event(record: TaskRecord, e: Event) -> TaskRecord | None:
    """`record` as `e` leaves it; None if the event lacks what the record needs (a result
    too large for it): read the task then."""
    d = e.details()
    if e.kind == "progress":
        return dataclasses.replace(record, progress=d.get("progress"))
    if e.kind == "cancel_requested":
        return dataclasses.replace(record, cancel_requested=True)
    if e.kind == "queued":
        return record
    attempt = d.get("attempt", record.attempts)
    history = [h for h in record.attempt_history
               if h.get("outcome") is not None and h.get("number") != attempt]
    if e.kind == "started":
        started_at = _moment(d.get("started_at"))
        history.append({"number": attempt, "worker": d.get("worker"),
                        "started_at": started_at, "finished_at": None,
                        "outcome": None, "error": None})
        return dataclasses.replace(record, status="running", attempts=attempt,
                                   worker=d.get("worker"), started_at=started_at,
                                   finished_at=None, attempt_history=history)
    if e.kind not in ("retrying", "succeeded", "dead", "cancelled"):
        return record
    if e.kind == "succeeded" and d.get("result_omitted"):
        return None
    if e.kind == "cancelled" and d.get("finished_at") is None:
        return None  # announced by a NOTIFY (a dependent its upstream cancelled): read it
    entry = {"number": attempt, "worker": d.get("worker", record.worker),
             "started_at": _moment(d.get("started_at")),
             "finished_at": _moment(d.get("finished_at")),
             "outcome": "succeeded" if e.kind == "succeeded" else d.get("outcome", "failed"),
             "error": d.get("error")}
    if "attempt" in d:
        history.append(entry)
    status: Status = e.status  # type: ignore[assignment]
    return dataclasses.replace(
        record,
        status=status,
        attempts=attempt,
        worker=d.get("worker", record.worker),
        result=d.get("result") if e.kind == "succeeded" else record.result,
        last_error=None if e.kind == "succeeded" else d.get("error", record.last_error),
        run_at=_moment(d.get("run_at")) or record.run_at,
        started_at=_moment(d.get("started_at")) or record.started_at,
        finished_at=None if e.kind == "retrying" else _moment(d.get("finished_at")),
        attempt_history=history,
    )


def _ids(values: Sequence[uuid.UUID | str]) -> tuple[uuid.UUID, ...]:
    """Task ids given as UUIDs or strings; WorkflowInvalid for one that is neither."""
    out = []
    for value in values:
        try:
            out.append(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))
        except ValueError:
            raise WorkflowInvalid("unknown_task", f"depends_on: {value!r} is no task id") from None
    return tuple(dict.fromkeys(out))


def _keys(tasks: Sequence[NewTask]) -> list[tuple[str, str]]:
    return [(t.type, t.idempotency_key) for t in tasks if t.idempotency_key]


def _refuse_reused_keys(new: Sequence[NewTask], existing: Sequence[TaskRecord]) -> None:
    """IdempotencyConflict if a key of `new` names a task (earlier, or earlier in `new`) whose
    payload differs; payloads are compared as JSON values, so key order and spacing do not
    count. The same key with the same payload is a repeat: it returns the first task."""
    first: dict[tuple[str, str], tuple[Any, str | None, int | None]] = {
        (r.type, r.idempotency_key): (r.payload, str(r.id), None)
        for r in existing if r.idempotency_key
    }
    reused = []
    for index, task in enumerate(new):
        if not task.idempotency_key:
            continue
        key = (task.type, task.idempotency_key)
        payload = orjson.loads(task.payload_json)
        if key not in first:
            first[key] = (payload, None, index)
        elif first[key][0] != payload:
            _, task_id, first_index = first[key]
            reused.append(ReusedKey(index, task.type, task.idempotency_key, task_id, first_index))
    if reused:
        raise IdempotencyConflict(reused)


async def insert_in_transaction(
    client: Client, conn: Connection, request: TaskRequest
) -> TaskRecord:
    """Insert a task on the caller's connection and transaction; publish after commit.

    The row is visible to workers only if the caller commits. A key already naming a task is a
    repeat (that task is returned) or, with another payload, IdempotencyConflict. A NOTIFY
    (`store.notify`), which Postgres delivers only on commit, tells the relay to publish it at
    once; if no relay listens, the relay's periodic scan publishes it after its grace period.
    """
    if tracing.enabled():
        with tracing.enqueue_span([request]) as span:  # the task carries its context
            return await _insert_in_transaction(client, conn, request, span)
    return await _insert_in_transaction(client, conn, request, None)


async def _insert_in_transaction(
    client: Client, conn: Connection, request: TaskRequest, span: Span | None
) -> TaskRecord:
    new = client.prepare(request)
    if span is not None:
        tracing.enqueued(span, [new.id])
    if request.depends_on or request.parent_id:
        node = NewNode(new, _ids(request.depends_on), request.on_upstream_failure,
                       request.parent_id)
        inserted = (await client.flows.insert([node], conn=conn))[0]
    else:
        inserted = (await client.store.insert([new], conn=conn))[0]
    record = inserted.record
    if not inserted.created:
        _refuse_reused_keys([new], [record])  # the same key for another payload: refused
    if inserted.created and record.status == "queued":
        at_ms = int(record.run_at.timestamp() * 1000) if new.delay_s > 0 else None
        ranked = client.registry.types[record.type].priorities \
            if record.type in client.registry.types else False
        level = level_of(new.priority) if ranked else None
        await notify.send(conn, client.store.channel,
                          Enqueued(record.type, record.id, at_ms, level))
    return record


class TaskRelatives:
    """`ctx.upstream()`, `ctx.enqueue()` and `ctx.wait_children()` of the handlers a worker
    runs, through its client (see `conveyor.registry.Relatives`)."""

    def __init__(self, client: Client, *, poll_s: float = 0.05, max_poll_s: float = 1.0
                 ) -> None:
        self.client = client
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s

    async def upstream(self, task_id: str) -> list[Upstream]:
        return await self.client.flows.upstream(uuid.UUID(task_id))

    async def enqueue(self, parent_id: str, type_: str, payload: Any, *,
                      depends_on: Sequence[Any] = (), idempotency_key: str | None = None,
                      delay_s: float = 0.0, max_attempts: int | None = None) -> TaskRecord:
        request = TaskRequest(type_, payload, idempotency_key, delay_s, max_attempts,
                              depends_on=depends_on, parent_id=uuid.UUID(parent_id))
        return (await self.client.enqueue_many([request]))[0].record

    async def wait_children(self, parent_id: str, timeout_s: float | None) -> list[TaskRecord]:
        """Polls Postgres (one count on the parent's index), from `poll_s` up to
        `max_poll_s` apart."""
        parent = uuid.UUID(parent_id)
        pause = self.poll_s
        async with asyncio.timeout(timeout_s):
            while await self.client.flows.live_children(parent):
                await asyncio.sleep(pause)
                pause = min(self.max_poll_s, pause * 1.5)
        return await self.client.flows.children(parent)
