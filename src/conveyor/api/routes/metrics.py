"""`/metrics`: Prometheus text exposition of this process's metrics, plus the backlog gauges
per task type (queue depth, lag, oldest age), read from Redis at scrape time."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from conveyor.api.auth import forbidden, metrics_access
from conveyor.api.direct import DirectRoute
from conveyor.queue.backlog import Backlog
from conveyor.store.keys import READ

router = APIRouter(route_class=DirectRoute, tags=["health"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            dependencies=[Depends(metrics_access)], responses=forbidden(READ))
async def metrics(request: Request) -> Response:
    backlog: Backlog = request.app.state.backlog
    await backlog.refresh()
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
