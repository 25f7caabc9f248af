"""`/v1/queues`: per task type, what Redis holds and what Postgres records.

The router is built per app: a type in a path is one of the registry's, and the OpenAPI
document lists them. (No `from __future__ import annotations` here: FastAPI must see that
type.)
"""

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.exceptions import RequestValidationError
from starlette.responses import Response

from conveyor.api.auth import forbidden, requires
from conveyor.api.deps import StateDep
from conveyor.api.direct import DirectRoute
from conveyor.api.models import DeadLettersOut, FlowOut, LimitsIn, QueuesOut
from conveyor.api.responses import OrjsonResponse
from conveyor.limits import change_limits, in_force
from conveyor.registry import PRIORITIES, Limits, Registry, TaskType
from conveyor.state import AppState
from conveyor.store.keys import ADMIN, MANAGE, READ
from conveyor.store.queue_settings import FIELDS, InvalidOverride, Override
from conveyor.validation import StorableStr

_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed JSON"},
    413: {"description": "body over MAX_BODY_BYTES"},
    415: {"description": "the body is not JSON"},
    422: {"description": "a limit out of range, a rate that is none, or a per-key limit on a "
                         "type without a concurrency_key; `errors` names it"},
}


def _flow_of(task_type: TaskType, limits: Limits, row: Override | None,
             in_use: int | None) -> dict[str, Any]:
    return {
        "max_concurrency": limits.max_concurrency,
        "concurrency_key": limits.concurrency_key,
        "max_concurrency_per_key": limits.max_concurrency_per_key,
        "rate_limit": str(limits.rate_limit) if limits.rate_limit else None,
        "rate_limit_per_key": str(limits.rate_limit_per_key) if limits.rate_limit_per_key
        else None,
        "paused": limits.paused,
        "priorities": list(PRIORITIES) if task_type.priorities else None,
        "leases_in_use": in_use,
        "overridden": [f for f in FIELDS if row is not None and getattr(row, f) is not None
                       and getattr(row, f) is not False],
        "updated_at": row.updated_at if row is not None else None,
    }


async def list_queues(state: StateDep) -> Response:
    names = list(state.app.registry.types)
    stats = await state.streams.stats(names)
    counts = await asyncio.gather(*(state.store.counts(n) for n in names))
    flow = await in_force(state, names)
    now = datetime.now(UTC)
    queues = []
    for name, count in zip(names, counts, strict=True):
        s = stats[name]
        queues.append({
            "type": name,
            "stream_length": s.length,
            "pending": s.pending,
            "undelivered": s.undelivered,
            "delayed": s.delayed,
            "dead_letters": s.dead_letters,
            "queued": count.queued,
            "running": count.running,
            "dead": count.dead,
            "oldest_queued_age_s": (
                round((now - count.oldest_due).total_seconds(), 3) if count.oldest_due else None
            ),
            "flow": _flow_of(state.app.registry.types[name], flow[name].limits,
                             flow[name].row, flow[name].leases),
        })
    return OrjsonResponse({"queues": queues})


def build_router(registry: Registry) -> APIRouter:
    """The queues router for the types in `registry`."""
    router = APIRouter(route_class=DirectRoute, prefix="/v1/queues", tags=["operations"],
                       dependencies=[Depends(requires[READ])], responses=forbidden(READ))
    router.get("", response_model=QueuesOut,
               summary="Depth, pending, dead and age per task type")(list_queues)
    names = tuple(registry.types)
    type_name: Any = Literal[names] if names else StorableStr

    @router.get("/{task_type}/dead-letters", response_model=DeadLettersOut,
                summary="Newest entries of a type's dead-letter stream")
    async def dead_letters(
        task_type: Annotated[type_name, Path(description="a registered task type")],
        state: StateDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        state.app.registry.get(task_type)  # 422 for an unknown type (when none is registered)
        entries = await state.streams.dead_letters(task_type, limit)
        return OrjsonResponse({"entries": entries})

    async def change(state: AppState, task_type: str, changes: dict[str, Any]) -> Response:
        """Write the changes, nudge every worker and answer the flow in force."""
        try:
            now = await change_limits(state, task_type, changes)
        except InvalidOverride as exc:  # rolled back: nothing was stored
            raise RequestValidationError([{
                "type": "value_error", "loc": ("body", exc.field), "msg": exc.message,
                "input": changes.get(exc.field)}]) from None
        return OrjsonResponse(_flow_of(state.app.registry.get(task_type), now.limits, now.row,
                                       now.leases))

    @router.patch("/{task_type}/limits", response_model=FlowOut,
                  dependencies=[Depends(requires[ADMIN])],
                  responses={**forbidden(ADMIN), **_BODY_ERRORS},
                  summary="Change a type's flow limits at run time (admin)")
    async def set_limits(
        task_type: Annotated[type_name, Path(description="a registered task type")],
        body: LimitsIn, state: StateDep,
    ) -> Response:
        return await change(state, task_type, {f: getattr(body, f) for f in body.model_fields_set})

    @router.post("/{task_type}/pause", response_model=FlowOut,
                 dependencies=[Depends(requires[MANAGE])], responses=forbidden(MANAGE),
                 summary="Stop starting a type's tasks (enqueues are still accepted)")
    async def pause(
        task_type: Annotated[type_name, Path(description="a registered task type")],
        state: StateDep,
    ) -> Response:
        return await change(state, task_type, {"paused": True})

    @router.post("/{task_type}/resume", response_model=FlowOut,
                 dependencies=[Depends(requires[MANAGE])], responses=forbidden(MANAGE),
                 summary="Start a paused type's tasks again")
    async def resume(
        task_type: Annotated[type_name, Path(description="a registered task type")],
        state: StateDep,
    ) -> Response:
        return await change(state, task_type, {"paused": False})

    return router
