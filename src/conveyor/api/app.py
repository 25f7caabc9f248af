"""create_app(state): the FastAPI application — routers, middleware, problem handlers.
[web server, router, middleware]"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware import Middleware

import conveyor
from conveyor.api import problems
from conveyor.api.admission import Admission
from conveyor.api.middleware.access_log import AccessLogMiddleware
from conveyor.api.middleware.auth import ApiKeyMiddleware
from conveyor.api.middleware.body_limit import BodyLimitMiddleware
from conveyor.api.middleware.request_id import RequestIdMiddleware
from conveyor.api.routes import health, metrics, queues, tasks, workers
from conveyor.state import AppState

DESCRIPTION = """Durable tasks on PostgreSQL and Redis Streams.

Enqueue a task with `POST /v1/tasks`; its `payload` must match the schema of its `type`
(see the request body schemas below). Errors are `application/problem+json`.
"""


def create_app(state: AppState) -> FastAPI:
    """A new API app over `state`. Middleware, outermost first: request id, access log and
    metrics, body limit, API keys (FastAPI's own error layer stays outermost)."""
    settings = state.settings
    registry = state.app.registry
    app = FastAPI(
        title="Conveyor",
        version=conveyor.__version__,
        description=DESCRIPTION,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(AccessLogMiddleware),
            Middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes),
            Middleware(ApiKeyMiddleware, keys=settings.api_keys),
        ],
    )
    app.state.conveyor = state
    app.state.admission = Admission(settings.api_max_pending)
    problems.install(app, set(registry.types))
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(tasks.build_router(registry))
    app.include_router(workers.router)
    app.include_router(queues.router)
    for router, prefix in state.app.routers:
        app.include_router(router, prefix=prefix)
    return app
