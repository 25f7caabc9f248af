"""`GuardedTransport`: an httpx transport that resolves each new connection's host once,
refuses it if any address is denied, and dials an address it checked (so a DNS answer that
changes between the check and the connect, rebinding, cannot move it). TLS SNI, certificate
verification and the `Host` header keep the hostname: only the socket's address is pinned.

It never uses a proxy (proxy variables are ignored) and cuts every response body at
`max_response_bytes` (the response's `extensions["conveyor.truncated"]` then says so).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import httpcore
import httpx
from httpcore import AsyncNetworkBackend, AsyncNetworkStream
from httpcore._backends.auto import AutoBackend

from conveyor.egress.hosts import literal_address
from conveyor.egress.policy import EgressPolicy, IPAddress
from conveyor.errors import EgressDenied

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
MAX_RESPONSE_BYTES = 64 * 1024
TRUNCATED = "conveyor.truncated"
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for `host` (a literal is its own answer)."""
    address = literal_address(host)
    if address is not None:
        return [address]
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        parsed = literal_address(str(sockaddr[0]).partition("%")[0])
        if parsed is not None and parsed not in found:
            found.append(parsed)
    return found


class GuardedBackend(AsyncNetworkBackend):
    """httpcore's network backend with the check in `connect_tcp`: one lookup, every answer
    checked, then a dial of the checked addresses in order."""

    def __init__(self, policy: EgressPolicy, resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.resolver = resolver
        self._dialer = AutoBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> AsyncNetworkStream:
        refused = self.policy.port_refusal(port)
        if refused is not None:
            raise EgressDenied(f"{host}:{port} blocked: {refused}")
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.resolver(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"looking up {host} took over {timeout} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            why = self.policy.address_refusal(address)
            if why is not None:
                resolved = "" if str(address) == host else f"it resolves to {address}; "
                raise EgressDenied(f"{host}:{port} blocked: {resolved}{why}")
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._dialer.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> AsyncNetworkStream:
        raise EgressDenied(f"unix socket {path} blocked: only TCP destinations are allowed")

    async def sleep(self, seconds: float) -> None:
        await self._dialer.sleep(seconds)


class _Capped(httpx.AsyncByteStream):
    """A response body that ends after `limit` bytes, closing the connection under it."""

    def __init__(self, stream: httpx.AsyncByteStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.extensions: dict[str, Any] = {}  # the response's, where TRUNCATED is set

    async def __aiter__(self) -> AsyncIterator[bytes]:
        left = self._limit
        async for chunk in self._stream:
            if len(chunk) > left:  # one byte past the limit: the body is cut here
                if left:
                    yield chunk[:left]
                self.extensions[TRUNCATED] = True
                break
            left -= len(chunk)
            yield chunk
        await self._stream.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()


class GuardedTransport(httpx.AsyncHTTPTransport):
    """`httpx.AsyncHTTPTransport` under `policy`: no proxies, checked and pinned connections,
    response bodies cut at `max_response_bytes` (None: not cut). `resolver` replaces the
    system's (tests simulate rebinding with it)."""

    def __init__(
        self, policy: EgressPolicy, *, resolver: Resolver = system_resolver,
        max_response_bytes: int | None = MAX_RESPONSE_BYTES,
        limits: httpx.Limits = DEFAULT_LIMITS,
        verify: ssl.SSLContext | bool = True, http2: bool = False,
    ) -> None:
        super().__init__(verify=verify, trust_env=False, limits=limits, http2=http2)
        self.policy = policy
        self.max_response_bytes = max_response_bytes
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        # The same pool httpx builds, on the guarded backend (httpx takes no backend itself).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True, http2=http2,
            network_backend=GuardedBackend(policy, resolver),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in ("http", "https"):
            raise EgressDenied(f"{request.url.scheme}: URLs blocked: only http and https")
        response = await super().handle_async_request(request)
        if self.max_response_bytes is None:
            return response
        assert isinstance(response.stream, httpx.AsyncByteStream)
        capped = _Capped(response.stream, self.max_response_bytes)
        cut = httpx.Response(status_code=response.status_code, headers=response.headers,
                             stream=capped, extensions=response.extensions)
        cut.extensions[TRUNCATED] = False
        capped.extensions = cut.extensions  # httpx copies the mapping it is given
        return cut
