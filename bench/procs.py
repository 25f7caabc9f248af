"""Process helpers: /proc readings (peak RSS, CPU time, children) and the `conveyor api`
process of the HTTP doors."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.testing.servers import free_port

_TICK = os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current RSS), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a live process in MiB (read it before stopping the process)."""
    kb = status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from the 3rd on (state, ppid, ...)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of a process and its direct children (e.g. a postmaster and its backends)."""
    return {p: cpu_seconds(p) for p in [pid, *children(pid)]}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two tree readings; processes that appeared count from zero."""
    return sum(v - before.get(p, 0.0) for p, v in after.items())


def _cpu_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of the process and of its children it has reaped)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
                table[int(entry.name)] = (int(fields[1]), ticks / _TICK)
    return table


def own_cpu_seconds() -> float:
    """CPU seconds of this process and everything it started, alive or reaped (servers,
    their backends, workers, the API)."""
    table = _cpu_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo += kids.get(pid, [])
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq
    return busy / _TICK, (busy + idle + iowait + steal) / _TICK


@dataclass
class ForeignLoad:
    """Share of the machine's CPU used by processes that are not ours, between two points."""

    machine: tuple[float, float]
    own: float

    @classmethod
    def now(cls) -> ForeignLoad:
        return cls(machine_cpu(), own_cpu_seconds())

    def pct_since(self, start: ForeignLoad) -> float:
        busy = self.machine[0] - start.machine[0]
        total = max(self.machine[1] - start.machine[1], 1e-9)
        return max(0.0, 100 * (busy - (self.own - start.own)) / total)


def postmaster_pid(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    return None


@dataclass
class ApiProcess:
    proc: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, log_path: Path
               ) -> None:
    """Until the API at `url` answers /readyz with 200; fails if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not _ready(url):
        if proc.poll() is not None:
            raise RuntimeError(f"conveyor exited with {proc.returncode} (log: {log_path})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"conveyor API not ready after {timeout:.0f}s (log: {log_path})")
        time.sleep(0.05)


@contextlib.contextmanager
def api_server(argv: list[str], env: dict[str, str], cwd: Path, log_path: Path,
               stop: Any, timeout: float = 30.0) -> Iterator[ApiProcess]:
    """Start `argv --port <free port>` (a `conveyor api`), wait for /readyz, yield it, and stop
    it with `stop(proc)` (harness.stop_worker: SIGTERM, then SIGKILL of the group)."""
    host, port = "127.0.0.1", free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*argv, "--host", host, "--port", str(port)], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    api = ApiProcess(proc, host, port)
    try:
        wait_ready(api.url, proc, timeout, log_path)
        yield api
    finally:
        stop(proc)
