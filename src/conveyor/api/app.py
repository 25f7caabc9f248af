"""create_app(state): the FastAPI application — routers, middleware, problem handlers.
[web server, router, middleware]"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.middleware import Middleware

import conveyor
from conveyor import tracing
from conveyor.api import docs, openapi, problems
from conveyor.api.admission import Admission
from conveyor.api.auth import (
    METRICS_PATH,
    Authenticator,
    authenticate,
    forbidden,
    is_loopback,
    is_open,
    require,
)
from conveyor.api.guards import reject_unknown_query
from conveyor.api.middleware.access_log import AccessLogMiddleware
from conveyor.api.middleware.body_limit import BodyLimitMiddleware
from conveyor.api.middleware.methods import MethodsMiddleware
from conveyor.api.middleware.request_id import RequestIdMiddleware
from conveyor.api.routes import events, health, keys, metrics, queues, tasks, workers, workflows
from conveyor.queue.backlog import Backlog
from conveyor.queue.ratelimit import RateLimiter
from conveyor.state import AppState
from conveyor.store.keys import KeyStore
from conveyor.ui import install as install_ui

_PROBES = frozenset({"/healthz", "/readyz", METRICS_PATH})  # no spans: polled all day

DESCRIPTION = """Durable tasks on PostgreSQL and Redis Streams.

Enqueue a task with `POST /v1/tasks`; its `payload` must match the schema of its `type`
(see the request body schemas below) as written: `"5"` or `true` is no integer, and no string
may hold a NUL (`\\u0000`). Errors are `application/problem+json`.
With API keys configured, use **Authorize** to send one; each route says the scope it needs
(401: no valid key, 403: a scope or task type the key lacks, 429: over its rate limit).
"""


def create_app(state: AppState, backlog: Backlog | None = None) -> FastAPI:
    """A new API app over `state`. Middleware, outermost first: request id, access log and
    metrics, body limit, 405s (FastAPI's own error layer, and its spans, stay outermost); API keys,
    scopes and rate limits are route dependencies (api/auth.py). `backlog` is the process's
    reader of the queue gauges, when other services of it share one."""
    settings = state.settings
    registry = state.app.registry
    metrics_key = settings.metrics_key
    app = FastAPI(
        title="Conveyor",
        version=conveyor.__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        telemetry=_telemetry(),
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(AccessLogMiddleware),
            Middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes),
            Middleware(MethodsMiddleware),
        ],
    )
    app.state.conveyor = state
    app.state.authenticator = Authenticator(
        KeyStore(state.pool, settings.database_schema,
                 acquire_timeout_s=settings.pg_acquire_timeout),
        RateLimiter(state.redis, state.keys),
        env_keys=settings.api_keys,
        metrics_keys=[metrics_key.get_secret_value()] if metrics_key else [],
        metrics_open=settings.metrics_open, default_rate=settings.api_rate_limit,
        anonymous_allowed=is_loopback(settings.host) or settings.allow_anonymous,
        cache_s=settings.api_key_cache,
    )
    app.state.admission = Admission(settings.api_max_pending)
    app.state.backlog = backlog or Backlog(
        state.streams, list(registry.types), settings.metrics_cache
    )
    problems.install(app, set(registry.types))
    docs.install(app)
    public = {prefix + route.path for router, prefix, scope in state.app.routers
              if scope is None for route in router.routes if hasattr(route, "path")}
    openapi.install(app, secured=lambda path: not is_open(path) and path not in public and not (
        path == METRICS_PATH and settings.metrics_open),
        stored=lambda path: path.startswith(tasks.PREFIX))
    app.include_router(health.router)
    app.include_router(metrics.router)
    # The key first (401, 429), then the query check; each route adds its scope (403).
    strict = [Depends(authenticate), Depends(reject_unknown_query)]
    app.include_router(tasks.build_router(registry, settings.max_wait), dependencies=strict)
    app.include_router(workers.router, dependencies=strict)
    app.include_router(queues.build_router(registry), dependencies=strict)
    app.include_router(keys.router, dependencies=strict)
    app.include_router(events.build_router(registry), dependencies=strict)
    app.include_router(workflows.build_router(registry), dependencies=strict)
    install_ui(app, state)  # the dashboard at /ui: its own pages, the same keys
    for router, prefix, scope in state.app.routers:  # an application's own
        if scope is None:
            app.include_router(router, prefix=prefix)
            continue
        app.include_router(router, prefix=prefix, dependencies=[Depends(require(scope))],
                           responses=forbidden(scope))
    return app


def _telemetry() -> TelemetryConfig:
    """FastAPI's own OpenTelemetry: while Conveyor's tracing is on, a SERVER span per request
    (named for its route, continuing a caller's `traceparent`; probes and scrapes make none);
    never its metrics or logs, which Conveyor has of its own. Off, it does nothing at all."""
    provider = tracing.current_provider()
    return {
        "tracing": provider is not None, "tracer_provider": provider, "metrics": False,
        "logs": False, "operation_spans": False, "auto_configure": False, "exclude": _probe,
    }


def _probe(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in _PROBES
