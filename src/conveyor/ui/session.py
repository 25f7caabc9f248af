"""Who is looking at the dashboard: an API key given once on the login page, whose id (never
the secret; a bootstrap key's SHA-256) is kept in a server-side session (Redis,
`CONVEYOR_UI_SESSION_TTL`), named by an HttpOnly, SameSite=Strict cookie (Secure per
`CONVEYOR_UI_SECURE_COOKIE`); and the CSRF token every POST must carry (the session's own,
compared in constant time).

The key is checked again by its id on every request by the API's authenticator (its cache,
its rate limit), so a revoked or expired key ends its sessions within
`CONVEYOR_API_KEY_CACHE`. Signing in drops the session the browser had. With no key at all
and the API open (loopback), the viewer is the API's anonymous admin: no login, but still a
session, for the CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from fastapi import Request
from starlette.responses import Response

from conveyor.errors import Forbidden, Unauthorized
from conveyor.queue.connection import translate
from conveyor.state import AppState
from conveyor.store.keys import ENQUEUE, MANAGE, READ

COOKIE = "conveyor_ui"
LOGIN_COOKIE = "conveyor_ui_login"  # the login form's own CSRF value (double submit)
PREFIX = "/ui"


class Caller(Protocol):
    """What the dashboard needs of the API's principal (api/auth.py)."""

    name: str

    def may(self, scope: str) -> bool: ...

    def check_types(self, types: Any) -> None: ...


class Authenticates(Protocol):
    """What the dashboard needs of the API's authenticator (api/auth.py)."""

    async def principal(self, token: str | None) -> Any: ...

    def reference(self, token: str) -> str | None: ...

    async def principal_of(self, reference: str) -> Any: ...

    async def limit(self, principal: Any) -> None: ...


class LoginNeeded(Exception):
    """The request has no usable key: the login page answers (with `reason`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Session:
    """`key`: the signed-in key's reference (its id, never the secret; None: open mode)."""

    sid: str
    key: str | None
    csrf: str


@dataclass(frozen=True, slots=True)
class Viewer:
    """The caller and its session; `new` when the cookie is to be set on the response."""

    caller: Caller
    session: Session
    new: bool = False
    secure: bool = False

    @property
    def manages(self) -> bool:
        return self.caller.may(MANAGE)

    @property
    def enqueues(self) -> bool:
        return self.caller.may(ENQUEUE)

    @property
    def signed_in(self) -> bool:
        return self.session.key is not None

    def set_cookie(self, response: Response, ttl_s: float) -> None:
        if self.new:
            set_session_cookie(response, self.session.sid, ttl_s, secure=self.secure)


def set_session_cookie(response: Response, sid: str, ttl_s: float, *, secure: bool) -> None:
    response.set_cookie(COOKIE, sid, max_age=int(ttl_s), path=PREFIX, httponly=True,
                        samesite="strict", secure=secure)


class Sessions:
    """Sessions in Redis under `<prefix>:ui:session:<sha256 of the cookie value>`."""

    def __init__(self, state: AppState) -> None:
        self.redis = state.redis
        self.prefix = f"{state.settings.key_prefix}:ui:session:"
        self.ttl_s = state.settings.ui_session_ttl

    def _key(self, sid: str) -> str:
        return self.prefix + hashlib.sha256(sid.encode()).hexdigest()

    async def get(self, sid: str) -> Session | None:
        with translate("ui.session.get"):
            raw = await self.redis.get(self._key(sid))
        if raw is None:
            return None
        data = orjson.loads(raw)
        if "key" not in data:  # a session of an older form: sign in again
            return None
        return Session(sid, data["key"], data["csrf"])

    async def create(self, key: str | None) -> Session:
        """A new session for the key `key` references (None: open mode)."""
        session = Session(secrets.token_urlsafe(32), key, secrets.token_urlsafe(32))
        with translate("ui.session.create"):
            await self.redis.set(self._key(session.sid),
                                 orjson.dumps({"key": key, "csrf": session.csrf}),
                                 ex=max(1, int(self.ttl_s)))
        return session

    async def drop(self, sid: str) -> None:
        with translate("ui.session.drop"):
            await self.redis.delete(self._key(sid))


def _authenticator(request: Request) -> Authenticates:
    auth: Authenticates = request.app.state.authenticator
    return auth


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.ui_sessions
    return sessions


def secure_request(request: Request) -> bool:
    """Whether cookies are to be Secure (CONVEYOR_UI_SECURE_COOKIE; auto: over https)."""
    state: AppState = request.app.state.conveyor
    mode = state.settings.ui_secure_cookie
    return mode == "on" or (mode == "auto" and request.url.scheme == "https")


async def viewer(request: Request) -> Viewer:
    """The dependency of every dashboard route: the caller (LoginNeeded without a usable
    key), counted against its rate limit."""
    sessions = _sessions(request)
    sid = request.cookies.get(COOKIE)
    session = await sessions.get(sid) if sid else None
    auth = _authenticator(request)
    try:
        if session is not None and session.key is not None:
            caller = await auth.principal_of(session.key)
        else:
            caller = await auth.principal(None)
    except Unauthorized as exc:
        if session is not None and session.key is not None:
            await sessions.drop(session.sid)
            raise LoginNeeded(f"signed out: {exc}") from None
        raise LoginNeeded("") from None
    await auth.limit(caller)
    check_reads(caller)
    new = False
    if session is None:  # open (no keys): a session for the CSRF token alone
        session = await sessions.create(None)
        new = True
    return Viewer(caller, session, new, secure_request(request))


def reads(caller: Caller) -> bool:
    """Whether `caller` may see the dashboard: every page shows tasks, so it needs
    tasks:read (or tasks:manage, or admin)."""
    return caller.may(READ) or caller.may(MANAGE)


def check_reads(caller: Caller) -> None:
    """Forbidden unless `caller` may see the dashboard."""
    if not reads(caller):
        raise Forbidden(f"API key {caller.name!r} lacks the scope {READ!r}: the dashboard "
                        "shows tasks, so it needs a key with tasks:read (or tasks:manage)",
                        scope=READ)


def notice_mac(session: Session, notice: str) -> str:
    """The signature of a notice for `session` (keyed by its CSRF token)."""
    return hmac.new(session.csrf.encode(), notice.encode(), hashlib.sha256).hexdigest()[:32]


def shown_notice(session: Session, notice: str | None, mac: str | None) -> str | None:
    """`notice` when `mac` is its signature for `session` (None otherwise)."""
    if not notice or not mac:
        return None
    expected = notice_mac(session, notice)
    return notice if hmac.compare_digest(mac.encode(), expected.encode()) else None


def check_csrf(view: Viewer, form: dict[str, str]) -> None:
    """Forbidden unless the form carries the session's CSRF token."""
    given = form.get("csrf", "")
    if not hmac.compare_digest(given.encode(), view.session.csrf.encode()):
        raise Forbidden("the form's CSRF token is missing or not this session's: reload the "
                        "page and try again")


def require(view: Viewer, scope: str) -> None:
    if not view.caller.may(scope):
        raise Forbidden(f"API key {view.caller.name!r} lacks the scope {scope!r}", scope=scope)
