"""Queue settings: a task type's flow limits as changed at run time (the `queue_settings`
table), over what its code declares. A column left NULL keeps the declared value; 0 (a rate
of `off`) lifts the limit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.registry import Limits, parse_task_rate
from conveyor.store.pool import Pool, borrowed

OFF = "off"  # a rate column that lifts the declared rate
FIELDS = ("max_concurrency", "max_concurrency_per_key", "rate_limit", "rate_limit_per_key",
          "paused")


@dataclass(frozen=True, slots=True)
class Override:
    """One type's row; None: as declared."""

    type: str
    max_concurrency: int | None = None
    max_concurrency_per_key: int | None = None
    rate_limit: str | None = None
    rate_limit_per_key: str | None = None
    paused: bool = False
    updated_at: datetime | None = None

    def over(self, declared: Limits) -> Limits:
        """The limits in force: `declared` with this override applied."""
        def count(value: int | None, base: int | None) -> int | None:
            return base if value is None else (value or None)

        def rate(value: str | None, base: Any) -> Any:
            if value is None:
                return base
            return None if value == OFF else parse_task_rate(value)

        return dataclasses.replace(
            declared,
            max_concurrency=count(self.max_concurrency, declared.max_concurrency),
            max_concurrency_per_key=count(self.max_concurrency_per_key,
                                          declared.max_concurrency_per_key),
            rate_limit=rate(self.rate_limit, declared.rate_limit),
            rate_limit_per_key=rate(self.rate_limit_per_key, declared.rate_limit_per_key),
            paused=self.paused,
        )


class QueueSettingsStore:
    """All SQL on the queue_settings table of one schema."""

    def __init__(self, pool: Pool, schema: str, *, acquire_timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s
        self.table = f"{schema}.queue_settings"

    async def all(self) -> dict[str, Override]:
        async with borrowed(self.pool, self.acquire_timeout_s, "queue_settings.all") as conn:
            rows = await conn.fetch(f"SELECT type, {', '.join(FIELDS)}, updated_at"
                                    f" FROM {self.table}")
        return {r["type"]: Override(*r) for r in rows}

    async def change(self, task_type: str, changes: dict[str, Any]) -> Override:
        """Set the given columns (None: back to the declared value) and return the row."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown queue settings: {sorted(unknown)}")
        names = list(changes)
        columns = ", ".join(["type", *names])
        values = ", ".join(f"${i + 2}" for i in range(len(names)))
        updates = ", ".join([*(f"{n} = EXCLUDED.{n}" for n in names), "updated_at = now()"])
        sql = (f"INSERT INTO {self.table} AS q ({columns}) VALUES ($1{', ' if names else ''}"
               f"{values}) ON CONFLICT (type) DO UPDATE SET {updates}"
               f" RETURNING type, {', '.join(FIELDS)}, updated_at")
        async with borrowed(self.pool, self.acquire_timeout_s,
                            "queue_settings.change") as conn:
            row = await conn.fetchrow(sql, task_type, *list(changes.values()))
        assert row is not None  # an upsert returns its row
        return Override(*row)
