"""A write on a connection torn down under it (redis/redis-py#4287: the transport's internals
are gone and redis-py raises AttributeError or TypeError, not ConnectionError) is an outage
the caller retries, not a bug that stops the worker; a same-named error of our own is not."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from conveyor.errors import Unavailable
from conveyor.queue.connection import translate
from conveyor.testing.servers import RedisServer


async def test_a_write_on_a_torn_down_connection_is_an_outage(
    redis_server: RedisServer,
) -> None:
    connection = aioredis.Connection(port=redis_server.port)
    await connection.connect()  # type: ignore[no-untyped-call]
    await connection.disconnect()  # what a concurrent failure does between check and write
    with pytest.raises(Unavailable, match="writelines"), translate("xadd"):
        await connection._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])


def test_an_attribute_error_of_our_own_stays_a_bug() -> None:
    missing: object = None
    with pytest.raises(AttributeError), translate("xadd"):
        missing.writelines  # type: ignore[attr-defined]  # noqa: B018
