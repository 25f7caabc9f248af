"""Redis key names: per-type keys share a `{type}` hash tag; consumer names round-trip."""

from __future__ import annotations

import pytest

from conveyor.queue.keys import GROUP, Keys, consumer_name, worker_of


def _hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first `{` and the next `}`."""
    start = key.index("{")
    end = key.index("}", start + 1)
    return key[start + 1:end]


def test_per_type_keys_carry_the_type_hash_tag() -> None:
    keys = Keys("app")
    assert keys.stream("resize") == "app:{resize}:stream"
    assert keys.delayed("resize") == "app:{resize}:delayed"
    assert keys.dead("resize") == "app:{resize}:dead"
    for key in (keys.stream("image.resize"), keys.delayed("image.resize"),
                keys.dead("image.resize")):
        assert _hash_tag(key) == "image.resize"


def test_keys_of_one_type_are_distinct() -> None:
    keys = Keys()
    names = {keys.stream("a"), keys.delayed("a"), keys.dead("a"), keys.stream("b")}
    assert len(names) == 4


def test_process_keys_use_the_prefix() -> None:
    keys = Keys("t1")
    assert keys.lock("rebalance") == "t1:lock:rebalance"
    assert Keys().stream("x").startswith("conveyor:")


def test_group_name() -> None:
    assert GROUP == "workers"


@pytest.mark.parametrize(
    ("worker_id", "task_type"),
    [("host-123-abcdef", "resize"), ("my/host-1-ff", "image.resize"), ("w", "a-b_c")],
)
def test_consumer_name_round_trip(worker_id: str, task_type: str) -> None:
    consumer = consumer_name(worker_id, task_type)
    assert consumer == f"{worker_id}/{task_type}"
    assert worker_of(consumer) == worker_id


def test_consumers_differ_per_type_and_worker() -> None:
    names = {consumer_name(w, t) for w in ("w1", "w2") for t in ("a", "b")}
    assert len(names) == 4
