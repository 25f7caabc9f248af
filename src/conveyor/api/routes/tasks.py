"""`/v1/tasks`: enqueue (one or a batch), read, list, cancel, retry.

The router is built per app because the request body's schema comes from the registry.
(No `from __future__ import annotations` here: FastAPI must see the built request types.)
"""

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel
from starlette.responses import Response

from conveyor.api.deps import AdmissionDep, ClientDep
from conveyor.api.models import BatchOut, TaskPage, request_models
from conveyor.api.responses import OrjsonResponse
from conveyor.client import TaskRequest
from conveyor.registry import Registry
from conveyor.store.tasks import Status, TaskRecord

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed JSON"},
    401: {"description": "missing or wrong API key"},
    413: {"description": "body over MAX_BODY_BYTES"},
    422: {"description": "unknown type or invalid payload; `errors` lists the fields"},
    503: {"description": "Postgres or Redis unavailable; retry after `Retry-After`"},
}


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
    router = APIRouter(prefix="/v1/tasks", tags=["tasks"], responses=_ERRORS)

    @router.post(
        "",
        status_code=202,
        response_model=TaskRecord,
        summary="Enqueue a task",
        responses={200: {"model": TaskRecord, "description": "idempotency key seen: first task"}},
    )
    async def create_task(
        body: Annotated[single, Body()],  # type: ignore[valid-type]
        client: ClientDep,
        admission: AdmissionDep,
    ) -> Response:
        with admission.slot():
            inserted = await client.enqueue_many([_task_request(body)])
        record = inserted[0].record
        return _task(record, 202 if inserted[0].created else 200,
                     Location=f"/v1/tasks/{record.id}")

    @router.post("/batch", status_code=202, response_model=BatchOut,
                 summary="Enqueue up to 1000 tasks in one transaction")
    async def create_batch(
        body: Annotated[batch, Body()],  # type: ignore[valid-type]
        client: ClientDep,
        admission: AdmissionDep,
    ) -> Response:
        tasks: list[BaseModel] = body.tasks  # type: ignore[attr-defined]
        with admission.slot():
            inserted = await client.enqueue_many([_task_request(t) for t in tasks])
        created = sum(1 for i in inserted if i.created)
        return OrjsonResponse({"tasks": [i.record for i in inserted], "created": created},
                              status_code=202)

    @router.get("", response_model=TaskPage, summary="List tasks, newest first")
    async def list_tasks(
        client: ClientDep,
        type: Annotated[str | None, Query(description="only this task type")] = None,
        status: Annotated[Status | None, Query(description="only this status")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            uuid.UUID | None, Query(description="`next_cursor` of the previous page")
        ] = None,
    ) -> Response:
        records = await client.list_tasks(type_=type, status=status, before=cursor, limit=limit)
        next_cursor = str(records[-1].id) if len(records) == limit else None
        return OrjsonResponse({"tasks": records, "next_cursor": next_cursor})

    @router.get("/{task_id}", response_model=TaskRecord, summary="Read a task")
    async def get_task(task_id: uuid.UUID, client: ClientDep) -> Response:
        return _task(await client.get(task_id))

    @router.post("/{task_id}/cancel", response_model=TaskRecord,
                 summary="Cancel a queued task (409 if it is not queued)")
    async def cancel_task(task_id: uuid.UUID, client: ClientDep) -> Response:
        return _task(await client.cancel(task_id))

    @router.post("/{task_id}/retry", response_model=TaskRecord,
                 summary="Queue a dead or cancelled task again (409 otherwise)")
    async def retry_task(task_id: uuid.UUID, client: ClientDep) -> Response:
        return _task(await client.retry(task_id))

    return router
