"""The dashboard's queries on real Postgres: filtered keyset pages, the payload search's
bounded scan and where it goes on, counts, bulk actions that touch only the statuses they
apply to, the overview's per-minute figures, and the plans they use."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.client import TaskRequest
from conveyor.state import AppState
from conveyor.store.dashboard import Dashboard, TaskFilter, id_floor


def dashboard_of(state: AppState) -> Dashboard:
    return Dashboard(state.pool, state.settings.database_schema)


async def test_pages_filters_and_the_bounded_payload_search(state: AppState) -> None:
    d = dashboard_of(state)
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n % 5}, delay_s=3600) for n in range(30)]
        + [TaskRequest("flaky", {"failures": 0}, delay_s=3600, idempotency_key="k1")])]
    types = ["echo", "flaky"]
    page = await d.page(types, TaskFilter(), before=None, limit=20)
    assert [t.id for t in page.tasks] == sorted((r.id for r in records), reverse=True)[:20]
    rest = await d.page(types, TaskFilter(), before=page.next_cursor, limit=20)
    assert len(rest.tasks) == 11
    assert rest.next_cursor is None
    keyed = await d.page(types, TaskFilter(key="k1"), before=None, limit=20)
    assert [t.type for t in keyed.tasks] == ["flaky"]
    echo_fours = {r.id for r in records if r.type == "echo" and r.payload["value"] == 4}
    f = TaskFilter(type="echo", since=datetime.now(UTC) - timedelta(hours=1),
                   field=(("value",), "4"))
    found = await d.page(types, f, before=None, limit=50)
    assert {t.id for t in found.tasks} == echo_fours
    assert found.next_cursor is None
    # examining 10 rows at a time, the search says where it stopped, and goes on from there
    seen, cursor, pages = set(), None, 0
    while True:
        part = await d.page(types, f, before=cursor, limit=50, scan=10)
        assert part.scanned is not None
        assert part.scanned <= 10
        seen |= {t.id for t in part.tasks}
        pages += 1
        if part.next_cursor is None:
            break
        cursor = part.next_cursor
    assert seen == echo_fours
    assert pages == 4
    assert (await d.count(types, f, cap=100)).n == len(echo_fours)
    assert (await d.count(types, TaskFilter(), cap=10)).n == 10
    future = TaskFilter(since=datetime.now(UTC) + timedelta(hours=1))
    assert (await d.page(types, future, before=None, limit=5)).tasks == []


async def test_bulk_actions_touch_only_what_they_apply_to(state: AppState) -> None:
    d = dashboard_of(state)
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n}, delay_s=3600) for n in range(4)])]
    ids = [r.id for r in records]
    assert await d.delete(ids) == []  # queued: not finished
    cancelled = await d.cancel(ids[:2])
    assert {r.status for r in cancelled} == {"cancelled"}
    retried = await d.retry(ids)
    assert {r.id for r in retried} == set(ids[:2])
    assert {r.status for r in retried} == {"queued"}
    matching = await d.matching_ids(["echo"], TaskFilter(type="echo"), ("queued",),
                                    before=None, limit=10)
    assert set(matching.ids) == set(ids)
    assert matching.next_cursor is None
    await d.cancel(ids)
    assert set(await d.delete(ids)) == set(ids)


async def test_minutes_latency_and_workers(state: AppState) -> None:
    d = dashboard_of(state)
    t = state.store.table
    await state.pool.execute(
        f"INSERT INTO {t} (id, type, status, payload, attempts, max_attempts, created_at,"
        " run_at, started_at, finished_at) SELECT gen_random_uuid(), 'echo', s, '{}', 1, 1,"
        " now(), now(), now() + interval '2 seconds', now() FROM unnest($1::text[]) AS s",
        ["succeeded", "succeeded", "dead"])
    # gen_random_uuid() is not time-ordered: give them ids of now
    await state.pool.execute(f"UPDATE {t} SET id = ($1::text || substr(id::text, 13))::uuid",
                             str(id_floor(datetime.now(UTC)))[:12])
    minutes = await d.minutes("echo")
    assert sum(m.succeeded for m in minutes) == 2
    assert sum(m.dead for m in minutes) == 1
    latency = await d.latency("echo")
    assert len(latency) == 3
    assert all(1.5 < s < 2.5 for s in latency)
    # made 90 minutes ago, finished now: in the hour; finished 2 hours ago: not
    for finished in ("now()", "now() - interval '2 hours'"):
        await state.pool.execute(
            f"INSERT INTO {t} (id, type, status, payload, attempts, max_attempts, created_at,"
            " run_at, started_at, finished_at) VALUES ($1, 'echo', 'succeeded', '{}', 1, 1,"
            f" now(), now(), now(), {finished})",
            uuid.UUID(int=id_floor(datetime.now(UTC) - timedelta(minutes=90)).int
                      + uuid.uuid4().int % (1 << 64)))
    minutes = await d.minutes("echo")
    assert sum(m.succeeded for m in minutes) == 3
    assert await d.worker_beats() == []


async def test_the_plans_are_index_ranges(state: AppState) -> None:
    t = state.store.table
    since = id_floor(datetime.now(UTC) - timedelta(hours=1))
    for sql in (
        f"SELECT id FROM {t} AS t WHERE t.type = 'echo' AND t.status = 'dead' AND t.id < $1"
        " ORDER BY t.id DESC LIMIT 51",
        f"SELECT id FROM {t} AS t WHERE t.type = 'echo' AND t.id >= $1"
        " ORDER BY t.id DESC LIMIT 51",
    ):
        async with state.pool.acquire() as conn:
            await conn.execute("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", since))
            await conn.execute("RESET enable_seqscan")
        assert "Index" in plan, plan
        assert "Seq Scan" not in plan, plan


async def test_throughput_reads_the_record_once_then_counts_events(state: AppState) -> None:
    import asyncio

    from conveyor.queue.events import event
    from conveyor.ui.throughput import Throughput

    t = state.store.table
    await state.pool.execute(
        f"INSERT INTO {t} (id, type, status, payload, attempts, max_attempts, created_at,"
        " run_at, started_at, finished_at) VALUES ($1, 'echo', 'dead', '{}', 1, 1, now(),"
        " now(), now(), now())", id_floor(datetime.now(UTC)))
    assert state.client.hub is not None
    throughput = Throughput(state.client.hub, dashboard_of(state), ["echo", "flaky"])
    await throughput.ensure(wait_s=5)
    assert throughput.filled
    assert [(m.succeeded, m.dead) for m in throughput.rows("echo")] == [(0, 1)]
    await state.events.publish([event("succeeded", uuid.uuid4(), "echo", "succeeded"),
                                event("succeeded", uuid.uuid4(), "echo", "succeeded"),
                                event("dead", uuid.uuid4(), "flaky", "dead")])
    for _ in range(100):
        if sum(m.succeeded for m in throughput.rows("echo")) == 2:
            break
        await asyncio.sleep(0.05)
    assert sum(m.succeeded for m in throughput.rows("echo")) == 2
    assert sum(m.dead for m in throughput.rows("echo")) == 1
    assert sum(m.dead for m in throughput.rows("flaky")) == 1
    await throughput.close()


class Recorded(Dashboard):
    """The dashboard, keeping every statement it ran (to EXPLAIN them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: list[tuple[str, str, tuple[Any, ...]]] = []

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        self.statements.append((op, sql, args))
        return await super()._fetch(op, sql, *args)

    async def _fetch_custom(self, op: str, sql: str, *args: Any) -> list[Any]:
        self.statements.append((op, sql, args))
        return await super()._fetch_custom(op, sql, *args)


async def test_payload_counts_and_bulk_walks_are_bounded_by_the_scan(state: AppState) -> None:
    d = dashboard_of(state)
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n % 5}, delay_s=3600) for n in range(30)])]
    newest = sorted((r.id for r in records), reverse=True)
    fours = sorted((r.id for r in records if r.payload["value"] == 4), reverse=True)
    f = TaskFilter(type="echo", since=datetime.now(UTC) - timedelta(hours=1),
                   field=(("value",), "4"))
    counted = await d.count(["echo"], f, cap=100, statuses=("queued",), scan=10)
    assert counted.scanned == 10
    assert counted.n == len([i for i in fours if i >= newest[9]])
    assert counted.next_cursor == newest[9]
    # the walk goes on from its cursor, each call examining at most `scan`
    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        walk = await d.matching_ids(["echo"], f, ("queued",), before=cursor, limit=100,
                                    scan=10)
        assert walk.scanned is not None
        assert walk.scanned <= 10
        seen += walk.ids
        if walk.next_cursor is None:
            break
        cursor = walk.next_cursor
    assert seen == fours
    # a limit reached: it goes on below the last one found, having examined down to it
    first = await d.matching_ids(["echo"], f, ("queued",), before=None, limit=1, scan=30)
    assert first.ids == fours[:1]
    assert first.next_cursor == fours[0]
    assert first.scanned == newest.index(fours[0]) + 1
    # the id bound: only those at or below it
    bounded = TaskFilter(type="echo", upto=newest[5])
    assert (await d.count(["echo"], bounded, cap=100)).n == 25


async def test_cancel_counts_leave_out_running_tasks_already_asked(state: AppState) -> None:
    d = dashboard_of(state)
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n}, delay_s=3600) for n in range(3)])]
    await state.pool.execute(
        f"UPDATE {state.store.table} SET status = 'running', started_at = now(),"
        " cancel_requested = (id = $1) WHERE id = ANY($2::uuid[])",
        records[0].id, [r.id for r in records[:2]])
    f = TaskFilter(type="echo")
    assert (await d.count(["echo"], f, cap=10, statuses=("queued", "running"))).n == 2
    walk = await d.matching_ids(["echo"], f, ("queued", "running"), before=None, limit=10)
    assert set(walk.ids) == {records[1].id, records[2].id}


async def test_bulk_statements_walk_one_index_range_per_status(state: AppState) -> None:
    d = Recorded(state.pool, state.settings.database_schema)
    f = TaskFilter(type="echo", since=datetime.now(UTC) - timedelta(hours=1))
    await d.matching_ids(["echo"], f, ("dead", "cancelled"), before=None, limit=500)
    await d.count(["echo"], f, cap=1001, statuses=("dead", "cancelled"))
    await d.matching_ids(["echo"], TaskFilter(type="echo", field=(("value",), "1")),
                         ("dead", "cancelled"), before=None, limit=500)
    assert len(d.statements) == 3
    for _, sql, args in d.statements:
        assert "IN (" not in sql, sql
        async with state.pool.acquire() as conn:
            await conn.execute("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args))
            await conn.execute("RESET enable_seqscan")
        assert plan.count("tasks_finished") == 2, plan
        assert "Seq Scan" not in plan, plan
