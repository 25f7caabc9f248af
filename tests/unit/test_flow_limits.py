"""Flow limits as declared and as overridden: rates, keys, and what a row changes."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.errors import ConfigError
from conveyor.queue.keys import Keys
from conveyor.registry import Limits, TaskRate, parse_task_rate
from conveyor.store.queue_settings import Override


class P(BaseModel):
    tenant: str = ""


def test_rates_read_their_period_and_burst() -> None:
    assert parse_task_rate("100/s") == TaskRate(100, 1, 1)
    assert parse_task_rate("6000/m burst=50") == TaskRate(6000, 60, 50)
    assert parse_task_rate(" 10 / h, burst 3 ") == TaskRate(10, 3600, 3)
    assert str(TaskRate(6000, 60, 50)) == "6000/m burst=50"
    for bad in ("fast", "0/s", "10/d", "10/s burst=0"):
        with pytest.raises(ValueError, match="is not a rate"):
            parse_task_rate(bad)


def test_a_key_is_read_from_the_payload() -> None:
    limits = Limits(concurrency_key="payload.tenant.id", max_concurrency_per_key=2)
    assert limits.key_of({"tenant": {"id": "acme"}}) == '"acme"'
    assert limits.key_of({"tenant": {"id": 7}}) == "7"
    assert limits.key_of({"tenant": {"id": True}}) != limits.key_of({"tenant": {"id": "true"}})
    assert limits.key_of({"tenant": {"id": 7}}) != limits.key_of({"tenant": {"id": "7"}})
    assert limits.key_of({"tenant": {}}) is None  # no key: no per-key limit
    assert limits.keyed
    assert not limits.limited  # no global limit: reads are not gated


def test_declarations_are_checked_when_the_type_is_registered() -> None:
    app = Conveyor()
    with pytest.raises(ConfigError, match="need a concurrency_key"):
        app.task("a", payload=P, max_concurrency_per_key=2)(_handler)
    with pytest.raises(ConfigError, match="payload path"):
        app.task("b", payload=P, concurrency_key="tenant", max_concurrency_per_key=2)(_handler)
    with pytest.raises(ConfigError, match="not a rate"):
        app.task("c", payload=P, rate_limit="lots")(_handler)
    with pytest.raises(ConfigError, match=r">= 1"):
        app.task("d", payload=P, max_concurrency=0)(_handler)
    app.task("e", payload=P, max_concurrency=3, rate_limit="5/s")(_handler)
    assert app.registry.types["e"].limits == Limits(max_concurrency=3,
                                                    rate_limit=TaskRate(5, 1))


def test_an_override_keeps_lifts_or_replaces_each_limit() -> None:
    declared = Limits(max_concurrency=3, rate_limit=TaskRate(5, 1))
    assert Override("t").over(declared) == declared
    lifted = Override("t", max_concurrency=0, rate_limit="off").over(declared)
    assert lifted.max_concurrency is None
    assert lifted.rate_limit is None
    assert not lifted.limited
    changed = Override("t", max_concurrency=1, rate_limit="2/m", paused=True).over(declared)
    assert changed == Limits(max_concurrency=1, rate_limit=TaskRate(2, 60), paused=True)


async def _handler(payload: P, ctx: object) -> None:
    return None


def test_long_concurrency_keys_are_named_by_their_hash() -> None:
    keys = Keys("p")
    short = keys.leases("t", "acme")
    assert short.endswith(":k:acme")
    one, two = "x" * 300 + "1", "x" * 300 + "2"  # the same first 300 characters
    assert keys.leases("t", one) != keys.leases("t", two)
    assert keys.pace("t", one) != keys.pace("t", two)
    assert len(keys.leases("t", one)) < 200
