"""A small HTTP/1.1 load generator: keep-alive connections on raw asyncio streams.

Every connection sends one request, reads its response, and takes the next request from a
shared list until none is left (closed loop, no pipelining). Requests are built once, before the
clock starts; a response is parsed only as far as the status line and `content-length`. Much
cheaper per request than a general-purpose client, so that on 2 cores the server, not the load
generator, is the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class HttpError(Exception):
    pass


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one response with a content-length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise HttpError(f"response without content-length: {head[:200]!r}")
    end = lower.index(b"\r\n", at + 2)
    length = int(lower[at + 17:end])
    body = await reader.readexactly(length) if length else b""
    return status, body


async def post_all(
    host: str, port: int, requests: Sequence[bytes], *, connections: int,
    expect: int = 202, timeout: float = 60.0,
) -> tuple[float, float]:
    """Send every request over `connections` keep-alive connections; (t_start, t_end) of the
    sending alone (`time.time()`), connections opened before. Any other status than `expect`
    fails the whole run."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with asyncio.timeout(timeout):
            for _ in range(max(1, min(connections, len(requests)))):
                conns.append(await asyncio.open_connection(host, port))
            pending: Iterator[bytes] = iter(requests)

            async def drive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                for request in pending:  # shared: each request is taken by one connection
                    writer.write(request)
                    status, body = await read_response(reader)
                    if status != expect:
                        raise HttpError(f"HTTP {status}: {body[:300]!r}")

            t0 = time.time()
            await asyncio.gather(*(drive(r, w) for r, w in conns))
            return t0, time.time()
    finally:
        for _, writer in conns:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def run_fast(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop when it is installed (a Conveyor dependency), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(factory())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(factory())
