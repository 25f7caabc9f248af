"""Throwaway PostgreSQL and Redis servers on 127.0.0.1, for the test suite, the benchmark and
the chaos run: start, stop, kill, restart (optionally wiping Redis).

PostgreSQL comes from the system binaries (`CONVEYOR_PG_BIN`, else the newest
/usr/lib/postgresql/*/bin, else `pg_config --bindir`); as root it runs as the `postgres` user,
since Postgres refuses to run as root. Durability is traded for speed (fsync off) unless
`durable=True` (the scale benchmark's): these servers hold test data only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_IS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout_s: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def postgres_bin_dir() -> Path:
    given = os.environ.get("CONVEYOR_PG_BIN")
    if given:
        return Path(given)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    raise RuntimeError("no PostgreSQL binaries found; set CONVEYOR_PG_BIN")


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if _IS_ROOT else cmd


class PostgresServer:
    """A private PostgreSQL cluster in `base_dir`, trust auth, listening on 127.0.0.1:port."""

    def __init__(self, base_dir: Path, port: int | None = None, *, durable: bool = False
                 ) -> None:
        self.base_dir = base_dir
        self.durable = durable  # keep Postgres's durability defaults (fsync and the rest)
        self.data_dir = base_dir / "pgdata"
        self.port = port or free_port()
        self.bin = postgres_bin_dir()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _chown(self) -> None:
        if _IS_ROOT:
            shutil.chown(self.base_dir, "postgres", "postgres")
            for path in self.base_dir.rglob("*"):
                shutil.chown(path, "postgres", "postgres")

    def init(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._chown()
        subprocess.run(
            _as_postgres([str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                          "--auth=trust", "--no-sync", "-E", "UTF8"]),
            check=True, capture_output=True,
        )

    def start(self, timeout_s: float = 30.0) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self.init()
        log = open(self.base_dir / "postgres.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            _as_postgres([
                str(self.bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={self.base_dir}",
                *([] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                           "-c", "full_page_writes=off"]),
                "-c", "max_connections=300", "-c", "shared_buffers=128MB",
                *os.environ.get("CONVEYOR_PG_EXTRA_ARGS", "").split(),
            ]),
            stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        _wait_port(self.port, timeout_s, self.process)
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True, check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")

    def stop(self, mode: str = "fast", timeout_s: float = 30.0) -> None:
        """`fast` (SIGINT: abort sessions, clean stop) or `immediate` (SIGQUIT: crash-like)."""
        if self.process is None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        with contextlib.suppress(ProcessLookupError):
            self._signal_postmaster(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_postmaster(signal.SIGKILL)
            self.process.wait(timeout_s)
        self.process = None

    def _signal_postmaster(self, sig: int) -> None:
        # Under runuser the postmaster is a child; its pid is in postmaster.pid.
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            if self.process is not None:
                os.killpg(self.process.pid, sig)
            return
        os.kill(pid, sig)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()


class RedisServer:
    """A private redis-server on 127.0.0.1:port; `persistent` turns AOF on."""

    def __init__(self, base_dir: Path, port: int | None = None, *, persistent: bool = False
                 ) -> None:
        self.base_dir = base_dir
        self.port = port or free_port()
        self.persistent = persistent
        self.binary = os.environ.get("CONVEYOR_REDIS_SERVER") or shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server not found; install it (apt-get install redis-server)")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> None:
        assert self.binary is not None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
                       if self.persistent else ["--appendonly", "no", "--save", ""])
        log = open(self.base_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.base_dir), "--protected-mode", "no", *persistence],
            stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        _wait_port(self.port, timeout_s, self.process)

    def stop(self, *, kill: bool = False, timeout_s: float = 15.0) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.process.wait(timeout_s)
        self.process = None

    def restart(self, *, wipe: bool = False, kill: bool = False) -> None:
        """Stop and start again on the same port; `wipe` deletes its files in between."""
        self.stop(kill=kill)
        if wipe:
            for name in ("appendonly.aof", "dump.rdb", "appendonlydir"):
                path = self.base_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        self.start()
