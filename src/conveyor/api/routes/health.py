"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: Postgres and Redis
answer within a second)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from conveyor.api.deps import StateDep
from conveyor.api.direct import DirectRoute
from conveyor.api.responses import OrjsonResponse, problem

router = APIRouter(route_class=DirectRoute, tags=["health"])
CHECK_TIMEOUT_S = 1.0


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check(probe: Any) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await probe
    except Exception as exc:
        return f"down: {type(exc).__name__}: {exc}"[:300]
    return "ok"


@router.get(
    "/readyz",
    summary="Postgres and Redis answer",
    responses={503: {"description": "a backing service is down"}},
)
async def readyz(state: StateDep) -> Response:
    postgres, redis = await asyncio.gather(
        _check(state.pool.fetchval("SELECT 1")), _check(state.redis.ping())
    )
    checks = {"postgres": postgres, "redis": redis}
    if postgres == "ok" and redis == "ok":
        return OrjsonResponse({"status": "ready", "checks": checks})
    down = ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
    return problem(503, "Not ready", down, checks=checks, headers={"Retry-After": "2"})
