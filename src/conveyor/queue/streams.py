"""Task streams: publish, read, settle, refresh, forward, re-queue and trim, batched.

A message is `{id: <task uuid>, r: <times re-queued by rebalance>}`; the payload stays in
Postgres, which hands it to the worker when the task is marked running. Each type has one stream
and one consumer group (`keys.GROUP`), created at id 0 so nothing published before the group
existed is skipped. Calls that touch several keys of a type use a Lua script on that type's
hash slot, so they are atomic and Redis-Cluster safe.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import ResponseError

from conveyor.queue.connection import Redis, translate
from conveyor.queue.keys import GROUP, Keys
from conveyor.registry import PRIORITIES

log = structlog.get_logger("conveyor.streams")

# Add ready tasks to a type's stream, in order, in one command rather than one XADD each (each
# command costs the client its encoding and its own reply, which a batch of 100 tasks feels).
# KEYS[1] stream; ARGV the task ids. Run by EVAL, its body sent each time: no script cache to
# reload after Redis lost its data, so it can sit in a pipeline. Returns the number added.
ADD_READY_MAX = 1000  # ids per EVAL: one script holds Redis (a cluster node) for its length
_ADD_READY = """
for i = 1, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'r', '0')
end
return #ARGV
"""

# Move due members of a type's delayed set to its stream.
# KEYS[1] delayed set, KEYS[2] stream; ARGV[1] max members to move.
# A type with priorities also has KEYS[3] its levels hash, KEYS[4] its bell, then its ready
# sets with ARGV[2..] their levels: each due task goes to its level's ready set (`default`
# unless the hash names another), not the stream, so a retry or a put-back keeps its priority.
# Uses the Redis clock, so every worker agrees on "due". Returns the number moved.
_FORWARD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local ready = {}
for i = 5, #KEYS do ready[ARGV[i - 3]] = KEYS[i] end
for _, member in ipairs(due) do
  if #KEYS > 2 then
    local level = redis.call('HGET', KEYS[3], member)
    local set = (level and ready[level]) or ready['default']
    redis.call('ZADD', set, now, member)
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', 1000, '*', 't', member)
    if level then redis.call('HDEL', KEYS[3], member) end
  else
    redis.call('XADD', KEYS[2], '*', 'id', member, 'r', '0')
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# Hand entries a consumer abandoned (claimed first, see TaskStreams.claim) to whoever reads next.
# KEYS[1] stream, KEYS[2] dead-letter stream.
# ARGV[1] group, ARGV[2] max re-queues, ARGV[3] dead-letter max length, then triples
# (entry id, task id or '' if undecodable, times re-queued so far).
# Each entry is re-added with r+1, or dead-lettered once r+1 exceeds the max, then acked and
# deleted. Returns {re-queued task ids, dead-lettered task ids}.
_REQUEUE = """
local requeued, dead = {}, {}
local limit = tonumber(ARGV[2])
for i = 4, #ARGV, 3 do
  local sid, id, r = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if id == '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
               'id', '', 'reason', 'undecodable message ' .. sid)
  elseif r + 1 > limit then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
               'id', id, 'reason', 'delivery limit reached')
    dead[#dead + 1] = id
  else
    redis.call('XADD', KEYS[1], '*', 'id', id, 'r', tostring(r + 1))
    requeued[#requeued + 1] = id
  end
  redis.call('XACK', KEYS[1], ARGV[1], sid)
  redis.call('XDEL', KEYS[1], sid)
end
return {requeued, dead}
"""

# Read for a type with priorities: entries already in the stream first (retries, delayed tasks
# come due, re-queued ones), then as many tasks as are still wanted moved from the ready sets
# into the stream and read, each from the level a smooth weighted round robin picks among the
# levels that have tasks (so a higher level goes first, and a lower one still gets its share).
# KEYS[1] stream, KEYS[2] bell, KEYS[3] turns, KEYS[4..] ready sets, highest level first.
# ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4..] the levels' weights.
# Returns {stream mark, bell mark, id, {field, value, ...}, id, {...}, ...}: the marks are the
# last ids of the stream and the bell before the read (see read_marked).
_READ_RANKED = """
local function last(key)
  local e = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if e[1] then return e[1][1] end
  return '0-0'
end
local out = {last(KEYS[1]), last(KEYS[2])}
local want = tonumber(ARGV[3])
local function read(n)
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', n,
                      'STREAMS', KEYS[1], '>')
  local got = 0
  if r and r[1] then
    for _, e in ipairs(r[1][2]) do
      out[#out + 1] = e[1]
      out[#out + 1] = e[2]
      got = got + 1
    end
  end
  return got
end
want = want - read(want)
if want <= 0 then return out end
local levels = #KEYS - 3
local moved = 0
for _ = 1, want do
  local total, best, best_w = 0, nil, nil
  local cw = {}
  for i = 1, levels do
    if redis.call('ZCARD', KEYS[i + 3]) > 0 then
      local w = tonumber(redis.call('HGET', KEYS[3], i) or '0') + tonumber(ARGV[i + 3])
      cw[i] = w
      total = total + tonumber(ARGV[i + 3])
      if best == nil or w > best_w then best, best_w = i, w end
    else
      redis.call('HDEL', KEYS[3], i)
    end
  end
  if best == nil then break end
  for i, w in pairs(cw) do
    if i == best then w = w - total end
    redis.call('HSET', KEYS[3], i, w)
  end
  local popped = redis.call('ZPOPMIN', KEYS[best + 3])
  redis.call('XADD', KEYS[1], '*', 'id', popped[1], 'r', '0')
  moved = moved + 1
end
if moved > 0 then read(moved) end
return out
"""

_LOST_STATE = ("NOGROUP", "UNBLOCKED", "no such key")


def lost_state(exc: ResponseError) -> bool:
    """The reply says the stream or its group is gone (Redis restarted without its data, a
    FLUSHALL, a deleted key or a destroyed group; a blocked read is answered UNBLOCKED): the
    caller recreates what it needs and carries on."""
    # Searched, not matched at the start: redis-py drops the "ERR " of generic errors, and a
    # pipeline wraps a command's error in "Command # n (...) of pipeline caused error: ...".
    text = str(exc)
    return any(marker in text for marker in _LOST_STATE)


READY_LEVELS = PRIORITIES  # the ready sets of a type with priorities, highest first
BELL_MAXLEN = 1000
_CHUNK = 500  # ids per script call: keeps Lua's unpack() and each call's latency small


@dataclass(frozen=True, slots=True)
class Message:
    """One stream entry; `task_id` is None when the entry cannot be decoded (`error` says why)."""

    stream_id: bytes
    task_id: uuid.UUID | None
    requeues: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """A task to put on Redis: to its stream now, or to its delayed set until `run_at_ms`."""

    task_type: str
    task_id: uuid.UUID
    run_at_ms: int | None = None
    level: str | None = None  # a type with priorities: its task's level (ready set, not stream)


def level_of(priority: str | None) -> str:
    """The ready set level of a task of a type with priorities (its stored priority, None
    being `default`)."""
    return priority or "default"


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True, slots=True)
class StreamStats:
    length: int
    pending: int
    undelivered: int | None  # None when Redis cannot tell (entries deleted mid-stream)
    delayed: int
    dead_letters: int


def decode(stream_id: bytes, fields: dict[bytes, bytes]) -> Message:
    raw = fields.get(b"id")
    if raw is None:
        return Message(stream_id, None, 0, "message has no id field")
    try:
        task_id = uuid.UUID(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return Message(stream_id, None, 0, f"message id {raw[:64]!r} is not a UUID")
    try:
        requeues = int(fields.get(b"r", b"0"))
    except ValueError:
        requeues = 0
    return Message(stream_id, task_id, requeues)


def _next_id(stream_id: bytes) -> str:
    ms, _, seq = stream_id.decode().partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


class TaskStreams:
    """Stream operations for every task type, on one Redis client."""

    def __init__(self, redis: Redis, keys: Keys, *, dead_letter_maxlen: int = 100_000) -> None:
        self.redis = redis
        self.keys = keys
        self.dead_letter_maxlen = dead_letter_maxlen
        self._forward = redis.register_script(_FORWARD)
        self._requeue = redis.register_script(_REQUEUE)
        self._read_ranked = redis.register_script(_READ_RANKED)

    async def ensure_group(self, task_type: str) -> None:
        """Create the type's stream and group if missing (at id 0: deliver what is there)."""
        with translate("streams.ensure_group"):
            try:
                await self.redis.xgroup_create(
                    self.keys.stream(task_type), GROUP, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _recreate_group(self, task_type: str, lost: ResponseError) -> None:
        """A read found the stream or its group gone: make them again and say so."""
        log.warning("streams.group.recreated", task_type=task_type, reason=str(lost)[:200])
        await self.ensure_group(task_type)

    async def publish(
        self, items: Sequence[Publish], also: Callable[[Any], None] | None = None
    ) -> None:
        """XADD ready tasks and ZADD delayed ones, in one pipeline (`also` may add commands of
        its own to it: the tasks' events)."""
        if not items:
            return
        with translate("streams.publish"):
            async with self.redis.pipeline(transaction=False) as pipe:
                if also is not None:  # first: a task's first event precedes its start's
                    also(pipe)
                ready: dict[str, list[str]] = {}  # stream: task ids, in order
                for item in items:
                    member = str(item.task_id)
                    if item.run_at_ms is None and item.level is not None:
                        pipe.zadd(self.keys.ready(item.task_type, item.level),
                                  {member: time.time() * 1000})
                        pipe.xadd(self.keys.bell(item.task_type), {"t": member},
                                  maxlen=BELL_MAXLEN, approximate=True)
                    elif item.run_at_ms is None:
                        ready.setdefault(self.keys.stream(item.task_type), []).append(member)
                    else:
                        pipe.zadd(self.keys.delayed(item.task_type), {member: item.run_at_ms})
                        if item.level not in (None, "default"):
                            pipe.hset(self.keys.levels(item.task_type), member, item.level)
                for stream, members in ready.items():
                    if len(members) == 1:
                        pipe.xadd(stream, {"id": members[0], "r": "0"})
                        continue
                    for i in range(0, len(members), ADD_READY_MAX):
                        pipe.eval(_ADD_READY, 1, stream, *members[i:i + ADD_READY_MAX])
                await pipe.execute()

    async def read(
        self, task_type: str, consumer: str, count: int, block_ms: int | None
    ) -> list[Message]:
        """XREADGROUP up to `count` new messages; recreates a group lost with Redis's data."""
        stream = self.keys.stream(task_type)
        with translate("streams.read"):
            try:
                reply: Any = await self.redis.xreadgroup(
                    GROUP, consumer, {stream: ">"}, count=count, block=block_ms
                )
            except ResponseError as exc:
                if not lost_state(exc):
                    raise
                await self._recreate_group(task_type, exc)
                return []
        if not reply:
            return []
        return [decode(sid, fields) for sid, fields in reply[0][1]]

    async def read_marked(
        self, task_type: str, consumer: str, count: int
    ) -> tuple[list[Message], bytes]:
        """XREADGROUP up to `count` new messages without blocking, and a mark: the id of the
        stream's last entry, read just before. When fewer than `count` came back, every entry
        not yet delivered to the group is newer than the mark, so `wait_new(mark)` sees it."""
        stream = self.keys.stream(task_type)
        with translate("streams.read"):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xrevrange(stream, count=1)
                    pipe.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
                    last, reply = await pipe.execute()
            except ResponseError as exc:
                if not lost_state(exc):
                    raise
                await self._recreate_group(task_type, exc)
                return [], b"0-0"  # the new group starts at 0: whatever is there is new
        mark: bytes = last[0][0] if last else b"0-0"
        if not reply:
            return [], mark
        return [decode(sid, fields) for sid, fields in reply[0][1]], mark

    async def read_ranked(
        self, task_type: str, consumer: str, count: int, levels: Sequence[str],
        weights: Sequence[int],
    ) -> tuple[list[Message], tuple[bytes, bytes]]:
        """`read_marked` for a type with priorities (`_READ_RANKED`): what is in the stream,
        then tasks moved from the ready sets of `levels` (highest first), by `weights`. The
        mark is the stream's and the bell's last ids, for `wait_new`."""
        stream = self.keys.stream(task_type)
        keys = [stream, self.keys.bell(task_type), self.keys.turns(task_type),
                *(self.keys.ready(task_type, level) for level in levels)]
        with translate("streams.read"):
            try:
                reply: Any = await self._read_ranked(
                    keys=keys, args=[GROUP, consumer, count, *weights])
            except ResponseError as exc:
                if not lost_state(exc):
                    raise
                await self._recreate_group(task_type, exc)
                return [], (b"0-0", b"0-0")
        marks = (bytes(reply[0]), bytes(reply[1]))
        messages = []
        for i in range(2, len(reply), 2):
            flat = reply[i + 1] or []
            messages.append(decode(reply[i], dict(zip(flat[::2], flat[1::2], strict=True))))
        return messages, marks

    async def wait_new(self, task_type: str, mark: bytes | tuple[bytes, bytes], block_ms: int
                       ) -> bool:
        """Block until the stream has an entry newer than `mark` (True) or `block_ms` passes
        (False); a pair of marks (`read_ranked`) waits on the bell too. A plain XREAD: it
        delivers nothing to the group and leaves nothing pending, so a consumer may wait here
        without holding a slot."""
        streams: dict[Any, Any]
        if isinstance(mark, tuple):
            streams = {self.keys.stream(task_type): mark[0], self.keys.bell(task_type): mark[1]}
        else:
            streams = {self.keys.stream(task_type): mark}
        with translate("streams.wait_new"):
            reply: Any = await self.redis.xread(streams, count=1, block=block_ms)
        return bool(reply)

    async def settle(
        self,
        task_type: str,
        acks: Sequence[bytes],
        *,
        delays: Sequence[tuple[uuid.UUID, int]] = (),
        dead: Sequence[tuple[str, str]] = (),
        levels: Mapping[uuid.UUID, str] | None = None,
    ) -> None:
        """Schedule retries, dead-letter, then ack, in one pipeline (in that order, so a crash
        midway leaves a message pending rather than a task nowhere). `levels`: the priority
        of delayed tasks that is not `default` (a type with priorities), kept for when they
        are due."""
        with translate("streams.settle"):
            if not delays and not dead:  # the common case: one command, no pipeline
                if acks:
                    await self.redis.xack(self.keys.stream(task_type), GROUP, *acks)
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                if delays:
                    pipe.zadd(self.keys.delayed(task_type),
                              {str(task_id): at_ms for task_id, at_ms in delays})
                    kept: dict[Any, Any] = {str(i): (levels or {})[i] for i, _ in delays
                            if (levels or {}).get(i) not in (None, "default")}
                    if kept:
                        pipe.hset(self.keys.levels(task_type), mapping=kept)
                for task_id, reason in dead:
                    pipe.xadd(self.keys.dead(task_type), {"id": task_id, "reason": reason[:2000]},
                              maxlen=self.dead_letter_maxlen, approximate=True)
                if acks:
                    pipe.xack(self.keys.stream(task_type), GROUP, *acks)
                await pipe.execute()

    async def refresh(self, task_type: str, consumer: str, stream_ids: Sequence[bytes]) -> None:
        """Reset the idle time of entries this consumer is still working on (heartbeat).

        Which entries Redis still had is not asked: it is not the lease (after a wipe it would
        name none, yet the tasks are still this worker's); Postgres's is (store/workers.py)."""
        if not stream_ids:
            return
        with translate("streams.refresh"):
            try:
                await self.redis.xclaim(
                    self.keys.stream(task_type), GROUP, consumer, 0, list(stream_ids),
                    justid=True,
                )
            except ResponseError as exc:
                if not lost_state(exc):
                    raise

    async def forward(self, task_type: str, limit: int = 1000, *, ranked: bool = False) -> int:
        """Move due delayed tasks of `task_type` to its stream (`ranked`, a type with
        priorities: to their level's ready set); returns how many moved."""
        keys = [self.keys.delayed(task_type), self.keys.stream(task_type)]
        args: list[Any] = [limit]
        if ranked:
            keys += [self.keys.levels(task_type), self.keys.bell(task_type),
                     *(self.keys.ready(task_type, level) for level in READY_LEVELS)]
            args += list(READY_LEVELS)
        with translate("streams.forward"):
            moved = await self._forward(keys=keys, args=args)
        return int(moved)

    # -- rebalance -------------------------------------------------------------------------

    async def consumers(self, task_type: str) -> list[ConsumerInfo]:
        with translate("streams.consumers"):
            try:
                rows = await self.redis.xinfo_consumers(self.keys.stream(task_type), GROUP)
            except ResponseError as exc:
                if lost_state(exc):
                    return []
                raise
        return [ConsumerInfo(r["name"].decode(), int(r["pending"]), int(r["idle"])) for r in rows]

    async def stale_pending(
        self, task_type: str, consumer: str, min_idle_ms: int, count: int = 1000
    ) -> list[bytes]:
        """Ids of entries pending on `consumer` for at least `min_idle_ms`."""
        with translate("streams.stale_pending"):
            try:
                rows: Any = await self.redis.xpending_range(
                    self.keys.stream(task_type), GROUP, "-", "+", count,
                    consumername=consumer, idle=min_idle_ms,
                )
            except ResponseError as exc:
                if not lost_state(exc):
                    raise
                return []
        return [row["message_id"] for row in rows]

    async def claim(
        self, task_type: str, consumer: str, stream_ids: Sequence[bytes], *, min_idle_ms: int
    ) -> list[Message]:
        """Take entries still idle for `min_idle_ms` (XCLAIM re-checks it atomically, so an
        entry its holder refreshed meanwhile is left alone), decoded. They stay pending, on
        the same consumer with their idle time reset, until `requeue` hands them on."""
        if not stream_ids:
            return []
        with translate("streams.claim"):
            try:
                entries: Any = await self.redis.xclaim(
                    self.keys.stream(task_type), GROUP, consumer, min_idle_ms,
                    list(stream_ids),
                )
            except ResponseError as exc:
                if not lost_state(exc):
                    raise
                return []
        return [decode(sid, fields or {}) for sid, fields in entries if sid is not None]

    async def requeue(
        self, task_type: str, messages: Sequence[Message], *, max_requeues: int
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        """Re-add claimed entries for any consumer to read (acking and deleting the originals);
        returns the task ids (re-queued, dead-lettered)."""
        requeued: list[uuid.UUID] = []
        dead: list[uuid.UUID] = []
        keys = [self.keys.stream(task_type), self.keys.dead(task_type)]
        for start in range(0, len(messages), _CHUNK):
            chunk = messages[start:start + _CHUNK]
            triples = [x for m in chunk
                       for x in (m.stream_id, str(m.task_id) if m.task_id else "", m.requeues)]
            with translate("streams.requeue"):
                back, gone = await self._requeue(
                    keys=keys, args=[GROUP, max_requeues, self.dead_letter_maxlen, *triples],
                )
            requeued += [uuid.UUID(x.decode()) for x in back]
            dead += [uuid.UUID(x.decode()) for x in gone]
        return requeued, dead

    async def delete_consumer(self, task_type: str, consumer: str) -> None:
        with translate("streams.delete_consumer"):
            try:
                await self.redis.xgroup_delconsumer(self.keys.stream(task_type), GROUP, consumer)
            except ResponseError as exc:
                if not lost_state(exc):
                    raise

    async def trim(self, task_type: str) -> int:
        """Drop entries every consumer is done with (acked); returns how many were dropped.

        The last-delivered id is read before the oldest pending id: an entry below both was
        delivered and is no longer pending, so it was acked, and an acked entry never becomes
        pending again. Undelivered entries are never trimmed.
        """
        stream = self.keys.stream(task_type)
        with translate("streams.trim"):
            try:
                groups = await self.redis.xinfo_groups(stream)
                group = next((g for g in groups if g["name"] == GROUP.encode()), None)
                if group is None:
                    return 0
                summary = await self.redis.xpending(stream, GROUP)
            except ResponseError as exc:
                if not lost_state(exc):
                    raise
                return 0  # nothing to trim: the stream or its group is gone (a Redis wipe)
            min_pending = summary["min"]
            min_id = min_pending.decode() if min_pending else _next_id(group["last-delivered-id"])
            dropped = await self.redis.xtrim(stream, minid=min_id, approximate=False)
        return int(dropped)

    async def trim_dead(self, task_type: str, older_than_s: float) -> int:
        """Cap the type's dead-letter stream: drop entries older than `older_than_s` (by
        Redis's clock; 0 keeps them by age) and beyond `dead_letter_maxlen`. Returns how many
        were dropped."""
        key = self.keys.dead(task_type)
        with translate("streams.trim_dead"):
            dropped = 0
            if older_than_s > 0:
                seconds, micros = await self.redis.time()
                min_ms = seconds * 1000 + micros // 1000 - int(older_than_s * 1000)
                dropped += int(await self.redis.xtrim(key, minid=f"{max(0, min_ms)}-0"))
            dropped += int(await self.redis.xtrim(key, maxlen=self.dead_letter_maxlen,
                                                  approximate=False))
        return dropped

    # -- relay -----------------------------------------------------------------------------

    async def undelivered(self, task_type: str, limit: int) -> set[uuid.UUID] | None:
        """Task ids of entries not yet delivered to the group; None if there are over `limit`.

        Creates the group if it is missing, so the answer is about this group's backlog.
        """
        stream = self.keys.stream(task_type)
        await self.ensure_group(task_type)
        with translate("streams.undelivered"):
            groups: Any = await self.redis.xinfo_groups(stream)
            group = next(g for g in groups if g["name"] == GROUP.encode())
            start = "(" + group["last-delivered-id"].decode()
            entries: Any = await self.redis.xrange(stream, min=start, max="+", count=limit + 1)
        if len(entries) > limit:
            return None
        return {m.task_id for m in (decode(s, f) for s, f in entries) if m.task_id}

    async def delayed_among(self, task_type: str, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of `task_ids` wait in the type's delayed set."""
        if not task_ids:
            return set()
        members = [str(t) for t in task_ids]
        with translate("streams.delayed_among"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zmscore(self.keys.delayed(task_type), members)
                for level in READY_LEVELS:  # a type with priorities: its ready sets too
                    pipe.zmscore(self.keys.ready(task_type, level), members)
                replies = await pipe.execute()
        return {t for scores in replies for t, score in zip(task_ids, scores, strict=True)
                if score is not None}

    # -- observation -----------------------------------------------------------------------

    async def stats(self, task_types: Iterable[str]) -> dict[str, StreamStats]:
        types = list(task_types)
        with translate("streams.stats"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for t in types:
                    pipe.xlen(self.keys.stream(t))
                    pipe.xinfo_groups(self.keys.stream(t))
                    pipe.zcard(self.keys.delayed(t))
                    pipe.xlen(self.keys.dead(t))
                    for level in READY_LEVELS:
                        pipe.zcard(self.keys.ready(t, level))
                replies = await pipe.execute(raise_on_error=False)
        out = {}
        width = 4 + len(READY_LEVELS)
        for i, t in enumerate(types):
            length, groups, delayed, dead = replies[width * i:width * i + 4]
            # Tasks in a priority level's ready set wait like undelivered entries.
            ready = sum(int(n) for n in replies[width * i + 4:width * (i + 1)]
                        if isinstance(n, int))
            group = None
            if isinstance(groups, list):
                group = next((g for g in groups if g["name"] == GROUP.encode()), None)
            undelivered = (int(group["lag"]) if group and group.get("lag") is not None
                           else (int(length) if group is None else None))
            out[t] = StreamStats(
                length=int(length),
                pending=int(group["pending"]) if group else 0,
                undelivered=None if undelivered is None else undelivered + ready,
                delayed=int(delayed),
                dead_letters=int(dead),
            )
        return out

    async def oldest_undelivered_age_ms(self, task_types: Iterable[str]
                                        ) -> dict[str, int | None]:
        """How long each type's oldest undelivered entry has been in its stream, by Redis's
        clock (the one its ids come from), None when nothing waits: two pipelines, one command
        per type in each."""
        types = list(task_types)
        with translate("streams.oldest_undelivered"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for t in types:
                    pipe.xinfo_groups(self.keys.stream(t))
                groups = await pipe.execute(raise_on_error=False)
            async with self.redis.pipeline(transaction=False) as pipe:
                for t, found in zip(types, groups, strict=True):
                    group = (next((g for g in found if g["name"] == GROUP.encode()), None)
                             if isinstance(found, list) else None)
                    start = "(" + group["last-delivered-id"].decode() if group else "-"
                    pipe.xrange(self.keys.stream(t), min=start, max="+", count=1)
                    for level in READY_LEVELS:  # a type with priorities: its ready sets
                        pipe.zrange(self.keys.ready(t, level), 0, 0, withscores=True)
                pipe.time()
                *replies, (seconds, micros) = await pipe.execute(raise_on_error=False)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        out: dict[str, int | None] = {}
        width = 1 + len(READY_LEVELS)
        for i, t in enumerate(types):
            entries, *ready = replies[width * i:width * (i + 1)]
            oldest = [int(entries[0][0].split(b"-")[0])] if isinstance(entries, list) and entries \
                else []
            oldest += [int(r[0][1]) for r in ready if isinstance(r, list) and r]
            out[t] = max(0, now_ms - min(oldest)) if oldest else None
        return out

    async def lag(self, task_type: str) -> int:
        """Entries of the type's stream not yet delivered to the group (0 if unknown)."""
        return sum(s.undelivered or 0 for s in (await self.stats([task_type])).values())

    async def dead_letters(self, task_type: str, count: int = 100) -> list[dict[str, str]]:
        """Newest dead-letter entries of a type."""
        with translate("streams.dead_letters"):
            rows: Any = await self.redis.xrevrange(self.keys.dead(task_type), count=count)
        return [
            {"stream_id": sid.decode(), **{k.decode(): v.decode() for k, v in fields.items()}}
            for sid, fields in rows
        ]
