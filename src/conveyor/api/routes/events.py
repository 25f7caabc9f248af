"""`/v1/events`: every task transition as Server-Sent Events, for integrations and dashboards,
resumable by `Last-Event-ID` within the events stream's window (`CONVEYOR_EVENTS_MAXLEN`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.exceptions import RequestValidationError
from starlette.responses import Response, StreamingResponse

from conveyor.api import sse
from conveyor.api.auth import forbidden, requires
from conveyor.api.deps import ClientDep
from conveyor.api.direct import DirectRoute
from conveyor.queue.events import stream_order
from conveyor.registry import Registry
from conveyor.store.keys import READ
from conveyor.store.tasks import Status

# 1733090000000-0.0, or an entry id; 19 digits stay within the 64 bits Redis takes
EVENT_ID_PATTERN = r"^[0-9]{1,19}(-[0-9]{1,19})?(\.[0-9]{1,9})?$"
_DOC: dict[int | str, dict[str, Any]] = {200: sse.response_doc(
    "`text/event-stream`: frames of `id`, `event` (the kind) and one JSON `data` line; `gap` "
    "when events after `Last-Event-ID` are no longer kept", {"gap", *sse.KINDS})}


def build_router(registry: Registry) -> APIRouter:
    """The events router; `type` takes the task types of `registry`."""
    router = APIRouter(route_class=DirectRoute, prefix="/v1/events", tags=["events"],
                       dependencies=[Depends(requires[READ])], responses=forbidden(READ))
    known = {"items": {"type": "string", "enum": sorted(registry.types)}} if registry.types \
        else None

    @router.get("", summary="Stream every task transition (Server-Sent Events)",
                response_class=StreamingResponse, responses=_DOC)
    async def stream_events(
        client: ClientDep,
        # a default, not an annotation: `known` is local, and annotations are strings here
        type: list[str] | None = Query(  # noqa: B008
            None, description="only these task types", json_schema_extra=known),
        status: Annotated[list[Status] | None, Query(
            description="only events leaving the task in these statuses")] = None,
        last_event_id: Annotated[str | None, Query(
            pattern=EVENT_ID_PATTERN,
            description="resume after this event id (as the `Last-Event-ID` header does)")] = None,
        last_event_id_header: Annotated[str | None, Header(
            alias="Last-Event-ID", pattern=EVENT_ID_PATTERN)] = None,
    ) -> Response:
        unknown = [t for t in type or () if t not in client.registry.types]
        if unknown:
            raise RequestValidationError([{
                "type": "value_error", "loc": ("query", "type"),
                "msg": f"unknown task type {name!r}", "input": name,
            } for name in unknown])
        assert client.hub is not None
        after = last_event_id or last_event_id_header
        if after is not None:  # the pattern says digits; Redis also wants them within 64 bits
            try:
                stream_order(after)
            except ValueError as exc:
                where = ("query", "last_event_id") if last_event_id else ("header", "Last-Event-ID")
                raise RequestValidationError([{
                    "type": "value_error", "loc": where, "msg": str(exc), "input": after,
                }]) from None
        return await sse.all_events(client, client.hub, set(type or ()), set(status or ()), after)

    return router
