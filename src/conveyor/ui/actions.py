"""The dashboard's actions (POST, each with the session's CSRF token): retry, cancel and
delete a task, a selection, or everything a filter matches (in batches, up to
`CONVEYOR_UI_BULK_MAX` per request); enqueue a copy of a task; pause and resume a type; sign
in and out.

An action answers with a redirect back to the page it came from (`next`, a dashboard path),
carrying a `notice` that says what was done."""

from __future__ import annotations

import hmac
import secrets
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson
import structlog
from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from conveyor.client import TaskRequest
from conveyor.errors import (
    InvalidTransition,
    PayloadInvalid,
    TaskNotFound,
    Unauthorized,
    Unavailable,
)
from conveyor.limits import change_limits
from conveyor.queue.events import event
from conveyor.state import AppState
from conveyor.store.dashboard import ACTION_FROM, ACTIONS, Action, Dashboard
from conveyor.store.keys import ENQUEUE, MANAGE
from conveyor.ui import filters
from conveyor.ui.pages import ViewerDep, dashboard_of, state_of
from conveyor.ui.render import bare, page, pretty, secure
from conveyor.ui.session import (
    COOKIE,
    LOGIN_COOKIE,
    PREFIX,
    Sessions,
    Viewer,
    check_csrf,
    notice_mac,
    reads,
    require,
    secure_request,
    set_session_cookie,
)

log = structlog.get_logger("conveyor.ui")
BATCH = 500  # tasks per statement of a bulk action
SELECTION_MAX = BATCH * 10  # selected tasks one request acts on
_PAST = {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}


async def form_of(request: Request) -> dict[str, list[str]]:
    """The urlencoded body, every value of every field."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return parse_qs(body, keep_blank_values=True)


def first(form: dict[str, list[str]]) -> dict[str, str]:
    return {k: v[0] for k, v in form.items() if v}


def back_to(target: str | None, notice: str | None = None, default: str = PREFIX, *,
            view: Viewer | None = None) -> Response:
    """303 to `target` when it is a dashboard path (never elsewhere), with `notice` signed
    for `view`'s session (a page shows a notice only with its session's signature, so a link
    from elsewhere cannot put words on the dashboard)."""
    path = target or default
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or not (path == PREFIX or path.startswith(PREFIX + "/")):
        path = default
        parts = urlsplit(path)
    query = [(k, v) for k, vs in parse_qs(parts.query).items() for v in vs
             if k not in ("notice", "sig", "cursor")]
    if notice and view is not None:
        query += [("notice", notice), ("sig", notice_mac(view.session, notice))]
    location = parts.path + (f"?{urlencode(query)}" if query else "")
    return secure(RedirectResponse(location, status_code=303))


async def apply(state: AppState, dashboard: Dashboard, action: Action,
                ids: Sequence[uuid.UUID]) -> int:
    """Do `action` to the tasks `ids` it applies to (one statement), publish or announce what
    changed; how many changed."""
    if not ids:
        return 0
    if action == "retry":
        records = await dashboard.retry(ids)
        await state.client.publish(records)
        return len(records)
    if action == "delete":
        return len(await dashboard.delete(ids))
    records = await dashboard.cancel(ids)
    events = state.events
    try:
        running = [r for r in records if r.status == "running"]
        for r in running:
            await events.request_cancel(r.id)  # its worker hears it now
        await events.publish([
            event("cancel_requested", r.id, r.type, "running") if r.status == "running"
            else event("cancelled", r.id, r.type, "cancelled", finished_at=r.finished_at,
                       outcome="cancelled")
            for r in records])
    except Unavailable as exc:  # the workers' next beats see the requests
        log.warning("ui.cancel.unannounced", tasks=len(records), error=str(exc))
    return len(records)


def _action(raw: str | None) -> Action:
    for action in ACTIONS:
        if raw == action:
            return action
    raise PayloadInvalid(f"action: {raw!r} is not one of {', '.join(ACTIONS)}")


def _ids(values: list[str]) -> list[uuid.UUID]:
    out = []
    for value in values:
        try:
            out.append(uuid.UUID(value))
        except ValueError:
            raise PayloadInvalid(f"id: {value!r} is not a task id") from None
    return out


def _counted(n: int, action: Action) -> str:
    noun = "task" if n == 1 else "tasks"
    return f"{_PAST[action].capitalize()} {n} {noun}"


router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.post("/tasks/act")
async def act_on_selection(request: Request, view: ViewerDep) -> Response:
    form = await form_of(request)
    check_csrf(view, first(form))
    require(view, MANAGE)
    action = _action(first(form).get("action"))
    given = list(dict.fromkeys(_ids(form.get("id", []))))
    ids = given[:SELECTION_MAX]
    done = 0
    for start in range(0, len(ids), BATCH):
        done += await apply(state_of(request), dashboard_of(request), action,
                            ids[start:start + BATCH])
    skipped = len(ids) - done
    notice = _counted(done, action)
    if skipped:
        notice += f" ({skipped} not {', '.join(ACTION_FROM[action])}: left as they are)"
    if len(given) > len(ids):
        notice += (f"; {len(given) - len(ids)} more were selected than one request takes "
                   f"({SELECTION_MAX}): left as they are")
    if not ids:
        notice = "Nothing selected"
    return back_to(first(form).get("next"), notice, f"{PREFIX}/tasks", view=view)


@router.post("/tasks/act-all")
async def act_on_filter(request: Request, view: ViewerDep) -> Response:
    """Everything the filter matches, in batches of BATCH, up to UI_BULK_MAX."""
    form = first(await form_of(request))
    check_csrf(view, form)
    require(view, MANAGE)
    state, dashboard = state_of(request), dashboard_of(request)
    action = _action(form.get("action"))
    parsed = filters.parse(form, state.app.registry.types)
    if parsed.errors:
        raise PayloadInvalid("; ".join(parsed.errors))
    cap = state.settings.ui_bulk_max
    scan = state.settings.ui_search_scan  # with a payload field: tasks examined, at most
    types = list(state.app.registry.types)
    done, examined, cursor = 0, 0, None
    while done < cap:
        walk = await dashboard.matching_ids(types, parsed.filter, ACTION_FROM[action],
                                            before=cursor, limit=min(BATCH, cap - done),
                                            scan=max(1, scan - examined))
        done += await apply(state, dashboard, action, walk.ids)
        examined += walk.scanned or 0
        cursor = walk.next_cursor
        if cursor is None or (walk.scanned is not None and examined >= scan):
            break
    if cursor is not None and parsed.filter.field is None:
        more = bool((await dashboard.matching_ids(types, parsed.filter, ACTION_FROM[action],
                                                  before=cursor, limit=1)).ids)
    else:
        more = cursor is not None
    log.info("ui.bulk", action=action, tasks=done, by=view.caller.name)
    notice = _counted(done, action)
    confirmed = _confirmed(form.get("confirmed"))
    if confirmed is not None and done < min(confirmed, cap):
        notice += f" of the {confirmed} confirmed: the others had changed or gone since"
    if more and cursor is not None and parsed.filter.field is not None:
        # the tasks further back were not examined: their own confirmation
        back = form.get("next") or f"{PREFIX}/tasks"
        further = parsed.query(action=action, back=back,
                               upto=str(uuid.UUID(int=cursor.int - 1)))
        return back_to(f"{PREFIX}/tasks/confirm?{further}",
                       notice + "; tasks further back are not examined yet: confirm them",
                       view=view)
    if more:
        notice += "; more match: run it again for the next batch"
    return back_to(form.get("next"), notice, f"{PREFIX}/tasks", view=view)


def _confirmed(raw: str | None) -> int | None:
    """The count the confirmation page showed (None when not given)."""
    if not raw:
        return None
    try:
        return max(0, int(raw))
    except ValueError:
        raise PayloadInvalid(f"confirmed: {raw!r} is not a count") from None


@router.post("/tasks/{task_id}/copy")
async def enqueue_copy(request: Request, view: ViewerDep, task_id: uuid.UUID) -> Response:
    form = first(await form_of(request))
    check_csrf(view, form)
    require(view, ENQUEUE)
    state = state_of(request)
    record = await state.store.get(task_id)
    if record is None:
        raise TaskNotFound(str(task_id))
    view.caller.check_types([record.type])
    task_type = state.app.registry.types.get(record.type)
    text = form.get("payload", "")
    error = None
    try:
        payload: Any = orjson.loads(text)
        if not isinstance(payload, dict):
            raise PayloadInvalid("the payload must be a JSON object")
        inserted = await state.client.enqueue_many([TaskRequest(record.type, payload)])
    except orjson.JSONDecodeError as exc:
        error = f"not JSON: {exc}"
    except PayloadInvalid as exc:
        error = str(exc)
    if error is not None:
        return page(request, view, "copy.html", 422, active="tasks", task=record,
                    task_type=task_type, payload=text, error=error,
                    schema=pretty(task_type.payload_model.model_json_schema())
                    if task_type else None)
    new = inserted[0].record
    return back_to(f"{PREFIX}/tasks/{new.id}", f"Enqueued a copy of {str(task_id)[:8]}",
                   view=view)


@router.post("/tasks/{task_id}/{action}")
async def act_on_task(request: Request, view: ViewerDep, task_id: uuid.UUID,
                      action: str) -> Response:
    form = first(await form_of(request))
    check_csrf(view, form)
    require(view, MANAGE)
    state = state_of(request)
    act = _action(action)
    here = f"{PREFIX}/tasks/{task_id}"
    try:
        if act == "retry":
            await state.client.retry(task_id)
            return back_to(here, "Retried: queued again", view=view)
        if act == "cancel":
            record = await state.client.cancel(task_id)
            return back_to(here, "Cancel requested: its worker stops it"
                           if record.status == "running" else "Cancelled", view=view)
    except InvalidTransition as exc:
        return back_to(here, f"Not done: the task is {exc.status}", view=view)
    if await dashboard_of(request).delete([task_id]):
        return back_to(f"{PREFIX}/tasks", f"Deleted task {str(task_id)[:8]}", view=view)
    if await state.store.get(task_id) is None:
        raise TaskNotFound(str(task_id))
    return back_to(here, "Not deleted: only finished tasks can be (cancel it first)",
                   view=view)


@router.post("/queues/{task_type}/{action}")
async def pause_or_resume(request: Request, view: ViewerDep, task_type: str,
                          action: str) -> Response:
    """Stop starting a type's tasks, or start them again (as the API's pause/resume)."""
    check_csrf(view, first(await form_of(request)))
    require(view, MANAGE)
    if action not in ("pause", "resume"):
        raise PayloadInvalid(f"action: {action!r} is not pause or resume")
    state = state_of(request)
    state.app.registry.get(task_type)  # UnknownTaskType: the dashboard's 4xx page
    view.caller.check_types([task_type])
    await change_limits(state, task_type, {"paused": action == "pause"})
    log.info("ui.queue", action=action, task_type=task_type, by=view.caller.name)
    notice = (f"Paused {task_type}: workers start none of its tasks (running ones finish)"
              if action == "pause" else f"Resumed {task_type}")
    return back_to(f"{PREFIX}/queues", notice, view=view)


# -- signing in and out ------------------------------------------------------------------


@router.get("/login")
async def login_form(request: Request) -> Response:
    auth = request.app.state.authenticator
    if await auth.keyless() and auth.anonymous_allowed:
        return back_to(request.query_params.get("next"))
    return _login_page(request, request.query_params.get("reason") or None)


@router.post("/login")
async def login(request: Request) -> Response:
    form = first(await form_of(request))
    expected = request.cookies.get(LOGIN_COOKIE, "")
    given = form.get("csrf", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return _login_page(request, "the form expired: try again", 403, form.get("next"))
    token = form.get("key", "").strip()
    if not token:
        return _login_page(request, "enter an API key", 401, form.get("next"))
    auth = request.app.state.authenticator
    try:
        caller = await auth.principal(token)
    except Unauthorized as exc:
        return _login_page(request, str(exc), 401, form.get("next"))
    if not reads(caller):
        return _login_page(request, f"API key {caller.name!r} lacks the scope 'tasks:read': "
                           "the dashboard needs a key that may read tasks", 403,
                           form.get("next"))
    sessions: Sessions = request.app.state.ui_sessions
    previous = request.cookies.get(COOKIE)
    if previous:  # a sign-in starts afresh (no session fixed before it lives on)
        await sessions.drop(previous)
    session = await sessions.create(auth.reference(token))
    response = back_to(form.get("next"))
    set_session_cookie(response, session.sid, sessions.ttl_s,
                       secure=secure_request(request))
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    return response


@router.post("/logout")
async def logout(request: Request, view: ViewerDep) -> Response:
    check_csrf(view, first(await form_of(request)))
    sessions: Sessions = request.app.state.ui_sessions
    await sessions.drop(view.session.sid)
    response = back_to(f"{PREFIX}/login")
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


def _login_page(request: Request, error: str | None, status_code: int = 200,
                next_path: str | None = None) -> Response:
    value = secrets.token_urlsafe(24)
    response = bare("login.html", status_code, csrf=value, error=error,
                    next=next_path or request.query_params.get("next", ""))
    response.set_cookie(LOGIN_COOKIE, value, max_age=3600, path=PREFIX, httponly=True,
                        samesite="strict", secure=secure_request(request))
    return response
