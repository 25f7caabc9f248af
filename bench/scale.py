"""`python -m bench --scale`: Conveyor on a large tasks table, and a soak with retention on.

Three parts, on a private PostgreSQL that keeps its durability defaults (fsync, synchronous
commit, full-page writes: unlike the peer table's) and a private redis-server:

1. **layouts** (`--compare-rows`, default 2,000,000; bench/layouts.py): the tasks table as
   migrations 0001-0003 left it, as 0004 makes it, 0004 with fillfactor 85, 0004 partitioned
   by id range (an hour a partition), and 0004 for live tasks with a narrow history table
   that completions move finished ones to, each holding that many finished tasks: the cost of
   a completion (time and WAL per task), of pruning (the janitor's DELETE batches of 500, and
   DETACH CONCURRENTLY + DROP of partitions: rows/s, WAL per row, longest statement, a
   writer's longest round trip meanwhile), of the queue counts, and table + index size per
   million finished tasks.
2. **scale** (`--rows`, default 10,000,000): the e2e no-op workload (`--scale-n` tasks through
   `Client.enqueue_many`, one `conveyor worker --concurrency 10`) on an empty table and on one
   holding that many finished tasks, the throughput ratio, and `GET /v1/queues` and
   `GET /v1/tasks?type=noop&status=succeeded` p99 at that size.
3. **soak** (`--soak-seconds`, default 1800; 0 skips): a steady `--soak-rate` tasks/s with a
   worker and `conveyor cron` (the janitor) running, retention `--soak-retention` s: the
   table + index size sampled every 15 s, which stops growing once the janitor deletes as
   fast as tasks finish.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg

from bench import sections
from bench.layouts import Figures, History, InPlace, Partitioned, fill, measure, sizes

REPO = Path(__file__).resolve().parent.parent


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def mb1(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def index_growth(index_sizes: list[dict[str, int]]) -> str:
    """Each index's size after the soak's first fifth and at its end: where growth is."""
    if len(index_sizes) < 2:
        return ""
    first, last = index_sizes[len(index_sizes) // 5], index_sizes[-1]
    return "Indexes after the first fifth -> at the end: " + ", ".join(
        f"{name} {mb1(first.get(name, 0))} -> {mb1(size)}" for name, size in last.items()) + "."


def soak_summary(samples: list[tuple[float, int, int, int]]) -> str:
    """The soak's size after its first fifth (the table filling up to its retention), in
    halves: a size that stopped growing has the same range in both."""
    settled = samples[len(samples) // 5:]
    if len(settled) < 2:
        return "Too short a soak to tell whether its size settled."
    halves = settled[:len(settled) // 2], settled[len(settled) // 2:]
    parts = [f"{half[0][0]:.0f}-{half[-1][0]:.0f} s: table + indexes "
             f"{mb1(min(x[1] for x in half))}-{mb1(max(x[1] for x in half))} "
             f"(table {mb1(min(x[3] for x in half))}-{mb1(max(x[3] for x in half))}), rows "
             f"{min(x[2] for x in half):,}-{max(x[2] for x in half):,}" for half in halves]
    return "Settled, in two halves: " + "; ".join(parts) + "."


def layouts() -> list[InPlace]:
    """The layouts compared, in the order of the table."""
    return [InPlace("without 0004: status in full indexes (0001-0003's)", without=4),
            InPlace("0004 as shipped: partial live/finished indexes (fillfactor 100)"),
            InPlace("0004 indexes at fillfactor 85 (not shipped)", fillfactor=85),
            Partitioned("0004 indexes, partitioned by id range, an hour a partition "
                        "(not shipped)"),
            History("0004 for live tasks + a narrow history table finished ones move to "
                    "(not shipped)")]


async def compare_layouts(url: str, scratch: Path, rows: int) -> list[tuple[InPlace, Figures]]:
    """Every layout measured with `rows` finished tasks, one after another."""
    out = []
    for number, layout in enumerate(layouts()):
        print(f"layout {layout.label}", flush=True)
        out.append((layout, await measure(layout, url, f"layout_{number}", scratch, rows)))
    return out


def layout_table(measured: list[tuple[InPlace, Figures]], rows: int) -> list[str]:
    """The layouts table (a row per layout and pruning method) and its legend."""
    lines = ["| layout | pruned by | completion µs/task | WAL B/completion | WAL B/completion, "
             "64 KiB payload | prune rows/s | WAL B/pruned row | longest prune statement | "
             "writer's longest enqueue + completion meanwhile | counts p50 | table + indexes "
             "per 1M finished |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    per_m = 1_000_000 / rows
    for layout, figures in measured:
        size = figures.size
        for k, prune in enumerate(figures.prunes):
            same = k > 0
            lines.append(
                f"| {'〃' if same else layout.label} | {prune.method} | "
                f"{'〃' if same else f'{figures.completion_us:.0f}'} | "
                f"{'〃' if same else f'{figures.completion_wal:,.0f}'} | "
                f"{'〃' if same else f'{figures.big_completion_wal:,.0f}'} | "
                f"{prune.rows / max(prune.seconds, 1e-9):,.0f} | "
                f"{prune.wal / max(1, prune.rows):,.0f} | {prune.longest_s * 1000:,.0f} ms | "
                f"{prune.writer_longest_s * 1000:,.0f} ms ({prune.writer_ops} writes) | "
                f"{'〃' if same else f'{figures.counts_ms_p50:.2f} ms'} | "
                + ("〃 |" if same else
                   f"{mb(size['table'] * per_m)} + {mb(size['indexes'] * per_m)} |"))
    lines += ["", "(Completion: 20,000 tasks through mark_running + record, batches of 100, "
              "and 1,000 more with a 64 KiB payload; with the history table, record is the "
              "move. Prune: about 200,000 expired "
              "rows, the janitor's statement in batches of 500, or whole partitions; the "
              "longest statement bounds the longest any lock was held; meanwhile a writer "
              "enqueues and completes one task every 50 ms. Sizes after VACUUM ANALYZE: the "
              "table holding the finished tasks.)"]
    return lines


def worker_env(urls: dict[str, str], schema: str, n: int, extra: dict[str, str] | None = None
               ) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO),
                                       os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "CONVEYOR_DATABASE_URL": urls["pg"],
            "CONVEYOR_REDIS_URL": urls["redis"], "CONVEYOR_DATABASE_SCHEMA": schema,
            "CONVEYOR_KEY_PREFIX": schema, "CONVEYOR_LOG_LEVEL": "warning",
            "BENCH_REDIS_URL": urls["redis"], "BENCH_N": str(n), "BENCH_CONCURRENCY": "10",
            **(extra or {})}


def spawn(role: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "conveyor", role, "--app", "bench.app:app"]
    if role == "worker":
        argv += ["--concurrency", "10"]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def e2e(urls: dict[str, str], schema: str, n: int, logdir: Path) -> float:
    """Tasks/s from the first enqueue to the N-th completion, one warm worker."""
    import redis.asyncio as aioredis

    from bench import app as bench_app
    from bench import workload
    from conveyor.client import TaskRequest
    from conveyor.config import Settings
    from conveyor.state import open_state

    r = aioredis.Redis.from_url(urls["redis"])
    settings = Settings(database_url=urls["pg"], redis_url=urls["redis"],
                        database_schema=schema, key_prefix=schema, log_level="warning")
    worker = spawn("worker", worker_env(urls, schema, n), logdir / "scale-worker.log")
    try:
        async with open_state(settings, bench_app.app) as state:
            await r.delete(workload.DONE_KEY, workload.FIRST_KEY, workload.LAST_KEY)
            await state.client.enqueue_many([TaskRequest(bench_app.TYPE, {})])  # warm-up
            await _until_done(r, workload.DONE_KEY)
            await r.delete(workload.DONE_KEY, workload.FIRST_KEY, workload.LAST_KEY)
            began = time.time()
            for i in range(0, n, 100):
                await state.client.enqueue_many(
                    [TaskRequest(bench_app.TYPE, {}) for _ in range(min(100, n - i))])
            deadline = time.monotonic() + 600
            while (last := await r.get(workload.LAST_KEY)) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("the e2e run did not finish within 600 s")
                await asyncio.sleep(0.05)
            return n / (float(last) - began)
    finally:
        stop(worker)
        await r.aclose()


async def _until_done(r: Any, key: str) -> None:
    for _ in range(1200):
        if int(await r.get(key) or 0) >= 1:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the warm-up task did not finish within 60 s")


async def http_p99(urls: dict[str, str], schema: str, requests: int = 300) -> dict[str, float]:
    import httpx

    from bench import app as bench_app
    from conveyor.api.app import create_app
    from conveyor.config import Settings
    from conveyor.state import open_state

    settings = Settings(database_url=urls["pg"], redis_url=urls["redis"],
                        database_schema=schema, key_prefix=schema, log_level="warning")
    out = {}
    async with open_state(settings, bench_app.app) as state:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            for name, path in (("queues", "/v1/queues"),
                               ("tasks", "/v1/tasks?type=noop&status=succeeded")):
                times = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    response = await http.get(path)
                    times.append(time.perf_counter() - t0)
                    assert response.status_code == 200, response.text
                times.sort()
                out[f"{name}_p50_ms"] = times[len(times) // 2] * 1000
                out[f"{name}_p99_ms"] = times[int(0.99 * (len(times) - 1))] * 1000
    return out


async def soak(urls: dict[str, str], schema: str, seconds: float, rate: float,
               retention_s: float, logdir: Path
               ) -> tuple[list[tuple[float, int, int, int]], list[dict[str, int]]]:
    """(elapsed s, total size, rows, table size) every 15 s of a steady `rate` with the
    janitor on, and each index's size at each sample."""
    from bench import app as bench_app
    from conveyor.client import TaskRequest
    from conveyor.config import Settings
    from conveyor.state import open_state

    extra = {"CONVEYOR_RETENTION_SUCCEEDED": str(retention_s), "CONVEYOR_JANITOR_INTERVAL": "10"}
    env = worker_env(urls, schema, 10**12, extra)
    procs = [spawn("worker", env, logdir / "soak-worker.log"),
             spawn("cron", env, logdir / "soak-cron.log")]
    settings = Settings(database_url=urls["pg"], redis_url=urls["redis"],
                        database_schema=schema, key_prefix=schema, log_level="warning")
    samples: list[tuple[float, int, int, int]] = []
    index_sizes: list[dict[str, int]] = []
    try:
        async with open_state(settings, bench_app.app) as state, AsyncExitStack():
            began = time.monotonic()
            sent, next_sample = 0, 0.0
            while (elapsed := time.monotonic() - began) < seconds:
                due = int(elapsed * rate) - sent
                if due > 0:
                    await state.client.enqueue_many(
                        [TaskRequest(bench_app.TYPE, {}) for _ in range(min(due, 500))])
                    sent += min(due, 500)
                if elapsed >= next_sample:
                    found = await state.pool.fetchrow(
                        "SELECT pg_table_size($1), pg_total_relation_size($1)",
                        state.store.table)
                    assert found is not None
                    heap, size = int(found[0]), int(found[1])
                    rows = int(await state.pool.fetchval(
                        f"SELECT count(*) FROM {state.store.table}"))
                    samples.append((elapsed, size, rows, heap))
                    index_sizes.append({r[0]: int(r[1]) for r in await state.pool.fetch(
                        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index AS i"
                        " JOIN pg_class AS c ON c.oid = i.indexrelid"
                        " WHERE i.indrelid = $1::regclass ORDER BY c.relname",
                        state.store.table)})
                    print(f"  soak {elapsed:6.0f} s: {mb1(size)} (table {mb1(heap)}), {rows:,}"
                          " rows", flush=True)
                    next_sample += 15.0
                await asyncio.sleep(0.02)
    finally:
        for proc in procs:
            stop(proc)
    return samples, index_sizes


def run(args: Any) -> int:
    """Run the parts asked for and write their report to `args.scale_out`."""
    from conveyor import logs
    from conveyor.testing.servers import PostgresServer, RedisServer

    logs.configure("warning", "console")
    scratch = Path(tempfile.mkdtemp(prefix="conveyor-scale-"))
    scratch.chmod(0o755)
    args.logdir.mkdir(parents=True, exist_ok=True)
    pg = PostgresServer(scratch / "postgres", durable=True)
    rs = RedisServer(scratch / "redis", persistent=False)
    lines: list[str] = []
    try:
        pg.start()
        rs.start()
        urls = {"pg": pg.dsn, "redis": rs.url}
        asyncio.run(_parts(args, urls, scratch, lines))
    finally:
        rs.stop()
        pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.scale_out:
        args.scale_out.write_text(report)
    sections.put(args.out, "scale", "## Scale: a large tasks table and retention\n\n"
                 f"`{args.command}`\n\n{report}")
    return 0


def _flush(args: Any, lines: list[str]) -> None:
    """Write what is measured so far (a long run stopped midway keeps its finished parts)."""
    if args.scale_out:
        args.scale_out.write_text("\n".join(lines) + "\n")


async def _parts(args: Any, urls: dict[str, str], scratch: Path, lines: list[str]) -> None:
    lines += ["Postgres keeps its durability defaults (fsync, synchronous_commit, "
             "full_page_writes on), shared_buffers=128MB; one shared 2-core machine."]
    if args.compare_rows:
        lines += ["", f"Layouts, each holding {args.compare_rows:,} finished tasks:", "",
                  *layout_table(await compare_layouts(urls["pg"], scratch, args.compare_rows),
                                args.compare_rows)]
        _flush(args, lines)
    if args.rows:
        schema = "scale"
        print("e2e on an empty table", flush=True)
        empty = await e2e(urls, schema, args.scale_n, args.logdir)
        empty_http = await http_p99(urls, schema)
        conn = await asyncpg.connect(urls["pg"])
        try:
            await conn.execute(f"TRUNCATE {schema}.tasks CASCADE")  # with task_edges
            fill_s = await fill(conn, f"{schema}.tasks", args.rows, span_s=20 * 3600)
            size = await sizes(conn, f"{schema}.tasks")
        finally:
            await conn.close()
        print(f"e2e on {args.rows:,} finished tasks", flush=True)
        large = await e2e(urls, schema, args.scale_n, args.logdir)
        large_http = await http_p99(urls, schema)
        per_m = 1_000_000 / args.rows
        lines += ["", f"Scale: {args.scale_n:,} no-op tasks e2e (enqueue_many 100 per call, "
                  "one worker, concurrency 10):", "",
                  "| table holds | e2e tasks/s | GET /v1/queues p50 / p99 | "
                  "GET /v1/tasks?type=&status= p50 / p99 |", "|---|---|---|---|",
                  f"| nothing | {empty:,.0f} | {empty_http['queues_p50_ms']:.1f} / "
                  f"{empty_http['queues_p99_ms']:.1f} ms | {empty_http['tasks_p50_ms']:.1f} / "
                  f"{empty_http['tasks_p99_ms']:.1f} ms |",
                  f"| {args.rows:,} finished | {large:,.0f} | {large_http['queues_p50_ms']:.1f}"
                  f" / {large_http['queues_p99_ms']:.1f} ms | "
                  f"{large_http['tasks_p50_ms']:.1f} / {large_http['tasks_p99_ms']:.1f} ms |",
                  "", f"Throughput ratio large/empty: {large / empty:.0%}. Filling took "
                  f"{fill_s:.0f} s; size per million finished tasks: table "
                  f"{mb(size['table'] * per_m)}, indexes {mb(size['indexes'] * per_m)}, total "
                  f"{mb(size['total'] * per_m)}."]
        _flush(args, lines)
    if args.soak_seconds:
        print(f"soak {args.soak_seconds:.0f} s at {args.soak_rate:.0f}/s", flush=True)
        samples, index_sizes = await soak(urls, "soak", args.soak_seconds, args.soak_rate,
                             args.soak_retention, args.logdir)
        lines += ["", f"Soak: {args.soak_rate:.0f} tasks/s for {args.soak_seconds:.0f} s, "
                  f"retention {args.soak_retention:.0f} s, janitor every 10 s "
                  "(`conveyor cron`), table + indexes (rows):", "",
                  "| elapsed | table + indexes | of which table | rows |", "|---|---|---|---|"]
        step = max(1, len(samples) // 20)
        shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        lines += [f"| {t:.0f} s | {mb1(s)} | {mb1(h)} | {r:,} |" for t, s, r, h in shown]
        lines += ["", soak_summary(samples), "", index_growth(index_sizes)]
