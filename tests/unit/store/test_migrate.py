"""Migration files: transactional or not, split into statements."""

from __future__ import annotations

import pytest

from conveyor.errors import SchemaTooNew
from conveyor.store.migrate import Migration, migrations, refuse_newer


def test_a_no_transaction_migration_is_split_per_statement() -> None:
    sql = ("-- conveyor: no-transaction\n-- why\nDROP INDEX CONCURRENTLY IF EXISTS a;\n"
           "CREATE INDEX CONCURRENTLY a ON t (x)\n    WHERE y IN ('p', 'q');  -- note\n"
           "ALTER TABLE t SET (\n    fillfactor = 85\n);\n-- trailing comment\n")
    migration = Migration(4, "m", sql)
    assert not migration.transactional
    statements = migration.statements()
    assert len(statements) == 3
    assert statements[1].endswith("WHERE y IN ('p', 'q')")
    assert Migration(1, "m", "CREATE TABLE x ();").transactional


def test_shipped_migrations_are_numbered_and_0004_builds_concurrently() -> None:
    shipped = {m.version: m for m in migrations()}
    assert not shipped[4].transactional
    assert all("CONCURRENTLY" in s for s in shipped[4].statements() if "INDEX" in s)


def test_from_0007_no_transaction_holds_a_scan_of_the_tasks_table() -> None:
    """A scan inside a migration's transaction would hold the lock its ALTERs took (writes
    wait): validating a check and building an index go in no-transaction files."""
    shipped = {m.version: m for m in migrations()}
    for migration in (m for v, m in shipped.items() if v >= 7):
        sql = " ".join(migration.sql.split()).upper()
        if migration.transactional:
            assert "VALIDATE CONSTRAINT" not in sql, migration.name
            assert "INDEX TASKS_" not in sql.replace("CREATE INDEX TASK_EDGES", ""), \
                migration.name
        else:
            assert all("CONCURRENTLY" in s for s in migration.statements() if "INDEX" in s)
    assert not shipped[11].transactional
    assert "VALIDATE CONSTRAINT TASKS_STATUS_CHECK" in shipped[11].sql.upper()
    assert not shipped[12].transactional
    assert "VALIDATE CONSTRAINT TASKS_PRIORITY_CHECK" in shipped[12].sql.upper()


def test_a_newer_schema_is_refused_naming_both_versions() -> None:
    known = [Migration(1, "a", ""), Migration(2, "b", "")]
    refuse_newer("s", {1, 2}, known)
    with pytest.raises(SchemaTooNew, match="version 7, newer than this Conveyor knows "
                                           r"\(up to 2\)"):
        refuse_newer("s", {1, 2, 7}, known)
