"""Dependencies as `Annotated` aliases, so handlers read as typed signatures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request

from conveyor.client import Client
from conveyor.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.conveyor
    return state


def get_client(request: Request) -> Client:
    return get_state(request).client


def admitted(request: Request) -> Iterator[None]:
    """Hold an admission slot for the request (503 + Retry-After when none is left)."""
    with request.app.state.admission.slot():
        yield


StateDep = Annotated[AppState, Depends(get_state)]
ClientDep = Annotated[Client, Depends(get_client)]
Admitted = Depends(admitted)
