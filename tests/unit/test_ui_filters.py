"""The dashboard's filter parsing and rendering helpers (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.store.dashboard import Minute, id_floor
from conveyor.ui import filters
from conveyor.ui.render import failure_svg, reason, seconds, throughput_svg

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "path", "value"), [
    ("payload.customer_id = 42", ("customer_id",), "42"),
    ("customer_id=42", ("customer_id",), "42"),
    ('payload.user.email = "a@b.c"', ("user", "email"), '"a@b.c"'),
    ("payload.state = open", ("state",), '"open"'),
    ("payload.flags.0 = true", ("flags", "0"), "true"),
])
def test_payload_fields(text: str, path: tuple[str, ...], value: str) -> None:
    assert filters.payload_field(text) == (path, value)


@pytest.mark.parametrize("text", ["", "= 3", "payload. = 1", "payload.x", "1x = 2"])
def test_payload_field_errors_name_the_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"payload\.name = value"):
        filters.payload_field(text)


def test_a_payload_search_is_bounded_to_a_type_and_a_window() -> None:
    parsed = filters.parse({"type": "echo", "field": "payload.x = 1"}, {"echo"}, NOW)
    assert parsed.errors == []
    assert parsed.filter.since == NOW - timedelta(hours=24)
    assert parsed.values["since"] == "24h"
    without = filters.parse({"field": "payload.x = 1"}, {"echo"}, NOW)
    assert any("needs a type" in e for e in without.errors)


def test_windows_relative_and_absolute() -> None:
    parsed = filters.parse({"since": "2h", "until": "2026-12-02T11:30"}, set(), NOW)
    assert parsed.filter.since == NOW - timedelta(hours=2)
    assert parsed.filter.until == datetime(2026, 12, 2, 11, 30, tzinfo=UTC)
    assert "since=2h" in parsed.query()


def test_id_floor_orders_with_uuidv7_ids() -> None:
    from conveyor.store.tasks import new_task_id
    before = id_floor(datetime.now(UTC) - timedelta(seconds=1))
    made = new_task_id()
    after = id_floor(datetime.now(UTC) + timedelta(seconds=1))
    assert before < made < after


def test_reason_is_the_errors_gist() -> None:
    trace = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n\n(gave up)"
    assert reason(trace) == "RuntimeError: boom"
    assert reason(None) == ""
    assert reason("(only a note)") == "(only a note)"


def test_durations_and_charts() -> None:
    assert [seconds(v) for v in (0.25, 12.4, 185, 7800, 90000)] == [
        "250 ms", "12.4 s", "3 min 5 s", "2 h 10 min", "1 d 1 h"]
    rows = [Minute(NOW - timedelta(minutes=1), 8, 2), Minute(NOW, 0, 0)]
    bars = str(throughput_svg(rows, NOW))
    assert bars.count('class="ok"') == 1
    assert bars.count('class="bad"') == 1
    assert "style=" not in bars
    line = str(failure_svg(rows, NOW))
    assert line.count("<polyline") == 1
    assert "<polyline" not in str(failure_svg([], NOW))


def test_windows_out_of_range_are_named_and_ids_clamped() -> None:
    far = filters.parse({"since": "1000000d"}, {"echo"}, now=NOW)
    assert any(e.startswith("since:") for e in far.errors), far.errors
    old = filters.parse({"since": "1900-01-01"}, {"echo"}, now=NOW)
    assert not old.errors
    assert id_floor(old.filter.since).int == 0  # type: ignore[arg-type]
