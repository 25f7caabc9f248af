"""A webhook receiver for tests: checks signatures, records deliveries, answers with the next
planned status (200 once the plan is used up, 401 for a bad signature)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

from conveyor.tasks.webhook import SIGNATURE_HEADER, TASK_ID_HEADER, TIMESTAMP_HEADER, verify
from conveyor.testing.servers import free_port


@dataclass
class Receiver:
    secret: str
    statuses: list[int] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

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
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def serve_receiver(app: Receiver) -> AsyncIterator[tuple[Receiver, str]]:
    """Serve `app` on a free port of 127.0.0.1; yields it and its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes start-up only as a flag
        await asyncio.sleep(0.01)
    try:
        yield app, f"http://127.0.0.1:{port}/hook"
    finally:
        server.should_exit = True
        await task
