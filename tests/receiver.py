"""A webhook receiver for tests: checks signatures, records deliveries, answers with the next
planned status (200 once the plan is used up, 401 for a bad signature); and `Answer`, a server
that answers every request alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.tasks.webhook import SIGNATURE_HEADER, TASK_ID_HEADER, TIMESTAMP_HEADER, verify
from conveyor.testing.servers import free_port

A = TypeVar("A", bound=ASGIApp)


@dataclass
class Receiver:
    secret: str
    statuses: list[int] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    location: str | None = None  # sent with a 3xx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        valid = verify(self.secret.encode(), headers.get(TIMESTAMP_HEADER.lower(), ""), body,
                       headers.get(SIGNATURE_HEADER.lower(), ""))
        self.received.append({"body": json.loads(body), "valid": valid,
                              "task_id": headers.get(TASK_ID_HEADER.lower())})
        status = self.statuses.pop(0) if self.statuses else 200
        if not valid:
            status = 401
        sent = [(b"location", self.location.encode())] if self.location else []
        await send({"type": "http.response.start", "status": status, "headers": sent})
        await send({"type": "http.response.body", "body": b"ok"})


@dataclass
class Answer:
    """Records each request's Host header; answers `status`, `headers` and `size` bytes."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    size: int = 2
    hosts: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        self.hosts.append(dict(scope["headers"]).get(b"host", b"").decode())
        await send({"type": "http.response.start", "status": self.status,
                    "headers": self.headers})
        chunk = b"x" * 16384
        left = self.size
        while left > 0:
            await send({"type": "http.response.body", "body": chunk[:left],
                        "more_body": left > len(chunk)})
            left -= len(chunk)
        if self.size == 0:
            await send({"type": "http.response.body", "body": b""})


@contextlib.asynccontextmanager
async def serve_receiver(
    app: A, host: str = "127.0.0.1", port: int | None = None, *,
    tls: tuple[str, str] | None = None,
) -> AsyncIterator[tuple[A, str]]:
    """Serve `app` on `host` (a loopback address), on `port` or a free one, over TLS with
    `tls` (certificate file, key file); yields it and its URL."""
    port = port or free_port()
    certfile, keyfile = tls or (None, None)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None,
                                           lifespan="off", ssl_certfile=certfile,
                                           ssl_keyfile=keyfile))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes start-up only as a flag
        await asyncio.sleep(0.01)
    try:
        yield app, f"{'https' if tls else 'http'}://{host}:{port}/hook"
    finally:
        server.should_exit = True
        await task
