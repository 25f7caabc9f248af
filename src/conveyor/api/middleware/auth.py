"""Bearer API keys: with `API_KEYS` set, every route but health and docs needs
`Authorization: Bearer <key>`; 401 otherwise. Keys are compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.api.responses import problem

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare against every key, so the time taken does not reveal which one nearly matched.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self._allowed(scope):
            await self.app(scope, receive, send)
            return
        response = problem(
            401,
            "Unauthorized",
            "send an API key as `Authorization: Bearer <key>`",
            request_id=scope.get("state", {}).get("request_id"),
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
