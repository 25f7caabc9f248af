"""Access log and request-duration metrics: one structured line per request, labelled by the
route template (not the raw path, which would make metric labels unbounded)."""

from __future__ import annotations

import time

import structlog
from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor import metrics

log = structlog.get_logger("conveyor.access")
_QUIET = {"/healthz", "/readyz", "/metrics"}


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._timers: dict[tuple[str, str, int], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            elapsed = time.perf_counter() - began
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            key = (scope["method"], template, status)
            timer = self._timers.get(key)
            if timer is None:  # label lookups take a lock: once per route and status
                timer = self._timers[key] = metrics.HTTP_REQUEST_DURATION.labels(
                    key[0], template, str(status))
            timer.observe(elapsed)
            path = scope["path"]
            if path not in _QUIET or status >= 400:
                log.info(
                    "http.request",
                    method=scope["method"],
                    path=path,
                    route=template,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                    client=(scope.get("client") or ("", 0))[0],
                )
