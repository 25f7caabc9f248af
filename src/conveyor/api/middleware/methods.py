"""405 Method Not Allowed, told by the OpenAPI document: a request whose path is documented but
not for its method gets 405 problem+json with an `Allow` header naming every documented
method of that path.

Routing alone gets both wrong: Starlette's `Allow` names only the first route whose path
matched (`OPTIONS /v1/tasks` said `POST`, not `GET, POST`), and a literal path falls through
to a templated sibling (`GET /v1/tasks/batch` reached `GET /v1/tasks/{task_id}`, a 422 about
the id). Here the most literal documented path wins, as a reader of the document would expect.
Paths the document does not list (`/docs`, `/openapi.json`) pass untouched.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.api.responses import problem

_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
_PARAM = re.compile(r"\{[^/{}]+\}")


class _Paths:
    """The documented paths: literal ones by path, templated ones as patterns, each with
    the number of literal segments (the more, the more specific) and its methods."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.literal: dict[str, frozenset[str]] = {}
        self.templated: list[tuple[re.Pattern[str], int, frozenset[str]]] = []
        for path, item in document.get("paths", {}).items():
            methods = frozenset(m.upper() for m in item if m in _METHODS)
            if not _PARAM.search(path):
                self.literal[path] = methods
                continue
            pattern = "".join(
                "[^/]+" if _PARAM.fullmatch(part) else re.escape(part)
                for part in re.split(r"(\{[^/{}]+\})", path)
            )
            literal_segments = sum(1 for s in path.split("/") if s and not _PARAM.search(s))
            self.templated.append((re.compile(pattern), literal_segments, methods))

    def allowed(self, path: str) -> frozenset[str] | None:
        """The methods documented for `path`, or None if no documented path matches it."""
        found = self.literal.get(path)
        if found is not None:
            return found
        best = -1
        methods: frozenset[str] = frozenset()
        for pattern, specificity, allowed in self.templated:
            if specificity < best or not pattern.fullmatch(path):
                continue
            if specificity > best:
                best, methods = specificity, frozenset()
            methods |= allowed
        return methods if best >= 0 else None


class MethodsMiddleware:
    """Reads the OpenAPI document of the app (`scope["app"].openapi()`) at the first request,
    when every route is in place."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._paths: _Paths | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._paths is None:
            self._paths = _Paths(scope["app"].openapi())
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        methods = self._paths.allowed(path)
        if methods is None or scope["method"] in methods:
            await self.app(scope, receive, send)
            return
        allow = ", ".join(sorted(methods))
        response = problem(
            405, "Method not allowed",
            f"{scope['method']} is not allowed on {path}; it takes {allow}",
            request_id=scope.get("state", {}).get("request_id"),
            headers={"Allow": allow},
        )
        await response(scope, receive, send)
