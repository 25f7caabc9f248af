"""`python -m bench --ui`: every dashboard page timed on a tasks table of `--ui-rows` (default
10,000,000) finished tasks, on a private durable PostgreSQL and redis-server.

The table is filled as bench/layouts.py fills it (succeeded `noop` tasks created over the last
20 hours, so the last hour holds 1/20 of them), then the newest 1 % are made dead. Each page is
requested `--ui-requests` times in process (httpx over ASGI, the app `conveyor run` serves);
p50 / p95 / max go to BENCHMARKS.md between `<!-- ui:start -->` and `<!-- ui:end -->`,
with the plan of the queries that read the most.
"""

from __future__ import annotations

import asyncio
import html
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import layouts, sections


async def _fill(url: str, schema: str, rows: int) -> float:
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        began = time.perf_counter()
        table = f"{schema}.tasks"
        await layouts.fill(conn, table, rows, span_s=20 * 3600)
        await conn.execute(f"""
            UPDATE {table} SET status = 'dead', last_error = 'RuntimeError: card declined'
            WHERE id IN (SELECT id FROM {table} ORDER BY id DESC LIMIT {max(1, rows // 100)})""")
        await conn.execute(f"VACUUM (ANALYZE) {table}")
        return time.perf_counter() - began
    finally:
        await conn.close()


async def _explain(conn: Any, sql: str, args: tuple[Any, ...]) -> str:
    rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, SUMMARY ON) {sql}", *args)
    lines = [r[0] for r in rows]
    nodes = [line.strip().lstrip("-> ").split("  (")[0] for line in lines
             if "Scan" in line or "Index" in line]
    total = next((line for line in lines if line.startswith("Execution Time")), "")
    return f"{'; '.join(dict.fromkeys(nodes))} ({total.lower()})"


def _record(dashboard: Any) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """The last statement of each kind `dashboard` runs (to EXPLAIN them afterwards)."""
    statements: dict[str, tuple[str, tuple[Any, ...]]] = {}

    def recording(fetch: Any) -> Any:
        async def recorded(op: str, sql: str, *args: Any) -> list[Any]:
            statements[op] = (sql, args)
            return list(await fetch(op, sql, *args))
        return recorded

    dashboard._fetch = recording(dashboard._fetch)
    dashboard._fetch_custom = recording(dashboard._fetch_custom)
    return statements


async def _measure(url: str, redis_url: str, schema: str, rows: int, requests: int
                   ) -> list[str]:
    import httpx

    from bench import app as bench_app
    from conveyor.api.app import create_app
    from conveyor.config import Settings
    from conveyor.state import open_state
    from conveyor.store.dashboard import TaskFilter

    settings = Settings(database_url=url, redis_url=redis_url, database_schema=schema,
                        key_prefix=schema, log_level="warning")
    lines: list[str] = []
    async with open_state(settings, bench_app.app) as state:
        table = f"{schema}.tasks"
        middle = await state.pool.fetchval(
            f"SELECT id FROM {table} ORDER BY id DESC OFFSET $1 LIMIT 1", rows // 2)
        newest = await state.pool.fetchval(f"SELECT id FROM {table} ORDER BY id DESC LIMIT 1")
        pages = {
            "Overview": "/ui",
            "Overview (live fragment)": "/ui/overview/body",
            "Tasks: newest": "/ui/tasks",
            "Tasks: type + succeeded": "/ui/tasks?type=noop&status=succeeded",
            "Tasks: dead": "/ui/tasks?status=dead",
            "Tasks: deep keyset page": f"/ui/tasks?type=noop&cursor={middle}",
            "Tasks: a window 2 h to 1 h ago": "/ui/tasks?type=noop&since=2h&until=1h",
            "Tasks: payload field (no match, 20,000 examined)":
                "/ui/tasks?type=noop&field=payload.customer_id+%3D+42",
            "Tasks: idempotency key": "/ui/tasks?key=absent",
            "Task": f"/ui/tasks/{newest}",
            "Confirm: retry all dead (count to 10,001)":
                "/ui/tasks/confirm?type=noop&status=dead&action=retry",
            "Confirm: delete by payload field (no match, 20,000 examined)":
                "/ui/tasks/confirm?type=noop&field=payload.customer_id+%3D+42&action=delete",
            "Dead letters": "/ui/dead-letters?type=noop",
            "Workers": "/ui/workers",
            "Cron": "/ui/cron",
            "Queues": "/ui/queues",
        }
        app = create_app(state)
        statements = _record(app.state.ui_dashboard)
        transport = httpx.ASGITransport(app=app)
        lines += ["| page | p50 | p95 | max |", "|---|---|---|---|"]

        def row(name: str, path: str, times: list[float]) -> None:
            times.sort()
            lines.append(f"| {name} (`{path.partition('?')[0]}`) | {times[len(times) // 2]:.1f} ms"
                         f" | {times[int(0.95 * (len(times) - 1))]:.1f} ms "
                         f"| {times[-1]:.1f} ms |")
            print(lines[-1], flush=True)

        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            for name, path in pages.items():
                times = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    response = await http.get(path)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert response.status_code == 200, (path, response.status_code)
                row(name, path, times)
            # an action on everything a payload field matches: it examines 20,000 tasks and
            # (matching none) changes nothing, so every request does the same work
            confirm = (await http.get(pages["Confirm: delete by payload field (no match, "
                                            "20,000 examined)"])).text
            form = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', confirm))
            form = {k: html.unescape(v) for k, v in form.items()}
            times = []
            for _ in range(requests):
                t0 = time.perf_counter()
                response = await http.post("/ui/tasks/act-all", data=form)
                times.append((time.perf_counter() - t0) * 1000)
                assert response.status_code == 303, response.text
            row("Act on all: delete by payload field (no match, 20,000 examined)",
                "/ui/tasks/act-all", times)
        # one batch of an action on a filter: the 500 newest dead or cancelled ids
        dashboard = app.state.ui_dashboard
        times = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await dashboard.matching_ids(["noop"], TaskFilter(type="noop"),
                                         ("dead", "cancelled"), before=None, limit=500)
            times.append((time.perf_counter() - t0) * 1000)
        row("Act on all: one batch, the 500 newest dead or cancelled (ids)",
            "dashboard.matching", times)
        async with state.pool.acquire() as conn:
            plans = {
                "overview, succeeded and dead per minute of the last hour (once per process)":
                    statements.get("dashboard.minutes"),
                "dead letters of a type (a page of type + dead)": statements.get("dashboard.page"),
                "confirm, retry all dead (count)": statements.get("dashboard.count"),
                "confirm and act on all, payload field (20,000 examined)":
                    statements.get("dashboard.search_ids"),
                "act on all, one batch of ids": statements.get("dashboard.matching"),
            }
            lines += ["", "Plans of the statements the pages ran (EXPLAIN ANALYZE at this "
                      "size):", ""]
            for name, statement in plans.items():
                if statement is not None:
                    lines.append(f"- {name}: {await _explain(conn, *statement)}")
    return lines


def run(args: Any) -> int:
    from conveyor import logs
    from conveyor.testing.servers import PostgresServer, RedisServer

    logs.configure("warning", "console")
    scratch = Path(tempfile.mkdtemp(prefix="conveyor-ui-bench-"))
    scratch.chmod(0o755)
    pg = PostgresServer(scratch / "postgres", durable=True)
    rs = RedisServer(scratch / "redis", persistent=False)
    schema = "ui_bench"
    try:
        pg.start()
        rs.start()
        lines = asyncio.run(_run(pg.dsn, rs.url, schema, args.ui_rows, args.ui_requests))
    finally:
        rs.stop()
        pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    print(report)
    sections.put(args.out, "ui", "## Dashboard pages on a large tasks table\n\n"
                 f"`{args.command}`\n\n{report}")
    return 0


async def _run(url: str, redis_url: str, schema: str, rows: int, requests: int) -> list[str]:
    from bench import app as bench_app
    from conveyor.config import Settings
    from conveyor.state import open_state

    settings = Settings(database_url=url, redis_url=redis_url, database_schema=schema,
                        key_prefix=schema, log_level="warning")
    async with open_state(settings, bench_app.app):  # migrates
        pass
    print(f"filling {rows:,} finished tasks", flush=True)
    fill_s = await _fill(url, schema, rows)
    lines = [f"{rows:,} finished tasks of one type (1 % dead), created over 20 hours; durable "
             f"PostgreSQL (shared_buffers=128MB), one shared 2-core machine; {requests} "
             f"requests per page, in process (httpx over ASGI). Filling took {fill_s:.0f} s.",
             "", "The first overview of a process starts its one read of the hour's record "
             "(the first plan below) in the background and waits up to 0.2 s for it; that "
             "request is the overview's max. Every other request reads no more than one page "
             "of rows.", ""]
    lines += await _measure(url, redis_url, schema, rows, requests)
    return lines
