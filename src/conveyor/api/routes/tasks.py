"""`/v1/tasks`: enqueue (one or a batch), read, list, cancel, retry; wait for a task
(`?wait=S`), its attempts, and its events (Server-Sent Events).

The router is built per app because the request body's schema comes from the registry.
(No `from __future__ import annotations` here: FastAPI must see the built request types.)
"""

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse

from conveyor.api import sse
from conveyor.api.auth import Enqueuer, forbidden, requires
from conveyor.api.deps import AdmissionDep, ClientDep
from conveyor.api.direct import DirectRoute
from conveyor.api.guards import JSON_MEDIA_TYPES, require_json
from conveyor.api.models import (
    SUMMARY_FIELDS,
    AttemptsOut,
    BatchOut,
    TaskPage,
    request_models,
)
from conveyor.api.responses import OrjsonResponse
from conveyor.client import TaskRequest
from conveyor.queue.events import FINAL_STATUSES
from conveyor.registry import Registry
from conveyor.store.keys import ENQUEUE, MANAGE, READ
from conveyor.store.tasks import Status, TaskRecord
from conveyor.validation import StorableStr

_ENQUEUE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed JSON"},
    409: {"description": "an idempotency key reused with another payload; `conflicts` "
                         "names each"},
    413: {"description": "body over MAX_BODY_BYTES"},
    415: {"description": f"the body is not {JSON_MEDIA_TYPES}"},
    422: {"description": "unknown type or invalid payload (`errors` lists the fields), or a "
                         "`depends_on` id that names no task (`rule`: `unknown_task`)"},
    403: {"description": f"the API key lacks the scope `{ENQUEUE}`, or may not enqueue a "
                         "type of the request (`types` names each)"},
}


def _scoped(scope: str, responses: dict[int | str, dict[str, Any]] | None = None
            ) -> dict[str, Any]:
    """A route's scope check and its documented responses, the 403 among them."""
    return {"dependencies": [Depends(requires[scope])],
            "responses": {**forbidden(scope), **(responses or {})}}


_READ = _scoped(READ)

PREFIX = "/v1/tasks"
_NOT_FOUND = {"description": "no task has this id"}


def _task_request(body: Any) -> TaskRequest:
    return TaskRequest(
        type=body.type,
        payload=body.payload,
        idempotency_key=body.idempotency_key,
        delay_s=body.delay_seconds,
        max_attempts=body.max_attempts,
        depends_on=body.depends_on,
        on_upstream_failure=body.on_upstream_failure,
        priority=body.priority,
        unique_for=body.unique_for,
        unique_key=body.unique_key,
    )


def _task(record: TaskRecord, status_code: int = 200, **headers: str) -> Response:
    return OrjsonResponse(record, status_code=status_code, headers=headers or None)


MAX_WAIT_S = 60.0  # the default of CONVEYOR_MAX_WAIT


def _wait(max_wait_s: float) -> Any:
    """The `wait` query parameter (its default: none), up to `max_wait_s`."""
    return Query(
        None, gt=0, le=max_wait_s,
        description=f"seconds (up to {max_wait_s:g}) to wait for the task to be final "
                    "(`succeeded`, `dead`, `cancelled`); the answer comes as soon as it is, or "
                    "after this long with its state then",
    )


_EVENTS_DOC: dict[int | str, dict[str, Any]] = {200: sse.response_doc(
    "`text/event-stream`: frames of `id` (the event's id), `event` (its kind: `state`, the "
    "task as stored, first and after any missed events; then its transitions) and one JSON "
    "`data` line; the stream ends after the task's final event", {"state", *sse.KINDS})}


def build_router(registry: Registry, max_wait_s: float = MAX_WAIT_S) -> APIRouter:
    """The tasks router for the types in `registry`, waiting up to `max_wait_s`."""
    single, batch = request_models(registry)
    router = APIRouter(prefix=PREFIX, tags=["tasks"], route_class=DirectRoute)

    @router.post(
        "",
        status_code=202,
        response_model=TaskRecord,
        summary="Enqueue a task",
        dependencies=[Depends(require_json)],
        responses={
            200: {"model": TaskRecord,
                  "description": "idempotency key seen with the same payload: the first task"},
            **_ENQUEUE_ERRORS,
        },
    )
    async def create_task(
        body: Annotated[single, Body()],  # type: ignore[valid-type]
        client: ClientDep,
        admission: AdmissionDep,
        caller: Enqueuer,
        wait: float | None = _wait(max_wait_s),
    ) -> Response:
        caller.check_types([body.type])  # type: ignore[attr-defined]
        with admission.slot():
            inserted = await client.enqueue_many([_task_request(body)])
        record = inserted[0].record
        status_code = 202 if inserted[0].created else 200
        if wait is not None:
            record = await client.wait(record.id, wait, known=record)
            if record.status in FINAL_STATUSES:
                status_code = 200
        return _task(record, status_code, Location=f"/v1/tasks/{record.id}")

    @router.post("/batch", status_code=202, response_model=BatchOut,
                 summary="Enqueue up to 1000 tasks in one transaction",
                 dependencies=[Depends(require_json)],
                 responses={200: {"model": BatchOut,
                                  "description": "with `wait`: every task final in time"},
                            **_ENQUEUE_ERRORS})
    async def create_batch(
        body: Annotated[batch, Body()],  # type: ignore[valid-type]
        client: ClientDep,
        admission: AdmissionDep,
        caller: Enqueuer,
        wait: float | None = _wait(max_wait_s),
    ) -> Response:
        tasks: list[BaseModel] = body.tasks  # type: ignore[attr-defined]
        caller.check_types(t.type for t in tasks)  # type: ignore[attr-defined]
        with admission.slot():
            inserted = await client.enqueue_many([_task_request(t) for t in tasks])
        created = sum(1 for i in inserted if i.created)
        records = [i.record for i in inserted]
        status_code = 202
        if wait is not None:
            records = await client.wait_many(records, wait)
            if all(r.status in FINAL_STATUSES for r in records):
                status_code = 200
        return OrjsonResponse({"tasks": records, "created": created}, status_code=status_code)

    @router.get("", response_model=TaskPage, summary="List tasks, newest first", **_READ)
    async def list_tasks(
        client: ClientDep,
        type: Annotated[StorableStr | None, Query(description="only this task type")] = None,
        status: Annotated[Status | None, Query(description="only this status")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            uuid.UUID | None, Query(description="`next_cursor` of the previous page")
        ] = None,
        fields: Annotated[Literal["summary", "full"], Query(
            description="`summary`: no payload or result (read a task for those); "
                        "`full`: whole tasks")] = "summary",
    ) -> Response:
        records = await client.list_tasks(type_=type, status=status, before=cursor, limit=limit)
        next_cursor = str(records[-1].id) if len(records) == limit else None
        tasks: list[Any] = records
        if fields == "summary":
            tasks = [{name: getattr(r, name) for name in SUMMARY_FIELDS} for r in records]
        return OrjsonResponse({"tasks": tasks, "next_cursor": next_cursor})

    @router.get("/{task_id}", response_model=TaskRecord,
                summary="Read a task (with `wait`: once it is final)",
                **_scoped(READ, {404: _NOT_FOUND}))
    async def get_task(task_id: uuid.UUID, client: ClientDep, wait: float | None = _wait(max_wait_s)
                       ) -> Response:
        if wait is not None:
            return _task(await client.wait(task_id, wait))
        return _task(await client.get(task_id))

    @router.get("/{task_id}/attempts", response_model=AttemptsOut,
                summary="Every attempt of a task: worker, times, outcome, error",
                **_scoped(READ, {404: _NOT_FOUND}))
    async def get_attempts(task_id: uuid.UUID, client: ClientDep) -> Response:
        record = await client.get(task_id)
        return OrjsonResponse({"attempts": record.attempt_history})

    @router.get("/{task_id}/events", summary="Stream a task's events (Server-Sent Events)",
                response_class=StreamingResponse,
                **_scoped(READ, {404: _NOT_FOUND, **_EVENTS_DOC}))
    async def task_events(task_id: uuid.UUID, client: ClientDep) -> Response:
        assert client.hub is not None
        return await sse.task_stream(client, client.hub, task_id)

    @router.post("/{task_id}/cancel", response_model=TaskRecord, status_code=200,
                 summary="Cancel a task: a queued one at once (200), a running one by its "
                         "worker (202, `cancel_requested`); 409 if it is final",
                 **_scoped(MANAGE, {
                     202: {"model": TaskRecord, "description":
                           "running: its worker stops it; it ends `cancelled`"},
                     404: _NOT_FOUND,
                     409: {"description": "the task is final; `status_now` says what it is"}}))
    async def cancel_task(task_id: uuid.UUID, client: ClientDep) -> Response:
        record = await client.cancel(task_id)
        return _task(record, 202 if record.status == "running" else 200)

    @router.post("/{task_id}/retry", response_model=TaskRecord,
                 summary="Queue a dead or cancelled task again (409 otherwise)",
                 **_scoped(MANAGE, {404: _NOT_FOUND, 409: {"description": "the task is neither "
                                "dead nor cancelled; `status_now` says what it is"}}))
    async def retry_task(task_id: uuid.UUID, client: ClientDep) -> Response:
        return _task(await client.retry(task_id))

    return router
