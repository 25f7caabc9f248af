"""`conveyor.http` against the real API served by uvicorn on a free port: every method and every
mapped error, blocking and async."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from conveyor import http
from conveyor.api.app import create_app
from conveyor.api.server import ApiServer
from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from tests.apps.basic import Echo
from tests.conftest import eventually

KEY = "test-key-1"


class Served:
    def __init__(self, url: str, state: AppState) -> None:
        self.url = url
        self.state = state


@pytest.fixture
async def served(settings: Settings, app: Conveyor) -> AsyncIterator[Served]:
    """The API on uvicorn, with a key, one enqueue at a time, and a small body limit."""
    tight = settings.model_copy(
        update={"api_keys": [KEY], "api_max_pending": 1, "max_body_bytes": 4096}
    )
    async with open_state(tight, app) as state:
        server = ApiServer(create_app(state), host="127.0.0.1", port=0, drain_timeout_s=2)
        shutdown = Shutdown(2.0)
        running = asyncio.create_task(server.run(shutdown))
        await asyncio.wait_for(server.started.wait(), 10)
        yield Served(f"http://127.0.0.1:{server.bound_port}", state)
        shutdown.begin("test over")
        await asyncio.wait_for(running, 10)
        await state.pool.execute(f"DROP SCHEMA {tight.database_schema} CASCADE")


class Seen:
    """Statuses of the responses a client received, in order."""

    def __init__(self) -> None:
        self.statuses: list[int] = []


class CountingTransport(httpx.HTTPTransport):
    def __init__(self, seen: Seen) -> None:
        super().__init__()
        self.seen = seen

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.statuses.append(response.status_code)
        return response


class AsyncCountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self, seen: Seen) -> None:
        super().__init__()
        self.seen = seen

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.seen.statuses.append(response.status_code)
        return response


@contextlib.asynccontextmanager
async def stalled(served: Served) -> AsyncIterator[None]:
    """Every insert waits on a table lock, and one request holding the API's only enqueue slot
    waits with it: the next enqueue gets 503. Leaving releases both."""
    settings = served.state.settings
    assert settings.database_url
    conn: asyncpg.Connection[Any] = await asyncpg.connect(settings.database_url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute(f"LOCK TABLE {served.state.store.table} IN ACCESS EXCLUSIVE MODE")
    async with http.AsyncClient(served.url, api_key=KEY) as holder:
        blocked = asyncio.create_task(holder.enqueue("echo", {"value": "holder"}))

        async def waiting() -> bool:
            count = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted")
            return bool(count)

        try:
            await eventually(waiting)
            yield
        finally:
            await tx.rollback()
            await conn.close()
            assert (await blocked).status == "queued"


def assert_problem_basics(error: http.ApiError, status: int) -> None:
    assert error.status == status
    assert error.title
    assert error.detail
    assert error.request_id


async def test_async_client_covers_every_method(served: Served) -> None:
    async with http.AsyncClient(served.url, api_key=KEY) as conveyor:
        task = await conveyor.enqueue("echo", Echo(value="hi"), idempotency_key="k-1",
                                      max_attempts=4)
        assert isinstance(task, http.Task)
        assert (task.status, task.payload, task.max_attempts) == ("queued", {"value": "hi"}, 4)
        assert (await conveyor.enqueue("echo", {"value": "hi"}, idempotency_key="k-1")).id \
            == task.id
        delayed = await conveyor.enqueue("echo", {"value": 2}, delay_s=60)
        assert delayed.run_at - delayed.created_at >= timedelta(seconds=59)
        batch = await conveyor.enqueue_many([
            http.TaskSpec("flaky", {"failures": 0}),
            http.TaskSpec("echo", Echo(value="hi"), idempotency_key="k-1"),
        ])
        assert batch.created == 1
        assert batch.tasks[1].id == task.id
        with pytest.raises(http.Conflict, match="k-1"):  # the key, with another payload
            await conveyor.enqueue("echo", {"value": "other"}, idempotency_key="k-1")
        got = await conveyor.get(task.id)
        assert got == task

        page = await conveyor.list_tasks(type_="echo", limit=2)
        assert [t.id for t in page.tasks] == [delayed.id, task.id]
        assert page.next_cursor is not None
        rest = await conveyor.list_tasks(type_="echo", limit=2, cursor=page.next_cursor)
        assert rest.tasks == []
        assert [t.type for t in (await conveyor.list_tasks(type_="flaky")).tasks] == ["flaky"]
        assert [t.id async for t in conveyor.iter_tasks(page_size=1)] == [
            batch.tasks[0].id, delayed.id, task.id]

        cancelled = await conveyor.cancel(delayed.id)
        assert cancelled.status == "cancelled"
        assert [t.id for t in (await conveyor.list_tasks(status="cancelled")).tasks] == [
            delayed.id]
        again = await conveyor.retry(delayed.id)
        assert again.status == "queued"


async def test_async_client_maps_every_error(served: Served) -> None:
    async with http.AsyncClient(served.url, api_key=KEY) as conveyor:
        with pytest.raises(http.TaskNotFound) as not_found:
            await conveyor.get(uuid.uuid4())
        assert_problem_basics(not_found.value, 404)

        task = await conveyor.enqueue("echo", {})
        await conveyor.cancel(task.id)
        with pytest.raises(http.InvalidTransition) as conflict:
            await conveyor.cancel(task.id)
        assert_problem_basics(conflict.value, 409)
        assert conflict.value.status_now == "cancelled"
        assert isinstance(conflict.value, http.Conflict)

        with pytest.raises(http.PayloadInvalid) as invalid:
            await conveyor.enqueue("flaky", {"failures": "x"})
        assert_problem_basics(invalid.value, 422)
        assert [e.path for e in invalid.value.errors] == ["payload.failures"]
        with pytest.raises(http.UnknownTaskType, match="nope"):
            await conveyor.enqueue("nope", {})
        with pytest.raises(http.InvalidRequest) as bad_id:
            await conveyor.get("not-a-uuid")
        assert not isinstance(bad_id.value, http.PayloadInvalid)
        assert bad_id.value.errors[0].path == "path.task_id"
        with pytest.raises(http.TooLarge):
            await conveyor.enqueue("echo", {"value": "x" * 5000})

    for key in ("wrong", None):
        async with http.AsyncClient(served.url, api_key=key) as stranger:
            with pytest.raises(http.Unauthorized) as unauthorized:
                await stranger.list_tasks()
            assert_problem_basics(unauthorized.value, 401)


async def test_async_client_maps_503_and_retries_it_within_bounds(served: Served) -> None:
    bounded, patient = Seen(), Seen()
    async with (
        http.AsyncClient(served.url, api_key=KEY) as once,
        http.AsyncClient(served.url, api_key=KEY, retries=2, max_retry_wait_s=0.05,
                         transport=AsyncCountingTransport(bounded)) as twice,
        http.AsyncClient(served.url, api_key=KEY, retries=100, max_retry_wait_s=0.05,
                         transport=AsyncCountingTransport(patient)) as retrying,
    ):
        async with stalled(served):
            with pytest.raises(http.Unavailable) as unavailable:
                await once.enqueue("echo", {})
            assert_problem_basics(unavailable.value, 503)
            assert unavailable.value.retry_after_s == 1.0
            with pytest.raises(http.Unavailable):
                await twice.enqueue("echo", {})
            assert bounded.statuses == [503, 503, 503]  # the first answer and two retries
            later = asyncio.create_task(retrying.enqueue("echo", {"value": "later"}))

            async def refused() -> bool:
                return 503 in patient.statuses

            await eventually(refused)
        task = await later
        assert task.payload == {"value": "later"}
        assert patient.statuses[-1] == 202
        assert set(patient.statuses[:-1]) == {503}


def blocking_scenario(url: str) -> None:
    """The blocking client, every method and error (run in a thread: the server is on the
    test's loop)."""
    with http.Client(url, api_key=KEY) as conveyor:
        task = conveyor.enqueue("echo", Echo(value="hi"), idempotency_key="k-1", max_attempts=4)
        assert (task.status, task.max_attempts) == ("queued", 4)
        assert conveyor.enqueue("echo", {"value": "hi"}, idempotency_key="k-1").id == task.id
        delayed = conveyor.enqueue("echo", {"value": 2}, delay_s=60)
        assert delayed.run_at - delayed.created_at >= timedelta(seconds=59)
        batch = conveyor.enqueue_many([http.TaskSpec("flaky", {"failures": 0})])
        assert batch.created == 1
        assert conveyor.get(task.id) == task
        page = conveyor.list_tasks(type_="echo", limit=1)
        assert [t.id for t in page.tasks] == [delayed.id]
        assert page.next_cursor is not None
        second = conveyor.list_tasks(type_="echo", limit=1, cursor=page.next_cursor)
        assert [t.id for t in second.tasks] == [task.id]
        assert [t.id for t in conveyor.iter_tasks(page_size=2)] == [
            batch.tasks[0].id, delayed.id, task.id]
        assert conveyor.list_tasks(status="running").tasks == []
        assert conveyor.cancel(delayed.id).status == "cancelled"
        assert conveyor.retry(delayed.id).status == "queued"

        with pytest.raises(http.TaskNotFound):
            conveyor.get(uuid.uuid4())
        with pytest.raises(http.InvalidTransition) as conflict:
            conveyor.retry(task.id)
        assert conflict.value.status_now == "queued"
        with pytest.raises(http.PayloadInvalid) as invalid:
            conveyor.enqueue("flaky", {"failures": "x"})
        assert [e.path for e in invalid.value.errors] == ["payload.failures"]
        with pytest.raises(http.UnknownTaskType):
            conveyor.enqueue("nope", {})
        with pytest.raises(http.InvalidRequest):
            conveyor.get("not-a-uuid")
        with pytest.raises(http.TooLarge):
            conveyor.enqueue("echo", {"value": "x" * 5000})
    with http.Client(url, api_key="wrong") as stranger, pytest.raises(http.Unauthorized):
        stranger.get(task.id)


async def test_blocking_client_covers_every_method_and_error(served: Served) -> None:
    await asyncio.to_thread(blocking_scenario, served.url)


async def test_blocking_client_maps_503_and_retries_it_within_bounds(served: Served) -> None:
    bounded, patient = Seen(), Seen()
    with (
        http.Client(served.url, api_key=KEY) as once,
        http.Client(served.url, api_key=KEY, retries=1, max_retry_wait_s=0.05,
                    transport=CountingTransport(bounded)) as twice,
        http.Client(served.url, api_key=KEY, retries=100, max_retry_wait_s=0.05,
                    transport=CountingTransport(patient)) as retrying,
    ):
        async with stalled(served):
            with pytest.raises(http.Unavailable) as unavailable:
                await asyncio.to_thread(once.enqueue, "echo", {})
            assert unavailable.value.retry_after_s == 1.0
            with pytest.raises(http.Unavailable):
                await asyncio.to_thread(twice.enqueue, "echo", {})
            assert bounded.statuses == [503, 503]
            later = asyncio.create_task(asyncio.to_thread(retrying.enqueue, "echo", {}))

            async def refused() -> bool:
                return 503 in patient.statuses

            await eventually(refused)
        assert (await later).status == "queued"
        assert patient.statuses[-1] == 202
