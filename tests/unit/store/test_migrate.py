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


def test_a_newer_schema_is_refused_naming_both_versions() -> None:
    known = [Migration(1, "a", ""), Migration(2, "b", "")]
    refuse_newer("s", {1, 2}, known)
    with pytest.raises(SchemaTooNew, match="version 7, newer than this Conveyor knows "
                                           r"\(up to 2\)"):
        refuse_newer("s", {1, 2, 7}, known)
