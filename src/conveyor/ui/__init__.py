"""The dashboard at `/ui`: server-rendered pages (Jinja2) with htmx for live parts, served by
the API app itself (its middleware, its keys), assets vendored in `static/`.

`install(app, state)` adds the routes, the static files and the login redirect; `close(app)`
stops what it started (the overview's event follower)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from starlette.responses import FileResponse, RedirectResponse, Response

from conveyor.state import AppState
from conveyor.store.dashboard import Dashboard
from conveyor.ui import actions, live, pages
from conveyor.ui.render import HEADERS
from conveyor.ui.session import PREFIX, LoginNeeded, Sessions
from conveyor.ui.throughput import Throughput

STATIC = Path(__file__).parent / "static"
_ASSETS = {p.name: p for p in STATIC.iterdir() if p.suffix in (".js", ".css")}
_MEDIA = {".js": "text/javascript", ".css": "text/css"}


def install(app: FastAPI, state: AppState) -> None:
    """Serve the dashboard on `app` (built by api/app.py over `state`)."""
    settings = state.settings
    app.state.ui_sessions = Sessions(state)
    app.state.ui_dashboard = dashboard = Dashboard(
        state.pool, settings.database_schema, acquire_timeout_s=settings.pg_acquire_timeout)
    assert state.client.hub is not None
    app.state.ui_throughput = Throughput(state.client.hub, dashboard, state.app.registry.types)

    async def login_needed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginNeeded)
        target = request.url.path if request.method == "GET" else PREFIX
        if request.method == "GET" and request.url.query:
            target += f"?{request.url.query}"
        reason = f"&reason={quote(exc.reason)}" if exc.reason else ""
        response = RedirectResponse(f"{PREFIX}/login?next={quote(target)}{reason}",
                                    status_code=303)
        response.headers.update(HEADERS)
        return response

    app.add_exception_handler(LoginNeeded, login_needed)

    @app.get(PREFIX + "/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = _ASSETS.get(name)
        if path is None:
            return Response(status_code=404)
        return FileResponse(path, media_type=_MEDIA[path.suffix],
                            headers={"Cache-Control": "public, max-age=3600",
                                     "X-Content-Type-Options": "nosniff"})

    app.include_router(actions.router)  # /tasks/act before /tasks/{task_id}
    app.include_router(pages.router)
    app.include_router(live.router)


async def close(app: FastAPI) -> None:
    """Stop the dashboard's background work on `app` (when the API server stops)."""
    throughput: Throughput | None = getattr(app.state, "ui_throughput", None)
    if throughput is not None:
        await throughput.close()
