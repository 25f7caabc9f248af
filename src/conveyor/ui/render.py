"""Pages as HTML: the Jinja2 environment, its filters, the security headers every dashboard
response carries, and the overview's charts as inline SVG (no script draws them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from fastapi import Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.responses import HTMLResponse, Response

from conveyor.store.dashboard import Minute
from conveyor.ui.session import PREFIX, Viewer, shown_notice

TEMPLATES = Path(__file__).parent / "templates"

# No inline script or style anywhere: scripts and the style sheet come from /ui/static.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "object-src 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NAV = (("overview", "Overview", ""), ("tasks", "Tasks", "/tasks"),
       ("dead", "Dead letters", "/dead-letters"), ("workers", "Workers", "/workers"),
       ("cron", "Cron", "/cron"), ("queues", "Queues", "/queues"))


def short(value: Any) -> str:
    return str(value)[:8]


def when(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def seconds(value: float | None) -> str:
    """A duration as people read it: 850 ms, 12.4 s, 3 min 5 s, 2 h 10 min."""
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    if value < 86400:
        return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"
    return f"{int(value // 86400)} d {int(value % 86400 // 3600)} h"


def between(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    return seconds(max(0.0, (end - start).total_seconds()))


def ago(value: datetime | None) -> str:
    if value is None:
        return ""
    return seconds(max(0.0, (datetime.now(UTC) - value).total_seconds())) + " ago"


def pretty(value: Any) -> str:
    """A JSON value indented for reading."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                        default=str).decode()


def fields(record: Any, leave_out: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """Every field of a record (a dataclass), in order, but those left out: new fields show
    up without a template change."""
    return [(f.name, getattr(record, f.name)) for f in dataclasses.fields(record)
            if f.name not in leave_out]


def shown(value: Any) -> str:
    if isinstance(value, datetime):
        return when(value)
    if value is None:
        return "—"
    if isinstance(value, dict | list):
        return orjson.dumps(value, default=str).decode()
    return str(value)


def reason(error: str | None) -> str:
    """An error's gist: its last line that is not a note in parentheses (for a traceback,
    the exception and its message)."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if not (line.startswith("(") and line.endswith(")")):
            return line
    return lines[-1] if lines else ""


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(short=short, when=when, seconds=seconds, ago=ago, pretty=pretty,
                       shown=shown, between=between, reason=reason)
    env.globals.update(nav=NAV, prefix=PREFIX, fields=fields)
    return env


ENV = _env()


def secure(response: Response) -> Response:
    response.headers.update(HEADERS)
    return response


def page(request: Request, view: Viewer, template: str, status_code: int = 200,
         **context: Any) -> Response:
    """A rendered page (or fragment) with the headers, and the session cookie if new."""
    notice = shown_notice(view.session, request.query_params.get("notice"),
                          request.query_params.get("sig"))
    html = ENV.get_template(template).render(
        view=view, csrf=view.session.csrf, notice=notice, request=request,
        here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        **context)
    response = secure(HTMLResponse(html, status_code=status_code))
    view.set_cookie(response, request.app.state.conveyor.settings.ui_session_ttl)
    return response


def bare(template: str, status_code: int = 200, **context: Any) -> Response:
    """A page for no viewer (the login page)."""
    html = ENV.get_template(template).render(view=None, notice=None, **context)
    return secure(HTMLResponse(html, status_code=status_code))


# -- charts ----------------------------------------------------------------------------------

W, H = 360, 80


def _minutes(rows: Sequence[Minute], now: datetime, span: int) -> list[tuple[int, int]]:
    """(succeeded, dead) for each of the last `span` minutes, oldest first."""
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=span - 1)
    by_minute = {r.at.astimezone(UTC).replace(second=0, microsecond=0): r for r in rows}
    out = []
    for i in range(span):
        r = by_minute.get(start + timedelta(minutes=i))
        out.append((r.succeeded, r.dead) if r else (0, 0))
    return out


def throughput_svg(rows: Sequence[Minute], now: datetime, span: int = 60) -> Markup:
    """Finished per minute: succeeded bars with dead stacked on top."""
    data = _minutes(rows, now, span)
    top = max([s + d for s, d in data] + [1])
    bar = W / span
    parts = []
    for i, (s, d) in enumerate(data):
        x = i * bar
        hs, hd = H * s / top, H * d / top
        if s:
            parts.append(f'<rect class="ok" x="{x:.1f}" y="{H - hs:.1f}" width="{bar * 0.8:.1f}"'
                         f' height="{hs:.1f}"><title>{s} succeeded</title></rect>')
        if d:
            parts.append(f'<rect class="bad" x="{x:.1f}" y="{H - hs - hd:.1f}" '
                         f'width="{bar * 0.8:.1f}" height="{hd:.1f}"><title>{d} dead</title>'
                         '</rect>')
    return Markup(
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" preserveAspectRatio="none" '
        f'aria-label="finished per minute, last {span} minutes (peak {top})">'
        f'<line class="axis" x1="0" y1="{H}" x2="{W}" y2="{H}"/>{"".join(parts)}</svg>')


def failure_svg(rows: Sequence[Minute], now: datetime, span: int = 60) -> Markup:
    """Dead / finished per minute, 0 to 100 %, as a line (minutes with nothing finished are
    gaps)."""
    data = _minutes(rows, now, span)
    step = W / span
    points = [f"{i * step + step / 2:.1f},{H - H * d / (s + d):.1f}"
              for i, (s, d) in enumerate(data) if s + d]
    line = (f'<polyline class="rate" fill="none" points="{" ".join(points)}"/>'
            if points else "")
    return Markup(
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" preserveAspectRatio="none" '
        f'aria-label="failure rate per minute, last {span} minutes">'
        f'<line class="axis" x1="0" y1="{H}" x2="{W}" y2="{H}"/>{line}</svg>')
