"""Sampling profiles (py-spy) of the Conveyor worker while it drains and of the API while it
takes single POSTs, with the CPU time each process of the machine spent meanwhile.

py-spy attaches to the running process (`py-spy record --pid --gil`, 100 Hz, `--format raw
--nolineno`: one collapsed stack per line) and is stopped with SIGINT at the end of the phase.
Only samples in which a thread holds the GIL are kept, so idle time (the loop waiting in epoll,
pool threads waiting for work) is left out and the shares are shares of the time the process
was busy. Without `--native`, time in C code (uvloop's loop, asyncpg's Cython protocol,
hiredis, syscalls) is charged to the Python frame that called it. The raw files open in
speedscope.app or flamegraph.pl.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import harness as bp
from bench.doors import ClientDoor, Context, HttpDoor
from bench.procs import ForeignLoad, cpu_delta, tree_cpu_seconds

RATE_HZ = 100


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@contextmanager
def py_spy(binary: str, pid: int, out: Path, rate: int = RATE_HZ, *, native: bool = False
           ) -> Iterator[None]:
    """Record `pid` into `out` while the block runs (only samples holding the GIL)."""
    log = open(out.with_suffix(".log"), "wb")  # noqa: SIM115 - closed below
    spy = subprocess.Popen([binary, "record", "--pid", str(pid), "--rate", str(rate), "--gil",
                            *(["--native"] if native else []),
                            "--format", "raw", "--nolineno", "-o", str(out)],
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # attach
        if spy.poll() is not None:
            raise RuntimeError(f"py-spy exited with {spy.returncode}: "
                               f"see {out.with_suffix('.log')}")
        yield
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
        log.close()


def _package(frame: str) -> str:
    """`func (path/to/file.py)` → a package label: `conveyor.worker`, `asyncpg`, `asyncio`..."""
    start = frame.rfind(" (")
    path = frame[start + 2:-1] if start >= 0 else frame
    for marker in ("site-packages/", "/src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "?"
    if parts[0] == "conveyor" and len(parts) > 2:
        return f"conveyor.{parts[1]}"
    return parts[0].removesuffix(".py")


@dataclass
class Summary:
    samples: int = 0
    own: Counter[str] = field(default_factory=Counter)  # leaf frame
    total: Counter[str] = field(default_factory=Counter)  # Conveyor's frames, anywhere
    packages: Counter[str] = field(default_factory=Counter)  # leaf frame's package

    def as_dict(self, top: int) -> dict[str, Any]:
        def pct(c: Counter[str]) -> list[tuple[str, float]]:
            return [(k, round(100 * v / max(self.samples, 1), 1)) for k, v in c.most_common(top)]
        # Frames on (nearly) every stack, such as the CLI's entry point, tell nothing.
        total = Counter({k: v for k, v in self.total.items() if v < 0.98 * self.samples})
        return {"samples": self.samples, "self": pct(self.own), "total": pct(total),
                "packages": pct(self.packages)}


def summarise(raw: Path) -> Summary:
    s = Summary()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        s.samples += count
        s.own[frames[-1]] += count
        s.packages[_package(frames[-1])] += count
        for frame in set(frames):
            if "(conveyor/" in frame:
                s.total[frame] += count
    return s


def redis_calls(r: Any) -> Counter[str]:
    """Commands served by Redis so far, by name (INFO commandstats)."""
    stats: dict[str, Any] = r.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


async def _pg_xacts(dsn: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"))
    finally:
        await conn.close()


def pg_xacts(dsn: str) -> int:
    """Transactions committed or rolled back in the database so far (each statement run
    outside a transaction block is one)."""
    import asyncio

    return asyncio.run(_pg_xacts(dsn))


@dataclass
class Traffic:
    """Redis commands and Postgres transactions between two points."""

    redis: Counter[str]
    pg: int
    load: ForeignLoad

    @classmethod
    def now(cls, r: Any, dsn: str) -> Traffic:
        return cls(redis_calls(r), pg_xacts(dsn), ForeignLoad.now())

    def per_task_since(self, start: Traffic, jobs: int) -> dict[str, Any]:
        calls = self.redis - start.redis
        calls.pop("info", None)  # our own readings
        return {"redis_per_task": {k: round(v / jobs, 3) for k, v in calls.most_common()},
                "pg_xacts_per_task": round((self.pg - start.pg - 1) / jobs, 3),  # -1: ours
                "foreign_pct": self.load.pct_since(start.load)}


def _cpu(pids: dict[str, int]) -> dict[str, dict[int, float]]:
    return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}


def _cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
              ) -> dict[str, float]:
    return {name: round(cpu_delta(before[name], after[name]), 3) for name in before}


def profile_drain(ctx: Context, door: ClientDoor, n: int, out_dir: Path, spy: str,
                  servers: dict[str, int], log_path: Path, *, native: bool = False
                  ) -> dict[str, Any]:
    """N tasks queued (enqueue_many), one worker started; profile from its first completion
    to the N-th."""
    import redis

    dsn = ctx.settings.database_url
    assert dsn
    r = redis.Redis.from_url(bp.SETUP.redis_url)
    r.flushdb()
    with bp.deadline(ctx.timeout, "profile enqueue"):
        door.enqueue(n)
    proc = bp.start_worker(door, n, log_path)
    out = out_dir / "worker-drain.txt"
    try:
        deadline = time.monotonic() + ctx.timeout
        while not r.exists(bp.FIRST_KEY):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start")
            time.sleep(0.005)
        pids = {"worker": proc.pid, **servers}
        with py_spy(spy, proc.pid, out, native=native):
            traffic0 = Traffic.now(r, dsn)
            before, wall0, done0 = _cpu(pids), time.time(), int(r.get(bp.DONE_KEY) or 0)
            bp.wait_done(r, proc, ctx.timeout)
            after, wall1 = _cpu(pids), time.time()
        bp.stop_worker(proc)  # its Postgres sessions end, and report their transactions
        time.sleep(0.5)
        jobs = n - done0
        traffic = Traffic.now(r, dsn).per_task_since(traffic0, jobs)
    finally:
        bp.stop_worker(proc)  # (again, if something failed: a no-op once it has exited)
        r.flushdb()
        r.close()
    return {"what": f"conveyor worker draining {jobs} queued tasks (of {n})", "jobs": jobs,
            "wall_s": round(wall1 - wall0, 3), "rate": jobs / (wall1 - wall0),
            "cpu_s": _cpu_used(before, after), "raw": str(out), "rate_hz": RATE_HZ,
            **traffic, "profile": summarise(out)}


def profile_api(ctx: Context, door: HttpDoor, n: int, out_dir: Path, spy: str,
                servers: dict[str, int], api: Any, *, native: bool = False) -> dict[str, Any]:
    """N single POSTs to the running API (`api`: a procs.ApiProcess; no worker); profile the
    API process meanwhile. Stops the API at the end."""
    api_pid = api.proc.pid
    import redis

    dsn = ctx.settings.database_url
    assert dsn
    r = redis.Redis.from_url(bp.SETUP.redis_url)
    r.flushdb()
    out = out_dir / "api-single-post.txt"
    pids = {"api": api_pid, **servers}
    try:
        with py_spy(spy, api_pid, out, native=native):
            traffic0 = Traffic.now(r, dsn)
            before, driver0 = _cpu(pids), time.process_time()
            with bp.deadline(ctx.timeout, "profile POSTs"):
                t0, t1 = door.enqueue(n)
            after, driver1 = _cpu(pids), time.process_time()
        bp.stop_worker(api.proc)  # its Postgres sessions end, and report their transactions
        time.sleep(0.5)
        traffic = Traffic.now(r, dsn).per_task_since(traffic0, n)
    finally:
        r.flushdb()
        r.close()
    used = _cpu_used(before, after)
    used["load generator (this process)"] = round(driver1 - driver0, 3)
    return {"what": f"conveyor api taking {n} single POST /v1/tasks from "
                    f"{ctx.http_connections} connections", "jobs": n,
            "wall_s": round(t1 - t0, 3), "rate": n / (t1 - t0), "cpu_s": used,
            "raw": str(out), "rate_hz": RATE_HZ, **traffic, "profile": summarise(out)}
