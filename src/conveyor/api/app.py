"""create_app(state): the FastAPI application — routers, middleware, problem handlers.
[web server, router, middleware]"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from starlette.middleware import Middleware

import conveyor
from conveyor.api import docs, openapi, problems
from conveyor.api.admission import Admission
from conveyor.api.guards import reject_unknown_query
from conveyor.api.middleware.access_log import AccessLogMiddleware
from conveyor.api.middleware.auth import METRICS_PATH, ApiKeyMiddleware, is_open
from conveyor.api.middleware.body_limit import BodyLimitMiddleware
from conveyor.api.middleware.request_id import RequestIdMiddleware
from conveyor.api.routes import events, health, metrics, queues, tasks, workers
from conveyor.state import AppState

DESCRIPTION = """Durable tasks on PostgreSQL and Redis Streams.

Enqueue a task with `POST /v1/tasks`; its `payload` must match the schema of its `type`
(see the request body schemas below). Errors are `application/problem+json`.
With `CONVEYOR_API_KEYS` set, use **Authorize** to send a key.
"""


def create_app(state: AppState) -> FastAPI:
    """A new API app over `state`. Middleware, outermost first: request id, access log and
    metrics, body limit, API keys (FastAPI's own error layer stays outermost)."""
    settings = state.settings
    registry = state.app.registry
    metrics_key = settings.metrics_key
    app = FastAPI(
        title="Conveyor",
        version=conveyor.__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(AccessLogMiddleware),
            Middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes),
            Middleware(
                ApiKeyMiddleware, keys=settings.api_keys,
                metrics_keys=[metrics_key.get_secret_value()] if metrics_key else [],
                metrics_open=settings.metrics_open,
            ),
        ],
    )
    app.state.conveyor = state
    app.state.admission = Admission(settings.api_max_pending)
    app.state.queue_depth = metrics.QueueDepth(
        state.streams, list(registry.types), settings.metrics_cache
    )
    problems.install(app, set(registry.types))
    docs.install(app)
    openapi.install(app, secured=lambda path: not is_open(path) and not (
        path == METRICS_PATH and settings.metrics_open))
    app.include_router(health.router)
    app.include_router(metrics.router)
    strict = [Depends(reject_unknown_query)]
    app.include_router(tasks.build_router(registry), dependencies=strict)
    app.include_router(workers.router, dependencies=strict)
    app.include_router(queues.router, dependencies=strict)
    app.include_router(events.router, dependencies=strict)
    for router, prefix in state.app.routers:
        app.include_router(router, prefix=prefix)
    return app
