"""The task list's filter as the page's query string gives it: type, status, a time window
(`since`/`until`: a UTC date-time, or a length back from now such as `1h`), idempotency key,
id, and a payload field (`payload.customer_id = 42`), with messages naming what is wrong."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson

from conveyor.config import parse_duration
from conveyor.store.dashboard import TaskFilter, id_ceiling
from conveyor.store.tasks import STATUSES, Status

__all__ = ["FIELDS", "STATUSES", "Parsed", "parse", "payload_field"]

FIELDS = ("type", "status", "since", "until", "key", "id", "field", "upto")
SEARCH_WINDOW = timedelta(hours=24)  # a payload search's window when none is given
_PATH = re.compile(r"^(?:payload\.)?([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*=\s*(.+)$")


@dataclass(slots=True)
class Parsed:
    filter: TaskFilter
    task_id: uuid.UUID | None = None
    values: dict[str, str] = field(default_factory=dict)  # as given, for the form
    errors: list[str] = field(default_factory=list)

    def absolute(self, now: datetime) -> None:
        """Write the window as date-times and bound the ids at `now`, so the filter given
        on (a confirmation's form) matches what it matched at `now`, and no task created
        since."""
        for name in ("since", "until"):
            moment = getattr(self.filter, name)
            if moment is not None:
                self.values[name] = moment.astimezone(UTC).isoformat()
        if self.filter.upto is None:
            self.values["upto"] = str(id_ceiling(now))
            self.filter = dataclasses.replace(self.filter, upto=id_ceiling(now))

    def query(self, **extra: str) -> str:
        """The filter as a query string (with `extra`), for links and forms."""
        return urlencode({**{k: v for k, v in self.values.items() if v}, **extra})


def _moment(name: str, text: str, now: datetime, errors: list[str]) -> datetime | None:
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    except OverflowError:
        errors.append(f"{name}: {text!r} reaches back before the year 1")
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        errors.append(f"{name}: {text!r} is neither a date-time (2026-01-31T12:00) nor a "
                      "length back from now (15m, 2h, 7d)")
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _id(name: str, text: str, errors: list[str]) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        errors.append(f"{name}: {text!r} is not a task id (a UUID)")
        return None


def payload_field(text: str) -> tuple[tuple[str, ...], str]:
    """`payload.customer_id = 42` as (path, value as JSON); a value that is not JSON is a
    string. ValueError naming the form otherwise."""
    match = _PATH.match(text.strip())
    if match is None:
        raise ValueError(f"field: {text!r} is not of the form payload.name = value "
                         "(e.g. payload.customer_id = 42, payload.user.email = \"a@b.c\")")
    path, raw = tuple(match[1].split(".")), match[2].strip()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    return path, orjson.dumps(value).decode()


def parse(query: Mapping[str, str], types: Any, now: datetime | None = None) -> Parsed:
    """The filter of `query`; `types`: the task types there are (a container)."""
    now = now or datetime.now(UTC)
    values = {k: query.get(k, "").strip() for k in FIELDS}
    errors: list[str] = []
    type_ = values["type"] or None
    if type_ is not None and type_ not in types:
        errors.append(f"type: no task type is named {type_!r}")
    status: Status | None = None
    for known in STATUSES:
        if values["status"] == known:
            status = known
    if values["status"] and status is None:
        errors.append(f"status: {values['status']!r} is not one of {', '.join(STATUSES)}")
    since = _moment("since", values["since"], now, errors) if values["since"] else None
    until = _moment("until", values["until"], now, errors) if values["until"] else None
    task_id = _id("id", values["id"], errors) if values["id"] else None
    upto = _id("upto", values["upto"], errors) if values["upto"] else None
    payload = None
    if values["field"]:
        try:
            payload = payload_field(values["field"])
        except ValueError as exc:
            errors.append(str(exc))
        if type_ is None:
            errors.append("field: a payload search needs a type (it reads each task's "
                          "payload, so it is bounded to one type and a time window)")
        if since is None:
            since = now - SEARCH_WINDOW
            values["since"] = "24h"
    f = TaskFilter(type=type_, status=status, since=since, until=until,
                   key=values["key"] or None, field=payload, id=task_id,
                   upto=upto)
    return Parsed(f, task_id, values, errors)
