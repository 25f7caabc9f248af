from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from conveyor.api.app import create_app
from conveyor.state import AppState
from conveyor.worker.worker import Worker
from tests.conftest import eventually


async def test_echo_task_runs(state: AppState, start_worker: Callable[..., Awaitable[Worker]]
                              ) -> None:
    await start_worker()
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        created = await http.post("/v1/tasks", json={"type": "echo", "payload": {"value": 42}})
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]

        async def done() -> bool:
            body = (await http.get(f"/v1/tasks/{task_id}")).json()
            return bool(body["status"] == "succeeded")

        await eventually(done)
        body = (await http.get(f"/v1/tasks/{task_id}")).json()
        assert body["result"] == {"echo": 42, "attempt": 1}
        assert body["attempts"] == 1
