"""Every compare-and-set of `TaskStore` against a real Postgres: the rows it changes, how, and
the rows it must leave alone (another worker's, a stale attempt's, the wrong state's)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from conveyor.state import AppState
from conveyor.store.tasks import (
    EARLY_START_S,
    NewTask,
    NotStarted,
    Outcome,
    Returned,
    Started,
    TaskRecord,
    new_task_id,
)


def task(
    type_: str = "echo", *, key: str | None = None, payload: str = "{}", delay_s: float = 0.0,
    max_attempts: int = 3,
) -> NewTask:
    return NewTask(new_task_id(), type_, payload, max_attempts, key, delay_s)


async def add(state: AppState, n: int = 1, **kwargs: Any) -> list[uuid.UUID]:
    inserted = await state.store.insert([task(**kwargs) for _ in range(n)])
    assert all(i.created for i in inserted)
    return [i.record.id for i in inserted]


async def put(state: AppState, task_id: uuid.UUID, **columns: Any) -> None:
    """Set columns directly: the state a test starts from."""
    names = list(columns)
    sets = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(names))
    await state.pool.execute(
        f"UPDATE {state.store.table} SET {sets} WHERE id = $1", task_id, *columns.values()
    )


async def rows(state: AppState) -> dict[uuid.UUID, TaskRecord]:
    return {r.id: r for r in await state.store.list_tasks(limit=1000)}


def changed(before: dict[uuid.UUID, TaskRecord], after: dict[uuid.UUID, TaskRecord]
            ) -> set[uuid.UUID]:
    assert before.keys() == after.keys()
    return {i for i in after if after[i] != before[i]}


async def db_now(state: AppState) -> datetime:
    value: datetime = await state.pool.fetchval("SELECT clock_timestamp()")
    return value


async def running_on(state: AppState, worker: str, n: int = 1, **kwargs: Any
                     ) -> list[uuid.UUID]:
    ids = await add(state, n, **kwargs)
    started, _ = await state.store.mark_running(ids, worker)
    assert {s.id for s in started} == set(ids)
    return ids


def get(rows_: dict[uuid.UUID, TaskRecord], task_id: uuid.UUID) -> TaskRecord:
    return rows_[task_id]


# -- insert and idempotency keys -----------------------------------------------------------


async def test_insert_with_a_used_key_returns_the_first_task_and_writes_nothing(
    state: AppState,
) -> None:
    [first] = await state.store.insert([task(key="k", payload='{"n": 1}')])
    before = await rows(state)
    [again] = await state.store.insert([task(key="k", payload='{"n": 2}')])
    assert first.created
    assert not again.created
    assert again.record == first.record
    assert again.record.payload == {"n": 1}
    assert await rows(state) == before


async def test_a_key_is_per_type_and_tasks_without_keys_never_collide(state: AppState) -> None:
    out = await state.store.insert(
        [task("echo", key="k"), task("flaky", key="k"), task(), task()]
    )
    assert [i.created for i in out] == [True, True, True, True]
    assert len({i.record.id for i in out}) == 4
    assert len(await rows(state)) == 4


async def test_a_batch_mixing_new_used_and_repeated_keys_keeps_request_order(
    state: AppState,
) -> None:
    [old] = await state.store.insert([task(key="old")])
    batch = [task(key="new"), task(key="old"), task(), task(key="new")]
    out = await state.store.insert(batch)
    assert [i.created for i in out] == [True, False, True, False]
    assert out[0].record.id == batch[0].id
    assert out[1].record == old.record
    assert out[2].record.id == batch[2].id
    assert out[3].record.id == batch[0].id  # the repeat in the same batch gets the first
    assert set(await rows(state)) == {old.record.id, batch[0].id, batch[2].id}


async def test_insert_sets_run_at_from_the_delay(state: AppState) -> None:
    before = await db_now(state)
    [now_, later] = await state.store.insert([task(), task(delay_s=30)])
    after = await db_now(state)
    assert before - timedelta(seconds=1) <= now_.record.run_at <= after
    assert before + timedelta(seconds=29) <= later.record.run_at <= after + timedelta(seconds=31)
    assert now_.record.status == later.record.status == "queued"
    assert now_.record.attempts == 0


# -- mark_running --------------------------------------------------------------------------


async def test_mark_running_starts_due_queued_tasks_and_explains_the_rest(
    state: AppState,
) -> None:
    due, future = await add(state), await add(state, delay_s=60)
    other = await add(state)  # not asked for
    before = await rows(state)
    started, not_started = await state.store.mark_running([*due, *future], "w1")
    after = await rows(state)
    assert [s.id for s in started] == due
    assert started[0].attempt == 1
    assert started[0].max_attempts == 3
    assert changed(before, after) == set(due)
    row = get(after, due[0])
    assert (row.status, row.attempts, row.worker) == ("running", 1, "w1")
    assert row.started_at is not None
    assert row.finished_at is None
    assert not_started == [
        NotStarted(future[0], "queued", get(before, future[0]).run_at, False)
    ]
    assert get(after, other[0]) == get(before, other[0])


async def test_mark_running_allows_an_early_start_within_the_skew_margin_only(
    state: AppState,
) -> None:
    inside, outside = await add(state), await add(state)
    now = await db_now(state)
    await put(state, inside[0], run_at=now + timedelta(seconds=EARLY_START_S * 0.4))
    await put(state, outside[0], run_at=now + timedelta(seconds=EARLY_START_S * 4 + 1))
    started, not_started = await state.store.mark_running([*inside, *outside], "w1")
    assert [s.id for s in started] == inside
    assert [n.id for n in not_started] == outside
    assert (await rows(state))[outside[0]].status == "queued"


async def test_mark_running_refuses_a_queued_task_whose_attempts_are_used_up(
    state: AppState,
) -> None:
    ids = await add(state, max_attempts=2)
    await put(state, ids[0], attempts=2)
    before = await rows(state)
    started, not_started = await state.store.mark_running(ids, "w1")
    assert started == []
    assert [(n.id, n.status, n.exhausted) for n in not_started] == [(ids[0], "queued", True)]
    assert await rows(state) == before


async def test_mark_running_counts_one_attempt_for_an_id_given_twice(state: AppState) -> None:
    ids = await add(state)
    started, not_started = await state.store.mark_running([ids[0], ids[0]], "w1")
    assert [s.id for s in started] == ids
    assert not_started == []
    assert (await rows(state))[ids[0]].attempts == 1


async def test_mark_running_reports_its_own_running_task_but_not_another_workers(
    state: AppState,
) -> None:
    mine, theirs = await running_on(state, "w1"), await running_on(state, "w2")
    before = await rows(state)
    started, not_started = await state.store.mark_running([*mine, *theirs], "w1")
    assert started == []
    assert await rows(state) == before  # no second attempt counted, no owner changed
    by_id = {n.id: n for n in not_started}
    row = get(before, mine[0])
    assert by_id[mine[0]].status == "running"
    assert by_id[mine[0]].running_here == Started(
        row.id, row.type, row.payload, 1, row.max_attempts, row.run_at,
        started_at=row.started_at,
    )
    assert by_id[theirs[0]].status == "running"
    assert by_id[theirs[0]].running_here is None


@pytest.mark.parametrize("status", ["succeeded", "dead", "cancelled"])
async def test_mark_running_leaves_finished_tasks_alone(state: AppState, status: str) -> None:
    ids = await add(state)
    await put(state, ids[0], status=status)
    before = await rows(state)
    started, not_started = await state.store.mark_running(ids, "w1")
    assert started == []
    assert [(n.id, n.status, n.exhausted) for n in not_started] == [(ids[0], status, False)]
    assert await rows(state) == before


async def test_mark_running_reports_an_unknown_id(state: AppState) -> None:
    ghost = new_task_id()
    started, not_started = await state.store.mark_running([ghost], "w1")
    assert started == []
    assert not_started == [NotStarted(ghost, None, None, False)]


# -- record --------------------------------------------------------------------------------


def outcome(task_id: uuid.UUID, attempt: int = 1, status: Any = "succeeded", **kwargs: Any
            ) -> Outcome:
    return Outcome(task_id, "echo", attempt, status, **kwargs)


async def test_record_success_stores_the_result_and_clears_the_last_error(
    state: AppState,
) -> None:
    [task_id] = await running_on(state, "w1")
    await put(state, task_id, last_error="boom on a previous attempt")
    recorded = await state.store.record(
        [outcome(task_id, result_json='{"ok": true}', error="ignored")], "w1"
    )
    row = (await rows(state))[task_id]
    assert [(r.task_id, r.status) for r in recorded] == [(task_id, "succeeded")]
    assert row.status == "succeeded"
    assert row.result == {"ok": True}
    assert row.last_error is None  # an earlier attempt's error does not outlive the success
    assert row.finished_at is not None


async def test_record_retry_requeues_at_the_delay_and_keeps_the_result(
    state: AppState,
) -> None:
    [task_id] = await running_on(state, "w1")
    await put(state, task_id, result={"from": "earlier"}, finished_at=await db_now(state))
    before = await db_now(state)
    recorded = await state.store.record(
        [outcome(task_id, status="queued", error="try again", delay_s=30,
                 result_json='{"x": 1}')], "w1",
    )
    after = await db_now(state)
    row = (await rows(state))[task_id]
    assert row.status == "queued"
    assert before + timedelta(seconds=29) <= row.run_at <= after + timedelta(seconds=31)
    assert recorded[0].run_at == row.run_at
    assert row.last_error == "try again"
    assert row.result == {"from": "earlier"}
    assert row.finished_at is None
    assert row.attempts == 1


async def test_record_dead_stores_the_error_and_keeps_run_at(state: AppState) -> None:
    [task_id] = await running_on(state, "w1")
    run_at = (await rows(state))[task_id].run_at
    await state.store.record([outcome(task_id, status="dead", error="gave up")], "w1")
    row = (await rows(state))[task_id]
    assert (row.status, row.last_error, row.run_at, row.result) == (
        "dead", "gave up", run_at, None)
    assert row.finished_at is not None


async def test_record_gives_each_task_of_a_batch_its_own_outcome(state: AppState) -> None:
    ids = await running_on(state, "w1", 6)
    given = list(reversed(ids))  # outcomes in another order than the rows'
    outcomes = [
        outcome(given[0], result_json='"a"'),
        outcome(given[1], status="dead", error="gave up b"),
        outcome(given[2], result_json='"c"'),
        outcome(given[3], status="queued", error="again d", delay_s=60),
        outcome(given[4], status="cancelled", error="stopped e"),
        outcome(given[5], result_json='"f"'),
    ]
    recorded = await state.store.record(outcomes, "w1")
    after = await rows(state)
    assert {r.task_id: r.status for r in recorded} == {o.task_id: o.status for o in outcomes}
    assert [(after[i].status, after[i].result, after[i].last_error) for i in given] == [
        ("succeeded", "a", None),
        ("dead", None, "gave up b"),
        ("succeeded", "c", None),
        ("queued", None, "again d"),
        ("cancelled", None, "stopped e"),
        ("succeeded", "f", None),
    ]
    finished = after[given[2]].finished_at
    assert finished is not None
    assert after[given[3]].run_at > finished  # the retry waits its delay


async def test_record_refuses_two_outcomes_of_one_task(state: AppState) -> None:
    [task_id] = await running_on(state, "w1")
    before = await rows(state)
    with pytest.raises(ValueError, match="two outcomes of one task"):
        await state.store.record([outcome(task_id), outcome(task_id, attempt=2)], "w1")
    assert await rows(state) == before


async def test_record_writes_only_outcomes_of_attempts_this_worker_owns(
    state: AppState,
) -> None:
    owned, stale, taken, other = await running_on(state, "w1", 4)
    await put(state, stale, attempts=2)  # requeued and started again since: attempt 2 now
    await put(state, taken, worker="w2")  # taken over by another worker
    await put(state, other, status="queued")  # requeued, not started again yet
    before = await rows(state)
    recorded = await state.store.record(
        [outcome(owned), outcome(stale, attempt=1), outcome(taken), outcome(other)], "w1"
    )
    after = await rows(state)
    assert [r.task_id for r in recorded] == [owned]
    assert changed(before, after) == {owned}


async def test_record_does_not_overwrite_a_recorded_outcome(state: AppState) -> None:
    [task_id] = await running_on(state, "w1")
    await state.store.record([outcome(task_id, result_json='"first"')], "w1")
    before = await rows(state)
    again = await state.store.record([outcome(task_id, result_json='"second"')], "w1")
    assert again == []
    assert await rows(state) == before
    assert before[task_id].result == "first"


async def test_another_worker_cannot_record_an_outcome(state: AppState) -> None:
    [task_id] = await running_on(state, "w1")
    before = await rows(state)
    assert await state.store.record([outcome(task_id)], "w2") == []
    assert await rows(state) == before


# -- kill, requeue -------------------------------------------------------------------------


async def test_kill_changes_only_tasks_in_the_given_states(state: AppState) -> None:
    [queued] = await add(state)
    [running] = await running_on(state, "w1")
    [done] = await add(state)
    await put(state, done, status="succeeded")
    before = await rows(state)
    assert await state.store.kill([queued, running, done], "poison") == [queued]
    after = await rows(state)
    assert changed(before, after) == {queued}
    assert (after[queued].status, after[queued].last_error) == ("dead", "poison")
    assert after[queued].finished_at is not None

    killed = await state.store.kill([running, done], "lost", from_=("queued", "running"))
    assert killed == [running]
    final = await rows(state)
    assert changed(after, final) == {running}
    assert final[done] == before[done]


async def test_requeue_takes_back_only_tasks_running_on_the_named_worker(
    state: AppState,
) -> None:
    [mine] = await running_on(state, "w1")
    [theirs] = await running_on(state, "w2")
    [queued] = await add(state)
    [done] = await running_on(state, "w1")
    await put(state, done, status="succeeded")
    before = await rows(state)
    assert await state.store.requeue([mine, theirs, queued, done], "w1") == Returned([mine], [])
    after = await rows(state)
    assert changed(before, after) == {mine}
    assert after[mine].status == "queued"
    assert after[mine].attempts == 1  # the attempt it used counts


# -- cancel, retry -------------------------------------------------------------------------


async def test_cancel_only_a_queued_task(state: AppState) -> None:
    [queued] = await add(state)
    [running] = await running_on(state, "w1")
    before = await rows(state)
    record = await state.store.cancel(queued)
    assert record is not None
    assert record.status == "cancelled"
    assert record.finished_at is not None
    assert changed(before, await rows(state)) == {queued}
    after = await rows(state)
    assert await state.store.cancel(running) is None
    assert await state.store.cancel(queued) is None  # cancelled already
    assert await state.store.cancel(new_task_id()) is None
    assert await rows(state) == after


@pytest.mark.parametrize("status", ["dead", "cancelled"])
async def test_retry_requeues_a_dead_or_cancelled_task_with_fresh_attempts(
    state: AppState, status: str
) -> None:
    [task_id] = await running_on(state, "w1")
    [bystander] = await add(state)
    await put(state, task_id, status=status, finished_at=await db_now(state),
              result={"partial": 1}, last_error="boom")
    before = await rows(state)
    start = await db_now(state)
    record = await state.store.retry(task_id)
    end = await db_now(state)
    assert record is not None
    after = await rows(state)
    assert changed(before, after) == {task_id}
    assert after[task_id] == record
    assert (record.status, record.attempts, record.result) == ("queued", 0, None)
    assert record.started_at is None
    assert record.finished_at is None
    assert start - timedelta(seconds=1) <= record.run_at <= end
    assert record.last_error == "boom"  # kept: why it died is still worth reading
    assert after[bystander] == before[bystander]


@pytest.mark.parametrize("status", ["queued", "running", "succeeded"])
async def test_retry_refuses_a_task_that_is_not_dead_or_cancelled(
    state: AppState, status: str
) -> None:
    [task_id] = await add(state)
    await put(state, task_id, status=status)
    before = await rows(state)
    assert await state.store.retry(task_id) is None
    assert await rows(state) == before



# -- listings by status (partial indexes) ----------------------------------------------------


async def test_listing_by_status_alone_merges_every_type_newest_first(state: AppState) -> None:
    ids = []
    for i in range(12):
        [task_id] = await add(state, type_=("echo", "sleep", "refuse")[i % 3])
        ids.append(task_id)
        await put(state, task_id, status="dead" if i % 2 else "queued",
                  finished_at=datetime.now().astimezone() if i % 2 else None)
    dead = [t for i, t in enumerate(ids) if i % 2]
    seen: list[uuid.UUID] = []
    before = None
    while True:
        page = await state.store.list_tasks(status="dead", before=before, limit=4)
        seen += [r.id for r in page]
        if len(page) < 4:
            break
        before = page[-1].id
    assert seen == sorted(dead, reverse=True)
    by_type = await state.store.list_tasks(type_="sleep", status="queued")
    assert [r.id for r in by_type] == sorted(
        (t for i, t in enumerate(ids) if i % 3 == 1 and not i % 2), reverse=True)
    assert sorted(await state.store.types_present()) == ["echo", "refuse", "sleep"]
