"""Guarded httpx clients: `guarded_client()` for any code, and `OutboundHttp`, the one pooled
client of a worker that handlers reach as `ctx.http.client`."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from conveyor.egress.policy import DEFAULT_POLICY, EgressPolicy
from conveyor.egress.transport import (
    MAX_RESPONSE_BYTES,
    GuardedTransport,
    Resolver,
    system_resolver,
)

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def guarded_client(
    policy: EgressPolicy = DEFAULT_POLICY, *, resolver: Resolver = system_resolver,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    max_response_bytes: int | None = MAX_RESPONSE_BYTES,
    verify: ssl.SSLContext | bool = True, **options: Any,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` on a `GuardedTransport`: redirects not followed (a hop that is
    followed anyway, with `follow_redirects=True` on a request, is checked like the first),
    proxy variables ignored, connect and read timeouts; `verify` as httpx's (a context
    trusting a private CA, say); `options` go to `httpx.AsyncClient`."""
    transport = GuardedTransport(policy, resolver=resolver, verify=verify,
                                 max_response_bytes=max_response_bytes)
    return httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False,
                             timeout=timeout, **options)


class OutboundHttp:
    """A worker's guarded, pooled client: made at the first `client` (on the event loop that
    uses it), closed by the worker when it stops. A copy sent to a process pool makes its own
    there, with the system resolver."""

    def __init__(self, policy: EgressPolicy = DEFAULT_POLICY, *,
                 resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.resolver = resolver
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = guarded_client(self.policy, resolver=self.resolver)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def __reduce__(self) -> tuple[object, ...]:
        return (OutboundHttp, (self.policy,))
