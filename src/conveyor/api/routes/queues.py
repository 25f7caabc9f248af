"""`/v1/queues`: per task type, what Redis holds and what Postgres records."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from conveyor.api.auth import forbidden, requires
from conveyor.api.deps import StateDep
from conveyor.api.models import DeadLettersOut, QueuesOut
from conveyor.api.responses import OrjsonResponse
from conveyor.store.keys import READ

router = APIRouter(prefix="/v1/queues", tags=["operations"],
                   dependencies=[Depends(requires[READ])], responses=forbidden(READ))


@router.get("", response_model=QueuesOut, summary="Depth, pending, dead and age per task type")
async def list_queues(state: StateDep) -> Response:
    names = list(state.app.registry.types)
    stats = await state.streams.stats(names)
    counts = await asyncio.gather(*(state.store.counts(n) for n in names))
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
        })
    return OrjsonResponse({"queues": queues})


@router.get("/{task_type}/dead-letters", response_model=DeadLettersOut,
            summary="Newest entries of a type's dead-letter stream")
async def dead_letters(
    task_type: str, state: StateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> Response:
    state.app.registry.get(task_type)  # 422 for an unknown type
    entries = await state.streams.dead_letters(task_type, limit)
    return OrjsonResponse({"entries": entries})

