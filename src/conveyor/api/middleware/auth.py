"""Bearer API keys: with `API_KEYS` set, every route but health and docs needs
`Authorization: Bearer <key>`; 401 otherwise. Keys are compared in constant time.

`/metrics` takes the API keys and `METRICS_KEY` (a key that can read metrics and nothing
else, for a Prometheus scrape config), or no key at all with `METRICS_OPEN`.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.api.responses import problem

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
DOCS_PREFIX = "/docs"  # the UI page and its assets
METRICS_PATH = "/metrics"


def is_open(path: str) -> bool:
    """Paths that never need a key."""
    return path in OPEN_PATHS or path == DOCS_PREFIX or path.startswith(DOCS_PREFIX + "/")


class ApiKeyMiddleware:
    def __init__(
        self, app: ASGIApp, keys: Iterable[str], *, metrics_keys: Iterable[str] = (),
        metrics_open: bool = False,
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.metrics_keys = [] if metrics_open else [
            *self.keys, *(k.encode() for k in metrics_keys)
        ]

    def _guarded(self, path: str) -> bool:
        if is_open(path):
            return False
        return bool(self.metrics_keys if path == METRICS_PATH else self.keys)

    @staticmethod
    def _allowed(scope: Scope, keys: list[bytes]) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare against every key, so the time taken does not reveal which one nearly matched.
        matches = [hmac.compare_digest(token.strip(), key) for key in keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        keys = self.metrics_keys if scope["path"] == METRICS_PATH else self.keys
        if self._allowed(scope, keys):
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
