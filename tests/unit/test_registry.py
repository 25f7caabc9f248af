"""RetryPolicy backoff, Registry validation, cron expressions."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from conveyor.errors import ConfigError, UnknownTaskType
from conveyor.registry import CronJob, CronTick, Registry, RetryPolicy, RunIn, TaskType


class Payload(BaseModel):
    n: int = 0


async def async_handler(payload: Payload, ctx: Any) -> int:
    return payload.n


def sync_handler(payload: Payload, ctx: Any) -> int:
    return payload.n


def task_type(
    name: str = "resize", handler: Any = async_handler, run_in: RunIn = "loop"
) -> TaskType:
    return TaskType(name=name, payload_model=Payload, handler=handler, run_in=run_in)


# -- RetryPolicy -----------------------------------------------------------------------------


def test_delay_doubles_per_attempt_without_jitter() -> None:
    policy = RetryPolicy(base_delay_s=1.5, max_delay_s=1000.0, jitter=0.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [1.5, 3.0, 6.0, 12.0, 24.0]


def test_delay_is_capped() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=10.0, jitter=0.0)
    assert policy.delay_s(4) == 8.0
    assert policy.delay_s(5) == 10.0
    assert policy.delay_s(60) == 10.0


def test_delay_stays_capped_for_huge_attempt_numbers() -> None:
    # Task types may set max_attempts without an upper bound; the backoff must not overflow.
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=10.0, jitter=0.0)
    assert policy.delay_s(2000) == 10.0


def test_attempt_zero_or_less_waits_the_base_delay() -> None:
    policy = RetryPolicy(base_delay_s=2.0, max_delay_s=100.0, jitter=0.0)
    assert policy.delay_s(0) == 2.0
    assert policy.delay_s(-3) == 2.0


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 1.0])
def test_jitter_stays_within_bounds(jitter: float) -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=30.0, jitter=jitter)
    rng = random.Random(1234)
    for attempt in range(1, 12):
        raw = min(30.0, 2.0 ** (attempt - 1))
        for _ in range(50):
            delay = policy.delay_s(attempt, rng)
            assert raw * (1 - jitter) <= delay <= raw


def test_jitter_actually_spreads_delays() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=30.0, jitter=0.5)
    rng = random.Random(7)
    delays = [policy.delay_s(3, rng) for _ in range(200)]
    assert min(delays) < 2.5  # raw 4.0: lower half of the band is reached
    assert max(delays) > 3.5  # and its upper end
    assert len(set(delays)) > 150


def test_same_seed_same_delays() -> None:
    policy = RetryPolicy()
    first = [policy.delay_s(n, random.Random(99)) for n in range(1, 8)]
    second = [policy.delay_s(n, random.Random(99)) for n in range(1, 8)]
    assert first == second


def test_delay_without_rng_uses_module_random() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=100.0, jitter=0.5)
    for _ in range(20):
        assert 2.0 <= policy.delay_s(3) <= 4.0


def test_default_policy_values() -> None:
    policy = RetryPolicy()
    assert (policy.base_delay_s, policy.max_delay_s, policy.jitter) == (1.0, 300.0, 0.5)


# -- Registry.add -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "resize", "image.resize", "send-mail", "v2_task", "0x", "a" * 64]
)
def test_valid_names_are_accepted(name: str) -> None:
    registry = Registry()
    registry.add(task_type(name))
    assert registry.get(name).name == name


@pytest.mark.parametrize(
    "name",
    ["", "Resize", "_private", "-dash", ".dot", "a/b", "has space", "a" * 65, "naïve", "a:b"],
)
def test_invalid_names_are_rejected(name: str) -> None:
    registry = Registry()
    with pytest.raises(ConfigError, match="must match"):
        registry.add(task_type(name))
    assert len(registry) == 0


def test_duplicate_name_is_rejected() -> None:
    registry = Registry()
    first = task_type("resize")
    registry.add(first)
    with pytest.raises(ConfigError, match="registered twice"):
        registry.add(task_type("resize", sync_handler, "thread"))
    assert registry.get("resize") is first
    assert len(registry) == 1


def test_loop_handler_must_be_async() -> None:
    registry = Registry()
    with pytest.raises(ConfigError, match="loop handlers must be async"):
        registry.add(task_type("resize", sync_handler, "loop"))
    assert "resize" not in registry.types


@pytest.mark.parametrize("run_in", ["thread", "process"])
def test_thread_and_process_handlers_must_be_plain(run_in: RunIn) -> None:
    registry = Registry()
    with pytest.raises(ConfigError, match=f"{run_in} handlers must be plain functions"):
        registry.add(task_type("resize", async_handler, run_in))
    assert len(registry) == 0


@pytest.mark.parametrize("run_in", ["thread", "process"])
def test_plain_handlers_in_thread_or_process_are_accepted(run_in: RunIn) -> None:
    registry = Registry()
    registry.add(task_type("resize", sync_handler, run_in))
    assert registry.get("resize").run_in == run_in


def test_get_unknown_raises_unknown_task_type() -> None:
    with pytest.raises(UnknownTaskType, match="nope"):
        Registry().get("nope")


def test_iteration_and_length() -> None:
    registry = Registry()
    registry.add(task_type("b"))
    registry.add(task_type("a"))
    assert len(registry) == 2
    assert [t.name for t in registry] == ["b", "a"]


# -- cron --------------------------------------------------------------------------------------


def cron_type(name: str) -> TaskType:
    return TaskType(name=name, payload_model=CronTick, handler=async_handler)


@pytest.mark.parametrize("expression", ["* * * * *", "*/5 * * * *", "0 12 * * 1"])
def test_add_cron_rejects_five_field_expressions(expression: str) -> None:
    registry = Registry()
    with pytest.raises(ConfigError, match="six-field"):
        registry.add_cron(CronJob("tick", expression), cron_type("tick"))
    assert registry.cron_jobs == {}
    assert len(registry) == 0


@pytest.mark.parametrize("expression", ["", "61 * * * * *", "* * * * * * *", "a b c d e f"])
def test_add_cron_rejects_invalid_expressions(expression: str) -> None:
    registry = Registry()
    with pytest.raises(ConfigError, match="six-field"):
        registry.add_cron(CronJob("tick", expression), cron_type("tick"))
    assert registry.cron_jobs == {}


def test_add_cron_registers_job_and_type() -> None:
    registry = Registry()
    job = CronJob("tick", "*/30 * * * * *")
    registry.add_cron(job, cron_type("tick"))
    assert registry.cron_jobs == {"tick": job}
    assert registry.get("tick").payload_model is CronTick


def test_add_cron_with_bad_type_name_registers_no_job() -> None:
    registry = Registry()
    with pytest.raises(ConfigError):
        registry.add_cron(CronJob("Tick", "* * * * * *"), cron_type("Tick"))
    assert registry.cron_jobs == {}


def test_next_after_honours_the_seconds_field() -> None:
    job = CronJob("tick", "*/15 * * * * *")
    moment = datetime(2024, 1, 1, 12, 0, 7, tzinfo=UTC)
    assert job.next_after(moment) == datetime(2024, 1, 1, 12, 0, 15, tzinfo=UTC)
    assert job.next_after(datetime(2024, 1, 1, 12, 0, 15, tzinfo=UTC)) == datetime(
        2024, 1, 1, 12, 0, 30, tzinfo=UTC
    )
    assert job.next_after(datetime(2024, 1, 1, 12, 0, 50, tzinfo=UTC)) == datetime(
        2024, 1, 1, 12, 1, 0, tzinfo=UTC
    )


def test_next_after_seconds_come_first() -> None:
    # "30 0 * * * *": second 30 of minute 0 of every hour (not minute 30 of hour 0).
    job = CronJob("hourly", "30 0 * * * *")
    moment = datetime(2024, 3, 5, 12, 0, 7, tzinfo=UTC)
    assert job.next_after(moment) == datetime(2024, 3, 5, 12, 0, 30, tzinfo=UTC)
    assert job.next_after(datetime(2024, 3, 5, 12, 0, 30, tzinfo=UTC)) == datetime(
        2024, 3, 5, 13, 0, 30, tzinfo=UTC
    )


def test_next_after_every_second_is_strictly_later() -> None:
    job = CronJob("fast", "* * * * * *")
    moment = datetime(2024, 1, 1, 23, 59, 59, tzinfo=UTC)
    assert job.next_after(moment) == datetime(2024, 1, 2, 0, 0, 0, tzinfo=UTC)


def test_cron_tick_forbids_extra_fields() -> None:
    tick = CronTick.model_validate({"scheduled_at": "2024-01-01T00:00:00Z"})
    assert tick.scheduled_at == datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="extra"):
        CronTick.model_validate({"scheduled_at": "2024-01-01T00:00:00Z", "x": 1})
