"""The chaos run's judgement of overlapping runs, on hand-made runs (no servers)."""

from __future__ import annotations

import math

from conveyor.testing.chaos import Run, Windows, overlaps


def _run(worker: str, started: float, finished: float | None, attempt: int = 1) -> Run:
    return Run("t1", worker, attempt, 200, started, finished)


def test_two_copies_on_live_workers_at_once_are_a_failure() -> None:
    live, others = overlaps([_run("host-a-10-ff", 0.0, 2.0), _run("host-a-20-ee", 1.0, 3.0, 2)],
                            {})
    assert others == 0
    assert live == ["task t1: attempt 1 on host-a-10-ff and attempt 2 on host-a-20-ee"
                    " overlap 1.00 s"]


def test_runs_one_after_another_do_not_overlap() -> None:
    assert overlaps([_run("h-10-ff", 0.0, 1.0), _run("h-20-ee", 1.0, 2.0)], {}) == ([], 0)


def test_an_overlap_during_a_stall_is_expected() -> None:
    stalled: Windows = {10: [(0.5, 1.5)]}
    assert overlaps([_run("h-10-ff", 0.0, 2.0), _run("h-20-ee", 1.0, 3.0)], stalled) == ([], 1)


def test_a_stall_outside_the_overlap_excuses_nothing() -> None:
    stalled: Windows = {10: [(5.0, 6.0)]}
    live, others = overlaps([_run("h-10-ff", 0.0, 2.0), _run("h-20-ee", 1.0, 3.0)], stalled)
    assert (len(live), others) == (1, 0)


def test_a_killed_workers_unfinished_run_ends_at_the_kill() -> None:
    killed: Windows = {10: [(1.0, math.inf)]}
    runs = [_run("h-10-ff", 0.0, None), _run("h-20-ee", 0.5, 3.0)]
    assert overlaps(runs, killed) == ([], 1)
    # Taken over only after the kill: no overlap at all.
    assert overlaps([_run("h-10-ff", 0.0, None), _run("h-20-ee", 1.5, 3.0)], killed) == ([], 0)


def test_an_unfinished_run_no_kill_explains_overlaps_every_later_run() -> None:
    live, _ = overlaps([_run("h-10-ff", 0.0, None), _run("h-20-ee", 5.0, 6.0)], {})
    assert live == ["task t1: attempt 1 on h-10-ff and attempt 1 on h-20-ee overlap 1.00 s"]
