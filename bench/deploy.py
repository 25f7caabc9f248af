"""How Conveyor is deployed around a row's workers: the split deployment or `conveyor run`.

- **split**: separate processes, `conveyor cron` for the whole row's run, `conveyor api` too
  for the HTTP doors (the Python client's doors talk to Postgres and Redis themselves), and
  `run_once`'s workers are `conveyor worker` processes.
- **run**: `conveyor run` (API, worker and cron in one process) is `run_once`'s worker; the
  HTTP doors post to that process. The enqueue phase, which has no worker by definition,
  posts to `conveyor run --no-worker` (API and cron), stopped before the worker starts.

`Deployment` is the row's `harness.Workers` (and gives its processes' pids to `bench.cpu`);
while it is open, `Context.api_address()` returns an API that is ready (it waits for
`/readyz`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType

from bench import harness as bp
from bench.app import SPEC
from bench.doors import Context, Door
from bench.procs import ApiProcess, api_server, wait_ready
from conveyor.testing.servers import free_port

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def conveyor(*args: str) -> list[str]:
    return [str(bp.BIN / "conveyor"), *args]


def wait_idle(proc: subprocess.Popen[bytes], timeout: float, quiet_s: float = 0.3) -> None:
    """Until `proc` (a process with no readiness probe: `conveyor cron`) has started and
    gone idle: no CPU used for `quiet_s`, after at least half a second."""
    from bench.cpu import read

    start = time.monotonic()
    last, since = -1.0, start
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        used = read({"p": proc.pid})["p"]
        now = time.monotonic()
        if used != last:
            last, since = used, now
        elif now - since >= quiet_s and now - start >= 0.5:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{proc.args!r} still busy after {timeout:.0f} s")


class Deployment:
    """The processes of one Conveyor row's run (a context manager), and its workers."""

    def __init__(self, ctx: Context, door: Door, log_path: Path, timeout: float) -> None:
        self.ctx, self.door, self.timeout = ctx, door, timeout
        self.log_path = log_path
        self.stack = contextlib.ExitStack()
        self.procs: dict[str, ApiProcess | subprocess.Popen[bytes]] = {}
        self.worker: tuple[subprocess.Popen[bytes], int] | None = None  # `conveyor run`, port
        self.enqueue_api: contextlib.ExitStack | None = None

    def _log(self, what: str) -> Path:
        return self.log_path.with_name(f"{self.log_path.stem}-{what}.log")

    def _api(self, argv: list[str], what: str) -> contextlib.AbstractContextManager[ApiProcess]:
        return api_server(argv, dict(os.environ), REPO, self._log(what), bp.stop_worker,
                          timeout=self.timeout)

    def __enter__(self) -> Deployment:
        try:
            if self.door.deployment == "split":
                self._start_cron()
                if self.door.http:
                    api = self.stack.enter_context(
                        self._api(conveyor("api", "--app", SPEC), "api"))
                    self.procs["api"] = api
                    self.ctx.api = (api.host, api.port)
            else:
                self.ctx.api_provider = self._run_api
                if self.door.http:  # up before the enqueue phase's window opens
                    self._run_api()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop_enqueue_api()
        self.ctx.api, self.ctx.api_provider = None, None
        self.stack.close()

    def _start_cron(self) -> None:
        with open(self._log("cron"), "ab") as log:
            proc = subprocess.Popen(conveyor("cron", "--app", SPEC), cwd=REPO,
                                    env=dict(os.environ), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.stack.callback(bp.stop_worker, proc)
        self.procs["cron"] = proc
        wait_idle(proc, self.timeout)

    def api_hwm_pid(self) -> int | None:
        """The pid of the process serving the HTTP doors (split deployment), if any."""
        api = self.procs.get("api")
        return api.proc.pid if isinstance(api, ApiProcess) else None

    def pids(self) -> dict[str, int]:
        """The deployment's processes other than the worker, for `bench.cpu`."""
        out = {}
        for name, p in self.procs.items():
            proc = p.proc if isinstance(p, ApiProcess) else p
            if proc.poll() is None:
                out[name] = proc.pid
        return out

    # -- `conveyor run`: where the HTTP doors post

    def _run_api(self) -> tuple[str, int]:
        if self.worker is not None:  # the all-in-one process: wait until its API is ready
            proc, port = self.worker
            wait_ready(f"http://{HOST}:{port}", proc, self.timeout, self.log_path)
            return HOST, port
        if self.enqueue_api is None:  # enqueue phase: API and cron, no worker
            stack = contextlib.ExitStack()
            self.procs["api"] = stack.enter_context(self._api(
                conveyor("run", "--app", SPEC, "--no-worker"), "run-no-worker"))
            self.enqueue_api = stack
        running = self.procs["api"]
        assert isinstance(running, ApiProcess)
        return running.host, running.port

    def _stop_enqueue_api(self) -> None:
        if self.enqueue_api is not None:
            self.enqueue_api.close()
            self.enqueue_api = None
            self.procs.pop("api", None)

    # -- harness.Workers

    def start(self, peer: bp.Peer, n: int, log_path: Path) -> subprocess.Popen[bytes]:
        if self.door.deployment == "split":
            return bp.start_worker(peer, n, log_path)
        self._stop_enqueue_api()
        port = free_port()
        self.door.port = port
        proc = bp.start_worker(peer, n, log_path)
        self.worker = (proc, port)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> bool:
        self.worker = None
        return bp.stop_worker(proc)

    def began(self, phase: str) -> None:
        pass

    def ended(self, phase: str, jobs: int) -> None:
        pass

