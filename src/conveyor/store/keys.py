"""API keys: the `api_keys` table, the key format, and what a key's scopes allow.

A key reads `cvk_<id>_<secret>`: 16 hex digits of public id, then 43 URL-safe base64
characters (256 random bits) of secret. The fixed prefix lets secret scanners find leaked keys
(`KEY_PATTERN`). Only the id and the SHA-256 of the secret are stored, never the key.

Why a plain SHA-256 and not a slow password hash (bcrypt, argon2): the secret is 256 random
bits, not something a person chose, so there is no dictionary to try and a brute force of the
hash is as hopeless as one of the key itself; a slow hash would only cost every cache miss
milliseconds of CPU. The row is found by its id (not secret), and the digests are compared with
`hmac.compare_digest`, so timing reveals nothing about the secret. This is the design of GitHub's
and Stripe's API tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from conveyor.config import Rate
from conveyor.errors import KeyNameTaken
from conveyor.store.pool import Pool, borrowed

PREFIX = "cvk"
KEY_PATTERN = re.compile(r"cvk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,99}$"  # printable, shell- and URL-friendly
_ID_BYTES, _SECRET_BYTES = 8, 32
MAX_RATE_COUNT = 2**31 - 1  # the column is an integer
MAX_LIFETIME_S = 100 * 365 * 86400  # past it, leave the key without an expiry

READ, ENQUEUE, MANAGE, ADMIN = "tasks:read", "tasks:enqueue", "tasks:manage", "admin"
SCOPES = (READ, ENQUEUE, MANAGE, ADMIN)  # admin implies every other scope

KeyState = Literal["active", "revoked", "expired"]


def grants(scopes: Iterable[str], scope: str) -> bool:
    """Whether a key with `scopes` may do what `scope` guards."""
    held = set(scopes)
    return ADMIN in held or scope in held


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """`scopes` without duplicates, in order; ValueError naming any unknown one."""
    wanted = list(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown or not wanted:
        raise ValueError(f"unknown scope(s) {', '.join(unknown) or '(none given)'}; "
                         f"scopes are: {', '.join(SCOPES)}")
    return wanted


def parse_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of a token in the key format, or None."""
    if not KEY_PATTERN.fullmatch(token):
        return None
    _, key_id, secret = token.split("_", 2)
    return key_id, secret


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One row of `api_keys`: everything about a key but the key."""

    id: str
    name: str
    secret_sha256: bytes
    scopes: tuple[str, ...]
    types: tuple[str, ...] | None  # task types it may enqueue; None: all
    rate: Rate | None  # its own rate limit; None: the default
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(digest(secret), self.secret_sha256)

    def state(self, now: datetime) -> KeyState:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def public(self, now: datetime) -> dict[str, Any]:
        """The key as `conveyor keys list` and `GET /v1/keys` show it: no secret, no hash."""
        return {
            "name": self.name, "id": self.id, "prefix": f"{PREFIX}_{self.id}_",
            "scopes": list(self.scopes), "types": list(self.types) if self.types else None,
            "rate": str(self.rate) if self.rate else None, "state": self.state(now),
            "created_at": self.created_at.isoformat(), "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at), "last_used_at": _iso(self.last_used_at),
        }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def _record(row: asyncpg.Record) -> KeyRecord:
    rate = Rate(row["rate_count"], row["rate_period_s"]) if row["rate_count"] else None
    return KeyRecord(
        id=row["id"], name=row["name"], secret_sha256=bytes(row["secret_sha256"]),
        scopes=tuple(row["scopes"]), types=tuple(row["types"]) if row["types"] else None,
        rate=rate, created_at=row["created_at"], expires_at=row["expires_at"],
        revoked_at=row["revoked_at"], last_used_at=row["last_used_at"],
    )


class KeyStore:
    """All SQL on the api_keys table of one schema."""

    def __init__(self, pool: Pool, schema: str, *, acquire_timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.table = f"{schema}.api_keys"
        self.acquire_timeout_s = acquire_timeout_s

    async def create(
        self, name: str, scopes: Sequence[str], *, types: Sequence[str] | None = None,
        rate: Rate | None = None, expires_in_s: float | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its row and the key itself, which exists nowhere else from now on.
        ValueError for a bad name, an unknown scope, or a rate or lifetime out of range;
        KeyNameTaken if the name is."""
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"key name {name!r}: 1-100 letters, digits and . _ : @ / -, "
                             "starting with a letter or digit")
        wanted = check_scopes(scopes)
        if rate is not None and not 0 < rate.count <= MAX_RATE_COUNT:
            raise ValueError(f"rate {rate}: at most {MAX_RATE_COUNT} requests per period")
        if expires_in_s is not None and not 0 < expires_in_s <= MAX_LIFETIME_S:
            raise ValueError(f"lifetime of {expires_in_s:g} s: more than 0 and at most 100 "
                             "years (omit it for a key that does not expire)")
        key_id, secret = secrets.token_hex(_ID_BYTES), secrets.token_urlsafe(_SECRET_BYTES)
        # $1 id, $2 name, $3 digest, $4 scopes, $5 types (NULL: all), $6/$7 rate (NULL:
        # default), $8 lifetime in seconds (NULL: none). Returns the row.
        sql = f"""
            INSERT INTO {self.table}
              (id, name, secret_sha256, scopes, types, rate_count, rate_period_s, expires_at)
            VALUES ($1, $2, $3, $4::text[], $5::text[], $6, $7,
                    now() + make_interval(secs => $8::float8))
            RETURNING *"""
        async with borrowed(self.pool, self.acquire_timeout_s, "keys.create") as conn:
            try:
                row = await conn.fetchrow(
                    sql, key_id, name, digest(secret), wanted,
                    list(types) if types else None, rate.count if rate else None,
                    rate.period_s if rate else None, expires_in_s,
                )
            except asyncpg.UniqueViolationError:
                raise KeyNameTaken(f"an API key named {name!r} exists already (revoked keys "
                                   "keep their names)") from None
        assert row is not None
        return _record(row), f"{PREFIX}_{key_id}_{secret}"

    async def get(self, key_id: str) -> KeyRecord | None:
        async with borrowed(self.pool, self.acquire_timeout_s, "keys.get") as conn:
            row = await conn.fetchrow(f"SELECT * FROM {self.table} WHERE id = $1", key_id)
        return _record(row) if row else None

    async def list(self) -> list[KeyRecord]:
        """Every key, revoked and expired ones too, oldest first."""
        async with borrowed(self.pool, self.acquire_timeout_s, "keys.list") as conn:
            rows = await conn.fetch(f"SELECT * FROM {self.table} ORDER BY created_at, name")
        return [_record(r) for r in rows]

    async def revoke(self, name: str) -> KeyRecord | None:
        """Revoke the key named `name` (a revoked key keeps its first revoked_at); None if no
        key has that name."""
        sql = f"""UPDATE {self.table} SET revoked_at = coalesce(revoked_at, now())
                  WHERE name = $1 RETURNING *"""
        async with borrowed(self.pool, self.acquire_timeout_s, "keys.revoke") as conn:
            row = await conn.fetchrow(sql, name)
        return _record(row) if row else None

    async def touch(self, key_id: str) -> None:
        """Note that the key was used now; a no-op within a minute of its last note, so that
        many processes noting one busy key write its row about once a minute."""
        sql = f"""UPDATE {self.table} SET last_used_at = now() WHERE id = $1
                  AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')"""
        async with borrowed(self.pool, self.acquire_timeout_s, "keys.touch") as conn:
            await conn.execute(sql, key_id)

    async def any_made(self) -> bool:
        """Whether any key was ever made here (revoked and expired ones count)."""
        sql = f"SELECT EXISTS (SELECT 1 FROM {self.table})"
        async with borrowed(self.pool, self.acquire_timeout_s, "keys.any_made") as conn:
            return bool(await conn.fetchval(sql))

    async def any_active(self) -> bool:
        """Whether any key is neither revoked nor expired."""
        sql = f"""SELECT EXISTS (SELECT 1 FROM {self.table} WHERE revoked_at IS NULL
                  AND (expires_at IS NULL OR expires_at > now()))"""
        async with borrowed(self.pool, self.acquire_timeout_s, "keys.any_active") as conn:
            return bool(await conn.fetchval(sql))
