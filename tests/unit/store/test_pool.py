"""The one classification of Postgres errors: outage, conflict, failover, or permanent."""

from __future__ import annotations

import asyncpg
import pytest
from asyncpg.exceptions import _base

from conveyor.errors import Conflict, Failover, Overloaded, Unavailable
from conveyor.store.pool import classify, translate


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), Conflict),
        (asyncpg.exceptions.SerializationError("could not serialize access"), Conflict),
        (asyncpg.exceptions.QueryCanceledError("canceling statement due to timeout"), Conflict),
        (asyncpg.exceptions.LockNotAvailableError("could not obtain lock"), Conflict),
        (asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"), Failover),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), Failover),
        (asyncpg.exceptions.CannotConnectNowError("the database system is in recovery"),
         Failover),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), Unavailable),
        (asyncpg.exceptions.TooManyConnectionsError("too many clients"), Unavailable),
        (ConnectionRefusedError(111, "refused"), Unavailable),
        (TimeoutError(), Unavailable),
        (asyncpg.exceptions.RaiseError("a trigger said no"), None),
        (asyncpg.exceptions.UntranslatableCharacterError("\\u0000"), None),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), None),
        (_base.DataError("invalid input for query argument $1"), None),  # client-side
        (asyncpg.InterfaceError("connection is closed"), Unavailable),
        (asyncpg.InterfaceError("cannot call Connection.fetch(): connection has been released"
                                " back to the pool"), Unavailable),
        (asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
         Unavailable),
        (asyncpg.InterfaceError("the server expects 2 arguments for this query, 1 was passed"),
         None),
        (asyncpg.exceptions.ClientConfigurationError("bad connection option"), None),
        (ValueError("not a driver error"), None),
    ],
)
def test_classify(error: Exception, kind: type[Unavailable] | None) -> None:
    assert classify(error) is kind


def test_translate_raises_the_class_with_the_op() -> None:
    with pytest.raises(Failover) as caught, translate("tasks.record"):
        raise asyncpg.exceptions.ReadOnlySQLTransactionError("read-only")
    assert caught.value.op == "tasks.record"
    assert "ReadOnlySQLTransactionError" in caught.value.detail
    assert isinstance(caught.value, Unavailable)  # retried by every loop as an outage


def test_translate_leaves_permanent_and_translated_errors_alone() -> None:
    with pytest.raises(asyncpg.exceptions.RaiseError), translate("tasks.record"):
        raise asyncpg.exceptions.RaiseError("no")
    with pytest.raises(Overloaded), translate("tasks.get"):
        raise Overloaded("no connection free")
