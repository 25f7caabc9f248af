"""What tracing costs: the off switch's checks per enqueue and per attempt (nanoseconds), and
end to end on real PostgreSQL and Redis (tasks enqueued one at a time by `Client.enqueue`, a
worker of concurrency 10 running them), tracing off and on.

    python -m bench.tracing_cost                         # this tree: off and on
    PYTHONPATH=<other tree>/src python -m bench.tracing_cost --label before
                                                         # a tree without tracing: off only

The figures print; nothing is written. Modes run round-robin so a drift in the machine's speed
spreads over all of them; the median of the rounds is shown beside every round's figure.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import statistics
import tempfile
import time
import timeit
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.registry import TaskContext
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import open_state
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker

HAS_TRACING = importlib.util.find_spec("conveyor.tracing") is not None
app = Conveyor()


class Nothing(BaseModel):
    pass


@app.task("noop", payload=Nothing)
async def noop(payload: Nothing, ctx: TaskContext) -> None:
    return None


def hooks_ns() -> dict[str, float]:
    """Nanoseconds per call of what tracing, off, adds to one enqueue (the switch checked in
    `Client.enqueue_many`, the context asked for in `Client.prepare`) and to one attempt (the
    switch checked in `Executor.execute`), beside an empty function call for scale."""
    if not HAS_TRACING:
        return {}
    from conveyor import tracing
    assert not tracing.enabled()

    def empty() -> None:
        return None

    def enqueue() -> None:
        tracing.enabled()
        tracing.current_context()

    def attempt() -> None:
        tracing.enabled()

    out = {}
    for name, fn in (("empty function call", empty), ("enqueue", enqueue),
                     ("attempt", attempt)):
        timer = timeit.Timer(fn)
        loops, _ = timer.autorange()
        out[name] = min(timer.repeat(5, loops)) / loops * 1e9
    return out


class _Drop:
    """A span exporter that keeps nothing: the cost of making spans, not of shipping them."""

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


async def e2e(settings: Settings, n: int, traced: bool) -> float:
    """Tasks per second from the first enqueue to the n-th success."""
    close = None
    if traced:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from conveyor import tracing
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(_Drop()))  # type: ignore[arg-type]
        tracing.enable(provider)
        close = provider.shutdown
    schema = f"b_{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(update={"database_schema": schema,
                                           "key_prefix": schema})
    try:
        async with open_state(settings, app) as state:
            stop = Shutdown(10)
            worker = asyncio.create_task(Worker(state).run(stop))
            await state.client.enqueue("noop", {})  # warm: connections, the first statement
            table = f"{schema}.tasks"
            await _until(state.pool, table, 1)
            began = time.perf_counter()
            for _ in range(n):
                await state.client.enqueue("noop", {})
            await _until(state.pool, table, n + 1)
            rate = n / (time.perf_counter() - began)
            stop.begin("bench over")
            await worker
            await state.pool.execute(f"DROP SCHEMA {schema} CASCADE")
            await state.redis.flushdb()
        return rate
    finally:
        if traced:
            from conveyor import tracing
            tracing.disable()
            assert close is not None
            close()


async def _until(pool: Any, table: str, count: int) -> None:
    sql = f"SELECT count(*) FROM {table} WHERE status = 'succeeded'"
    while True:
        if await pool.fetchval(sql) >= count:
            return
        await asyncio.sleep(0.01)


async def measure(args: argparse.Namespace, base: Path) -> None:
    postgres, redis = PostgresServer(base / "pg"), RedisServer(base / "redis")
    postgres.start()
    redis.start()
    try:
        settings = Settings(database_url=postgres.dsn, redis_url=redis.url, concurrency=10,
                            log_level="warning", log_format="json")
        modes = ["off", "on"] if HAS_TRACING else ["off"]
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                rates[mode].append(await e2e(settings, args.n, traced=mode == "on"))
    finally:
        redis.stop()
        postgres.stop()
    print(f"e2e, {args.n} tasks enqueued one by one (Client.enqueue), worker concurrency 10, "
          f"{args.rounds} rounds:")
    for mode, values in rates.items():
        figures = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {args.label} tracing {mode}: median {statistics.median(values):,.0f} tasks/s "
              f"({figures})")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tracing_cost",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="tasks per round (default 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per mode (default 5)")
    ap.add_argument("--label", default="this tree", help="name of the tree in the output")
    args = ap.parse_args()
    import logging

    from conveyor import logs
    logs.configure("warning", "json")
    logging.getLogger().setLevel(logging.WARNING)
    for name, ns in hooks_ns().items():
        print(f"tracing off, {name}: {ns:,.0f} ns")
    base = Path(tempfile.mkdtemp(prefix="conveyor-bench-tracing-"))
    base.chmod(0o755)
    try:
        asyncio.run(measure(args, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
