"""Dependencies as `Annotated` aliases, so handlers read as typed signatures.

They are coroutines on purpose: FastAPI runs a plain-function dependency in a thread pool,
two thread hops per request for what is an attribute lookup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from conveyor.client import Client
from conveyor.state import AppState


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.conveyor
    return state


async def get_client(request: Request) -> Client:
    state: AppState = request.app.state.conveyor
    return state.client


async def admitted(request: Request) -> AsyncIterator[None]:
    """Hold an admission slot for the request (503 + Retry-After when none is left)."""
    with request.app.state.admission.slot():
        yield


StateDep = Annotated[AppState, Depends(get_state)]
ClientDep = Annotated[Client, Depends(get_client)]
Admitted = Depends(admitted)
