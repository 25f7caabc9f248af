"""Dependencies between tasks, workflows (DAGs created whole) and parent-child tasks.

A task enqueued with `depends_on` (ids of tasks that exist already, or keys of nodes of the
same workflow: so a cycle cannot be built) starts `waiting`, in no stream, unless every
upstream is final by then. It leaves `waiting` in the transaction that makes its last
upstream final: migration 0007's trigger, the one owner of that rule, run by whatever
statement finishes a task (a worker's record, a kill by the rebalancer or the relay, a cancel
from the API), and by a retry that takes one back. It then is `queued`, announced by a NOTIFY
that the relay turns into its message and its event after the commit (the relay's scan is the
backstop: a crash between commit and publish loses nothing), or `cancelled` with a reason
naming the upstream, when one ended dead or cancelled and its `on_upstream_failure` is
`cancel` (`run`: it runs anyway and sees the failure through `ctx.upstream()`).

Inserting a dependent locks its existing upstreams (the UPDATE that flags them
`has_dependents`), so an upstream finishing meanwhile is seen either as final by the insert or
as having this dependent by its trigger, never neither.

A workflow is a row of `workflows` plus its nodes (tasks with its `workflow_id` and a key);
its status is computed from theirs. The janitor prunes it whole, once its last node finished
longer ago than the retention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson

from conveyor.errors import WorkflowInvalid
from conveyor.store.pool import Connection, borrowed, translate
from conveyor.store.tasks import (
    FINISHED,
    RECORD_COLUMNS,
    ExtraColumns,
    Inserted,
    NewTask,
    TaskRecord,
    TaskStore,
    UpstreamFailure,
)
from conveyor.store.tasks import record_of as _record

_COLUMNS = RECORD_COLUMNS
# What a node sets beyond a plain task (TaskStore.insert's `extra`): see migration 0007.
_NODE_COLUMNS = (
    ("status", "text", "u.status"),
    ("finished_at", "bool", "CASE WHEN u.finished_at THEN now() END"),
    ("last_error", "text", "u.last_error"),
    ("depends_on", "text", "u.depends_on::uuid[]"),
    ("on_upstream_failure", "text", "u.on_upstream_failure"),
    ("workflow_id", "uuid", "u.workflow_id"),
    ("node_key", "text", "u.node_key"),
    ("parent_id", "uuid", "u.parent_id"),
    ("has_dependents", "bool", "u.has_dependents"),
    ("deps_left", "int", "u.deps_left"),
)

MAX_NODES = 1000
WorkflowStatus = Literal["running", "succeeded", "failed", "cancelled"]
UPSTREAM_PREFIX = "upstream task "  # the start of the reason of a task cancelled by upstream


@dataclass(frozen=True, slots=True)
class NewNode:
    """A task to insert with what it depends on: ids of existing tasks or of other nodes of the
    same insert (which must come before it)."""

    task: NewTask
    depends_on: tuple[uuid.UUID, ...] = ()
    on_upstream_failure: UpstreamFailure = "cancel"
    parent_id: uuid.UUID | None = None
    key: str | None = None  # its key in the workflow


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    """A workflow and its nodes (each a whole task record; its key is `workflow_key`)."""

    id: uuid.UUID
    name: str | None
    status: WorkflowStatus
    created_at: datetime
    cancelled_at: datetime | None
    tasks: list[TaskRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WorkflowSummary:
    id: uuid.UUID
    name: str | None
    status: WorkflowStatus
    nodes: int
    created_at: datetime
    cancelled_at: datetime | None
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream of a task as its handler sees it (`ctx.upstream()`)."""

    id: uuid.UUID
    key: str | None
    type: str
    status: str
    result: Any
    error: str | None


def workflow_status(statuses: Iterable[str], cancelled: bool) -> WorkflowStatus:
    """`running` while a node is live; then `cancelled` if it was cancelled, `succeeded` if
    every node did, else `failed`."""
    seen = set(statuses)
    if seen - set(FINISHED):
        return "running"
    if cancelled:
        return "cancelled"
    return "succeeded" if seen <= {"succeeded"} else "failed"


def order_nodes(keys: Sequence[str], depends_on: Sequence[Sequence[str]]) -> list[int]:
    """Indexes of the nodes in an order where each comes after what it depends on; raises
    WorkflowInvalid for a duplicate or unknown key, or a cycle (naming one)."""
    index: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in index:
            raise WorkflowInvalid("duplicate_key", f"tasks[{i}]: key {key!r} is used twice")
        index[key] = i
    for i, deps in enumerate(depends_on):
        for dep in deps:
            if dep not in index:
                raise WorkflowInvalid(
                    "unknown_key", f"tasks[{i}].depends_on: no task has key {dep!r}")
            if dep == keys[i]:
                raise WorkflowInvalid("cycle", f"tasks[{i}] ({keys[i]!r}) depends on itself")
    order: list[int] = []
    state = [0] * len(keys)  # 0 new, 1 on the path, 2 placed
    for root in range(len(keys)):
        if state[root]:
            continue
        stack: list[tuple[int, int]] = [(root, 0)]
        state[root] = 1
        while stack:
            node, at = stack[-1]
            deps = depends_on[node]
            if at < len(deps):
                stack[-1] = (node, at + 1)
                nxt = index[deps[at]]
                if state[nxt] == 1:
                    path = [keys[n] for n, _ in stack]
                    cycle = [*path[path.index(keys[nxt]):], keys[nxt]]
                    raise WorkflowInvalid("cycle", "the dependencies form a cycle: "
                                          + " -> ".join(repr(k) for k in cycle))
                if state[nxt] == 0:
                    state[nxt] = 1
                    stack.append((nxt, 0))
                continue
            state[node] = 2
            order.append(node)
            stack.pop()
    return order


class WorkflowStore:
    """All SQL of dependencies, workflows and parent-child tasks on one schema."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store  # its insert is the one path of a new task, a node's too
        self.pool = store.pool
        self.acquire_timeout_s = store.acquire_timeout_s
        schema = store.table.rpartition(".")[0]
        self.tasks = f"{schema}.tasks"
        self.edges = f"{schema}.task_edges"
        self.workflows = f"{schema}.workflows"

    @contextlib.asynccontextmanager
    async def _connection(self, op: str) -> AsyncIterator[Connection]:
        async with borrowed(self.pool, self.acquire_timeout_s, op) as conn:
            yield conn

    # -- insert ----------------------------------------------------------------------------

    async def insert(
        self, nodes: Sequence[NewNode], *, workflow: tuple[uuid.UUID, str | None] | None = None,
        conn: Connection | None = None,
    ) -> list[Inserted]:
        """Insert `nodes` (and the workflow row, when given) in one transaction; results in
        the order of `nodes`. WorkflowInvalid if an upstream id names no task."""
        if conn is not None:
            with translate("workflows.insert"):
                return await self._insert(conn, nodes, workflow)
        async with self._connection("workflows.insert") as own, own.transaction():
            return await self._insert(own, nodes, workflow)

    async def _insert(
        self, conn: Connection, nodes: Sequence[NewNode],
        workflow: tuple[uuid.UUID, str | None] | None,
    ) -> list[Inserted]:
        own = {n.task.id for n in nodes}
        outside = sorted({d for n in nodes for d in n.depends_on if d not in own})
        status_of: dict[uuid.UUID, str] = {}
        if outside:
            # Locks them till the caller's transaction ends: an upstream finishing meanwhile
            # waits for this commit (its trigger then sees the new edges), so a transactional
            # enqueue with depends_on holds up its upstreams' completions as long as the
            # caller's transaction stays open. Only the first dependent flags an upstream (an
            # update: its row lock); later ones take a shared lock, so dependents enqueued
            # side by side do not queue behind one another.
            flagged = await conn.fetch(
                f"UPDATE {self.tasks} SET has_dependents = true"
                " WHERE id = ANY($1::uuid[]) AND NOT has_dependents RETURNING id, status",
                outside)
            status_of = {r[0]: r[1] for r in flagged}
            rest = [i for i in outside if i not in status_of]
            if rest:
                shared = await conn.fetch(
                    f"SELECT id, status FROM {self.tasks} WHERE id = ANY($1::uuid[])"
                    " ORDER BY id FOR SHARE", rest)
                status_of.update((r[0], r[1]) for r in shared)
            unknown = [str(i) for i in outside if i not in status_of]
            if unknown:
                raise WorkflowInvalid("unknown_task",
                                      "depends_on names no task with id " + ", ".join(unknown))
        upstreams = {d for n in nodes for d in n.depends_on}
        placed: dict[uuid.UUID, str] = {}
        values: dict[uuid.UUID, tuple[Any, ...]] = {}
        workflow_id = workflow[0] if workflow else None
        for n in nodes:
            left, failed = 0, None
            for dep in dict.fromkeys(n.depends_on):
                status = status_of.get(dep) or placed.get(dep)
                if status is None:
                    raise WorkflowInvalid("order", f"a node depends on {dep}, placed after it")
                if status not in FINISHED:
                    left += 1
                elif status != "succeeded" and failed is None:
                    failed = (dep, status)
            reason = None
            if failed is not None and n.on_upstream_failure == "cancel":
                status = "cancelled"
                reason = f"{UPSTREAM_PREFIX}{failed[0]} ended {failed[1]}"
            else:
                status = "waiting" if left else "queued"
            placed[n.task.id] = status if status == "cancelled" else "waiting"
            values[n.task.id] = (
                status, status == "cancelled", reason,
                None if not n.depends_on else "{" + ",".join(map(str, n.depends_on)) + "}",
                None if n.on_upstream_failure == "cancel" else n.on_upstream_failure,
                workflow_id, n.key, n.parent_id, n.task.id in upstreams, left)
        if workflow is not None:
            await conn.execute(
                f"INSERT INTO {self.workflows} (id, name, nodes) VALUES ($1, $2, $3)",
                workflow[0], workflow[1], len(nodes))
        # A node whose idempotency key names a task already is that task (not inserted, no
        # edges): TaskStore's own handling, the key's TTL and a concurrent release included.
        out = await self.store.insert([n.task for n in nodes], conn,
                                      extra=ExtraColumns(_NODE_COLUMNS, values))
        created = {i.record.id for i in out if i.created}
        edges = [(d, n.task.id) for n in nodes if n.task.id in created
                 for d in dict.fromkeys(n.depends_on)]
        if edges:
            await conn.execute(
                f"INSERT INTO {self.edges} (upstream, downstream)"
                " SELECT * FROM unnest($1::uuid[], $2::uuid[])",
                [e[0] for e in edges], [e[1] for e in edges])
        return out

    # -- reads -----------------------------------------------------------------------------

    async def dependents(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[uuid.UUID]]:
        """The dependents of each of `ids` (those with any)."""
        if not ids:
            return {}
        async with self._connection("workflows.dependents") as conn:
            rows = await conn.fetch(
                f"SELECT upstream, array_agg(downstream ORDER BY downstream) FROM {self.edges}"
                " WHERE upstream = ANY($1::uuid[]) GROUP BY upstream", list(ids))
        return {r[0]: list(r[1]) for r in rows}

    async def get(self, workflow_id: uuid.UUID) -> WorkflowRecord | None:
        async with self._connection("workflows.get") as conn:
            head = await conn.fetchrow(
                f"SELECT id, name, created_at, cancelled_at FROM {self.workflows}"
                " WHERE id = $1", workflow_id)
            if head is None:
                return None
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self.tasks} AS t WHERE t.workflow_id = $1"
                " ORDER BY t.id", workflow_id)
            edges = await conn.fetch(
                f"SELECT e.upstream, e.downstream FROM {self.edges} AS e"
                f" JOIN {self.tasks} AS t ON t.id = e.upstream WHERE t.workflow_id = $1"
                " ORDER BY e.downstream", workflow_id)
        below: dict[uuid.UUID, list[uuid.UUID]] = {}
        for up, down in edges:
            below.setdefault(up, []).append(down)
        tasks = [_with_dependents(_record(r), below) for r in rows]
        return WorkflowRecord(
            head[0], head[1], workflow_status((t.status for t in tasks), head[3] is not None),
            head[2], head[3], tasks)

    async def page(
        self, *, before: uuid.UUID | None = None, limit: int = 50
    ) -> list[WorkflowSummary]:
        """Newest first; `before` is the last id of the previous page."""
        async with self._connection("workflows.list") as conn:
            rows = await conn.fetch(
                f"""SELECT w.id, w.name, w.nodes, w.created_at, w.cancelled_at,
                           (SELECT jsonb_object_agg(s.status, s.n) FROM (
                               SELECT t.status, count(*) AS n FROM {self.tasks} AS t
                               WHERE t.workflow_id = w.id GROUP BY t.status) AS s)
                    FROM {self.workflows} AS w
                    WHERE $1::uuid IS NULL OR w.id < $1
                    ORDER BY w.id DESC LIMIT $2""", before, limit)
        out = []
        for r in rows:
            counts = dict(r[5] or {}) if not isinstance(r[5], str) else orjson.loads(r[5])
            out.append(WorkflowSummary(
                r[0], r[1], workflow_status(counts, r[4] is not None), r[2], r[3], r[4],
                counts))
        return out

    async def upstream(self, task_id: uuid.UUID) -> list[Upstream]:
        """The upstreams of a task, in the order of its `depends_on`."""
        async with self._connection("workflows.upstream") as conn:
            rows = await conn.fetch(
                f"""SELECT u.id, u.node_key, u.type, u.status, u.result, u.last_error
                    FROM {self.tasks} AS t
                    CROSS JOIN LATERAL unnest(t.depends_on) WITH ORDINALITY AS d(id, i)
                    JOIN {self.tasks} AS u ON u.id = d.id
                    WHERE t.id = $1 ORDER BY d.i""", task_id)
        return [Upstream(*r) for r in rows]

    async def children(self, parent_id: uuid.UUID) -> list[TaskRecord]:
        async with self._connection("workflows.children") as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self.tasks} AS t WHERE t.parent_id = $1"
                " ORDER BY t.id", parent_id)
        return [_record(r) for r in rows]

    async def live_children(self, parent_id: uuid.UUID) -> int:
        async with self._connection("workflows.live_children") as conn:
            found: int = await conn.fetchval(
                f"SELECT count(*) FROM {self.tasks} WHERE parent_id = $1"
                " AND status IN ('waiting', 'queued', 'running')", parent_id)
        return found

    # -- actions ---------------------------------------------------------------------------

    async def cancel(
        self, workflow_id: uuid.UUID
    ) -> tuple[list[TaskRecord], list[uuid.UUID]] | None:
        """Mark the workflow cancelled; its waiting and queued nodes end `cancelled`, its
        running ones are asked to stop. Returns (nodes cancelled now, running nodes asked), or
        None, changing nothing, when every node has finished (a finished workflow keeps its
        status)."""
        async with self._connection("workflows.cancel") as conn, conn.transaction():
            rows = await conn.fetch(
                f"""UPDATE {self.tasks} AS t SET cancel_requested = true,
                        status = CASE WHEN t.status = 'running' THEN t.status
                                      ELSE 'cancelled' END,
                        finished_at = CASE WHEN t.status = 'running' THEN t.finished_at
                                           ELSE now() END
                    WHERE t.workflow_id = $1 AND t.status IN ('waiting', 'queued', 'running')
                    RETURNING {_COLUMNS}""", workflow_id)
            if not rows:
                return None
            await conn.execute(
                f"UPDATE {self.workflows} SET cancelled_at = coalesce(cancelled_at, now())"
                " WHERE id = $1", workflow_id)
        records = [_record(r) for r in rows]
        return ([r for r in records if r.status == "cancelled"],
                [r.id for r in records if r.status == "running"])

    async def retry(self, workflow_id: uuid.UUID) -> list[TaskRecord]:
        """Queue again every node that ended dead or cancelled (but those cancelled by an
        upstream: they wait again for it, by the trigger), each `waiting` while an upstream
        is unfinished; the workflow is no longer cancelled. Returns the nodes it queued (to
        publish)."""
        async with self._connection("workflows.retry") as conn, conn.transaction():
            await conn.execute(
                f"UPDATE {self.workflows} SET cancelled_at = NULL WHERE id = $1", workflow_id)
            retried = await conn.fetch(
                f"""UPDATE {self.tasks} AS t SET attempts = 0, run_at = now(),
                        status = CASE WHEN t.deps_left > 0 THEN 'waiting' ELSE 'queued' END,
                        started_at = NULL, finished_at = NULL, result = NULL,
                        cancel_requested = false, progress = NULL
                    WHERE t.workflow_id = $1 AND t.status IN ('dead', 'cancelled')
                      AND NOT (t.status = 'cancelled' AND t.attempts = 0
                               AND coalesce(t.last_error, '') LIKE '{UPSTREAM_PREFIX}%')
                    RETURNING t.id""",
                workflow_id)
            # Those the trigger did not make wait again (an upstream retried in the same
            # statement): the only ones to publish; a node the retry left alone (a delayed
            # one, say) is where it was.
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self.tasks} AS t WHERE t.id = ANY($1::uuid[])"
                " AND t.status = 'queued' ORDER BY t.id", [r[0] for r in retried])
        return [_record(r) for r in rows]

    async def prune(self, older_than_s: float, limit: int) -> int:
        """Delete up to `limit` workflows whose every node finished more than `older_than_s`
        ago, nodes and all; returns how many."""
        async with self._connection("workflows.prune") as conn, conn.transaction():
            doomed = await conn.fetch(
                f"""SELECT w.id FROM {self.workflows} AS w
                    WHERE w.created_at < now() - $1 * interval '1 second'
                      AND NOT EXISTS (
                        SELECT 1 FROM {self.tasks} AS t WHERE t.workflow_id = w.id
                          AND (t.status IN ('waiting', 'queued', 'running')
                               OR t.finished_at >= now() - $1 * interval '1 second'))
                    ORDER BY w.id LIMIT $2 FOR UPDATE SKIP LOCKED""", older_than_s, limit)
            ids = [r[0] for r in doomed]
            if ids:
                await conn.execute(
                    f"DELETE FROM {self.tasks} WHERE workflow_id = ANY($1::uuid[])", ids)
                await conn.execute(
                    f"DELETE FROM {self.workflows} WHERE id = ANY($1::uuid[])", ids)
        return len(ids)


def _with_dependents(record: TaskRecord, below: Mapping[uuid.UUID, list[uuid.UUID]]
                     ) -> TaskRecord:
    found = below.get(record.id)
    if not found:
        return record
    return dataclasses.replace(record, dependents=found)
