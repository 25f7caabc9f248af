"""The dashboard's queries on real Postgres: filtered keyset pages, the payload search's
bounded scan and where it goes on, counts, bulk actions that touch only the statuses they
apply to, the overview's per-minute figures, and the plans they use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
    assert await d.count(types, f, cap=100) == len(echo_fours)
    assert await d.count(types, TaskFilter(), cap=10) == 10
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
    assert set(matching) == set(ids)
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
    import uuid

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
