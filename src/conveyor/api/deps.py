"""Dependencies as `Annotated` aliases, so handlers read as typed signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from conveyor.client import Client
from conveyor.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.conveyor
    return state


def get_client(request: Request) -> Client:
    return get_state(request).client


StateDep = Annotated[AppState, Depends(get_state)]
ClientDep = Annotated[Client, Depends(get_client)]
