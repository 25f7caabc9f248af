"""CPU time per task of every process a row uses, per phase, from /proc.

`CpuWorkers` wraps a row's `harness.Workers`: `run_once` tells it where each phase's timed
window begins and ends (`began` / `ended`), and it reads the CPU seconds (utime + stime) of
every process tree it was told about at both edges:

- `worker`: the worker process and its descendants (pool children), or `conveyor run`;
- the deployment's other processes (`api`, `cron`) when a Conveyor row has them;
- `postgres`: the postmaster and its children, the backends (a backend that exits in the
  window is counted through its parent's cutime/cstime);
- `redis`: redis-server;
- `driver`: this process alone (the producer: client calls or the HTTP load generator; its
  10 ms polls of the completion counter too).

Windows: *enqueue* is the enqueue call (client set-up and the Postgres reset included, a few
ms); *drain* is from the first completion seen to the N-th (the jobs done before the first
reading are not counted); *e2e* from the first enqueue call to the N-th completion.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Peer, Workers

_TICK = os.sysconf("SC_CLK_TCK")


def _table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime + stime + cutime + cstime in seconds) of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / _TICK)
    return out


def tree_seconds(table: dict[int, tuple[int, float]], root: int) -> float:
    """CPU seconds of `root` and all its descendants, reaped ones included (a live process
    is counted by itself, a reaped one in its parent's cutime: never twice)."""
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo += kids.get(pid, [])
    return total


def driver_seconds() -> float:
    t = os.times()
    return t.user + t.system


def read(trees: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process tree, and of this process (`driver`)."""
    table = _table()
    out = {name: tree_seconds(table, pid) for name, pid in trees.items()}
    out["driver"] = driver_seconds()
    return out


class CpuWorkers:
    """A `harness.Workers` that also reads CPU at the phases' edges (see the module doc).

    `servers`: pids of the servers (postgres: the postmaster, redis); `others`: a function
    returning the deployment's other processes at the moment (name -> pid); `worker_name`:
    what the worker process is called in the figures."""

    def __init__(self, inner: Workers, servers: dict[str, int],
                 others: Callable[[], dict[str, int]] | None = None,
                 worker_name: str = "worker") -> None:
        self.inner, self.servers, self.others = inner, servers, others
        self.worker_name = worker_name
        self.worker: subprocess.Popen[bytes] | None = None
        self.opened: dict[str, dict[str, float]] = {}
        self.phases: dict[str, dict[str, Any]] = {}

    def start(self, peer: Peer, n: int, log_path: Path) -> subprocess.Popen[bytes]:
        self.worker = self.inner.start(peer, n, log_path)
        return self.worker

    def stop(self, proc: subprocess.Popen[bytes]) -> bool:
        self.worker = None
        return self.inner.stop(proc)

    def _trees(self) -> dict[str, int]:
        trees = dict(self.servers)
        if self.others is not None:
            trees.update(self.others())
        if self.worker is not None and self.worker.poll() is None:
            trees[self.worker_name] = self.worker.pid
        return trees

    def began(self, phase: str) -> None:
        self.opened[phase] = read(self._trees())
        self.inner.began(phase)

    def ended(self, phase: str, jobs: int) -> None:
        self.inner.ended(phase, jobs)
        before = self.opened.pop(phase, None)
        if before is None or jobs <= 0:
            return
        after = read(self._trees())
        self.phases[phase] = {
            "jobs": jobs,
            "cpu_s": {name: round(after[name] - before.get(name, 0.0), 4)
                      for name in after if name in before},
        }


def workload_us(redis_url: str, n: int = 5000) -> float:
    """µs of CPU that the task body costs its process: `amark_done`'s INCR through redis-py's
    asyncio client, awaited `n` times in turn on uvloop (as in a worker), in this process, on
    a key of its own. The figure lets the worker's own CPU per task be told from the
    workload's."""
    import time

    import redis.asyncio as aioredis

    from bench.httpload import run_fast

    async def go() -> float:
        client = aioredis.Redis.from_url(redis_url)
        try:
            for _ in range(200):  # connection and first-call set-up, not measured
                await client.incrby("bench:calibrate", 1)
            t0 = time.process_time()
            for _ in range(n):
                await client.incrby("bench:calibrate", 1)
            used = time.process_time() - t0
            await client.delete("bench:calibrate")
            return 1e6 * used / n
        finally:
            await client.aclose()

    return run_fast(go)
