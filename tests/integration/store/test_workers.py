"""Worker liveness on a real Postgres: the beat and its lease check, the judgement of death,
and the compare-and-sets a worker's lease protects (hand back)."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from conveyor.client import TaskRequest
from conveyor.state import AppState
from conveyor.store.workers import Beat, Liveness


async def beat(state: AppState, worker: str,
               running: list[tuple[uuid.UUID, int]] | None = None,
               held: list[uuid.UUID] | None = None, previous: Beat | None = None) -> Beat:
    running = running or []
    return await state.workers.beat(
        worker, host="h", pid=1, types=["echo"], concurrency=5, info={"processed": 3},
        running=running, held=held if held is not None else [t for t, _ in running],
        previous=previous.at if previous else None)


def judge(state: AppState, now: list[float]) -> Liveness:
    return Liveness(state.workers, ttl_s=3, confirm_s=1, watch_gap_s=2, clock=lambda: now[0])


async def started(state: AppState, worker: str, n: int = 1) -> list[uuid.UUID]:
    new = [state.client.prepare(TaskRequest("echo", {})) for _ in range(n)]
    await state.store.insert(new)
    ids = [t.id for t in new]
    begun, _ = await state.store.mark_running(ids, worker)
    assert len(begun) == n
    return ids


async def test_the_beat_answers_which_running_tasks_are_still_the_workers(
    state: AppState,
) -> None:
    mine, requeued, elsewhere, stale = await started(state, "w1", 4)
    await state.store.requeue([requeued], "w1")  # taken while w1 looked dead
    await state.store.requeue([elsewhere], "w1")
    await state.store.mark_running([elsewhere], "w2")  # and run by another
    seen = await beat(state, "w1", [(mine, 1), (requeued, 1), (elsewhere, 1), (stale, 2)])
    assert seen.owned == {(mine, 1)}  # stale: attempt 2 is not the attempt running (1)
    assert seen.forgotten == []


async def test_an_older_attempt_of_a_task_running_again_here_is_not_owned(
    state: AppState,
) -> None:
    [task_id] = await started(state, "w1")
    await state.store.requeue([task_id], "w1")  # taken while w1 stalled...
    await state.store.mark_running([task_id], "w1")  # ...and read again by w1 itself
    seen = await beat(state, "w1", [(task_id, 1), (task_id, 2)])
    assert seen.owned == {(task_id, 2)}


async def test_a_task_running_here_but_held_nowhere_here_is_given_back(
    state: AppState,
) -> None:
    kept, forgotten, fresh = await started(state, "w1", 3)
    first = await beat(state, "w1", [(kept, 1)], held=[kept])
    assert first.forgotten == []  # no previous beat: nothing is old enough to judge
    await state.pool.execute(
        f"UPDATE {state.store.table} SET started_at = now() + interval '1 hour'"
        " WHERE id = $1", fresh)  # started after the previous beat (as if in flight)
    second = await beat(state, "w1", [(kept, 1)], held=[kept], previous=first)
    assert second.forgotten == [forgotten]
    statuses = {t: r.status for t in (kept, forgotten, fresh)
                if (r := await state.store.get(t)) is not None}
    assert statuses == {kept: "running", forgotten: "queued", fresh: "running"}


async def test_the_beat_writes_the_row_live_lists_it_and_remove_deletes_it(
    state: AppState,
) -> None:
    await started(state, "w1", 2)
    await beat(state, "w1")
    rows = await state.workers.live(60)
    assert [(r.id, r.running, r.info) for r in rows] == [("w1", 2, {"processed": 3})]
    await state.workers.remove("w1")
    assert await state.workers.live(60) == []


async def test_fresh_and_prune_go_by_the_postgres_clock(state: AppState) -> None:
    await beat(state, "old")
    await beat(state, "new")
    await state.pool.execute(
        f"UPDATE {state.workers.table} SET beat_at = now() - interval '1 hour' WHERE id = 'old'")
    assert await state.workers.known_and_fresh(["old", "new", "never"], 60) == (
        {"old", "new"}, {"new"})
    assert await state.workers.prune(600) == 1
    assert await state.workers.known_and_fresh(["old", "new"], 7200) == ({"new"}, {"new"})


async def stale(state: AppState, worker: str) -> None:
    await beat(state, worker)
    await state.pool.execute(
        f"UPDATE {state.workers.table} SET beat_at = now() - interval '1 hour' WHERE id = $1",
        worker)


async def test_a_worker_without_a_row_is_dead_at_once(state: AppState) -> None:
    await beat(state, "alive")
    assert await judge(state, [0.0]).dead(["alive", "stopped"]) == {"stopped"}


async def test_a_stale_worker_is_dead_only_when_seen_so_throughout_the_window(
    state: AppState,
) -> None:
    now = [100.0]
    liveness = judge(state, now)
    await beat(state, "alive")
    await stale(state, "ghost")
    assert await liveness.dead(["alive", "ghost"]) == set()  # stale at one look only
    now[0] += 0.5
    assert await liveness.dead(["ghost"]) == set()
    now[0] += 0.5
    assert await liveness.dead(["alive", "ghost"]) == {"ghost"}  # a whole window, stale


async def test_a_beat_within_the_window_clears_the_suspicion(state: AppState) -> None:
    now = [0.0]
    liveness = judge(state, now)
    await stale(state, "back")
    assert await liveness.dead(["back"]) == set()  # e.g. Postgres was down: nobody could beat
    await beat(state, "back")
    now[0] += 0.6
    assert await liveness.dead(["back"]) == set()
    await stale(state, "back")
    now[0] += 0.6
    assert await liveness.dead(["back"]) == set()  # stale again: the window starts over
    now[0] += 1.0
    assert await liveness.dead(["back"]) == {"back"}


async def test_a_gap_in_watching_restarts_the_window(state: AppState) -> None:
    now = [0.0]
    liveness = judge(state, now)
    await stale(state, "w")
    assert await liveness.dead(["w"]) == set()
    now[0] += 1.5  # within the watch gap (2 s): still watching
    assert await liveness.dead(["w"]) == {"w"}
    await stale(state, "v")
    assert await liveness.dead(["v"]) == set()
    now[0] += 10.0  # not watched for longer than the gap: it may have beaten meanwhile
    assert await liveness.dead(["v"]) == set()
    now[0] += 1.0
    assert await liveness.dead(["v"]) == {"v"}


async def test_a_look_that_fails_forgets_what_was_seen(state: AppState) -> None:
    now = [0.0]
    liveness = judge(state, now)
    await stale(state, "w")
    assert await liveness.dead(["w"]) == set()
    state.workers.table, table = "nowhere.workers", state.workers.table
    try:
        now[0] += 0.5
        with pytest.raises(asyncpg.UndefinedTableError):
            await liveness.dead(["w"])  # blind: what it saw before counts for nothing now
    finally:
        state.workers.table = table
    now[0] += 0.6
    assert await liveness.dead(["w"]) == set()  # seen stale again, but only just now


async def test_hand_back_requeues_only_the_workers_own_attempt(state: AppState) -> None:
    mine, stale, theirs = await started(state, "w1", 3)
    await state.store.requeue([theirs], "w1")
    await state.store.mark_running([theirs], "w2")
    back = await state.store.hand_back([(mine, 1), (stale, 2), (theirs, 1)], "w1")
    assert back.queued == [mine]
    record = await state.store.get(mine)
    assert record is not None
    assert (record.status, record.attempts, record.started_at) == ("queued", 0, None)
    for untouched, worker, attempt in ((stale, "w1", 1), (theirs, "w2", 2)):
        other = await state.store.get(untouched)
        assert other is not None
        assert (other.status, other.worker, other.attempts) == ("running", worker, attempt)


async def test_running_on_names_the_tasks_a_worker_runs(state: AppState) -> None:
    mine = await started(state, "w1", 2)
    theirs = await started(state, "w2", 1)
    assert await state.store.running_on([*mine, *theirs], "w1") == set(mine)
