"""ApiServer: uvicorn driven by the shared Shutdown instead of its own signal handlers.

When shutdown begins, uvicorn stops accepting connections and waits for open requests (up to
the drain timeout); a forced shutdown closes them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator

import structlog
import uvicorn
from fastapi import FastAPI

from conveyor.errors import ConfigError
from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.api")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals belong to runtime/signals.py; uvicorn must neither take nor replay them.
        yield


class ApiServer:
    """Serves `app` on `host:port` (port 0 picks a free port, see `bound_port`)."""

    name = "api"

    def __init__(self, app: FastAPI, *, host: str, port: int, drain_timeout_s: float) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_config=None,
            http="httptools",
            loop="none",
            timeout_graceful_shutdown=max(1, round(drain_timeout_s)),
            server_header=False,
        )
        self.server = _Server(self.config)
        self.started = asyncio.Event()

    @property
    def bound_port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.port

    async def run(self, shutdown: Shutdown) -> None:
        """Serve until shutdown begins and open requests finish (or the drain times out)."""
        sock = self._bind()
        state = getattr(self.app.state, "conveyor", None)
        if state is not None:
            state.client.accept_waiters()

        async def watch() -> None:
            await shutdown.wait()
            self.server.should_exit = True
            if state is not None:  # open waits and event streams answer now
                state.client.release_waiters()
            await shutdown.wait_forced()
            self.server.force_exit = True

        async def note_started() -> None:
            # uvicorn exposes start-up only as a flag.
            while not self.server.started:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            self.started.set()
            log.info("api.started", url=f"http://{self.host}:{self.bound_port}",
                     docs=f"http://{self.host}:{self.bound_port}/docs")

        watcher = asyncio.create_task(watch())
        announcer = asyncio.create_task(note_started())
        try:
            await self.server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            announcer.cancel()
            sock.close()
        log.info("api.stopped")

    def _bind(self) -> socket.socket:
        """Bind here, so a taken port is one readable error rather than uvicorn's exit()."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        sock.set_inheritable(True)
        return sock
