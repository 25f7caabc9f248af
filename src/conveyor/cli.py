"""The `conveyor` command and the composition root: settings, embedded servers, AppState,
services, signals, supervisor.

    conveyor run      API + worker + cron in one process (embedded servers without URLs)
    conveyor api | worker | cron    one service, to scale out; without URLs, attached to
                      the embedded servers of a running `conveyor run` (same data dir)
    conveyor migrate  apply database migrations and exit
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import sys
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import structlog
import typer

from conveyor import __version__, logs
from conveyor.api.app import create_app
from conveyor.api.server import ApiServer
from conveyor.application import Conveyor
from conveyor.config import Settings, load_settings
from conveyor.cron.janitor import Janitor
from conveyor.cron.rebalance import Rebalancer
from conveyor.cron.relay import Relay
from conveyor.cron.scheduler import CronScheduler
from conveyor.errors import ConfigError, ConveyorError
from conveyor.runtime import signals
from conveyor.runtime.shutdown import Shutdown
from conveyor.runtime.supervisor import Service, ServicesFailed, supervise
from conveyor.state import AppState, open_state
from conveyor.store.migrate import migrate
from conveyor.store.pool import open_pool
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
    if roles.api:
        services.append(ApiServer(create_app(state), host=settings.host, port=settings.port,
                                  drain_timeout_s=settings.drain_timeout))
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
            max_requeues=settings.max_deliveries,
        ))
        services.append(Relay(
            state.redis, state.keys, state.streams, state.store, types, liveness=liveness,
            interval_s=settings.relay_interval, grace_s=settings.relay_grace,
            ttl_s=settings.heartbeat_ttl,
        ))
        services.append(Janitor(
            state.redis, state.keys, state.streams, state.store, types, liveness=liveness,
            settings=settings,
            retention={t.name: t.retention for t in state.app.registry},
            interval_s=settings.janitor_interval, batch=settings.janitor_batch,
            lock_timeout_s=settings.janitor_lock_timeout,
        ))
    return services


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


async def serve(settings: Settings, app: Conveyor, roles: Roles,
                worker_types: list[str] | None = None,
                embedded_mode: Embedded = Embedded("start")) -> int:
    """Run the chosen services until a signal or a failure; returns the exit code."""
    shutdown = Shutdown(settings.drain_timeout)
    remove_handlers = signals.install(shutdown)
    try:
        async with contextlib.AsyncExitStack() as stack:
            servers = _servers(settings, embedded_mode)
            ready = await _unless_shutdown(stack.enter_async_context(servers), shutdown)
            if ready is None:
                return EXIT_OK
            state = await _unless_shutdown(stack.enter_async_context(open_state(ready, app)),
                                           shutdown)
            if state is None:
                return EXIT_OK
            services = build_services(state, roles, worker_types=worker_types)
            tune_gc()
            log.info("conveyor.started", version=__version__,
                     services=[s.name for s in services], embedded=settings.embedded)
            await supervise(services, shutdown)
        code = EXIT_FORCED if shutdown.forced else EXIT_OK
        log.info("conveyor.stopped", reason=shutdown.reason, exit_code=code)
        return code
    except ServicesFailed as exc:
        for failure in exc.failures:
            log.error("conveyor.failed", service=failure.service, error=str(failure.error))
        return EXIT_FAILED
    finally:
        remove_handlers()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)
    return uvloop.run(coro)


def _launch(roles: Roles, app_spec: str, overrides: dict[str, Any],
            worker_types: list[str] | None = None, *, app_dir: Path | None = None,
            embedded_mode: Embedded = Embedded("attach")) -> None:
    try:
        settings = load_settings(overrides)
    except ConfigError as exc:
        typer.echo(f"conveyor: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    logs.configure(settings.log_level, settings.log_format)
    try:
        app = load_app(app_spec, app_dir)
        if not settings.embedded and not (settings.database_url and settings.redis_url):
            raise ConfigError("set both DATABASE_URL and REDIS_URL, or neither (embedded "
                              "servers: `conveyor run` starts them, other commands attach)")
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


@cli.command("worker")
def worker_command(
    app: AppOpt = DEFAULT_APP,
    app_dir: AppDirOpt = None,
    concurrency: ConcurrencyOpt = None,
    types: Annotated[str | None, typer.Option(help="comma-separated task types (default all)")]
    = None,
    data_dir: AttachDirOpt = None,
    log_level: LogOpt = None,
) -> None:
    """A worker alone."""
    wanted = [t.strip() for t in types.split(",") if t.strip()] if types else None
    _launch(Roles(worker=True), app, {"concurrency": concurrency, "data_dir": data_dir,
                                      "log_level": log_level}, wanted, app_dir=app_dir)


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
            await pool.close()

    try:
        applied = _run(apply())
    except ConfigError as exc:
        typer.echo(f"conveyor: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    typer.echo(f"applied: {applied or 'nothing, up to date'}")



def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:  # pragma: no cover - a signal before handlers were installed
        sys.exit(EXIT_FORCED)
