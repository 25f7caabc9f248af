"""Dependencies as `Annotated` aliases, so handlers read as typed signatures.

They are coroutines on purpose: FastAPI runs a plain-function dependency in a thread pool,
two thread hops per request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from conveyor.api.admission import Admission
from conveyor.client import Client
from conveyor.state import AppState


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.conveyor
    return state


async def get_client(request: Request) -> Client:
    state: AppState = request.app.state.conveyor
    return state.client


async def get_admission(request: Request) -> Admission:
    admission: Admission = request.app.state.admission
    return admission


StateDep = Annotated[AppState, Depends(get_state)]
ClientDep = Annotated[Client, Depends(get_client)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
