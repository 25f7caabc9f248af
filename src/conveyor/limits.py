"""Changing a task type's flow limits at run time, for the API and the dashboard alike: the
change is checked against the declared limits and stored in one transaction, then every
worker is told to reload (without Redis, they pick it up at their next periodic reload)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.errors import Unavailable
from conveyor.queue.flow import FlowRedis
from conveyor.registry import Limits
from conveyor.state import AppState
from conveyor.store.queue_settings import Override, QueueSettingsStore


def settings_store(state: AppState) -> QueueSettingsStore:
    return QueueSettingsStore(state.pool, state.settings.database_schema,
                              acquire_timeout_s=state.settings.pg_acquire_timeout)


@dataclass(frozen=True)
class InForce:
    """A type's limits now: the declared ones under its stored row, and its concurrency
    leases in use (None when Redis did not answer)."""

    limits: Limits
    row: Override | None
    leases: int | None


async def change_limits(state: AppState, task_type: str, changes: dict[str, Any]) -> InForce:
    """Store `changes` to `task_type`'s limits (InvalidOverride, with nothing stored, when
    they cannot apply) and nudge the workers; what is now in force (leases None without
    Redis)."""
    declared = state.app.registry.get(task_type)
    row, limits = await settings_store(state).change(task_type, changes, declared.limits)
    flow = FlowRedis(state.redis, state.keys)
    leases = None
    with contextlib.suppress(Unavailable):
        await flow.nudge(task_type)
        leases = (await flow.in_use([task_type])).get(task_type)
    return InForce(limits, row, leases)


async def in_force(state: AppState, task_types: Sequence[str]) -> dict[str, InForce]:
    overrides = await settings_store(state).all()
    leases = await FlowRedis(state.redis, state.keys).in_use(task_types)
    out = {}
    for name in task_types:
        declared = state.app.registry.get(name).limits
        row = overrides.get(name)
        out[name] = InForce(row.over_or_declared(declared, name) if row is not None
                            else declared, row, leases.get(name))
    return out
