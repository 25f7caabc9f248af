"""Queue settings: a task type's flow limits as changed at run time (the `queue_settings`
table), over what its code declares. A column left NULL keeps the declared value; 0 (a rate
of `off`) lifts the limit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from conveyor.errors import ConfigError
from conveyor.registry import Limits, parse_task_rate
from conveyor.store.pool import Pool, borrowed

OFF = "off"  # a rate column that lifts the declared rate
FIELDS = ("max_concurrency", "max_concurrency_per_key", "rate_limit", "rate_limit_per_key",
          "paused")
log = structlog.get_logger("conveyor.flow")
_PER_KEY = ("max_concurrency_per_key", "rate_limit_per_key")


class InvalidOverride(ConfigError):
    """A row that cannot apply over its type's declared limits; `field` names the column."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
        """The limits in force: `declared` with this override applied. InvalidOverride naming
        the column when it cannot apply (a rate that is none, a count below 0, a per-key limit
        on a type without a concurrency_key)."""
        def count(name: str, base: int | None) -> int | None:
            value = getattr(self, name)
            if value is None:
                return base
            if not isinstance(value, int) or value < 0:
                raise InvalidOverride(name, f"{value!r} is not a count >= 0 (0 lifts it)")
            return value or None

        def rate(name: str, base: Any) -> Any:
            value = getattr(self, name)
            if value is None:
                return base
            if value == OFF:
                return None
            try:
                return parse_task_rate(value)
            except ValueError as exc:
                raise InvalidOverride(name, str(exc)) from None

        if declared.concurrency_key is None:
            for name in _PER_KEY:
                if getattr(self, name) not in (None, 0, OFF):
                    raise InvalidOverride(name, "the type declares no concurrency_key, so a "
                                          "per-key limit binds nothing")
        try:
            return dataclasses.replace(
                declared,
                max_concurrency=count("max_concurrency", declared.max_concurrency),
                max_concurrency_per_key=count("max_concurrency_per_key",
                                              declared.max_concurrency_per_key),
                rate_limit=rate("rate_limit", declared.rate_limit),
                rate_limit_per_key=rate("rate_limit_per_key", declared.rate_limit_per_key),
                paused=bool(self.paused),
            )
        except InvalidOverride:
            raise
        except (ConfigError, ValueError) as exc:
            raise InvalidOverride("limits", str(exc)) from None

    def over_or_declared(self, declared: Limits, task_type: str) -> Limits:
        """`over(declared)`, or `declared` with a warning when the row cannot apply (a row
        written by hand: the API checks its own): a bad row never stops a worker or a page."""
        try:
            return self.over(declared)
        except InvalidOverride as exc:
            log.warning("flow.settings.invalid", task_type=task_type, field=exc.field,
                        error=exc.message)
            return declared


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

    async def change(self, task_type: str, changes: dict[str, Any],
                     declared: Limits) -> tuple[Override, Limits]:
        """Set the given columns (None: back to the declared value) and return the row with
        the limits it puts in force over `declared`, in one transaction: a row that cannot
        apply is rolled back (InvalidOverride naming the column), so none is ever stored."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown queue settings: {sorted(unknown)}")
        names = list(changes)
        columns = ", ".join(["type", *names])
        values = ", ".join(f"${i + 2}" for i in range(len(names)))
        updates = ", ".join([*(f"{n} = EXCLUDED.{n}" for n in names), "updated_at = now()"])
        # The upsert locks the row (as SELECT ... FOR UPDATE would) until the commit, so two
        # changes at once are checked one after the other, each over the other's result.
        sql = (f"INSERT INTO {self.table} AS q ({columns}) VALUES ($1{', ' if names else ''}"
               f"{values}) ON CONFLICT (type) DO UPDATE SET {updates}"
               f" RETURNING type, {', '.join(FIELDS)}, updated_at")
        async with borrowed(self.pool, self.acquire_timeout_s,
                            "queue_settings.change") as conn, conn.transaction():
            row = await conn.fetchrow(sql, task_type, *list(changes.values()))
            assert row is not None  # an upsert returns its row
            override = Override(*row)
            limits = override.over(declared)  # InvalidOverride: rolled back
        return override, limits
