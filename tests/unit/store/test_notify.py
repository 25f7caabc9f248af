"""The NOTIFY payload of a transactional enqueue: what `payload` writes, `parse` reads back."""

from __future__ import annotations

import uuid

import pytest

from conveyor.store.notify import Enqueued, parse, payload


@pytest.mark.parametrize("task", [
    Enqueued("echo", uuid.uuid4()),
    Enqueued("echo", uuid.uuid4(), 1_767_000_000_123),
    Enqueued("billing:invoice", uuid.uuid4(), 5),  # a colon in the type name
])
def test_round_trip(task: Enqueued) -> None:
    assert parse(payload(task)) == task


def test_wire_format() -> None:
    task_id = uuid.UUID("01890000-0000-7000-8000-000000000001")
    assert payload(Enqueued("echo", task_id)) == f"echo:{task_id}:"
    assert payload(Enqueued("echo", task_id, 42)) == f"echo:{task_id}:42"


@pytest.mark.parametrize("text", [
    "", "echo", f"echo:{uuid.uuid4()}", f":{uuid.uuid4()}:", "echo:not-a-uuid:",
    f"echo:{uuid.uuid4()}:soon",
])
def test_malformed_payloads_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a type:id:run_at_ms payload"):
        parse(text)
