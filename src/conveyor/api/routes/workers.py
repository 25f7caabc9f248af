"""`/v1/workers`: live workers, read from their heartbeat records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from conveyor.api.deps import StateDep
from conveyor.api.models import WorkersOut
from conveyor.api.responses import OrjsonResponse
from conveyor.queue.connection import translate

router = APIRouter(prefix="/v1/workers", tags=["operations"])


def _when(seconds: Any) -> str:
    return datetime.fromtimestamp(float(seconds), UTC).isoformat()


@router.get("", response_model=WorkersOut, summary="Workers whose heartbeat is alive")
async def list_workers(state: StateDep) -> Response:
    keys = state.keys
    with translate("workers.list"):
        raw_members: Any = await state.redis.smembers(keys.workers)
        members = sorted(m.decode() for m in raw_members)
        async with state.redis.pipeline(transaction=False) as pipe:
            for worker_id in members:
                pipe.get(keys.worker(worker_id))
            records = await pipe.execute() if members else []
        gone = [w for w, r in zip(members, records, strict=True) if r is None]
        if gone:
            await state.redis.srem(keys.workers, *gone)
    workers = []
    for raw in records:
        if raw is None:
            continue
        record = orjson.loads(raw)
        record["started_at"] = _when(record["started_at"])
        record["last_beat"] = _when(record["last_beat"])
        workers.append(record)
    return OrjsonResponse({"workers": workers})
