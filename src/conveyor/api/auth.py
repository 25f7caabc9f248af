"""Who is calling, and may they: bearer API keys, their scopes and their rate limits, as
FastAPI dependencies (so the OpenAPI document shows each route's 401, 403 and 429).

Keys are the bootstrap keys of `CONVEYOR_API_KEYS` (admin, compared in constant time against
every one) and the keys of the `api_keys` table (store/keys.py), looked up by their id and
kept here for `API_KEY_CACHE` seconds, so a request costs no Postgres query and a revoke takes
effect within that time (while Postgres is down, keys seen before are served as they were).
With no key at all (no bootstrap key, and none ever made in the table: revoking or outliving
every key does not reopen it) the API is open (anonymous admin), but only when it is bound to
a loopback address or `CONVEYOR_ALLOW_ANONYMOUS` is set.

Order per request: authenticate (401), count against the key's rate limit (429), then the
route's scope (403), so refused requests count too. Health, readiness and docs need no key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request

from conveyor.config import Rate, Settings
from conveyor.errors import ConfigError, Forbidden, RateLimited, Unauthorized, Unavailable
from conveyor.queue.ratelimit import RateLimiter
from conveyor.store.keys import ADMIN, ENQUEUE, MANAGE, READ, KeyRecord, KeyStore, grants, parse_key

log = structlog.get_logger("conveyor.api")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
DOCS_PREFIX = "/docs"  # the UI page and its assets
METRICS_PATH = "/metrics"
TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key and process
_CACHE_MAX = 10_000  # entries (found or not) before the cache starts over
_OUTAGE_LOG_EVERY_S = 10.0


def is_open(path: str) -> bool:
    """Paths that never need a key."""
    return path in OPEN_PATHS or path == DOCS_PREFIX or path.startswith(DOCS_PREFIX + "/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    scopes: frozenset[str]
    types: frozenset[str] | None = None  # task types it may enqueue; None: all
    rate: Rate | None = None
    limit_id: str | None = None  # its rate-limit identity; None: never limited

    def may(self, scope: str) -> bool:
        return grants(self.scopes, scope)

    def check_types(self, types: Iterable[str]) -> None:
        """Forbidden naming every type in `types` this caller may not enqueue."""
        if self.types is None:
            return
        refused = sorted({t for t in types if t not in self.types})
        if refused:
            raise Forbidden(
                f"API key {self.name!r} may not enqueue {', '.join(refused)} (it may "
                f"enqueue: {', '.join(sorted(self.types))})", types=refused)


ANONYMOUS = Principal("anonymous", frozenset({ADMIN}))


def bearer(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    """Resolves bearer tokens to principals and applies their rate limits (one per app)."""

    def __init__(
        self, store: KeyStore, limiter: RateLimiter, *, env_keys: Sequence[str] = (),
        metrics_keys: Sequence[str] = (), metrics_open: bool = False,
        default_rate: Rate | None = None, anonymous_allowed: bool = True,
        cache_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.env_keys = [k.encode() for k in env_keys]
        self.metrics_keys = [k.encode() for k in metrics_keys]
        self.metrics_open = metrics_open
        self.default_rate = default_rate
        self.anonymous_allowed = anonymous_allowed
        self.cache_s = cache_s
        self.clock = clock
        # key id -> (read at, its row or None for no such key); read by clock()
        self._rows: dict[str, tuple[float, KeyRecord | None]] = {}
        self._any_made: tuple[float, bool] = (-float("inf"), False)
        self._touched: dict[str, float] = {}  # key id -> when this process last wrote it
        self._outage_logged = -float("inf")

    async def _has_table_keys(self) -> bool:
        at, value = self._any_made
        if self.clock() - at >= self.cache_s:
            try:
                value = await self.store.any_made()
            except Unavailable:
                if at == -float("inf"):
                    raise
                return value  # Postgres is away: what was last read stands
            self._any_made = (self.clock(), value)
        return value

    async def keyless(self) -> bool:
        """True when no key exists at all: no bootstrap key, and no table key ever made (a
        revoked or expired one keeps the API closed)."""
        return not self.env_keys and not await self._has_table_keys()

    def _env_index(self, token: bytes) -> int | None:
        # Compare against every key, so the time taken does not reveal which one nearly matched.
        matches = [hmac.compare_digest(token, key) for key in self.env_keys]
        return matches.index(True) if any(matches) else None

    async def _row(self, key_id: str) -> KeyRecord | None:
        cached = self._rows.get(key_id)
        if cached is not None and self.clock() - cached[0] < self.cache_s:
            return cached[1]
        try:
            row = await self.store.get(key_id)
        except Unavailable:
            if cached is None:
                raise
            return cached[1]  # Postgres is away: a key seen before is served as it was
        if len(self._rows) >= _CACHE_MAX:
            self._rows.clear()
        self._rows[key_id] = (self.clock(), row)
        return row

    async def principal(self, token: str | None) -> Principal:
        """The caller `token` names; Unauthorized if none, Unavailable if Postgres is down."""
        if token is not None:
            index = self._env_index(token.encode())
            if index is not None:
                return Principal(f"bootstrap key {index + 1}", frozenset({ADMIN}),
                                 rate=self.default_rate, limit_id=f"env:{index}")
            parsed = parse_key(token)
            if parsed is not None:
                return await self._table_principal(*parsed)
        if await self.keyless():
            if self.anonymous_allowed:
                return ANONYMOUS
            raise Unauthorized("no API keys are configured, and this API is not on a loopback "
                               "address: create one with `conveyor keys create`")
        if token is None:
            raise Unauthorized("send an API key as `Authorization: Bearer <key>`")
        raise Unauthorized("unknown API key")

    def reference(self, token: str) -> str | None:
        """What a session keeps of `token` instead of the secret: `key:<id>` for a table key,
        `env:<sha256>` for a bootstrap key (None: neither). `principal_of` checks it again."""
        if self._env_index(token.encode()) is not None:
            return "env:" + hashlib.sha256(token.encode()).hexdigest()
        parsed = parse_key(token)
        return f"key:{parsed[0]}" if parsed is not None else None

    async def principal_of(self, reference: str) -> Principal:
        """The caller a session's `reference` names, checked as a token is (a revoked,
        expired or removed key is Unauthorized)."""
        kind, _, value = reference.partition(":")
        if kind == "env":
            digests = [hashlib.sha256(key).hexdigest().encode() for key in self.env_keys]
            matches = [hmac.compare_digest(value.encode(), d) for d in digests]
            if any(matches):
                index = matches.index(True)
                return Principal(f"bootstrap key {index + 1}", frozenset({ADMIN}),
                                 rate=self.default_rate, limit_id=f"env:{index}")
        elif kind == "key":
            row = await self._row(value)
            if row is not None:
                return await self._checked(row)
        raise Unauthorized("unknown API key")

    async def _table_principal(self, key_id: str, secret: str) -> Principal:
        row = await self._row(key_id)
        if row is None or not row.matches(secret):
            raise Unauthorized("unknown API key")
        return await self._checked(row)

    async def _checked(self, row: KeyRecord) -> Principal:
        now = datetime.now(UTC)
        state = row.state(now)
        if state == "revoked":
            raise Unauthorized(f"API key {row.name!r} was revoked")
        if state == "expired":
            expired = f"{row.expires_at:%Y-%m-%dT%H:%M:%SZ}"
            raise Unauthorized(f"API key {row.name!r} expired at {expired}")
        await self._touch(row.id)
        return Principal(row.name, frozenset(row.scopes),
                         frozenset(row.types) if row.types is not None else None,
                         rate=row.rate or self.default_rate, limit_id=f"key:{row.id}")

    def forget(self, key_id: str) -> None:
        """Drop a key from the cache (it was just revoked here)."""
        self._rows.pop(key_id, None)

    async def _touch(self, key_id: str) -> None:
        now = self.clock()
        if now - self._touched.get(key_id, -float("inf")) < TOUCH_EVERY_S:
            return
        if len(self._touched) >= _CACHE_MAX:
            self._touched.clear()
        self._touched[key_id] = now
        try:
            await self.store.touch(key_id)
        except Unavailable as exc:  # a usage note is not worth failing the request for
            log.warning("auth.touch_failed", key_id=key_id, error=str(exc))

    async def limit(self, principal: Principal) -> None:
        """Count one request against the principal's rate; RateLimited when over it.

        Fails open: with Redis down, requests pass (logged at most every 10 s). The limit
        guards fairness between keys, and a Redis outage already stops enqueues from being
        published; refusing every read as well would turn a Redis outage into an API outage.
        """
        if principal.rate is None or principal.limit_id is None:
            return
        try:
            verdict = await self.limiter.check(principal.limit_id, principal.rate)
        except Unavailable as exc:
            if self.clock() - self._outage_logged >= _OUTAGE_LOG_EVERY_S:
                self._outage_logged = self.clock()
                log.warning("auth.rate_limit_unavailable", error=str(exc),
                            note="requests pass unlimited until Redis answers")
            return
        if not verdict.allowed:
            raise RateLimited(principal.name, verdict.retry_after_s)

    def metrics_key(self, token: str | None) -> bool:
        """Whether `token` is one of the metrics-only keys (constant time)."""
        if token is None or not self.metrics_keys:
            return False
        matches = [hmac.compare_digest(token.encode(), key) for key in self.metrics_keys]
        return any(matches)


async def check_exposure(settings: Settings, store: KeyStore) -> None:
    """ConfigError, before anything listens, for an API on a non-loopback address with no key
    at all, unless `CONVEYOR_ALLOW_ANONYMOUS` says that is meant."""
    if is_loopback(settings.host) or settings.allow_anonymous or settings.api_keys:
        return
    if await store.any_active():
        return
    raise ConfigError(
        f"refusing to serve the API on {settings.host!r} with no API keys: anyone who can "
        "reach it could enqueue, cancel and retry tasks. Create a key (`conveyor keys create "
        "--name NAME --scopes admin`) or set CONVEYOR_API_KEYS, bind to 127.0.0.1, or set "
        "CONVEYOR_ALLOW_ANONYMOUS=true if another layer guards it"
    )


def _authenticator(request: Request) -> Authenticator:
    auth: Authenticator = request.app.state.authenticator
    return auth


async def authenticate(request: Request) -> Principal:
    """The caller, counted against its rate limit (401, 429)."""
    auth = _authenticator(request)
    principal = await auth.principal(bearer(request.headers.get("authorization")))
    await auth.limit(principal)
    return principal


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller, if it holds `scope` (403 naming the scope otherwise)."""

    async def scoped(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.may(scope):
            raise Forbidden(f"API key {principal.name!r} lacks the scope {scope!r}",
                            scope=scope)
        return principal

    scoped.__name__ = f"require_{scope.replace(':', '_')}"
    return scoped


async def metrics_access(request: Request) -> None:
    """`/metrics`: open with METRICS_OPEN, else a metrics-only key or a key with
    tasks:read (as other routes, open when no key exists and none is set for metrics)."""
    auth = _authenticator(request)
    if auth.metrics_open:
        return
    token = bearer(request.headers.get("authorization"))
    if auth.metrics_key(token):
        return
    if auth.metrics_keys and (token is None or await auth.keyless()):
        raise Unauthorized("send the metrics key or an API key as `Authorization: Bearer <key>`")
    principal = await authenticate(request)
    if not principal.may(READ):
        raise Forbidden(f"API key {principal.name!r} lacks the scope {READ!r}", scope=READ)


def forbidden(scope: str) -> dict[int | str, dict[str, Any]]:
    """The 403 entry of a route's documented responses."""
    return {403: {"description": f"the API key lacks the scope `{scope}` (`admin` holds "
                                 "every scope)"}}


requires = {scope: require(scope) for scope in (READ, ENQUEUE, MANAGE, ADMIN)}
Reader = Annotated[Principal, Depends(requires[READ])]
Enqueuer = Annotated[Principal, Depends(requires[ENQUEUE])]
Manager = Annotated[Principal, Depends(requires[MANAGE])]
Admin = Annotated[Principal, Depends(requires[ADMIN])]
