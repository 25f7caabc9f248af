"""`/v1/keys`: list and revoke API keys (scope `admin`). Keys are made with
`conveyor keys create` only, so a key's secret is shown once, on the terminal that asked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel
from starlette.responses import Response

from conveyor.api.auth import Authenticator, forbidden, requires
from conveyor.api.deps import StateDep
from conveyor.api.direct import DirectRoute
from conveyor.api.responses import OrjsonResponse
from conveyor.errors import KeyNotFound
from conveyor.store.keys import ADMIN, NAME_PATTERN, KeyStore

router = APIRouter(route_class=DirectRoute, prefix="/v1/keys", tags=["keys"],
                   dependencies=[Depends(requires[ADMIN])], responses=forbidden(ADMIN))


class KeyOut(BaseModel):
    name: str
    id: str
    prefix: str  # what the key starts with: `cvk_<id>_`
    scopes: list[str]
    types: list[str] | None
    rate: str | None
    state: Literal["active", "revoked", "expired"]
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None


class KeysOut(BaseModel):
    keys: list[KeyOut]


def _store(state: StateDep) -> KeyStore:
    return KeyStore(state.pool, state.settings.database_schema,
                    acquire_timeout_s=state.settings.pg_acquire_timeout)


@router.get("", response_model=KeysOut, summary="Every API key, without secrets")
async def list_keys(state: StateDep) -> Response:
    now = datetime.now(UTC)
    return OrjsonResponse({"keys": [k.public(now) for k in await _store(state).list()]})


@router.post("/{name}/revoke", response_model=KeyOut,
             summary="Revoke an API key (in effect everywhere within API_KEY_CACHE seconds)",
             responses={404: {"description": "no key has this name"}})
async def revoke_key(request: Request, state: StateDep,
                     name: Annotated[str, Path(pattern=NAME_PATTERN)]) -> Response:
    record = await _store(state).revoke(name)
    if record is None:
        raise KeyNotFound(name)
    auth: Authenticator = request.app.state.authenticator
    auth.forget(record.id)  # at once here; other processes within their cache time
    return OrjsonResponse(record.public(datetime.now(UTC)))
