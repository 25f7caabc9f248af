"""What the PostgreSQL peers' worker commands import: PgQueuer's factory and worker
(`python -m bench.pg_peer_apps --batch-size 10`: `pgqueuer.run(factory)` on uvloop, which is
what `pgq run` does; the `pgq run` command of pgqueuer 1.6.0 fails on its own default log
level) and Procrastinate's app (`procrastinate --app bench.pg_peer_apps.procrastinate_app
worker`), each with the workload's no-op task.

Each peer has a database of its own on the benchmark's Postgres: `database_url(peer)` names
it, from `BENCH_PG_URL` (the driver's Postgres, handed to the workers in their environment).
As in `bench.peer_apps`, no peer library is imported at module level: the Procrastinate app is
built on first access (PEP 562), and the peers' objects are `Any` here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.workload import amark_done, async_redis

URL_ENV = "BENCH_PG_URL"  # the benchmark's Postgres (any database on it)
TASK = "bench_noop"
DATABASES = {"pgqueuer": "bench_pgqueuer", "procrastinate": "bench_procrastinate"}


def database_url(peer: str, base: str | None = None) -> str:
    """The URL of `peer`'s database on the benchmark's Postgres."""
    base = base or os.environ.get(URL_ENV)
    if not base:
        raise RuntimeError(f"{URL_ENV} is not set (the driver sets it for its workers)")
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"/{DATABASES[peer]}"))


@contextlib.asynccontextmanager
async def pgqueuer_factory() -> AsyncIterator[Any]:
    """One PgQueuer on one asyncpg connection (PgQueuer's own set-up), the no-op entrypoint."""
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver

    conn = await asyncpg.connect(database_url("pgqueuer"))
    try:
        pgq = PgQueuer(AsyncpgDriver(conn))

        @pgq.entrypoint(TASK)
        async def noop(job: Any) -> None:
            await amark_done(async_redis())

        yield pgq
    finally:
        await conn.close()


def _procrastinate_app() -> Any:
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=database_url("procrastinate")))

    @app.task(name=TASK)
    async def noop() -> None:
        await amark_done(async_redis())

    return app


def __getattr__(name: str) -> Any:
    if name != "procrastinate_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = globals()[name] = _procrastinate_app()
    return built


def run_pgqueuer(batch_size: int, max_concurrent_tasks: int | None) -> None:
    """`pgq run bench.pg_peer_apps:pgqueuer_factory` without its CLI: the same supervisor
    (SIGTERM/SIGINT stop it gracefully) on the same loop (uvloop when installed)."""
    import pgqueuer
    from pgqueuer.adapters.cli.cli import asyncio_run

    asyncio_run(pgqueuer.run(pgqueuer_factory, batch_size=batch_size,
                             max_concurrent_tasks=max_concurrent_tasks))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the PgQueuer peer's worker")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--max-concurrent-tasks", type=int)
    args = parser.parse_args()
    run_pgqueuer(args.batch_size, args.max_concurrent_tasks)
