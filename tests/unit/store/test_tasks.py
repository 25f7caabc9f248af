"""`new_task_id`: UUIDv7 layout and time order."""

from __future__ import annotations

import time
import uuid

import pytest

from conveyor.store.tasks import new_task_id


def _ms_of(task_id: uuid.UUID) -> int:
    return task_id.int >> 80


def test_version_and_variant() -> None:
    for _ in range(200):
        task_id = new_task_id()
        assert task_id.version == 7
        assert task_id.variant == uuid.RFC_4122
        assert (task_id.int >> 76) & 0xF == 7
        assert (task_id.int >> 62) & 0b11 == 0b10


def test_timestamp_is_unix_milliseconds_now() -> None:
    before = time.time_ns() // 1_000_000
    task_id = new_task_id()
    after = time.time_ns() // 1_000_000
    assert before <= _ms_of(task_id) <= after


def test_ids_are_unique_and_random() -> None:
    ids = [new_task_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    # the 74 random bits differ even within one millisecond
    assert len({task_id.int & ((1 << 62) - 1) for task_id in ids}) == len(ids)


def test_ids_sort_by_creation_time_across_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1_700_000_000_000, 1_700_000_000_050))

    def fake_time_ns() -> int:
        return next(clock) * 1_000_000 + 999_999

    monkeypatch.setattr(time, "time_ns", fake_time_ns)  # the module new_task_id reads
    ids = [new_task_id() for _ in range(50)]
    monkeypatch.undo()
    assert [_ms_of(task_id) for task_id in ids] == list(
        range(1_700_000_000_000, 1_700_000_000_050)
    )
    assert sorted(ids) == ids
    assert sorted(str(task_id) for task_id in ids) == [str(task_id) for task_id in ids]


def test_ids_sort_by_creation_time_with_the_real_clock() -> None:
    earlier = [new_task_id() for _ in range(20)]
    time.sleep(0.003)
    later = [new_task_id() for _ in range(20)]
    assert max(earlier) < min(later)
    assert max(map(str, earlier)) < min(map(str, later))
