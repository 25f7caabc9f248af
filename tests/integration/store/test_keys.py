"""The api_keys table: keys stored as a hash only, names unique, revoke and touch."""

from __future__ import annotations

import pytest

from conveyor.config import Rate
from conveyor.errors import KeyNameTaken
from conveyor.state import AppState
from conveyor.store.keys import KEY_PATTERN, KeyStore, digest, parse_key


def store_of(state: AppState) -> KeyStore:
    return KeyStore(state.pool, state.settings.database_schema)


async def test_the_table_never_holds_the_key_or_its_secret(state: AppState) -> None:
    store = store_of(state)
    record, key = await store.create("ci", ["tasks:read", "tasks:enqueue"], types=["echo"],
                                     rate=Rate(100, 1), expires_in_s=3600)
    assert KEY_PATTERN.fullmatch(key)
    parsed = parse_key(key)
    assert parsed is not None
    key_id, secret = parsed
    assert record.id == key_id
    assert record.secret_sha256 == digest(secret)
    rows = await state.pool.fetch(f"SELECT * FROM {store.table}")
    assert len(rows) == 1
    for column, value in rows[0].items():
        text = value.hex() if isinstance(value, bytes) else str(value)
        assert secret not in text, column
        assert key not in text, column
        if isinstance(value, bytes):
            assert secret.encode() not in value, column
    assert record.scopes == ("tasks:read", "tasks:enqueue")
    assert record.types == ("echo",)
    assert record.rate == Rate(100, 1)
    assert record.expires_at is not None


async def test_names_are_unique_and_scopes_checked(state: AppState) -> None:
    store = store_of(state)
    await store.create("ci", ["admin"])
    with pytest.raises(KeyNameTaken, match="'ci'"):
        await store.create("ci", ["tasks:read"])
    with pytest.raises(ValueError, match="tasks:write"):
        await store.create("other", ["tasks:write"])
    for bad in (" ", "", "a b", "-x", "nul\x00", "ci\n", "x" * 101):
        with pytest.raises(ValueError, match="key name"):
            await store.create(bad, ["admin"])


async def test_revoke_keeps_the_first_time_and_any_active_follows(state: AppState) -> None:
    store = store_of(state)
    assert not await store.any_active()
    await store.create("ci", ["admin"])
    assert await store.any_active()
    first = await store.revoke("ci")
    assert first is not None
    assert first.state(first.revoked_at) == "revoked"  # type: ignore[arg-type]
    again = await store.revoke("ci")
    assert again is not None
    assert again.revoked_at == first.revoked_at
    assert await store.revoke("nobody") is None
    assert not await store.any_active()
    await store.create("brief", ["admin"], expires_in_s=60)
    assert await store.any_active()
    await state.pool.execute(f"UPDATE {store.table} SET expires_at = now() - interval '1 s'")
    assert not await store.any_active()  # expired


async def test_touch_writes_at_most_once_a_minute(state: AppState) -> None:
    store = store_of(state)
    record, _ = await store.create("ci", ["admin"])
    assert record.last_used_at is None
    await store.touch(record.id)
    touched = await store.get(record.id)
    assert touched is not None
    assert touched.last_used_at is not None
    await store.touch(record.id)
    again = await store.get(record.id)
    assert again is not None
    assert again.last_used_at == touched.last_used_at


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"rate": Rate(3_000_000_000, 1)}, "rate"),
    ({"expires_in_s": 10.0 ** 12}, "lifetime"),
])
async def test_a_rate_or_lifetime_postgres_cannot_hold_is_a_value_error(
    state: AppState, kwargs: dict[str, object], needle: str,
) -> None:
    # `conveyor keys create --rate 3000000000/s` or `--expires-in 99999999999d`: one line
    # naming the option (ValueError), not a database traceback.
    with pytest.raises(ValueError, match=needle):
        await store_of(state).create("huge", ["tasks:read"], **kwargs)  # type: ignore[arg-type]
    assert await store_of(state).list() == []
