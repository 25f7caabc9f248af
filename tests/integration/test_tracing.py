"""Tracing on real servers, spans caught by the OTel SDK's in-memory exporter: the worker's
attempt span is a child of the enqueue span, itself a child of the HTTP request's span (which
continues the caller's `traceparent`); retries share the trace; a task the relay republished
keeps its context; a task enqueued by a handler, or by blocking code through a SyncProducer,
continues the trace it was enqueued in; tracing off, nothing is made or stored."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conveyor import http as conveyor_http
from conveyor import tracing
from conveyor.api.app import create_app
from conveyor.application import Conveyor
from conveyor.client import TaskRequest
from conveyor.cron.relay import Relay
from conveyor.producer import SyncProducer
from conveyor.state import AppState
from conveyor.worker.worker import Worker
from tests.apps import traced
from tests.conftest import eventually, judge

pytestmark = pytest.mark.slow

StartWorker = Callable[..., Awaitable[Worker]]
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@pytest.fixture
def app() -> Conveyor:
    return traced.app


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    yield provider
    provider.shutdown()


@pytest.fixture
def spans(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    """Tracing on, every span kept in memory."""
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    yield exporter
    tracing.disable()


def http(state: AppState) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)),
                             base_url="http://t")


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


def runs(spans: InMemorySpanExporter, task_id: str) -> list[ReadableSpan]:
    """The attempt spans of a task, in attempt order."""
    found = [s for s in spans.get_finished_spans()
             if s.name.startswith("run ") and attr(s, "conveyor.task.id") == task_id]
    return sorted(found, key=lambda s: int(attr(s, "conveyor.task.attempt")))


async def attempts(spans: InMemorySpanExporter, task_id: str, n: int) -> list[ReadableSpan]:
    async def ended() -> bool:
        return len(runs(spans, task_id)) >= n
    await eventually(ended)
    return runs(spans, task_id)


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, [s.name for s in spans]
    return named[0]


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return int(span.parent.span_id)


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


async def test_the_attempt_span_is_a_child_of_the_request_that_enqueued_it(
    state: AppState, start_worker: StartWorker, spans: InMemorySpanExporter
) -> None:
    await start_worker()
    async with http(state) as client:
        reply = await client.post(
            "/v1/tasks", json={"type": "echo", "payload": {"value": 1}},
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        )
    assert reply.status_code == 202, reply.text
    task_id = reply.json()["id"]
    [run] = await attempts(spans, task_id, 1)
    finished = spans.get_finished_spans()
    server = one(finished, "POST /v1/tasks")
    enqueue = one(finished, "enqueue echo")
    assert [server.kind, enqueue.kind, run.kind] == [
        SpanKind.SERVER, SpanKind.PRODUCER, SpanKind.CONSUMER]
    assert parent_of(server) == int(CALLER_SPAN, 16)
    assert parent_of(enqueue) == span_id(server)
    assert parent_of(run) == span_id(enqueue)
    assert {trace_id(s) for s in (server, enqueue, run)} == {int(CALLER_TRACE, 16)}
    assert attr(server, "http.route") == "/v1/tasks"
    assert attr(enqueue, "conveyor.task.id") == task_id
    assert attr(run, "conveyor.task.type") == "echo"
    assert attr(run, "conveyor.task.attempt") == 1
    assert attr(run, "conveyor.task.outcome") == "succeeded"
    assert run.status.status_code == StatusCode.UNSET


async def test_retries_share_the_trace_and_failures_are_errors(
    state: AppState, start_worker: StartWorker, spans: InMemorySpanExporter,
    provider: TracerProvider,
) -> None:
    await start_worker()
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        inserted = await state.client.enqueue("flaky", {"failures": 2})
    task_id = str(inserted.record.id)
    first, second, third = await attempts(spans, task_id, 3)
    enqueue = one(spans.get_finished_spans(), "enqueue flaky")
    assert parent_of(enqueue) == caller.get_span_context().span_id
    for run in (first, second, third):
        assert parent_of(run) == span_id(enqueue)
        assert trace_id(run) == caller.get_span_context().trace_id
    outcomes = [attr(r, "conveyor.task.outcome") for r in (first, second, third)]
    assert outcomes == ["retry", "retry", "succeeded"]
    assert first.status.status_code == StatusCode.ERROR
    assert first.status.description == "RuntimeError: planned failure 1"
    assert [e.name for e in first.events] == ["exception"]
    assert third.status.status_code == StatusCode.UNSET


async def test_a_task_the_relay_republished_keeps_its_context(
    state: AppState, start_worker: StartWorker, spans: InMemorySpanExporter,
    provider: TracerProvider,
) -> None:
    # A crash between commit and XADD: the row is committed, nothing is published.
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        new = state.client.prepare(TaskRequest("echo", {"value": "lost"}))
    await state.store.insert([new])
    relay = Relay(state.redis, state.keys, state.streams, state.store, ["echo"],
                  liveness=judge(state), interval_s=0.2, grace_s=0.0,
                  ttl_s=state.settings.heartbeat_ttl)
    assert await relay.relay_overdue("echo") == 1
    await start_worker()
    [run] = await attempts(spans, str(new.id), 1)
    assert parent_of(run) == caller.get_span_context().span_id
    assert trace_id(run) == caller.get_span_context().trace_id


@pytest.mark.parametrize("parent_type", ["parent", "parent_thread"])
async def test_a_task_enqueued_by_a_handler_continues_its_trace(
    state: AppState, start_worker: StartWorker, spans: InMemorySpanExporter, parent_type: str
) -> None:
    await start_worker()
    async with http(state) as client:
        reply = await client.post("/v1/tasks", json={"type": parent_type, "payload": {}})
    assert reply.status_code == 202, reply.text
    [parent_run] = await attempts(spans, reply.json()["id"], 1)
    assert attr(parent_run, "conveyor.task.outcome") == "succeeded"
    parent_id = uuid.UUID(reply.json()["id"])

    async def recorded() -> bool:
        return (await state.client.get(parent_id)).status == "succeeded"
    await eventually(recorded)
    child_id = (await state.client.get(parent_id)).result
    [child_run] = await attempts(spans, child_id, 1)
    child_enqueue = one(spans.get_finished_spans(), "enqueue echo")
    assert parent_of(child_enqueue) == span_id(parent_run)
    assert parent_of(child_run) == span_id(child_enqueue)
    assert trace_id(child_run) == trace_id(parent_run)


async def test_a_sync_producer_enqueue_continues_the_callers_trace(
    state: AppState, start_worker: StartWorker, spans: InMemorySpanExporter,
    provider: TracerProvider,
) -> None:
    """Blocking code (a Django view, say) enqueues through a SyncProducer, whose connections
    live on a loop of their own in another thread: the caller's span still parents it."""
    await start_worker()
    producer = SyncProducer(traced.app, state.settings)
    try:
        with provider.get_tracer("test").start_as_current_span("view") as view:
            record = await asyncio.to_thread(producer.enqueue, "echo", {"value": "sync"})
    finally:
        await asyncio.to_thread(producer.close)
    [run] = await attempts(spans, str(record.id), 1)
    enqueue = one(spans.get_finished_spans(), "enqueue echo")
    assert parent_of(enqueue) == view.get_span_context().span_id
    assert parent_of(run) == span_id(enqueue)


async def test_the_api_client_carries_the_callers_trace_to_the_api(
    state: AppState, start_worker: StartWorker, spans: InMemorySpanExporter,
    provider: TracerProvider,
) -> None:
    await start_worker()
    transport = httpx.ASGITransport(app=create_app(state))
    async with conveyor_http.AsyncClient("http://t", transport=transport) as api:
        with provider.get_tracer("test").start_as_current_span("caller") as caller:
            task = await api.enqueue("echo", {"value": "over http"})
    [run] = await attempts(spans, str(task.id), 1)
    server = one(spans.get_finished_spans(), "POST /v1/tasks")
    assert parent_of(server) == caller.get_span_context().span_id
    assert trace_id(run) == caller.get_span_context().trace_id


async def test_a_transactional_enqueue_stores_its_spans_context(
    state: AppState, spans: InMemorySpanExporter, provider: TracerProvider
) -> None:
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        async with state.pool.acquire() as conn, conn.transaction():
            record = await traced.app.enqueue(conn, "echo", {"value": "in a transaction"})
    enqueue = one(spans.get_finished_spans(), "enqueue echo")
    assert parent_of(enqueue) == caller.get_span_context().span_id
    stored = await state.pool.fetchval(
        f"SELECT trace_context FROM {state.settings.database_schema}.tasks WHERE id = $1",
        record.id)
    assert list(stored) == ["traceparent"]
    version, trace, parent, _flags = stored["traceparent"].split("-")
    assert (version, trace, parent) == ("00", f"{trace_id(enqueue):032x}",
                                        f"{span_id(enqueue):016x}")


async def test_with_tracing_off_no_span_is_made_and_no_context_stored(
    state: AppState, start_worker: StartWorker, provider: TracerProvider
) -> None:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert not tracing.enabled()
    await start_worker()
    with provider.get_tracer("test").start_as_current_span("caller"):
        async with http(state) as client:
            reply = await client.post("/v1/tasks", json={"type": "echo", "payload": {}})
    task_id = uuid.UUID(reply.json()["id"])

    async def done() -> bool:
        return (await state.client.get(task_id)).status == "succeeded"
    await eventually(done)
    assert [s.name for s in exporter.get_finished_spans()] == ["caller"]
    stored = await state.pool.fetchval(
        f"SELECT trace_context FROM {state.settings.database_schema}.tasks WHERE id = $1",
        task_id)
    assert stored is None
