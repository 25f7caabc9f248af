"""`/v1/workers`: live workers, from their rows in Postgres (see store/workers.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import Response

from conveyor.api.auth import forbidden, requires
from conveyor.api.deps import StateDep
from conveyor.api.direct import DirectRoute
from conveyor.api.models import WorkersOut
from conveyor.api.responses import OrjsonResponse
from conveyor.store.keys import READ

router = APIRouter(route_class=DirectRoute, prefix="/v1/workers", tags=["operations"],
                   dependencies=[Depends(requires[READ])], responses=forbidden(READ))


@router.get("", response_model=WorkersOut, summary="Workers whose heartbeat is alive")
async def list_workers(state: StateDep) -> Response:
    rows = await state.workers.live(state.settings.heartbeat_ttl)
    workers = [
        {
            "id": w.id, "host": w.host, "pid": w.pid, "types": w.types,
            "concurrency": w.concurrency,
            "in_flight": w.running,  # live, from the task record
            "processed": int(w.info.get("processed", 0)),
            "tasks": w.info.get("tasks", []),
            "started_at": w.started_at.isoformat(),
            "last_beat": w.beat_at.isoformat(),
        }
        for w in rows
    ]
    return OrjsonResponse({"workers": workers})
