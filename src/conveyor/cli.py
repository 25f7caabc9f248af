"""The `conveyor` command and the composition root: settings, embedded servers, AppState,
services, signals, supervisor.

    conveyor run      API + worker + cron in one process (embedded servers without URLs)
    conveyor api | worker | cron    one service, to scale out; without URLs, attached to
                      the embedded servers of a running `conveyor run` (same data dir)
    conveyor worker --processes N   N worker processes under one supervisor
    conveyor migrate  apply database migrations and exit
    conveyor keys create | list | revoke    API keys (the new key alone on stdout)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import orjson
import structlog
import typer

from conveyor import __version__, logs, metrics
from conveyor.api.app import create_app
from conveyor.api.auth import check_exposure
from conveyor.api.server import ApiServer
from conveyor.application import Conveyor
from conveyor.config import Settings, load_settings, parse_duration, parse_rate
from conveyor.cron.janitor import Janitor
from conveyor.cron.rebalance import Rebalancer
from conveyor.cron.relay import Relay
from conveyor.cron.scheduler import CronScheduler
from conveyor.errors import ConfigError, ConveyorError
from conveyor.queue.backlog import Backlog
from conveyor.queue.connection import open_redis
from conveyor.queue.keys import Keys
from conveyor.queue.streams import TaskStreams
from conveyor.runtime import signals
from conveyor.runtime.children import Children, follow_supervisor
from conveyor.runtime.metrics_server import MetricsServer, aggregate_registry
from conveyor.runtime.shutdown import Shutdown
from conveyor.runtime.supervisor import Service, ServicesFailed, supervise
from conveyor.state import AppState, open_state
from conveyor.store.keys import SCOPES, KeyStore
from conveyor.store.migrate import migrate
from conveyor.store.pool import close_pool, open_pool
from conveyor.store.workers import Liveness, confirmation_s, watch_gap_s
from conveyor.tasks import webhook
from conveyor.worker.worker import Worker

log = structlog.get_logger("conveyor")
DEFAULT_APP = "conveyor.tasks:app"
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_FORCED = 0, 1, 2, 130
T = TypeVar("T")

cli = typer.Typer(
    name="conveyor",
    help="Durable tasks on PostgreSQL and Redis Streams: HTTP API, worker and cron.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataclass(frozen=True)
class Roles:
    api: bool = False
    worker: bool = False
    cron: bool = False


def load_app(spec: str, app_dir: Path | None = None) -> Conveyor:
    """Import `module:attribute` (attribute defaults to `app`) and check it is a Conveyor.

    `app_dir` (default: the working directory) goes first on `sys.path`, as uvicorn's
    `--app-dir` and celery's `-A` do: `conveyor run --app myapp:app` beside `myapp.py` works
    with no PYTHONPATH. It is made absolute, so that the spawned processes of `process=True`
    handlers (which inherit `sys.path`) find the module too.
    """
    directory = str((app_dir or Path.cwd()).resolve())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--app {spec!r}: cannot import {module_name!r} (looked first in "
                          f"{directory}; --app-dir names another directory): {exc}") from exc
    app = getattr(module, attr or "app", None)
    if not isinstance(app, Conveyor):
        raise ConfigError(f"--app {spec!r}: {attr or 'app'} is not a Conveyor instance")
    return app


def build_services(state: AppState, roles: Roles, *, worker_types: list[str] | None = None
                   ) -> list[Service]:
    """The services of this process, in start order."""
    settings = state.settings
    services: list[Service] = []
    backlog = Backlog(state.streams, list(state.app.registry.types), settings.metrics_cache)
    if roles.api:
        services.append(ApiServer(create_app(state, backlog), host=settings.host,
                                  port=settings.port, drain_timeout_s=settings.drain_timeout))
    if settings.metrics_port is not None:
        services.append(MetricsServer(host=settings.host, port=settings.metrics_port,
                                      before_scrape=backlog.refresh, key=_metrics_key(settings)))
    if roles.worker:
        worker = Worker(state, types=worker_types)
        webhook.warn_if_development_secret(settings, worker.types)
        services.append(worker)
    if roles.cron:
        types = list(state.app.registry.types)
        services.append(CronScheduler(state.client, list(state.app.registry.cron_jobs.values())))
        # One judge of liveness for both loops, so they share what they have seen.
        liveness = Liveness(
            state.workers, ttl_s=settings.heartbeat_ttl,
            confirm_s=confirmation_s(settings.heartbeat_interval),
            watch_gap_s=watch_gap_s(settings.rebalance_interval, settings.relay_interval),
        )
        services.append(Rebalancer(
            state.redis, state.keys, state.streams, state.store, types, liveness=liveness,
            interval_s=settings.rebalance_interval, ttl_s=settings.heartbeat_ttl,
            max_requeues=settings.max_deliveries, events=state.events,
        ))
        services.append(Relay(
            state.redis, state.keys, state.streams, state.store, types, liveness=liveness,
            interval_s=settings.relay_interval, grace_s=settings.relay_grace,
            ttl_s=settings.heartbeat_ttl, events=state.events,
            ranked=[t.name for t in state.app.registry if t.priorities],
        ))
        services.append(Janitor(
            state.redis, state.keys, state.streams, state.store, types, liveness=liveness,
            settings=settings,
            retention={t.name: t.retention for t in state.app.registry},
            interval_s=settings.janitor_interval, batch=settings.janitor_batch,
            lock_timeout_s=settings.janitor_lock_timeout,
        ))
    return services


class _Noted:
    """A service that calls `done` when it returns, however it ends."""

    def __init__(self, service: Service, done: Callable[[], None]) -> None:
        self.service = service
        self.name = service.name
        self.done = done

    async def run(self, shutdown: Shutdown) -> None:
        try:
            await self.service.run(shutdown)
        finally:
            self.done()


def metrics_last(services: list[Service]) -> list[Service]:
    """`services`, the metrics server stopping only after all the others (so their drain
    shows in its metrics and its `/healthz` answers through it)."""
    servers = [s for s in services if isinstance(s, MetricsServer)]
    others = [s for s in services if not isinstance(s, MetricsServer)]
    if not servers:
        return services
    left = len(others)

    def one_done() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            for server in servers:
                server.drained.set()

    if not others:
        for server in servers:
            server.drained.set()
    return [*(_Noted(s, one_done) for s in others), *servers]


def _metrics_key(settings: Settings) -> str | None:
    """The key the metrics port asks for: METRICS_KEY, unless METRICS_OPEN."""
    if settings.metrics_key is None or settings.metrics_open:
        return None
    return settings.metrics_key.get_secret_value()


def tune_gc() -> None:
    """Fewer, shorter garbage-collector pauses on the event loop.

    Start-up objects (modules, the app, pools) never die: frozen, full passes skip them. And
    a young collection every 50,000 container allocations instead of 700 makes the full
    passes (tens of ms with a warm heap) rare: at 2,300 tasks/s the worker's enqueue→start
    p99 went from about 25 ms to about 12 ms. Cyclic garbage lives a little longer for it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


@dataclass(frozen=True)
class Embedded:
    """What a process does without server URLs: `start` its own servers (`conveyor run`) or
    `attach` to those a running `conveyor run` keeps in the same data dir."""

    mode: Literal["start", "attach"]
    show_secrets: bool = False


@contextlib.asynccontextmanager
async def _servers(settings: Settings, embedded_mode: Embedded) -> AsyncIterator[Settings]:
    """Yield settings with server URLs: as given, or of embedded servers started or found."""
    if not settings.embedded:
        yield settings
        return
    from conveyor import embedded

    async with contextlib.AsyncExitStack() as stack:
        if embedded_mode.mode == "start":
            urls = await stack.enter_async_context(embedded.start(settings.data_dir))
        else:
            urls = await asyncio.to_thread(embedded.attach, settings.data_dir)
        hint = ({"attach_with": f"conveyor worker --data-dir {urls.data_dir}"}
                if embedded_mode.mode == "start" else {})
        log.info("embedded.servers", mode=embedded_mode.mode, data_dir=str(urls.data_dir),
                 database_url=urls.database_url,
                 redis_url=urls.redis_url if embedded_mode.show_secrets else urls.redis_redacted,
                 **hint)
        yield settings.model_copy(
            update={"database_url": urls.database_url, "redis_url": urls.redis_url}
        )


async def _unless_shutdown(step: Coroutine[Any, Any, T], shutdown: Shutdown) -> T | None:
    """Run a start-up step; give up on it (None) if shutdown begins first."""
    task = asyncio.ensure_future(step)
    stopper = asyncio.ensure_future(shutdown.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


Compose = Callable[[contextlib.AsyncExitStack, Shutdown], Awaitable[list[Service] | None]]


async def _serve_until_stopped(settings: Settings, compose: Compose) -> int:
    """Install the signal handlers, build the services (None: shutdown came first), run them
    until a signal or a failure; returns the exit code."""
    shutdown = Shutdown(settings.drain_timeout)
    remove_handlers = signals.install(shutdown)
    try:
        async with contextlib.AsyncExitStack() as stack:
            services = await compose(stack, shutdown)
            if services is None:
                return EXIT_OK
            log.info("conveyor.started", version=__version__,
                     services=[s.name for s in services], embedded=settings.embedded)
            await supervise(metrics_last(services), shutdown)
        code = EXIT_FORCED if shutdown.forced else EXIT_OK
        log.info("conveyor.stopped", reason=shutdown.reason, exit_code=code)
        return code
    except ServicesFailed as exc:
        for failure in exc.failures:
            log.error("conveyor.failed", service=failure.service, error=str(failure.error))
        return EXIT_FAILED
    finally:
        remove_handlers()


async def serve(settings: Settings, app: Conveyor, roles: Roles,
                worker_types: list[str] | None = None,
                embedded_mode: Embedded = Embedded("start")) -> int:
    """Run the chosen services until a signal or a failure; returns the exit code."""

    async def compose(stack: contextlib.AsyncExitStack, shutdown: Shutdown
                      ) -> list[Service] | None:
        servers = _servers(settings, embedded_mode)
        ready = await _unless_shutdown(stack.enter_async_context(servers), shutdown)
        if ready is None:
            return None
        state = await _unless_shutdown(stack.enter_async_context(open_state(ready, app)),
                                       shutdown)
        if state is None:
            return None
        if roles.api:  # before anything listens
            await check_exposure(ready, KeyStore(state.pool, ready.database_schema))
        services = build_services(state, roles, worker_types=worker_types)
        tune_gc()
        return services

    return await _serve_until_stopped(settings, compose)


async def serve_processes(settings: Settings, app: Conveyor, count: int, command: list[str],
                          worker_types: list[str] | None = None,
                          embedded_mode: Embedded = Embedded("attach")) -> int:
    """Supervise `count` processes running `command` (each a `conveyor worker`). With a
    metrics port, this process serves it: the children's metrics summed (prometheus_client's
    multiprocess mode, in a directory of its own), and the backlog gauges read here."""
    unknown = [t for t in worker_types or settings.worker_types if t not in app.registry.types]
    if unknown:  # refused here, not by every child in a restart loop
        raise ConfigError(f"worker types not registered: {', '.join(unknown)}")

    async def compose(stack: contextlib.AsyncExitStack, shutdown: Shutdown
                      ) -> list[Service] | None:
        env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_METRICS_PORT"}
        if settings.metrics_port is None:
            return [Children(command, count, env=env)]
        from prometheus_client import multiprocess

        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-metrics-"))
        env["PROMETHEUS_MULTIPROC_DIR"] = directory

        def forget(pid: int) -> None:  # its live gauges go; its counts stay in the sums
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]

        children = Children(command, count, env=env, on_exit=forget)
        ready = await _unless_shutdown(
            stack.enter_async_context(_servers(settings, embedded_mode)), shutdown)
        if ready is None or not ready.redis_given:
            return None
        redis = open_redis(ready, max_connections=4)
        stack.push_async_callback(redis.aclose)
        streams = TaskStreams(redis, Keys(settings.key_prefix),
                              dead_letter_maxlen=settings.dead_letter_maxlen)
        backlog = Backlog(streams, list(app.registry.types), settings.metrics_cache)
        server = MetricsServer(
            host=settings.host, port=settings.metrics_port,
            registry=aggregate_registry(Path(directory), metrics.BACKLOG),
            before_scrape=backlog.refresh, health=children.health, key=_metrics_key(settings),
        )
        return [children, server]

    return await _serve_until_stopped(settings, compose)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)
    return uvloop.run(coro)


def _launch(roles: Roles, app_spec: str, overrides: dict[str, Any],
            worker_types: list[str] | None = None, *, app_dir: Path | None = None,
            embedded_mode: Embedded = Embedded("attach"), processes: int = 1,
            child_command: list[str] | None = None) -> None:
    follow_supervisor()
    try:
        settings = load_settings(overrides)
    except ConfigError as exc:
        typer.echo(f"conveyor: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    logs.configure(settings.log_level, settings.log_format)
    try:
        app = load_app(app_spec, app_dir)
        if not settings.embedded and not (settings.database_url and settings.redis_given):
            raise ConfigError("set both DATABASE_URL and REDIS_URL, or neither (embedded "
                              "servers: `conveyor run` starts them, other commands attach)")
        if processes > 1 and child_command:
            code = _run(serve_processes(settings, app, processes, child_command, worker_types,
                                        embedded_mode))
        else:
            code = _run(serve(settings, app, roles, worker_types, embedded_mode))
    except ConfigError as exc:
        log.error("conveyor.config_error", error=str(exc))
        raise typer.Exit(EXIT_CONFIG) from None
    except ConveyorError as exc:
        log.error("conveyor.failed", error=str(exc), exc_info=exc)
        raise typer.Exit(EXIT_FAILED) from None
    raise typer.Exit(code)


AppOpt = Annotated[str, typer.Option("--app", help="module:attribute of your Conveyor app")]
HostOpt = Annotated[str | None, typer.Option(help="API bind address [CONVEYOR_HOST]")]
PortOpt = Annotated[int | None, typer.Option(help="API port [CONVEYOR_PORT]")]
ConcurrencyOpt = Annotated[int | None, typer.Option(
    help="messages in flight per worker process [CONVEYOR_CONCURRENCY]")]
AppDirOpt = Annotated[Path | None, typer.Option(
    "--app-dir", help="directory put first on the import path for --app (default: the "
    "working directory)")]
DataDirOpt = Annotated[Path | None, typer.Option(
    help="embedded servers' data directory [CONVEYOR_DATA_DIR]")]
AttachDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="without DATABASE_URL and REDIS_URL: attach to the embedded servers "
    "that `conveyor run` keeps in this directory [CONVEYOR_DATA_DIR]")]
LogOpt = Annotated[str | None, typer.Option(help="debug|info|warning|error [CONVEYOR_LOG_LEVEL]")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"conveyor {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Durable tasks on PostgreSQL and Redis Streams."""


@cli.command()
def run(
    app: AppOpt = DEFAULT_APP,
    app_dir: AppDirOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    concurrency: ConcurrencyOpt = None,
    data_dir: DataDirOpt = None,
    log_level: LogOpt = None,
    api: Annotated[bool, typer.Option(help="serve the HTTP API")] = True,
    worker: Annotated[bool, typer.Option(help="run a worker")] = True,
    cron: Annotated[bool, typer.Option(help="run cron, rebalance and relay")] = True,
    show_secrets: Annotated[bool, typer.Option(
        help="log the embedded Redis URL with its password")] = False,
) -> None:
    """API, worker and cron in one process. Without DATABASE_URL and REDIS_URL, starts
    embedded PostgreSQL and Redis in --data-dir (other commands can attach to them)."""
    overrides = {"host": host, "port": port, "concurrency": concurrency, "data_dir": data_dir,
                 "log_level": log_level}
    _launch(Roles(api, worker, cron), app, overrides, app_dir=app_dir,
            embedded_mode=Embedded("start", show_secrets))


@cli.command("api")
def api_command(app: AppOpt = DEFAULT_APP, app_dir: AppDirOpt = None, host: HostOpt = None,
                port: PortOpt = None, data_dir: AttachDirOpt = None, log_level: LogOpt = None,
                ) -> None:
    """The HTTP API alone."""
    _launch(Roles(api=True), app, {"host": host, "port": port, "data_dir": data_dir,
                                   "log_level": log_level}, app_dir=app_dir)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - platforms without affinity masks


def parse_processes(value: str) -> int:
    """`--processes`: a positive whole number, or `auto` (the CPU count)."""
    if value.strip().lower() == "auto":
        return cpu_count()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise typer.BadParameter(f"{value!r} is not a positive whole number or 'auto'")
    return count


def worker_child_command(app: str, app_dir: Path | None, concurrency: int | None,
                         types: str | None, data_dir: Path | None, log_level: str | None,
                         ) -> list[str]:
    """The command each process of `worker --processes N` runs: this worker, one process."""
    command = [sys.executable, "-m", "conveyor", "worker", "--processes", "1", "--app", app,
               "--app-dir", str((app_dir or Path.cwd()).resolve())]
    for flag, value in (("--concurrency", concurrency), ("--types", types),
                        ("--data-dir", data_dir), ("--log-level", log_level)):
        if value is not None:
            command += [flag, str(value)]
    return command


@cli.command("worker")
def worker_command(
    app: AppOpt = DEFAULT_APP,
    app_dir: AppDirOpt = None,
    concurrency: ConcurrencyOpt = None,
    types: Annotated[str | None, typer.Option(help="comma-separated task types (default all)")]
    = None,
    processes: Annotated[str, typer.Option(
        help="worker processes: a number, or auto (the CPU count); above 1, this process "
        "supervises them (restarts one that dies, drains all on SIGTERM)")] = "1",
    data_dir: AttachDirOpt = None,
    log_level: LogOpt = None,
) -> None:
    """A worker alone (or --processes N of them)."""
    count = parse_processes(processes)
    wanted = [t.strip() for t in types.split(",") if t.strip()] if types else None
    _launch(Roles(worker=True), app, {"concurrency": concurrency, "data_dir": data_dir,
                                      "log_level": log_level}, wanted, app_dir=app_dir,
            processes=count,
            child_command=worker_child_command(app, app_dir, concurrency, types, data_dir,
                                               log_level))


@cli.command("cron")
def cron_command(app: AppOpt = DEFAULT_APP, app_dir: AppDirOpt = None,
                 data_dir: AttachDirOpt = None, log_level: LogOpt = None) -> None:
    """Cron jobs, rebalance and relay alone (run one or more; locks keep them single)."""
    _launch(Roles(cron=True), app, {"data_dir": data_dir, "log_level": log_level},
            app_dir=app_dir)


@cli.command("migrate")
def migrate_command(log_level: LogOpt = None) -> None:
    """Apply database migrations and exit."""
    settings = load_settings({"log_level": log_level})
    logs.configure(settings.log_level, settings.log_format)
    if not settings.database_url:
        typer.echo("conveyor: DATABASE_URL is not set", err=True)
        raise typer.Exit(EXIT_CONFIG)
    dsn = settings.database_url

    async def apply() -> list[int]:
        pool = await open_pool(dsn, min_size=1, max_size=1)
        try:
            return await migrate(pool, settings.database_schema,
                                 lock_timeout_s=settings.migrate_lock_timeout)
        finally:
            await close_pool(pool)

    try:
        applied = _run(apply())
    except ConfigError as exc:
        typer.echo(f"conveyor: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    typer.echo(f"applied: {applied or 'nothing, up to date'}")


keys_cli = typer.Typer(name="keys", no_args_is_help=True,
                       help="API keys: create (the key is shown once), list, revoke.")
cli.add_typer(keys_cli)
ROW = "{name:<20} {prefix:<22} {state:<8} {scopes:<28} {types:<16} {rate:<8} {expires:<20} {used}"


@contextlib.asynccontextmanager
async def _key_store(settings: Settings) -> AsyncIterator[KeyStore]:
    """The api_keys table of DATABASE_URL, or of the embedded servers of a running
    `conveyor run` on the same data dir; migrated first."""
    async with _servers(settings, Embedded("attach")) as ready:
        if not ready.database_url:
            raise ConfigError("DATABASE_URL is not set")
        pool = await open_pool(ready.database_url, min_size=1, max_size=1)
        try:
            await migrate(pool, ready.database_schema)
            yield KeyStore(pool, ready.database_schema)
        finally:
            await close_pool(pool)


def _keys(data_dir: Path | None, action: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Run `action` on the key store; errors as one line on stderr and a non-zero exit."""
    try:
        settings = load_settings({"data_dir": data_dir})
    except ConfigError as exc:
        typer.echo(f"conveyor: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    logs.configure("warning", settings.log_format)

    async def run() -> T:
        async with _key_store(settings) as store:
            return await action(store)

    try:
        return _run(run())
    except (ConfigError, ValueError) as exc:
        typer.echo(f"conveyor: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except ConveyorError as exc:
        typer.echo(f"conveyor: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


def _list_of(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@keys_cli.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="a unique name for the key")],
    scopes: Annotated[str, typer.Option(help=f"comma-separated: {', '.join(SCOPES)}")],
    types: Annotated[str | None, typer.Option(
        help="comma-separated task types it may enqueue (default: all)")] = None,
    expires_in: Annotated[str | None, typer.Option(
        help="lifetime: 90s, 15m, 12h or 30d (default: none)")] = None,
    rate: Annotated[str | None, typer.Option(
        help="its rate limit: N/s, N/m or N/h (default: CONVEYOR_API_RATE_LIMIT)")] = None,
    data_dir: AttachDirOpt = None,
) -> None:
    """Create a key and print it, alone, on stdout: `KEY=$(conveyor keys create ...)`. It is
    stored only as a hash: it cannot be shown again."""
    try:
        lifetime = parse_duration(expires_in) if expires_in else None
        limit = parse_rate(rate) if rate else None
    except ValueError as exc:
        typer.echo(f"conveyor: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None

    async def create(store: KeyStore) -> str:
        _, key = await store.create(name, _list_of(scopes), types=_list_of(types) or None,
                                    rate=limit, expires_in_s=lifetime)
        return key

    typer.echo(_keys(data_dir, create))


@keys_cli.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False,
    data_dir: AttachDirOpt = None,
) -> None:
    """Every key (revoked and expired ones too), without secrets."""

    async def read(store: KeyStore) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        return [k.public(now) for k in await store.list()]

    keys = _keys(data_dir, read)
    if as_json:
        typer.echo(orjson.dumps(keys, option=orjson.OPT_INDENT_2).decode())
        return
    typer.echo(ROW.format(name="NAME", prefix="PREFIX", state="STATE", scopes="SCOPES",
                          types="TYPES", rate="RATE", expires="EXPIRES", used="LAST USED"))
    for k in keys:
        typer.echo(ROW.format(
            name=k["name"], prefix=k["prefix"], state=k["state"], scopes=",".join(k["scopes"]),
            types=",".join(k["types"]) if k["types"] else "all", rate=k["rate"] or "default",
            expires=(k["expires_at"] or "never")[:19], used=(k["last_used_at"] or "never")[:19],
        ))


@keys_cli.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="the key's name")],
                data_dir: AttachDirOpt = None) -> None:
    """Revoke a key: refused by every API process within CONVEYOR_API_KEY_CACHE seconds."""

    async def revoke(store: KeyStore) -> bool:
        return await store.revoke(name) is not None

    if not _keys(data_dir, revoke):
        typer.echo(f"conveyor: no API key is named {name!r}", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"revoked {name}", err=True)


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:  # pragma: no cover - a signal before handlers were installed
        sys.exit(EXIT_FORCED)
