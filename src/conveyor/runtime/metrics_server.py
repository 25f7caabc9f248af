"""MetricsServer: `/metrics` (Prometheus text) and `/healthz` on CONVEYOR_METRICS_PORT, for
processes without the API (`conveyor worker`, `conveyor cron`, a multi-process worker's
supervisor).  [metrics]

Before each scrape it awaits `before_scrape` (the backlog reading, cached by its owner). With
`CONVEYOR_METRICS_KEY` set, `/metrics` needs `Authorization: Bearer <key>`; `/healthz` is open.
It serves on through the process's drain: it stops once `drained` is set (by the composition,
when the process's other services have stopped) or the stop is forced.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conveyor.runtime.http_server import HttpServer
from conveyor.runtime.shutdown import Shutdown

Health = Callable[[], dict[str, object]]


class _Only(Collector):
    """The families of a few collectors of another registry (the supervisor's own backlog
    gauges beside its children's aggregate)."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterable[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def aggregate_registry(directory: Path, own: Iterable[Collector]) -> CollectorRegistry:
    """A registry of the child processes' metrics written to `directory` (prometheus_client's
    multiprocess mode: counters and histograms summed, gauges by their `multiprocess_mode`),
    plus `own` collectors of this process."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(_Only(own))
    return registry


class MetricsServer(HttpServer):
    """Serves `registry` (default: this process's) at `/metrics` and `health()` at `/healthz`.
    """

    name = "metrics"

    def __init__(
        self, *, host: str, port: int, registry: CollectorRegistry = REGISTRY,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
        health: Health | None = None, key: str | None = None,
    ) -> None:
        self.registry = registry
        self.before_scrape = before_scrape
        self.health: Health = health or dict
        self.key = key
        self.drained = asyncio.Event()
        app = Starlette(routes=[Route("/metrics", self._metrics), Route("/healthz", self._healthz)])
        super().__init__(app, host=host, port=port, drain_timeout_s=1.0)

    async def run(self, shutdown: Shutdown) -> None:
        own = Shutdown(drain_timeout_s=1.0)

        async def follow() -> None:
            await shutdown.wait()
            ends = {asyncio.ensure_future(self.drained.wait()),
                    asyncio.ensure_future(shutdown.wait_forced())}
            _, pending = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
            own.begin(shutdown.reason or "stopped")
            if shutdown.forced:
                own.force()

        follower = asyncio.create_task(follow())
        try:
            await super().run(own)
        finally:
            follower.cancel()

    async def _metrics(self, request: Request) -> Response:
        if self.key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            bearer = scheme.lower() == "bearer"  # any case, as the API reads it
            if not (hmac.compare_digest(given.strip().encode(), self.key.encode()) and bearer):
                return JSONResponse(
                    {"type": "about:blank", "title": "Unauthorized", "status": 401,
                     "detail": "send CONVEYOR_METRICS_KEY as Authorization: Bearer <key>"},
                    status_code=401, media_type="application/problem+json",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if self.before_scrape is not None:
            await self.before_scrape()
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.health()})
