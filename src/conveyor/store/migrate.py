"""Apply `migrations/NNNN_*.sql` in order, once each, recording the version.

Safe for a rolling deploy: an advisory lock serialises concurrent starts (many processes may
call `migrate()` at once, one migrates), every statement runs under a lock timeout so that a
migration stuck behind a long transaction fails fast instead of queueing every write behind
it, and a schema newer than this code knows makes `migrate()` refuse, naming both versions.

A migration runs in one transaction, unless its first line is `-- conveyor: no-transaction`:
then each statement (one per `;` that ends a line; no dollar-quoted bodies) runs on its own,
as `CREATE INDEX CONCURRENTLY` requires. Such a migration must be safe to run again from the
start after a failure midway (`DROP INDEX CONCURRENTLY IF EXISTS` before each build: a failed
concurrent build leaves an invalid index behind).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import structlog

from conveyor.errors import SchemaTooNew
from conveyor.store.pool import Connection, Pool, translate

log = structlog.get_logger("conveyor.migrate")
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x636F6E76  # "conv": one advisory lock id for all Conveyor migrations
_NO_TRANSACTION = "-- conveyor: no-transaction"
_STATEMENT_END = re.compile(r";[ \t]*(?:--[^\n]*)?$", re.MULTILINE)
LOCK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        return not self.sql.startswith(_NO_TRANSACTION)

    def statements(self) -> list[str]:
        """The statements of a no-transaction migration, comments kept, empty ones dropped."""
        parts = _STATEMENT_END.split(self.sql)
        return [p.strip() for p in parts if _code(p)]


def _code(sql: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in sql.splitlines())


def migrations(directory: Path | None = None) -> list[Migration]:
    """All migrations shipped with the package (or in `directory`), in version order."""
    source: Traversable | Path = (directory if directory is not None
                                  else resources.files("conveyor.store").joinpath("migrations"))
    found = []
    for entry in source.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(
    pool: Pool, schema: str, *, directory: Path | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> list[int]:
    """Bring `schema` up to date; returns the versions applied by this call.

    Raises SchemaTooNew if the schema records a version this code does not ship (a newer
    Conveyor migrated it): running on it could misread or damage its data.
    """
    known = migrations(directory)
    applied: list[int] = []
    with translate("migrate"):
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            try:
                await conn.execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {schema}.migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["version"] for r in await conn.fetch(
                    f"SELECT version FROM {schema}.migrations")}
                refuse_newer(schema, done, known)
                for migration in known:
                    if migration.version in done:
                        continue
                    await _apply(conn, schema, migration)
                    log.info("migrate.applied", version=migration.version, name=migration.name)
                    applied.append(migration.version)
            finally:
                await conn.execute("RESET lock_timeout")
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


async def _apply(conn: Connection, schema: str, migration: Migration) -> None:
    record = f"INSERT INTO {schema}.migrations (version, name) VALUES ($1, $2)"
    if migration.transactional:
        async with conn.transaction():
            await conn.execute(migration.sql.replace("{schema}", schema))
            await conn.execute(record, migration.version, migration.name)
        return
    for statement in migration.statements():
        await conn.execute(statement.replace("{schema}", schema))
    await conn.execute(record, migration.version, migration.name)


def refuse_newer(schema: str, done: set[int], known: list[Migration]) -> None:
    """Raise SchemaTooNew if `done` holds a version above every one in `known`."""
    newest_known = max((m.version for m in known), default=0)
    newer = sorted(v for v in done if v > newest_known)
    if newer:
        raise SchemaTooNew(
            f"schema {schema!r} is at version {max(newer)}, newer than this Conveyor knows "
            f"(up to {newest_known}): it was migrated by a newer release; run that release "
            "(or newer) against it"
        )


async def pending(pool: Pool, schema: str, *, directory: Path | None = None) -> list[int]:
    """Versions shipped with the package that `schema` has not applied (all, if none ran).
    Raises SchemaTooNew as `migrate` does."""
    known = migrations(directory)
    with translate("migrate.pending"):
        table = await pool.fetchval("SELECT to_regclass($1)", f"{schema}.migrations")
        done = set() if table is None else {
            r["version"] for r in await pool.fetch(f"SELECT version FROM {schema}.migrations")
        }
    refuse_newer(schema, done, known)
    return [m.version for m in known if m.version not in done]
