"""`decode`: a stream entry's fields to a Message."""

from __future__ import annotations

import uuid

import pytest

from conveyor.queue.streams import Message, decode


def test_valid_message() -> None:
    task_id = uuid.uuid4()
    message = decode(b"1700000000000-0", {b"id": str(task_id).encode(), b"r": b"3"})
    assert message == Message(b"1700000000000-0", task_id, 3, None)


def test_missing_r_means_zero_requeues() -> None:
    task_id = uuid.uuid4()
    message = decode(b"1-1", {b"id": str(task_id).encode()})
    assert message.task_id == task_id
    assert message.requeues == 0
    assert message.error is None


def test_missing_id() -> None:
    message = decode(b"1-2", {b"r": b"0"})
    assert message.task_id is None
    assert message.stream_id == b"1-2"
    assert message.error == "message has no id field"


@pytest.mark.parametrize("raw", [b"not-a-uuid", b"", b"\xff\xfe", b"1234"])
def test_non_uuid_id(raw: bytes) -> None:
    message = decode(b"1-3", {b"id": raw, b"r": b"0"})
    assert message.task_id is None
    assert message.requeues == 0
    assert message.error is not None
    assert "is not a UUID" in message.error
    assert repr(raw) in message.error


def test_long_non_uuid_id_is_truncated_in_the_error() -> None:
    raw = b"x" * 500
    message = decode(b"1-4", {b"id": raw})
    assert message.error is not None
    assert repr(b"x" * 64) in message.error
    assert len(message.error) < 120


@pytest.mark.parametrize("bad_r", [b"", b"many", b"1.5", b"\xff"])
def test_bad_r_field_counts_as_zero(bad_r: bytes) -> None:
    task_id = uuid.uuid4()
    message = decode(b"1-5", {b"id": str(task_id).encode(), b"r": bad_r})
    assert message.task_id == task_id
    assert message.requeues == 0
    assert message.error is None
