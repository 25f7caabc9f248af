"""`/v1/workflows`: create a DAG of tasks in one transaction, read it (every node's record),
list, cancel and retry it.

The router is built per app because the request body's schema comes from the registry.
(No `from __future__ import annotations` here: FastAPI must see the built request types.)
"""

import dataclasses
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel
from starlette.responses import Response

from conveyor.api.auth import Enqueuer, forbidden, requires
from conveyor.api.deps import AdmissionDep, ClientDep
from conveyor.api.direct import DirectRoute
from conveyor.api.guards import JSON_MEDIA_TYPES, require_json
from conveyor.api.models import WorkflowOut, WorkflowPage, workflow_model
from conveyor.api.responses import OrjsonResponse
from conveyor.client import NodeRequest, TaskRequest
from conveyor.registry import Registry
from conveyor.store.keys import ENQUEUE, MANAGE, READ
from conveyor.store.workflows import MAX_NODES, WorkflowRecord

PREFIX = "/v1/workflows"
_NOT_FOUND = {"description": "no workflow has this id"}


def _scoped(scope: str, responses: dict[int | str, dict[str, Any]] | None = None
            ) -> dict[str, Any]:
    return {"dependencies": [Depends(requires[scope])],
            "responses": {**forbidden(scope), **(responses or {})}}


def _node(body: Any) -> NodeRequest:
    return NodeRequest(body.key, TaskRequest(
        type=body.type, payload=body.payload, delay_s=body.delay_seconds,
        max_attempts=body.max_attempts, on_upstream_failure=body.on_upstream_failure,
    ), tuple(body.depends_on))


def _workflow(found: WorkflowRecord, status_code: int = 200) -> Response:
    out = {
        "id": found.id, "name": found.name, "status": found.status,
        "created_at": found.created_at, "cancelled_at": found.cancelled_at,
        "tasks": [{"key": t.workflow_key, **{f.name: getattr(t, f.name)
                                             for f in dataclasses.fields(t)}}
                  for t in found.tasks],
    }
    return OrjsonResponse(out, status_code=status_code,
                          headers={"Location": f"{PREFIX}/{found.id}"})


def build_router(registry: Registry) -> APIRouter:
    """The workflows router for the types in `registry`."""
    body_model = workflow_model(registry)
    router = APIRouter(route_class=DirectRoute, prefix=PREFIX, tags=["workflows"])

    @router.post(
        "", status_code=201, response_model=WorkflowOut,
        summary=f"Create a workflow: up to {MAX_NODES} tasks and their dependencies by key",
        dependencies=[Depends(require_json)],
        responses={
            **forbidden(ENQUEUE),
            400: {"description": "malformed JSON"},
            413: {"description": "body over MAX_BODY_BYTES"},
            415: {"description": f"the body is not {JSON_MEDIA_TYPES}"},
            422: {"description": "invalid node (`errors` lists the fields), or a graph that "
                                 "cannot be built: `rule` is `unknown_key`, `duplicate_key` "
                                 "or `cycle`"},
        },
    )
    async def create_workflow(
        body: Annotated[body_model, Body()],  # type: ignore[valid-type]
        client: ClientDep,
        admission: AdmissionDep,
        caller: Enqueuer,
    ) -> Response:
        nodes: list[BaseModel] = body.tasks  # type: ignore[attr-defined]
        caller.check_types(n.type for n in nodes)  # type: ignore[attr-defined]
        with admission.slot():
            found = await client.create_workflow([_node(n) for n in nodes],
                                                 name=body.name)  # type: ignore[attr-defined]
        return _workflow(found, 201)

    @router.get("", response_model=WorkflowPage, summary="List workflows, newest first",
                **_scoped(READ))
    async def list_workflows(
        client: ClientDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            uuid.UUID | None, Query(description="`next_cursor` of the previous page")
        ] = None,
    ) -> Response:
        found = await client.list_workflows(before=cursor, limit=limit)
        next_cursor = str(found[-1].id) if len(found) == limit else None
        return OrjsonResponse({"workflows": found, "next_cursor": next_cursor})

    @router.get("/{workflow_id}", response_model=WorkflowOut,
                summary="Read a workflow: its status and every node's task record",
                **_scoped(READ, {404: _NOT_FOUND}))
    async def get_workflow(workflow_id: uuid.UUID, client: ClientDep) -> Response:
        return _workflow(await client.get_workflow(workflow_id))

    @router.post("/{workflow_id}/cancel", response_model=WorkflowOut,
                 summary="Cancel a workflow: its waiting and queued nodes at once, its running "
                         "ones by their workers",
                 **_scoped(MANAGE, {404: _NOT_FOUND, 409: {
                     "description": "every node has finished; `status_now` is the "
                                    "workflow's status"}}))
    async def cancel_workflow(workflow_id: uuid.UUID, client: ClientDep) -> Response:
        return _workflow(await client.cancel_workflow(workflow_id))

    @router.post("/{workflow_id}/retry", response_model=WorkflowOut,
                 summary="Queue the workflow's dead and cancelled nodes again; the rest of "
                         "the graph follows them",
                 **_scoped(MANAGE, {404: _NOT_FOUND}))
    async def retry_workflow(workflow_id: uuid.UUID, client: ClientDep) -> Response:
        return _workflow(await client.retry_workflow(workflow_id))

    return router
