"""Apply `migrations/NNNN_*.sql` in order, once each, recording the version.

An advisory lock serialises concurrent starts, so many processes may call `migrate()` at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import structlog

from conveyor.store.pool import Pool, translate

log = structlog.get_logger("conveyor.migrate")
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x636F6E76  # "conv": one advisory lock id for all Conveyor migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files("conveyor.store").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(pool: Pool, schema: str) -> list[int]:
    """Bring `schema` up to date; returns the versions applied by this call."""
    applied: list[int] = []
    with translate("migrate"):
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            try:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {schema}.migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["version"] for r in await conn.fetch(
                    f"SELECT version FROM {schema}.migrations")}
                for migration in migrations():
                    if migration.version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(migration.sql.replace("{schema}", schema))
                        await conn.execute(
                            f"INSERT INTO {schema}.migrations (version, name) VALUES ($1, $2)",
                            migration.version, migration.name,
                        )
                    log.info("migrate.applied", version=migration.version, name=migration.name)
                    applied.append(migration.version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


async def pending(pool: Pool, schema: str) -> list[int]:
    """Versions shipped with the package that `schema` has not applied (all, if none ran)."""
    with translate("migrate.pending"):
        table = await pool.fetchval("SELECT to_regclass($1)", f"{schema}.migrations")
        done = set() if table is None else {
            r["version"] for r in await pool.fetch(f"SELECT version FROM {schema}.migrations")
        }
    return [m.version for m in migrations() if m.version not in done]
