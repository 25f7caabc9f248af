"""How one row is measured, and the common table: worker processes, deadlines, the three
phases of `run_once`, CPU steal, rates and `render`.

Per row and run, Redis is FLUSHDB-ed before each phase, then:
1. enqueue: N jobs from this process, no worker running;
2. drain: one freshly started worker on the N queued jobs, timed from the first completion to
   the last (spawn to first completion is reported apart as *boot*);
3. e2e: a fresh worker warmed up with one job, then the wall time from the first enqueue call
   to the N-th completion, producer and worker at once.
Every wait has a deadline (a SIGALRM watchdog interrupts even a blocking client call), so a
stuck row fails its run and the benchmark goes on. Workers run in sessions of their own and
are stopped with SIGTERM (a warm shutdown in every peer), then SIGKILL as a group after 10 s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata as md
import os
import platform
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import redis

from bench.peers import BIN, Peer, all_peers
from bench.workload import BATCH, DONE_KEY, FIRST_KEY, LAST_KEY, SETUP

__all__ = ["BATCH", "BIN", "DONE_KEY", "FIRST_KEY", "LAST_KEY", "SETUP", "Peer", "Workers",
           "all_peers", "deadline", "run_once", "start_worker", "stop_worker", "wait_done"]

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 10.0


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise PhaseTimeout in this (main) thread once `seconds` have passed."""
    def expired(signum: int, frame: FrameType | None) -> None:
        raise PhaseTimeout(f"{what} took longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def start_worker(peer: Peer, n: int, log_path: Path) -> subprocess.Popen[bytes]:
    """The peer's worker for a phase of `n` jobs, in a session of its own (so that its pool
    children can be stopped as a group), importing `bench` from this repository."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **SETUP.env(n), "PYTHONPATH": path}
    with open(log_path, "ab") as log:
        return subprocess.Popen(peer.worker_argv(), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop_worker(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> bool:
    """SIGTERM, then SIGKILL to the whole group of whatever is left; True if the worker and
    its children had all gone by themselves within `grace` seconds."""
    clean = True
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            clean = False
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pool children still in its group?
        clean = False
    except ProcessLookupError:
        pass
    proc.wait(5)
    return clean


class Workers(Protocol):
    """How `run_once` starts and stops a row's workers (the driver wraps them to watch), and
    where it tells them each phase's timed window begins and ends (`bench.cpu` reads CPU
    time there): `began(phase)`, then `ended(phase, jobs)` with the jobs done in the window;
    phases: "enqueue", "drain" (first completion seen to the N-th), "e2e"."""

    def start(self, peer: Peer, n: int, log_path: Path) -> subprocess.Popen[bytes]: ...

    def stop(self, proc: subprocess.Popen[bytes]) -> bool: ...

    def began(self, phase: str) -> None: ...

    def ended(self, phase: str, jobs: int) -> None: ...


class PlainWorkers:
    def start(self, peer: Peer, n: int, log_path: Path) -> subprocess.Popen[bytes]:
        return start_worker(peer, n, log_path)

    def stop(self, proc: subprocess.Popen[bytes]) -> bool:
        return stop_worker(proc)

    def began(self, phase: str) -> None:
        pass

    def ended(self, phase: str, jobs: int) -> None:
        pass


def _done(r: redis.Redis) -> int:
    value = r.get(DONE_KEY)
    return int(value) if isinstance(value, (bytes, str)) else 0


def wait_done(r: redis.Redis, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the N-th job's completion has been stamped; fails if the worker exits first."""
    give_up = time.monotonic() + timeout
    while not r.exists(LAST_KEY):
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} after {_done(r)} jobs")
        if time.monotonic() > give_up:
            raise PhaseTimeout(f"{_done(r)} jobs done after {timeout:.0f} s")
        time.sleep(0.01)


def _wait_first(r: redis.Redis, proc: subprocess.Popen[bytes]) -> None:
    while not r.exists(FIRST_KEY):
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} during warm-up")
        time.sleep(0.01)


def _stamps(r: redis.Redis) -> tuple[float, int, float]:
    """(time of the first completion, jobs it completed, time of the N-th)."""
    first, last = (v.decode() if isinstance(v, bytes) else str(v)
                   for v in r.mget(FIRST_KEY, LAST_KEY))
    when, count = first.split()
    return float(when), int(count), float(last)


def run_once(peer: Peer, n: int, timeout: float, log_path: Path,
             workers: Workers | None = None) -> dict[str, Any]:
    """The three phases for one row; raw figures (seconds, extra executions, clean stops)."""
    workers = workers or PlainWorkers()
    r = redis.Redis.from_url(SETUP.redis_url)
    res: dict[str, Any] = {"n": n}
    try:
        r.flushdb()
        with deadline(timeout, "enqueue"):
            workers.began("enqueue")
            began, ended = peer.enqueue(n)
            workers.ended("enqueue", n)
        res["enqueue_s"] = ended - began

        spawned = time.time()
        proc = workers.start(peer, n, log_path)
        try:
            with deadline(timeout, "drain start"):
                _wait_first(r, proc)
            workers.began("drain")
            done_before = _done(r)
            wait_done(r, proc, timeout)
            workers.ended("drain", n - done_before)
        finally:
            res["drain_clean_stop"] = workers.stop(proc)
        first, first_count, last = _stamps(r)
        res.update(boot_s=first - spawned, drain_s=last - first,
                   drain_jobs_timed=n - first_count, drain_extra=_done(r) - n)

        r.flushdb()
        proc = workers.start(peer, n, log_path)
        try:
            with deadline(timeout, "warm-up"):
                peer.enqueue(1)
                _wait_first(r, proc)
            r.delete(DONE_KEY, FIRST_KEY, LAST_KEY)
            workers.began("e2e")
            with deadline(timeout, "e2e enqueue"):
                began, ended = peer.enqueue(n)
            wait_done(r, proc, timeout)
            workers.ended("e2e", n)
            time.sleep(0.2)  # a duplicate execution, if any, reaches the counter
        finally:
            res["e2e_clean_stop"] = workers.stop(proc)
        res.update(e2e_s=_stamps(r)[2] - began, e2e_enqueue_s=ended - began,
                   e2e_extra=_done(r) - n)
        r.flushdb()
    finally:
        r.close()
    return res


def cpu_jiffies() -> tuple[int, int]:
    """(steal, total) CPU time of the machine (/proc/stat): steal is the time a hypervisor
    gave this VM's CPUs to others, the main noise between runs on a shared VM."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    return fields[7], sum(fields)


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    return 100.0 * (after[0] - before[0]) / max(after[1] - before[1], 1)


def rates(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Jobs per second of each phase, one value per run."""
    return {"enqueue": [x["n"] / x["enqueue_s"] for x in runs],
            "drain": [x["drain_jobs_timed"] / x["drain_s"] for x in runs],
            "e2e": [x["n"] / x["e2e_s"] for x in runs]}


DASH = "\u2013"


def fmt_rate(values: Sequence[float]) -> str:
    """Bold median, then the range of the runs."""
    if not values:
        return DASH
    return f"**{statistics.median(values):,.0f}** ({min(values):,.0f}{DASH}{max(values):,.0f})"


def fmt_s(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else DASH


def fmt_pct(values: Sequence[float]) -> str:
    if not values:
        return DASH
    return f"{statistics.median(values):.0f} ({min(values):.0f}{DASH}{max(values):.0f})"


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


PEER_DISTS = ("arq", "saq", "taskiq", "taskiq-redis", "streaq", "coredis", "celery", "kombu",
              "dramatiq", "rq", "redis", "hiredis", "pgqueuer", "procrastinate", "psycopg",
              "psycopg-pool")


def machine_facts(r: redis.Redis) -> list[str]:
    from redis.utils import HIREDIS_AVAILABLE

    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                    if line.startswith("model name")), platform.processor())
    server: dict[str, Any] = r.info("server")
    return [
        f"- nproc: {os.cpu_count()} ({cpu}); {platform.platform()}",
        f"- Redis server {server['redis_version']} (no persistence)",
        f"- Python {platform.python_version()}; redis-py's hiredis parser: {HIREDIS_AVAILABLE}",
        "- packages: " + ", ".join(f"{d} {version(d)}" for d in PEER_DISTS),
    ]


def _ok(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [x for x in runs if "error" not in x]


def render(results: Mapping[str, Sequence[Mapping[str, Any]]], rows: Mapping[str, Peer],
           args: Any, facts: Sequence[str], command: str) -> str:
    """The table of every row (jobs/s, median and range), the seconds, the settings, the
    problems. `args` has n, runs and n_for (KEY → N)."""
    out = [f"# Redis task-queue peers: throughput, N={args.n} jobs, {args.runs} runs each", "",
           f"Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "", *facts, "",
           f"Command: `{command}`", "",
           "Jobs per second, **median** (min\u2013max) over the runs, of a no-op task that INCRs "
           "a Redis counter. *enqueue*: one producer process, no worker. *drain*: N jobs "
           "queued, then one worker started; first to last completion. *e2e*: a warm worker; "
           "the first enqueue call to the N-th completion, producer and worker at once (on "
           "the same cores as Redis). *boot*: worker spawn to first completion, seconds "
           "(median). *CPU steal*: the hypervisor's share of the machine's CPU time during "
           "each run; a high steal means slower, noisier runs.", "",
           "| peer | N | enqueue jobs/s | drain jobs/s | e2e jobs/s | boot s | CPU steal % "
           "| runs ok |", "|---|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        ok = _ok(results[key])
        rate = rates(ok)
        out.append(f"| {row.name} | {args.n_for.get(key, args.n)} | {fmt_rate(rate['enqueue'])}"
                   f" | {fmt_rate(rate['drain'])} | {fmt_rate(rate['e2e'])} | "
                   f"{fmt_s([x['boot_s'] for x in ok])} | "
                   f"{fmt_pct([x['steal_pct'] for x in results[key]])} | "
                   f"{len(ok)}/{len(results[key])} |")
    out += ["", "Median seconds for N jobs:", "",
            "| peer | enqueue s | drain s | e2e s | e2e: of which enqueue s |",
            "|---|---|---|---|---|"]
    for key, row in rows.items():
        ok = _ok(results[key])
        cells = [fmt_s([x[f] for x in ok])
                 for f in ("enqueue_s", "drain_s", "e2e_s", "e2e_enqueue_s")]
        out.append(f"| {row.name} | {' | '.join(cells)} |")
    out += ["", "Settings:", "",
            "| peer | version | worker concurrency | enqueue API | worker command |",
            "|---|---|---|---|---|"]
    for row in rows.values():
        argv = " ".join(Path(a).name if a.startswith("/") else a for a in row.worker_argv())
        out.append(f"| {row.name} | {version(row.dist)} | "
                   f"{row.concurrency.format(c=SETUP.concurrency)} | {row.enqueue_api} | "
                   f"`{argv}` |")
    problems = []
    for key, row in rows.items():
        for i, x in enumerate(results[key], 1):
            if "error" in x:
                problems.append(f"- {row.name} run {i}: {x['error']}")
                continue
            if x["drain_extra"] or x["e2e_extra"]:
                problems.append(f"- {row.name} run {i}: extra executions "
                                f"drain={x['drain_extra']} e2e={x['e2e_extra']}")
            if not (x["drain_clean_stop"] and x["e2e_clean_stop"]):
                problems.append(f"- {row.name} run {i}: worker needed SIGKILL")
    out += ["", "Problems:", "",
            *(problems or ["- none: every run completed all N jobs exactly once and every "
                           "worker stopped on SIGTERM"]), ""]
    return "\n".join(out)
