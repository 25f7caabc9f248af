"""The chaos run: tasks flow through real worker processes while workers are SIGKILLed or
stalled (SIGSTOP, later SIGCONT), Redis restarts (once with its data wiped) or is flushed live,
Postgres restarts or fails Conveyor's statements with real server errors; at the end every task
must have succeeded once, and no run may contradict the record.

    python -m conveyor.testing.chaos --tasks 2000 --faults-each 1 --pg-errors 4

It starts its own PostgreSQL and Redis (see `servers.py`), a `conveyor cron` process and
`--workers` `conveyor worker` processes running this module's `app`, enqueues the tasks over
`--duration` seconds (a `--long-share` of them run `--long-ms`, longer than the heartbeat TTL)
and injects the faults at random moments meanwhile.

What it records, in the `chaos` schema of the same database:

- `runs/<pid>.jsonl` in the run's directory: a line per handler run as it starts (task,
  worker, attempt) and one as it ends, `ok` when it is about to return its result — appended
  to a local file, so neither a Postgres nor a Redis fault can lose or delay it, and a SIGKILL
  loses nothing already written;
- `chaos.transitions`: every status write to a task (old and new status, attempts, worker),
  by a trigger on the tasks table;
- `chaos.faults`: the injected Postgres error, if one is active; a BEFORE UPDATE trigger on the
  tasks table raises it (`RAISE ... USING ERRCODE`) for a share of the rows while it lasts.

With `--workflows N`, N workflows of `--workflow-nodes` effect tasks each (a root, the middle
nodes, a callback depending on all of them, then a chain of two after it whose first link
fails its first attempt and is retried) are created while the faults strike, the first at the
start and the others spread over the enqueue period.

What it checks (any failure exits 1): every task succeeded; no run of a workflow node began
before each of its upstreams had finished (its handler's start against their `finished_at`); no
task's history goes on after a final state (succeeded, dead, cancelled), which also catches
succeeding twice; no dead or cancelled task has a run that finished ok; no two runs of one task
overlap in time unless one of their workers was SIGKILLed or stalled during the overlap (those
are reported apart, as the at-least-once re-runs they are); no Conveyor process exited without
being sent a signal, and each one stopped by SIGTERM at the end exited 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import BaseModel
from redis.asyncio import Redis

from conveyor import logs
from conveyor.application import Conveyor
from conveyor.client import NodeRequest, TaskRequest
from conveyor.config import Settings
from conveyor.errors import Unavailable
from conveyor.registry import RetryPolicy, TaskContext
from conveyor.state import AppState, open_state
from conveyor.testing.servers import PostgresServer, RedisServer

SCHEMA = "conveyor"
FINAL = ("succeeded", "dead", "cancelled")
app = Conveyor()
RUNS_DIR_ENV = "CHAOS_RUNS_DIR"  # where handlers append their run lines (set by the Cluster)
_run_log: list[int] = []  # this process's open run file, once opened


class Effect(BaseModel):
    n: int
    work_ms: int = 0
    fail_attempts: int = 0  # its first this many attempts raise (then it is retried)


@dataclass(frozen=True)
class Run:
    """One handler run from the run files; times are Unix seconds, `finished` None if no end
    was noted (its worker was killed mid-run)."""

    task_id: str
    worker: str
    attempt: int
    work_ms: int
    started: float
    finished: float | None
    ok: bool = False


def _note(line: dict[str, Any]) -> None:
    """Append one run line to this process's run file (one write: a line is never torn)."""
    if not _run_log:
        path = Path(os.environ[RUNS_DIR_ENV]) / f"{os.getpid()}.jsonl"
        _run_log.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    os.write(_run_log[0], (json.dumps(line) + "\n").encode())


@app.task("effect", payload=Effect, max_attempts=100, timeout=30,
          retry=RetryPolicy(base_delay_s=0.2, max_delay_s=2.0))
async def effect(payload: Effect, ctx: TaskContext) -> dict[str, int]:
    """Note this run's start, pretend to work for `work_ms`, note its end: `ok` just before
    returning (a run noted ok is one whose effect happened), not ok if it was interrupted."""
    run = {"task": ctx.task_id, "worker": ctx.worker_id, "attempt": ctx.attempt}
    _note({**run, "work_ms": payload.work_ms, "started": time.time()})
    ok = False
    try:
        await asyncio.sleep(payload.work_ms / 1000)
        if ctx.attempt <= payload.fail_attempts:
            raise RuntimeError(f"attempt {ctx.attempt} was told to fail")
        ok = True
    finally:
        _note({**run, "finished": time.time(), "ok": ok})
    return {"n": payload.n}


def read_runs(directory: Path) -> list[Run]:
    """Every handler run noted in `directory`, with its end if one was noted."""
    runs: dict[tuple[str, str, int], Run] = {}
    for path in sorted(directory.glob("*.jsonl")):
        for raw in path.read_text().splitlines():
            line = json.loads(raw)
            key = (line["task"], line["worker"], line["attempt"])
            if "started" in line:
                runs[key] = Run(line["task"], line["worker"], line["attempt"],
                                line["work_ms"], line["started"], None)
            elif key in runs:
                runs[key] = dataclasses.replace(runs[key], finished=line["finished"],
                                                ok=line["ok"])
    return list(runs.values())


CHAOS_SQL = f"""
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.transitions (
  id bigserial PRIMARY KEY, task_id uuid NOT NULL, old_status text, new_status text NOT NULL,
  attempts integer NOT NULL, worker text, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS chaos.faults (
  only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row), code text, message text,
  share float8 NOT NULL DEFAULT 1, until timestamptz);
INSERT INTO chaos.faults (only_row) VALUES (true) ON CONFLICT DO NOTHING;
CREATE SEQUENCE IF NOT EXISTS chaos.raised;

-- Every status write, in the order the row lock serialised them (id is taken after the lock).
CREATE OR REPLACE FUNCTION chaos.note_transition() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO chaos.transitions (task_id, new_status, attempts, worker)
    VALUES (NEW.id, NEW.status, NEW.attempts, NEW.worker);
  ELSE
    INSERT INTO chaos.transitions (task_id, old_status, new_status, attempts, worker)
    VALUES (NEW.id, OLD.status, NEW.status, NEW.attempts, NEW.worker);
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS note_transition ON {SCHEMA}.tasks;
CREATE TRIGGER note_transition AFTER INSERT OR UPDATE OF status ON {SCHEMA}.tasks
  FOR EACH ROW EXECUTE FUNCTION chaos.note_transition();

-- While a fault is active, a share of the updates fail with its SQLSTATE, raised by the server
-- inside Conveyor's own statement. The sequence counts them (nextval outlives the rollback).
CREATE OR REPLACE FUNCTION chaos.inject_fault() RETURNS trigger AS $$
DECLARE f chaos.faults;
BEGIN
  SELECT * INTO f FROM chaos.faults WHERE code IS NOT NULL AND until > clock_timestamp();
  IF FOUND AND random() < f.share THEN
    PERFORM nextval('chaos.raised');
    RAISE EXCEPTION USING MESSAGE = f.message, ERRCODE = f.code,
      DETAIL = 'injected by the chaos run';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS inject_fault ON {SCHEMA}.tasks;
CREATE TRIGGER inject_fault BEFORE UPDATE ON {SCHEMA}.tasks
  FOR EACH ROW EXECUTE FUNCTION chaos.inject_fault();
"""

# Postgres error kinds: (SQLSTATE, message) raised by the trigger, or None for a real read-only
# server (ALTER SYSTEM SET default_transaction_read_only, then a reload).
PG_ERRORS: dict[str, tuple[str, str] | None] = {
    "Postgres 40P01 deadlock": ("40P01", "deadlock detected"),
    "Postgres 40001 serialization failure": (
        "40001", "could not serialize access due to concurrent update"),
    "Postgres 25006 read-only UPDATE": (
        "25006", "cannot execute UPDATE in a read-only transaction"),
    "Postgres read-only server": None,
}
# Fault kinds by Plan field; a Postgres error is reported by its PG_ERRORS kind.
FAULTS = {
    "kills": "worker SIGKILL", "stalls": "worker stall", "redis_restarts": "Redis restart",
    "redis_wipes": "Redis wipe", "flushes": "Redis FLUSHALL", "pg_restarts": "Postgres restart",
    "pg_errors": "Postgres error",
}

_TIMINGS: dict[str, Any] = {
    "heartbeat_interval": 1.0, "heartbeat_ttl": 3.0, "rebalance_interval": 1.0,
    "relay_interval": 1.0, "relay_grace": 3.0, "read_block": 0.5, "drain_timeout": 10.0,
    "max_deliveries": 100, "concurrency": 10,
}
# After SIGCONT, a stalled worker finishes what it held before it hears of the takeover.
_STALL_GRACE_S = float(_TIMINGS["heartbeat_interval"])


@dataclass
class Plan:
    tasks: int = 2000
    duration_s: float = 30.0
    workers: int = 3
    kills: int = 3
    redis_restarts: int = 1
    redis_wipes: int = 1
    pg_restarts: int = 1
    flushes: int = 1
    stalls: int = 1
    pg_errors: int = 1
    work_ms: int = 200
    long_share: float = 0.02
    long_ms: int = 5000
    stall_s: float = 2 * float(_TIMINGS["heartbeat_ttl"])
    drain_timeout_s: float = 120.0
    seed: int = 0
    workflows: int = 0
    workflow_nodes: int = 500


@dataclass
class Exit:
    """A Conveyor process that ended on its own."""

    role: str
    pid: int
    code: int
    log: Path
    tail: list[str]


@dataclass
class Report:
    enqueued: int = 0
    long_tasks: int = 0
    succeeded: int = 0
    final: dict[str, int] = field(default_factory=dict)
    recorded_twice: list[str] = field(default_factory=list)
    dead_but_ran_ok: list[str] = field(default_factory=list)
    workflows: int = 0
    released_early: list[str] = field(default_factory=list)
    live_overlaps: list[str] = field(default_factory=list)
    impaired_overlaps: int = 0
    exits: list[Exit] = field(default_factory=list)
    unclean_stops: list[str] = field(default_factory=list)
    handler_runs: int = 0
    faults: list[tuple[float, str]] = field(default_factory=list)
    pg_errors_raised: int = 0
    drain_after_last_fault_s: float | None = None
    elapsed_s: float = 0.0

    @property
    def lost(self) -> int:
        return self.enqueued - self.succeeded

    @property
    def ok(self) -> bool:
        return (self.enqueued > 0 and self.lost == 0 and not self.recorded_twice
                and not self.dead_but_ran_ok and not self.live_overlaps and not self.exits
                and not self.unclean_stops and not self.released_early)

    def lines(self) -> list[str]:
        kinds: dict[str, int] = {}
        for _, kind in self.faults:
            kinds[kind] = kinds.get(kind, 0) + 1
        drain = ("n/a" if self.drain_after_last_fault_s is None
                 else f"{self.drain_after_last_fault_s:.1f} s")
        others = ", ".join(f"{n} {s}" for s, n in sorted(self.final.items()) if s != "succeeded")
        out = [
            _row("tasks enqueued", f"{self.enqueued} ({self.long_tasks} long)"),
            _row("tasks succeeded", self.succeeded),
            _row("lost (never succeeded)", self.lost, others),
            _row("recorded twice", len(self.recorded_twice)),
            *_examples(self.recorded_twice),
            _row("dead or cancelled, yet ran ok", len(self.dead_but_ran_ok)),
            *_examples(self.dead_but_ran_ok),
            _row("workflows", self.workflows),
            _row("ran before an upstream finished", len(self.released_early)),
            *_examples(self.released_early),
            _row("concurrent copies, live workers", len(self.live_overlaps)),
            *_examples(self.live_overlaps),
            _row("concurrent copies, killed/stalled", self.impaired_overlaps,
                 "expected: at-least-once"),
            _row("exited without being killed", len(self.exits)),
        ]
        for e in self.exits:
            out.append(f"  {e.role} pid {e.pid} exited {e.code}; log {e.log}")
            out.extend(f"    | {line}" for line in e.tail)
        out += [
            _row("non-zero exit on SIGTERM", len(self.unclean_stops)),
            *_examples(self.unclean_stops),
            _row("handler runs", self.handler_runs,
                 f"{self.handler_runs - self.succeeded} more than tasks: at-least-once re-runs"),
            _row("faults injected",
                 ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"),
            _row("Postgres errors raised", self.pg_errors_raised, "statements failed by trigger"),
            _row("drain after last fault", drain),
            _row("elapsed", f"{self.elapsed_s:.1f} s"),
            _row("result", "OK" if self.ok else "FAILED"),
        ]
        return out


def _row(label: str, value: object, note: str = "") -> str:
    return f"{label:<34}{value}" + (f" ({note})" if note else "")


def _examples(items: list[str], limit: int = 5) -> list[str]:
    shown = [f"  {item}" for item in items[:limit]]
    return shown + ([f"  ... and {len(items) - limit} more"] if len(items) > limit else [])


def _why(log_lines: list[str], limit: int = 3) -> list[str]:
    """The last warnings and errors of a process log (JSON lines, or a bare traceback)."""
    found: list[str] = []
    for line in log_lines[-50:]:
        try:
            entry = json.loads(line)
        except ValueError:
            if line and not line.startswith(" "):
                found.append(line)
            continue
        if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
            found.append(f"{entry['level']} {entry.get('event')}: {_innermost(entry)}")
    return [" ".join(line.split())[:300] for line in found[-limit:]]


def _innermost(entry: Any) -> str:
    """The deepest `exc_type: exc_value` of a structlog exception, else the `error` field."""
    best = str(entry.get("error", "")) if isinstance(entry, dict) else ""
    if isinstance(entry, dict) and "exc_type" in entry and not entry.get("exceptions"):
        return f"{entry['exc_type']}: {entry.get('exc_value', '')}"
    children = entry.get("exception") or entry.get("exceptions") if isinstance(
        entry, dict) else entry
    if isinstance(children, list):
        for child in children:
            inner = _innermost(child)
            if inner:
                best = inner
    return best


@dataclass
class Proc:
    role: str
    popen: subprocess.Popen[bytes]
    log: Path

    _started: bool = field(default=False, init=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def started(self) -> bool:
        if not self._started:
            self._started = b'"event":"conveyor.started"' in self.log.read_bytes()
        return self._started


# Per pid, wall-clock windows in which that process was not a live worker.
Windows = dict[int, list[tuple[float, float]]]


class Cluster:
    """The servers and Conveyor processes of one chaos run, and what was done to each process.

    `impaired` holds, per pid, the wall-clock windows in which that process was not a live
    worker: from its SIGKILL on, or from SIGSTOP to SIGCONT (plus a grace).
    """

    def __init__(self, base: Path, plan: Plan) -> None:
        self.base = base
        self.plan = plan
        self.pg = PostgresServer(base / "postgres")
        self.redis = RedisServer(base / "redis", persistent=True)
        self.runs_dir = base / "runs"  # the handlers' run files
        self.runs_dir.mkdir(exist_ok=True)
        self.runs_dir.chmod(0o777)
        self.procs: list[Proc] = []
        self.signalled: set[int] = set()
        self.stalled: set[int] = set()
        self.impaired: Windows = {}
        self._spawned = 0

    def settings(self) -> Settings:
        return Settings(database_url=self.pg.dsn, redis_url=self.redis.url, **_TIMINGS)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env.update({"DATABASE_URL": self.pg.dsn, "REDIS_URL": self.redis.url,
                    "CONVEYOR_LOG_FORMAT": "json", "CONVEYOR_LOG_LEVEL": "info",
                    RUNS_DIR_ENV: str(self.runs_dir)})
        env.update({f"CONVEYOR_{k.upper()}": str(v) for k, v in _TIMINGS.items()})
        return env

    def spawn(self, role: str) -> Proc:
        self._spawned += 1
        path = self.base / f"{role}-{self._spawned}.log"
        log = open(path, "ab")  # noqa: SIM115 - owned by the process
        popen = subprocess.Popen(
            [sys.executable, "-m", "conveyor", role, "--app", "conveyor.testing.chaos:app"],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        proc = Proc(role, popen, path)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.pg.start()
        self.redis.start()

    def launch(self) -> None:
        self.spawn("cron")
        for _ in range(self.plan.workers):
            self.spawn("worker")

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every Conveyor process has started (connected, migrated, serving)."""
        deadline = time.monotonic() + timeout_s
        while not all(p.started() for p in self.procs if p.popen.poll() is None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Conveyor processes not started after {timeout_s} s")
            await asyncio.sleep(0.1)

    def live_workers(self) -> list[Proc]:
        alive = [p for p in self.procs if p.role == "worker" and p.popen.poll() is None]
        return [p for p in alive if p.pid not in self.stalled] or alive

    def reap_unsignalled(self) -> list[Exit]:
        """Processes that ended though nobody signalled them; each is replaced."""
        exits = []
        for proc in list(self.procs):
            code = proc.popen.poll()
            if code is None or proc.pid in self.signalled:
                continue
            tail = _why(proc.log.read_text(errors="replace").splitlines())
            exits.append(Exit(proc.role, proc.pid, code, proc.log, tail))
            self.procs.remove(proc)
            self.impaired.setdefault(proc.pid, []).append((time.time(), math.inf))
            self.spawn(proc.role)
        return exits

    async def kill_worker(self, rng: random.Random) -> int:
        victim = rng.choice(self.live_workers())
        self.signalled.add(victim.pid)
        self.impaired.setdefault(victim.pid, []).append((time.time(), math.inf))
        victim.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.popen.wait, 10)
        self.procs.remove(victim)
        self.spawn("worker")
        return victim.pid

    async def stall_worker(self, victim: Proc, stall_s: float) -> None:
        """SIGSTOP `victim` for `stall_s`, then SIGCONT; it is not killed."""
        self.stalled.add(victim.pid)
        began = time.time()
        try:
            victim.popen.send_signal(signal.SIGSTOP)
            await asyncio.sleep(stall_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                victim.popen.send_signal(signal.SIGCONT)
            self.stalled.discard(victim.pid)
            self.impaired.setdefault(victim.pid, []).append(
                (began, time.time() + _STALL_GRACE_S))

    def stop_processes(self, timeout_s: float = 20.0) -> list[str]:
        """SIGTERM every Conveyor process; returns those that did not exit 0."""
        unclean = []
        for proc in self.procs:
            if proc.popen.poll() is None:
                self.signalled.add(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGCONT)
                    proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                code = proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                code = proc.popen.wait(5)
                unclean.append(f"{proc.role} pid {proc.pid}: still running after {timeout_s} s;"
                               f" killed; log {proc.log}")
                continue
            if code != 0:
                unclean.append(f"{proc.role} pid {proc.pid}: exit {code}; log {proc.log}")
        self.procs = []
        return unclean

    def stop(self) -> None:
        self.stop_processes()
        self.redis.stop()
        self.pg.stop()


# What the run's own statements meet while a fault lasts; anything else is a bug of the run.
_OUTAGE = (Unavailable, OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
           asyncpg.exceptions.OperatorInterventionError, asyncpg.ReadOnlySQLTransactionError)


async def _retrying(op: Any, *args: Any, timeout_s: float = 60.0) -> Any:
    """Call `op` until Postgres and Redis let it through (for at most `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await op(*args)
        except _OUTAGE:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _count(state: AppState, sql: str, *args: Any) -> int:
    value: int = await _retrying(state.pool.fetchval, sql, *args)
    return value


def _work_ms(plan: Plan, rng: random.Random) -> int:
    return plan.long_ms if rng.random() < plan.long_share else plan.work_ms


async def _enqueue(state: AppState, plan: Plan, report: Report) -> None:
    batch = 20
    rng = random.Random(f"{plan.seed}-tasks")
    began = time.monotonic()
    for start in range(0, plan.tasks, batch):
        effects = [Effect(n=i, work_ms=_work_ms(plan, rng))
                   for i in range(start, min(start + batch, plan.tasks))]
        requests = [TaskRequest("effect", e, idempotency_key=f"chaos-{e.n}") for e in effects]
        report.long_tasks += sum(e.work_ms == plan.long_ms for e in effects)
        await _retrying(state.client.enqueue_many, requests)
        report.enqueued = min(start + batch, plan.tasks)
        due = began + plan.duration_s * report.enqueued / plan.tasks
        await asyncio.sleep(max(0.0, due - time.monotonic()))


async def _workflows(state: AppState, plan: Plan, report: Report) -> None:
    """Create the plan's workflows: the first at once, the rest spread over the period."""
    for k in range(plan.workflows):
        if k:
            await asyncio.sleep(plan.duration_s / plan.workflows)
        base = plan.tasks + k * plan.workflow_nodes
        mids = [NodeRequest(f"m{i}", TaskRequest("effect", Effect(n=base + i + 1,
                                                                   work_ms=plan.work_ms // 4)),
                            ("root",)) for i in range(plan.workflow_nodes - 4)]
        last = base + plan.workflow_nodes - 1
        # After the fan-in, a chain (callback → then → last: root to last is 5 deep) whose
        # middle link fails its first attempt and is retried before its dependent may run.
        nodes = [NodeRequest("root", TaskRequest("effect", Effect(n=base))), *mids,
                 NodeRequest("callback", TaskRequest("effect", Effect(n=last - 2)),
                             tuple(m.key for m in mids)),
                 NodeRequest("then", TaskRequest("effect", Effect(n=last - 1, fail_attempts=1)),
                             ("callback",)),
                 NodeRequest("last", TaskRequest("effect", Effect(n=last)), ("then",))]
        name = f"chaos-{k}"
        deadline = time.monotonic() + 60
        while True:  # a retry after a lost answer must not make the workflow twice
            try:
                await state.client.create_workflow(nodes, name)
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
                with contextlib.suppress(Unavailable):
                    listed = await state.client.list_workflows(before=None, limit=100)
                    if any(w.name == name for w in listed):
                        break
        report.workflows += 1


async def _released_early(state: AppState, runs: list[Run]) -> list[str]:
    """Runs of a dependent that began before one of its upstreams had finished."""
    rows = await _retrying(state.pool.fetch, f"""
        SELECT e.downstream, max(u.finished_at) AS last,
               bool_or(u.finished_at IS NULL) AS unfinished
        FROM {SCHEMA}.task_edges e JOIN {SCHEMA}.tasks u ON u.id = e.upstream
        GROUP BY e.downstream""")
    ready = {str(r["downstream"]): (r["last"], r["unfinished"]) for r in rows}
    early = []
    for run in runs:
        if run.task_id not in ready:
            continue
        last, unfinished = ready[run.task_id]
        if unfinished or run.started < last.timestamp():
            early.append(f"task {run.task_id}: attempt {run.attempt} began at {run.started:.3f},"
                         f" its last upstream finished at "
                         f"{'never' if unfinished else f'{last.timestamp():.3f}'}")
    return early


def _pg_error_kinds(rng: random.Random) -> Iterator[str]:
    """Postgres error kinds in random order, each once before any repeats."""
    while True:
        kinds = list(PG_ERRORS)
        rng.shuffle(kinds)
        yield from kinds


class Injector:
    """Runs the plan's faults at random moments of the enqueue period."""

    def __init__(self, cluster: Cluster, state: AppState, report: Report, began: float) -> None:
        self.cluster = cluster
        self.plan = cluster.plan
        self.state = state
        self.report = report
        self.began = began
        self.rng = random.Random(self.plan.seed)
        self.pg_kinds = _pg_error_kinds(self.rng)
        self._background: list[asyncio.Task[None]] = []

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f} s] {text}", flush=True)

    def done(self, kind: str) -> None:
        self.report.faults.append((time.monotonic(), kind))

    async def run(self) -> None:
        plan = self.plan
        faults = [kind for name, kind in FAULTS.items() for _ in range(getattr(plan, name))]
        moments = sorted(self.rng.uniform(0.1, 0.9) * plan.duration_s for _ in faults)
        self.rng.shuffle(faults)
        for at, kind in zip(moments, faults, strict=True):
            await asyncio.sleep(max(0.0, self.began + at - time.monotonic()))
            await self.cluster.ready()
            await self.inject(kind)
        await asyncio.gather(*self._background)

    async def inject(self, kind: str) -> None:
        cluster = self.cluster
        if kind == "worker SIGKILL":
            pid = await cluster.kill_worker(self.rng)
            self.say(f"worker SIGKILL: pid {pid}")
        elif kind == "worker stall":
            victim = self.rng.choice(cluster.live_workers())
            self.say(f"worker stall: SIGSTOP pid {victim.pid} for {self.plan.stall_s:.1f} s")
            self._background.append(asyncio.create_task(self.stall(victim)))
            return
        elif kind == "Redis restart":
            self.say(kind)
            await asyncio.to_thread(cluster.redis.restart)
        elif kind == "Redis wipe":
            self.say(kind)
            await asyncio.to_thread(cluster.redis.restart, wipe=True)
        elif kind == "Redis FLUSHALL":
            await self.flushall()
        elif kind == "Postgres restart":
            self.say(kind)
            await asyncio.to_thread(cluster.pg.restart)
        else:
            kind = next(self.pg_kinds)
            await self.pg_error(kind)
        self.done(kind)

    async def stall(self, victim: Proc) -> None:
        await self.cluster.stall_worker(victim, self.plan.stall_s)
        self.say(f"worker stall: SIGCONT pid {victim.pid}")
        self.done("worker stall")

    async def flushall(self) -> None:
        """FLUSHALL the live Redis once a long task runs and a worker is blocked in a read
        (waiting at most two long tasks' length for both; a backlog keeps reads from
        blocking)."""
        window = timedelta(milliseconds=self.plan.long_ms)
        deadline = time.monotonic() + 2 * window.total_seconds()
        async with Redis.from_url(self.cluster.redis.url) as redis:
            while True:
                now = time.time()
                long_now = sum(
                    r.work_ms >= self.plan.long_ms and r.finished is None
                    and r.started > now - window.total_seconds()
                    for r in read_runs(self.cluster.runs_dir)
                ) if self.plan.long_share > 0 else 0
                blocked = sum(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
                              for c in await redis.client_list())
                ready = blocked > 0 and (long_now > 0 or self.plan.long_share <= 0)
                if ready or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            await redis.flushall()
        self.say(f"Redis FLUSHALL: {long_now} long tasks running, {blocked} clients blocked"
                 " in XREADGROUP")

    async def pg_error(self, kind: str) -> None:
        """Make Conveyor's statements fail with `kind` for 1-2 s."""
        window = self.rng.uniform(1.0, 2.0)
        error = PG_ERRORS[kind]
        control = await _retrying(asyncpg.connect, self.cluster.pg.dsn)
        try:
            await control.execute("SET default_transaction_read_only = off")
            if error is None:
                self.say(f"{kind} for {window:.1f} s")
                await control.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                await control.execute("SELECT pg_reload_conf()")
                try:
                    await asyncio.sleep(window)
                finally:
                    await control.execute("ALTER SYSTEM RESET default_transaction_read_only")
                    await control.execute("SELECT pg_reload_conf()")
                return
            code, message = error
            share = self.rng.choice([0.3, 1.0])
            before = await _raised(control)
            await control.execute(
                "UPDATE chaos.faults SET code = $1, message = $2, share = $3,"
                " until = clock_timestamp() + $4::interval",
                code, message, share, timedelta(seconds=window))
            await asyncio.sleep(window)
            raised = await _raised(control) - before
            self.report.pg_errors_raised += raised
            self.say(f"{kind} for {window:.1f} s on {share:.0%} of task updates:"
                     f" {raised} statements failed")
        finally:
            await control.close()


async def _raised(conn: asyncpg.Connection[asyncpg.Record]) -> int:
    row = await conn.fetchrow("SELECT last_value, is_called FROM chaos.raised")
    assert row is not None
    return int(row["last_value"]) if row["is_called"] else 0


async def _watch(cluster: Cluster, report: Report, stop: asyncio.Event) -> None:
    """Poll every Conveyor process; one that ended unsignalled is reported and replaced."""
    while not stop.is_set():
        for e in cluster.reap_unsignalled():
            print(f"!! {e.role} pid {e.pid} exited {e.code} without being signalled", flush=True)
            report.exits.append(e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def _drain(state: AppState, plan: Plan, report: Report) -> None:
    """Wait until every task is in a final state, or the drain timeout."""
    deadline = time.monotonic() + plan.drain_timeout_s
    sql = (f"SELECT count(*) FILTER (WHERE status IN ('waiting', 'queued', 'running'))"
           f" FROM {SCHEMA}.tasks")
    while time.monotonic() < deadline:
        if await _count(state, sql) == 0:
            return
        await asyncio.sleep(0.25)


def _worker_pid(worker_id: str) -> int:
    """`host-pid-hex` → pid (the host may hold dashes)."""
    return int(worker_id.rsplit("-", 2)[1])


def overlaps(runs: list[Run], impaired: Windows) -> tuple[list[str], int]:
    """Pairs of runs of one task that overlap in time: (those on live workers, how many others).

    `impaired` holds per pid the windows in which that process was not a live worker (from its
    SIGKILL on: `(t, inf)`; a stall: `(stop, cont + grace)`). A pair is excused when either
    worker has such a window meeting the overlap. A run's end is its noted end; without one
    (its worker was killed mid-run), the kill of its worker, else never: a run that simply
    stopped with no kill to explain it overlaps everything after it.
    """
    def end_of(run: Run) -> float:
        if run.finished is not None:
            return run.finished
        kills = [a for a, b in impaired.get(_worker_pid(run.worker), [])
                 if b == math.inf and a >= run.started]
        return min(kills) if kills else math.inf

    def excused(run: Run, lo: float, hi: float) -> bool:
        return any(a <= hi and lo <= b for a, b in impaired.get(_worker_pid(run.worker), []))

    live: list[str] = []
    others = 0
    ordered = sorted(runs, key=lambda r: (r.task_id, r.started))
    for task_id, group in itertools.groupby(ordered, key=lambda r: r.task_id):
        spans = [(r, r.started, end_of(r)) for r in group]
        for (a, a0, a1), (b, b0, b1) in itertools.combinations(spans, 2):
            lo, hi = max(a0, b0), min(a1, b1)
            if lo >= hi:
                continue
            if excused(a, lo, hi) or excused(b, lo, hi):
                others += 1
            else:
                live.append(f"task {task_id}: attempt {a.attempt} on {a.worker} and"
                            f" attempt {b.attempt} on {b.worker} overlap {hi - lo:.2f} s")
    return live, others


async def _check(state: AppState, cluster: Cluster, report: Report) -> None:
    fetch = state.pool.fetch
    rows = await _retrying(fetch, f"SELECT status, count(*) FROM {SCHEMA}.tasks GROUP BY 1")
    report.final = {r["status"]: r["count"] for r in rows}
    report.enqueued = sum(report.final.values())
    report.succeeded = report.final.get("succeeded", 0)
    runs = read_runs(cluster.runs_dir)
    report.handler_runs = len(runs)
    histories = await _retrying(fetch, f"""
        WITH h AS (
          SELECT task_id, id, new_status, count(*) FILTER (WHERE new_status IN {FINAL})
                   OVER (PARTITION BY task_id ORDER BY id
                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS finals_before
          FROM chaos.transitions)
        SELECT task_id, string_agg(coalesce(old_status, '') || '→' || new_status
                                   || '(' || attempts || ')', ' ' ORDER BY id) AS history
        FROM chaos.transitions
        WHERE task_id IN (SELECT task_id FROM h WHERE finals_before > 0)
        GROUP BY task_id ORDER BY task_id""")
    report.recorded_twice = [f"task {r['task_id']}: {r['history']}" for r in histories]
    ok_runs: dict[str, int] = {}
    for r in runs:
        if r.ok:
            ok_runs[r.task_id] = ok_runs.get(r.task_id, 0) + 1
    dead = await _retrying(fetch, f"""
        SELECT t.id, t.status, t.attempts FROM {SCHEMA}.tasks t
        WHERE t.status IN ('dead', 'cancelled') AND t.id = ANY($1::uuid[]) ORDER BY t.id""",
                           list(ok_runs))
    report.dead_but_ran_ok = [f"task {r['id']}: {r['status']} after {r['attempts']} attempts,"
                              f" {ok_runs[str(r['id'])]} runs finished ok" for r in dead]
    report.live_overlaps, report.impaired_overlaps = overlaps(runs, cluster.impaired)
    report.released_early = await _released_early(state, runs)


async def _run(cluster: Cluster, plan: Plan) -> Report:
    report = Report()
    async with open_state(cluster.settings(), app) as state:
        await state.pool.execute(CHAOS_SQL)
        cluster.launch()
        await cluster.ready()
        began = time.monotonic()
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(cluster, report, stop))
        try:
            await asyncio.gather(_enqueue(state, plan, report),
                                 _workflows(state, plan, report),
                                 Injector(cluster, state, report, began).run())
            await _drain(state, plan, report)
        finally:
            stop.set()
            await watcher
        drained = time.monotonic()
        report.elapsed_s = drained - began
        report.unclean_stops = await asyncio.to_thread(cluster.stop_processes)
        await _check(state, cluster, report)
        if not report.ok:
            for table in (f"{SCHEMA}.tasks", "chaos.transitions"):
                await state.pool.copy_from_query(
                    f"SELECT * FROM {table} ORDER BY 1", output=cluster.base / f"{table}.csv",
                    format="csv", header=True)
        if report.faults and report.lost == 0:
            report.drain_after_last_fault_s = drained - max(t for t, _ in report.faults)
    return report


def run(plan: Plan, keep: Path | None = None) -> Report:
    """Start everything, run the plan, stop everything; the report says what happened.

    A failed run keeps its process and server logs, and the task, run and transition tables
    as CSV (not the server data), and says where.
    """
    base = keep or Path(tempfile.mkdtemp(prefix="conveyor-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    cluster = Cluster(base, plan)
    report: Report | None = None
    try:
        cluster.start()
        report = asyncio.run(_run(cluster, plan))
        return report
    finally:
        cluster.stop()
        if keep is None and report is not None and report.ok:
            shutil.rmtree(base, ignore_errors=True)
        elif keep is None:
            shutil.rmtree(cluster.pg.data_dir, ignore_errors=True)
            for path in (cluster.redis.base_dir / "appendonlydir",):
                shutil.rmtree(path, ignore_errors=True)
            print(f"logs kept in {base}", flush=True)


_FAULT_FLAGS = {"kills": 3, "redis_restarts": 1, "redis_wipes": 1, "pg_restarts": 1,
                "flushes": 1, "stalls": 1, "pg_errors": 1}


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run(), which stops every server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds over which tasks are enqueued and faults injected")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--faults-each", type=int, default=None,
                        help="set every fault count below that is not given to this")
    parser.add_argument("--kills", type=int, help="worker SIGKILLs (default 3)")
    parser.add_argument("--stalls", type=int,
                        help="worker SIGSTOPs, each SIGCONTed after --stall-s (default 1)")
    parser.add_argument("--redis-restarts", type=int, help="(default 1)")
    parser.add_argument("--redis-wipes", type=int,
                        help="Redis restarts with its data deleted (default 1)")
    parser.add_argument("--flushes", type=int,
                        help="FLUSHALLs of the live Redis while a long task runs (default 1)")
    parser.add_argument("--pg-restarts", type=int, help="(default 1)")
    parser.add_argument("--pg-errors", type=int,
                        help="1-2 s windows of deadlock, serialization or read-only errors on"
                             " Conveyor's task updates, or a read-only server (default 1)")
    parser.add_argument("--work-ms", type=int, default=200, help="handler sleep per task")
    parser.add_argument("--long-share", type=float, default=0.02,
                        help="share of tasks that run --long-ms instead")
    parser.add_argument("--long-ms", type=int, default=5000,
                        help="a long task's sleep, beyond the 3 s heartbeat TTL")
    parser.add_argument("--stall-s", type=float, default=Plan.stall_s,
                        help="how long a stalled worker stays stopped (default 2 x TTL)")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workflows", type=int, default=0,
                        help="fan-out/fan-in workflows created while the faults strike")
    parser.add_argument("--workflow-nodes", type=int, default=500,
                        help="nodes per workflow (a root, the middle ones, a callback, a "
                             "chain of two after it; at least 5)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep logs and server data in this directory")
    args = parser.parse_args(argv)
    if args.workflows and args.workflow_nodes < 5:
        parser.error("--workflow-nodes: at least 5 (a root, a middle node, a callback, two after)")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    counts = {name: (getattr(args, name) if getattr(args, name) is not None
                     else args.faults_each if args.faults_each is not None else default)
              for name, default in _FAULT_FLAGS.items()}
    plan = Plan(tasks=args.tasks, duration_s=args.duration, workers=args.workers,
                work_ms=args.work_ms, long_share=args.long_share, long_ms=args.long_ms,
                stall_s=args.stall_s, drain_timeout_s=args.drain_timeout, seed=seed,
                workflows=args.workflows, workflow_nodes=args.workflow_nodes, **counts)
    logs.configure("warning", "console")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print(f"chaos run: {plan}", flush=True)
    report = run(plan, args.keep)
    print("\n".join(report.lines()), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
