"""ApiServer: the API app served by the shared HttpServer (uvicorn under the shared Shutdown).
"""

from __future__ import annotations

import structlog
from fastapi import FastAPI

from conveyor.runtime.http_server import HttpServer
from conveyor.runtime.shutdown import Shutdown
from conveyor.ui import close as close_ui

log = structlog.get_logger("conveyor.api")


class ApiServer(HttpServer):
    """Serves the API `app` on `host:port` (port 0 picks a free port, see `bound_port`)."""

    name = "api"

    def __init__(self, app: FastAPI, *, host: str, port: int, drain_timeout_s: float) -> None:
        super().__init__(app, host=host, port=port, drain_timeout_s=drain_timeout_s)

    async def run(self, shutdown: Shutdown) -> None:
        try:
            await super().run(shutdown)
        finally:
            await close_ui(self.app)  # the dashboard's overview stops following events

    def announce(self) -> None:
        log.info("api.started", url=self.url, docs=f"{self.url}/docs")

    def serving(self) -> None:
        state = getattr(self.app.state, "conveyor", None)
        if state is not None:
            state.client.accept_waiters()

    def draining(self) -> None:
        state = getattr(self.app.state, "conveyor", None)
        if state is not None:  # open waits and event streams answer now
            state.client.release_waiters()
