"""HttpServer: uvicorn driven by the shared Shutdown instead of its own signal handlers.
[web server]

When shutdown begins, uvicorn stops accepting connections and waits for open requests (up to
the drain timeout); a forced shutdown closes them at once. The API and the metrics port of
`worker` and `cron` processes both serve through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import structlog
import uvicorn

from conveyor.errors import ConfigError
from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals belong to runtime/signals.py; uvicorn must neither take nor replay them.
        yield


class HttpServer:
    """Serves the ASGI `app` on `host:port` (port 0 picks a free port, see `bound_port`)."""

    name = "http"

    def __init__(self, app: Any, *, host: str, port: int, drain_timeout_s: float) -> None:
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

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.bound_port}"

    def announce(self) -> None:
        """Log that the server listens (once it does)."""
        log.info(f"{self.name}.started", url=self.url)

    def serving(self) -> None:
        """Called once before the server listens (a subclass prepares what requests use)."""

    def draining(self) -> None:
        """Called when shutdown begins, as uvicorn stops accepting (a subclass ends long
        requests here, so that they need not run into the drain deadline)."""

    async def run(self, shutdown: Shutdown) -> None:
        """Serve until shutdown begins and open requests finish (or the drain times out)."""
        sock = self._bind()
        self.serving()

        async def watch() -> None:
            await shutdown.wait()
            self.server.should_exit = True
            self.draining()
            await shutdown.wait_forced()
            self.server.force_exit = True

        async def note_started() -> None:
            # uvicorn exposes start-up only as a flag.
            while not self.server.started:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            self.started.set()
            self.announce()

        watcher = asyncio.create_task(watch())
        announcer = asyncio.create_task(note_started())
        try:
            await self.server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            announcer.cancel()
            sock.close()
        log.info(f"{self.name}.stopped")

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
