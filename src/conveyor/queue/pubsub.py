"""Listening on a Redis pub/sub channel for as long as a process runs.  [Redis]

Pub/sub is a nudge, never the record: a message published while the subscriber reconnects is
lost, so every caller has a backstop (a worker's beat, a periodic reload).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from conveyor.errors import Unavailable
from conveyor.queue.connection import Redis, translate
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown


async def messages(redis: Redis, channel: str, stop: Shutdown, *, op: str,
                   outage: str) -> AsyncIterator[str]:
    """The messages published on `channel`, decoded, until `stop` begins; reconnects by itself
    while Redis is away (`op` names the subscription in errors, `outage` in its log lines)."""
    lost = Outage(outage)
    while not stop.begun:
        pubsub = redis.pubsub()
        try:
            with translate(op):
                await pubsub.subscribe(channel)
                while not stop.begun:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:  # a quiet second, or a server gone silent
                        continue
                    # Only a reply proves Redis is back (the subscription's confirmation
                    # first): SUBSCRIBE is sent without reading one, and a connection the
                    # server has closed still takes a write.
                    lost.recovered()
                    if message.get("type") == "message":
                        yield bytes(message["data"]).decode(errors="replace")
        except Unavailable as exc:
            await lost.failed(exc, stop)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
