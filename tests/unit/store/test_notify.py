"""The NOTIFY payload of a transactional enqueue: what `payload` writes, `parse` reads back."""

from __future__ import annotations

import uuid

import pytest

from conveyor.store.notify import Enqueued, parse, payload

ID = uuid.UUID("0190b9a4-7c1e-7d2a-9b3c-4d5e6f708192")  # fixed: parallel runs collect alike


@pytest.mark.parametrize("task", [
    Enqueued("echo", ID),
    Enqueued("echo", ID, 1_767_000_000_123),
    Enqueued("billing:invoice", ID, 5),  # a colon in the type name
    Enqueued("ranked", ID, None, "high"),  # a type with priorities: its level
    Enqueued("billing:ranked", ID, 7, "default"),
])
def test_round_trip(task: Enqueued) -> None:
    assert parse(payload(task)) == task


def test_wire_format() -> None:
    task_id = uuid.UUID("01890000-0000-7000-8000-000000000001")
    assert payload(Enqueued("echo", task_id)) == f"echo:{task_id}::"
    assert payload(Enqueued("echo", task_id, 42)) == f"echo:{task_id}:42:"
    assert payload(Enqueued("echo", task_id, None, "low")) == f"echo:{task_id}::low"


@pytest.mark.parametrize("text", [
    "", "echo", f"echo:{ID}", f":{ID}::", "echo:not-a-uuid::", f"echo:{ID}:",
    f"echo:{ID}:soon:", f"echo:{ID}::lo w",
])
def test_malformed_payloads_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a type:id:run_at_ms:level payload"):
        parse(text)
