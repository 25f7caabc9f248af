"""The dashboard's pages (GET): overview, tasks, a task, dead letters, workers, cron, queues,
and the fragments their live parts reload. Each page reads at most one page of rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from starlette.responses import RedirectResponse, Response

from conveyor.errors import TaskNotFound
from conveyor.limits import in_force
from conveyor.registry import TaskType
from conveyor.state import AppState
from conveyor.store.dashboard import (
    ACTION_FROM,
    ACTIONS,
    Count,
    Dashboard,
    Minute,
    TaskFilter,
)
from conveyor.store.tasks import FINISHED, QueueCounts, TaskRecord
from conveyor.ui import filters
from conveyor.ui.render import failure_svg, page, pretty, throughput_svg
from conveyor.ui.session import PREFIX, Viewer, viewer
from conveyor.ui.throughput import Throughput

ViewerDep = Annotated[Viewer, Depends(viewer)]
T = TypeVar("T")
_PARALLEL = 4  # per-type reads at once (the pool serves the API too)


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.conveyor
    return state


def dashboard_of(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.ui_dashboard
    return dashboard


async def each(items: list[str], read: Callable[[str], Awaitable[T]]) -> list[T]:
    """`read` of every item, a few at a time, in order."""
    gate = asyncio.Semaphore(_PARALLEL)

    async def one(item: str) -> T:
        async with gate:
            return await read(item)

    return list(await asyncio.gather(*(one(i) for i in items)))


@dataclass(frozen=True, slots=True)
class TypeRow:
    """One line of the overview."""

    name: str
    counts: QueueCounts
    minutes: list[Minute]
    latency: list[float]
    now: datetime

    @property
    def succeeded_hour(self) -> int:
        return sum(m.succeeded for m in self.minutes)

    @property
    def dead_hour(self) -> int:
        return sum(m.dead for m in self.minutes)

    @property
    def failure_rate(self) -> float | None:
        done = self.succeeded_hour + self.dead_hour
        return self.dead_hour / done if done else None

    @property
    def oldest_age_s(self) -> float | None:
        due = self.counts.oldest_due
        return max(0.0, (self.now - due).total_seconds()) if due else None

    def percentile(self, p: float) -> float | None:
        if not self.latency:
            return None
        return self.latency[min(len(self.latency) - 1, int(p * len(self.latency)))]

    @property
    def throughput(self) -> Any:
        return throughput_svg(self.minutes, self.now)

    @property
    def failures(self) -> Any:
        return failure_svg(self.minutes, self.now)


def _throughput(request: Request) -> Throughput:
    throughput: Throughput = request.app.state.ui_throughput
    return throughput


async def overview_rows(request: Request) -> list[TypeRow]:
    state, dashboard = state_of(request), dashboard_of(request)
    now = datetime.now(UTC)

    throughput = _throughput(request)
    await throughput.ensure()

    async def row(name: str) -> TypeRow:
        counts = await state.store.counts(name)
        latency = await dashboard.latency(name)
        return TypeRow(name, counts, throughput.rows(name, now), latency, now)

    return await each(list(state.app.registry.types), row)


def safe_back(target: str | None) -> str:
    """`target` when it is a dashboard path (never elsewhere), else the task list."""
    path = target or ""
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or not (path == PREFIX or path.startswith(PREFIX + "/")):
        return f"{PREFIX}/tasks"
    return path


def task_types(request: Request) -> list[str]:
    return list(state_of(request).app.registry.types)


router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("")
async def overview(request: Request, view: ViewerDep) -> Response:
    rows = await overview_rows(request)
    return page(request, view, "overview.html", active="overview", rows=rows,
                filled=_throughput(request).filled)


@router.get("/overview/body")
async def overview_body(request: Request, view: ViewerDep) -> Response:
    rows = await overview_rows(request)
    return page(request, view, "overview_body.html", rows=rows,
                filled=_throughput(request).filled)


@router.get("/tasks")
async def tasks(request: Request, view: ViewerDep) -> Response:
    state, dashboard = state_of(request), dashboard_of(request)
    types = task_types(request)
    parsed = filters.parse(request.query_params, state.app.registry.types)
    if parsed.task_id is not None and not parsed.errors:
        return RedirectResponse(f"{PREFIX}/tasks/{parsed.task_id}", status_code=303)
    cursor = None
    raw_cursor = request.query_params.get("cursor")
    if raw_cursor:
        try:
            cursor = uuid.UUID(raw_cursor)
        except ValueError:
            parsed.errors.append(f"cursor: {raw_cursor!r} is not a task id")
    found = None
    if not parsed.errors:
        found = await dashboard.page(types, parsed.filter, before=cursor,
                                     limit=state.settings.ui_page_size,
                                     scan=state.settings.ui_search_scan)
    return page(request, view, "tasks.html", 422 if parsed.errors else 200,
                active="tasks", parsed=parsed, found=found, types=types,
                statuses=filters.STATUSES, cursor=raw_cursor)


@router.get("/tasks/confirm")
async def confirm(request: Request, view: ViewerDep) -> Response:
    """How many tasks an action on everything the filter matches would change."""
    state, dashboard = state_of(request), dashboard_of(request)
    parsed = filters.parse(request.query_params, state.app.registry.types)
    raw = request.query_params.get("action", "")
    action = next((a for a in ACTIONS if a == raw), None)
    if action is None:
        parsed.errors.append(f"action: {raw!r} is not one of {', '.join(ACTIONS)}")
    count = Count(0)
    cap = state.settings.ui_bulk_max
    if not parsed.errors:
        parsed.absolute(datetime.now(UTC))
    if not parsed.errors and action is not None:
        count = await dashboard.count(task_types(request), parsed.filter, cap=cap + 1,
                                      statuses=ACTION_FROM[action],
                                      scan=state.settings.ui_search_scan)
    back = request.query_params.get("back", "")
    further = None  # with a payload field: the confirmation of the tasks further back
    if count.next_cursor is not None and action is not None:
        further = parsed.query(action=action, back=back,
                               upto=str(uuid.UUID(int=count.next_cursor.int - 1)))
    return page(request, view, "confirm.html", 422 if parsed.errors else 200,
                active="tasks", parsed=parsed, action=action, count=count.n,
                scanned=count.scanned, further=further, cap=cap,
                applies_to=ACTION_FROM[action] if action else (), back=safe_back(back))


async def one_task(request: Request, task_id: uuid.UUID) -> tuple[TaskRecord, TaskType | None]:
    state = state_of(request)
    record = await state.store.get(task_id)
    if record is None:
        raise TaskNotFound(str(task_id))
    return record, state.app.registry.types.get(record.type)


@router.get("/tasks/{task_id}")
async def task(request: Request, view: ViewerDep, task_id: uuid.UUID) -> Response:
    record, task_type = await one_task(request, task_id)
    return page(request, view, "task.html", active="tasks", task=record,
                task_type=task_type, finished=FINISHED)


@router.get("/tasks/{task_id}/body")
async def task_body(request: Request, view: ViewerDep, task_id: uuid.UUID) -> Response:
    record, task_type = await one_task(request, task_id)
    return page(request, view, "task_body.html", task=record, task_type=task_type,
                finished=FINISHED)


@router.get("/tasks/{task_id}/copy")
async def copy_form(request: Request, view: ViewerDep, task_id: uuid.UUID) -> Response:
    record, task_type = await one_task(request, task_id)
    return page(request, view, "copy.html", active="tasks", task=record,
                task_type=task_type, payload=pretty(record.payload), error=None,
                schema=pretty(task_type.payload_model.model_json_schema())
                if task_type else None)


@router.get("/dead-letters")
async def dead_letters(request: Request, view: ViewerDep) -> Response:
    state, dashboard = state_of(request), dashboard_of(request)
    types = task_types(request)
    chosen = request.query_params.get("type") or None
    if chosen is not None and chosen not in types:
        chosen = None
    counts = await each(types, state.store.counts)
    cursor = None
    raw_cursor = request.query_params.get("cursor")
    if raw_cursor:
        try:
            cursor = uuid.UUID(raw_cursor)
        except ValueError:
            cursor = None
    found = await dashboard.page(types, TaskFilter(type=chosen, status="dead"),
                                 before=cursor, limit=state.settings.ui_page_size)
    entries: list[dict[str, str]] = []
    if chosen is not None:
        entries = await state.streams.dead_letters(chosen, 20)
    return page(request, view, "dead.html", active="dead", types=types, chosen=chosen,
                counts=dict(zip(types, counts, strict=True)), found=found,
                entries=entries)


@router.get("/workers")
async def workers(request: Request, view: ViewerDep) -> Response:
    return page(request, view, "workers.html", active="workers",
                **await _workers(request))


@router.get("/workers/body")
async def workers_body(request: Request, view: ViewerDep) -> Response:
    return page(request, view, "workers_body.html", **await _workers(request))


async def _workers(request: Request) -> dict[str, Any]:
    state = state_of(request)
    beats = await dashboard_of(request).worker_beats()
    return {"beats": beats, "ttl": state.settings.heartbeat_ttl,
            "now": datetime.now(UTC)}


@router.get("/cron")
async def cron(request: Request, view: ViewerDep) -> Response:
    state = state_of(request)
    now = datetime.now(UTC)
    jobs = list(state.app.registry.cron_jobs.values())

    async def runs(name: str) -> list[TaskRecord]:
        return await state.store.list_tasks(type_=name, limit=5)

    last = await each([j.name for j in jobs], runs)
    rows = []
    for job, recent in zip(jobs, last, strict=True):
        upcoming, at = [], now
        for _ in range(5):
            at = job.next_after(at)
            upcoming.append(at)
        rows.append({"job": job, "next": upcoming, "runs": recent})
    return page(request, view, "cron.html", active="cron", rows=rows)


@router.get("/queues")
async def queues(request: Request, view: ViewerDep) -> Response:
    state = state_of(request)
    registry = state.app.registry
    names = list(registry.types)
    stats = await state.streams.stats(names)
    counts = await each(names, state.store.counts)
    flow = await in_force(state, names)
    settings = state.settings
    rows = []
    for name, count in zip(names, counts, strict=True):
        task_type = registry.types[name]
        rows.append({
            "type": task_type, "stats": stats[name], "counts": count,
            "max_attempts": task_type.max_attempts or settings.max_attempts,
            "retention": task_type.retention.resolved(settings),
            "retry": task_type.retry,
            "flow": flow[name],
        })
    return page(request, view, "queues.html", active="queues", rows=rows,
                settings=settings)

