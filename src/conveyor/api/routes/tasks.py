"""`/v1/tasks`: enqueue (one or a batch), read, list, cancel, retry.

The router is built per app because the request body's schema comes from the registry.
(No `from __future__ import annotations` here: FastAPI must see the built request types.)
"""

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel
from starlette.responses import Response

from conveyor.api.auth import Enqueuer, forbidden, requires
from conveyor.api.deps import AdmissionDep, ClientDep
from conveyor.api.guards import JSON_MEDIA_TYPES, require_json
from conveyor.api.models import SUMMARY_FIELDS, BatchOut, TaskPage, request_models
from conveyor.api.responses import OrjsonResponse
from conveyor.client import TaskRequest
from conveyor.registry import Registry
from conveyor.store.keys import ENQUEUE, MANAGE, READ
from conveyor.store.tasks import Status, TaskRecord

_ENQUEUE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed JSON"},
    409: {"description": "an idempotency key reused with another payload; `conflicts` "
                         "names each"},
    413: {"description": "body over MAX_BODY_BYTES"},
    415: {"description": f"the body is not {JSON_MEDIA_TYPES}"},
    422: {"description": "unknown type or invalid payload; `errors` lists the fields"},
    403: {"description": f"the API key lacks the scope `{ENQUEUE}`, or may not enqueue a "
                         "type of the request (`types` names each)"},
}
_READ: dict[str, Any] = {"dependencies": [Depends(requires[READ])],
                         "responses": forbidden(READ)}
_MANAGE: dict[str, Any] = {"dependencies": [Depends(requires[MANAGE])],
                           "responses": forbidden(MANAGE)}


def _task_request(body: Any) -> TaskRequest:
    return TaskRequest(
        type=body.type,
        payload=body.payload,
        idempotency_key=body.idempotency_key,
        delay_s=body.delay_seconds,
        max_attempts=body.max_attempts,
    )


def _task(record: TaskRecord, status_code: int = 200, **headers: str) -> Response:
    return OrjsonResponse(record, status_code=status_code, headers=headers or None)


def build_router(registry: Registry) -> APIRouter:
    """The tasks router for the types in `registry`."""
    single, batch = request_models(registry)
    router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

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
    ) -> Response:
        caller.check_types([body.type])  # type: ignore[attr-defined]
        with admission.slot():
            inserted = await client.enqueue_many([_task_request(body)])
        record = inserted[0].record
        return _task(record, 202 if inserted[0].created else 200,
                     Location=f"/v1/tasks/{record.id}")

    @router.post("/batch", status_code=202, response_model=BatchOut,
                 summary="Enqueue up to 1000 tasks in one transaction",
                 dependencies=[Depends(require_json)], responses=_ENQUEUE_ERRORS)
    async def create_batch(
        body: Annotated[batch, Body()],  # type: ignore[valid-type]
        client: ClientDep,
        admission: AdmissionDep,
        caller: Enqueuer,
    ) -> Response:
        tasks: list[BaseModel] = body.tasks  # type: ignore[attr-defined]
        caller.check_types(t.type for t in tasks)  # type: ignore[attr-defined]
        with admission.slot():
            inserted = await client.enqueue_many([_task_request(t) for t in tasks])
        created = sum(1 for i in inserted if i.created)
        return OrjsonResponse({"tasks": [i.record for i in inserted], "created": created},
                              status_code=202)

    @router.get("", response_model=TaskPage, summary="List tasks, newest first", **_READ)
    async def list_tasks(
        client: ClientDep,
        type: Annotated[str | None, Query(description="only this task type")] = None,
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

    @router.get("/{task_id}", response_model=TaskRecord, summary="Read a task", **_READ)
    async def get_task(task_id: uuid.UUID, client: ClientDep) -> Response:
        return _task(await client.get(task_id))

    @router.post("/{task_id}/cancel", response_model=TaskRecord,
                 summary="Cancel a queued task (409 if it is not queued)", **_MANAGE)
    async def cancel_task(task_id: uuid.UUID, client: ClientDep) -> Response:
        return _task(await client.cancel(task_id))

    @router.post("/{task_id}/retry", response_model=TaskRecord,
                 summary="Queue a dead or cancelled task again (409 otherwise)", **_MANAGE)
    async def retry_task(task_id: uuid.UUID, client: ClientDep) -> Response:
        return _task(await client.retry(task_id))

    return router
