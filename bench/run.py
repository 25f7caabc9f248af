"""The Conveyor benchmark: Conveyor's doors and the peers, the same workload, one table.

    python -m bench            # from the repo root; see bench/README.md

Every row, Conveyor's and the peers', is measured by `bench.harness.run_once` (enqueue with
no worker; drain by one fresh worker; e2e with a warm worker), round-robin over the runs, and
rendered by its `render`; peers whose libraries are not installed are skipped. Conveyor adds:
the HTTP doors' request rates and a batch-1000 enqueue, enqueue→start latency at half load,
the workers' peak RSS, a check that every task ended `succeeded` in Postgres, the goals, and
(with --profile) py-spy profiles of the worker and the API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata as md
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import harness as bp
from bench import sections
from bench.peers import all_peers as peer_rows

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEERS = ("raw-stream,saq,taskiq-stream,dramatiq,streaq,pgqueuer,pgqueuer-fast,"
                 "procrastinate")
# Each door in both deployments (split: the plain keys; `conveyor run`: conveyor-run-*), and
# the per-task client in the split deployment (the latency phase's pace is half its rate).
_DOOR_SUFFIXES = ("bulk", "http", "http-batch", "http-batch-1c", "http-batch500",
                  "http-batch500-1c")
DOORS = ",".join([*(f"conveyor-{d}" for d in _DOOR_SUFFIXES), "conveyor-client",
                  *(f"conveyor-run-{d}" for d in _DOOR_SUFFIXES)])
ALL_DOORS = [*DOORS.split(","), "conveyor-run-client"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="jobs per measurement (default 10000)")
    ap.add_argument("--runs", type=int, default=3, help="runs per row (default 3)")
    ap.add_argument("--peers", default=DEFAULT_PEERS,
                    help=f"peer keys, 'all' or 'none' (default {DEFAULT_PEERS}); peers not "
                    "installed are skipped (bench/requirements-peers.txt installs them)")
    ap.add_argument("--doors", default=DOORS,
                    help=f"Conveyor rows, or 'none' (default {DOORS}; also "
                         "conveyor-run-client)")
    ap.add_argument("--n-for", action="append", default=[], metavar="KEY=N",
                    help="override N for one row, e.g. rq=2000 (repeatable)")
    ap.add_argument("--concurrency", type=int, default=10,
                    help="worker concurrency, Conveyor's and the peers' (default 10)")
    ap.add_argument("--timeout", type=float, default=180,
                    help="seconds allowed per phase (default 180)")
    ap.add_argument("--http-connections", type=int, default=8,
                    help="keep-alive connections of the HTTP load generator (default 8)")
    ap.add_argument("--no-batch-1000", dest="batch_1000", action="store_false",
                    help="skip the enqueue-only figure of POST /v1/tasks/batch with 1000 tasks")
    ap.add_argument("--latency-seconds", type=float, default=10,
                    help="length of the paced latency phase; 0 skips it (default 10)")
    ap.add_argument("--latency-rate", type=float,
                    help="tasks/s of the latency phase (default: half the e2e median of the"
                    " door the producer uses: conveyor-client, or conveyor-bulk with batches)")
    ap.add_argument("--latency-batch", type=int, default=1,
                    help="tasks per enqueue call in the latency phase (default 1)")
    ap.add_argument("--profile", action="store_true",
                    help="after the runs, profile the worker (drain) and the API (single "
                         "POSTs) with py-spy")
    ap.add_argument("--profile-native", action="store_true",
                    help="py-spy --native: show C/Cython frames (uvloop, asyncpg, hiredis) too")
    ap.add_argument("--profile-n", type=int, default=20000,
                    help="tasks per profiled phase (default 20000)")
    ap.add_argument("--profile-dir", type=Path, default=REPO / "bench" / "results" / "profile")
    ap.add_argument("--no-analyze", dest="analyze", action="store_false",
                    help="skip the ANALYZE of the tasks table (holding N queued tasks) done "
                         "before the runs so that the planner has the statistics of a "
                         "long-lived table (they survive TRUNCATE); without it the runs start "
                         "on a never analyzed table until autovacuum analyzes it")
    ap.add_argument("--pg-unsafe", action="store_true",
                    help="start the private PostgreSQL with fsync, synchronous_commit and "
                         "full_page_writes off (fast, NOT durable: a crash loses committed "
                         "tasks; every figure of the report is labelled so). Default: "
                         "PostgreSQL's durable defaults")
    ap.add_argument("--database-url", help="use this PostgreSQL instead of starting one")
    ap.add_argument("--redis-url",
                    help="use this Redis (it is FLUSHDB-ed!) instead of starting one")
    ap.add_argument("--schema", default="conveyor_bench", help="CONVEYOR_DATABASE_SCHEMA")
    ap.add_argument("--key-prefix", default="conveyor_bench", help="CONVEYOR_KEY_PREFIX")
    ap.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                    help="import src/ live instead of a copy taken at the start (then edits "
                         "made to src/ during the benchmark change what later runs measure)")
    scale = ap.add_argument_group("scale mode (bench/scale.py; durable Postgres)")
    scale.add_argument("--scale", action="store_true",
                       help="run the scale benchmark instead of the peer table")
    scale.add_argument("--rows", type=int, default=10_000_000,
                       help="finished tasks in the large table (0 skips; default 10,000,000)")
    scale.add_argument("--scale-n", type=int, default=20_000,
                       help="tasks per e2e run in scale mode (default 20,000)")
    scale.add_argument("--compare-rows", type=int, default=2_000_000,
                       help="finished tasks per layout compared (0 skips; default 2,000,000)")
    scale.add_argument("--soak-seconds", type=float, default=1800,
                       help="soak duration (0 skips; default 1800)")
    scale.add_argument("--soak-rate", type=float, default=500, help="soak tasks/s (500)")
    scale.add_argument("--soak-retention", type=float, default=60,
                       help="CONVEYOR_RETENTION_SUCCEEDED during the soak (60 s)")
    scale.add_argument("--scale-out", type=Path,
                       help="also write the scale report to this file")
    flow = ap.add_argument_group("flow mode (bench/flow.py)")
    flow.add_argument("--flow", action="store_true",
                      help="cost of an unlimited type and throughput at limits, then exit")
    flow.add_argument("--flow-n", type=int, default=5000, help="tasks per flow round (5000)")
    flow.add_argument("--flow-before", type=Path,
                      help="a checkout without flow control, for the unlimited type's figure")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="also write every run's raw figures here")
    ap.add_argument("--logdir", type=Path, default=Path("/tmp/conveyor-bench-logs"))
    ui = ap.add_argument_group("dashboard mode (bench/ui_pages.py; durable Postgres)")
    ui.add_argument("--ui", action="store_true",
                    help="time every dashboard page on a large tasks table instead")
    ui.add_argument("--ui-rows", type=int, default=10_000_000,
                    help="finished tasks in the table (default 10,000,000)")
    ui.add_argument("--ui-requests", type=int, default=30, help="requests per page (30)")
    ap.add_argument("--topologies", action="store_true",
                    help="instead of the table: drain throughput of 1, 2, 4 worker processes on "
                         "one Redis and on a Redis Cluster of 3+3 nodes (bench/topologies.py); "
                         "uses --n, --concurrency, --timeout, --logdir")
    ap.add_argument("--topology-processes", default="1,2,4",
                    help="worker process counts of --topologies (default 1,2,4)")
    ap.add_argument("--topology-types", type=int, default=1, choices=range(1, 9),
                    help="task types the --topologies tasks are spread over (default 1)")
    flows = ap.add_argument_group("workflow mode (bench/workflows.py)")
    flows.add_argument("--workflows", action="store_true",
                       help="instead of the table: a fan-out/fan-in workflow against as many "
                            "independent tasks (uses --runs, --out)")
    flows.add_argument("--workflow-nodes", type=int, default=10_000,
                       help="nodes of the workflow, and independent tasks (default 10,000)")
    return ap.parse_args(argv)


@contextlib.contextmanager
def private_servers(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """PostgreSQL and redis-server on 127.0.0.1 (unless URLs are given); stopped at exit."""
    import shutil

    from conveyor.testing.servers import PostgresServer, RedisServer

    info: dict[str, Any] = {"database_url": args.database_url, "redis_url": args.redis_url,
                            "pids": {}}
    with contextlib.ExitStack() as stack:
        if not (args.database_url and args.redis_url):
            scratch = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
            scratch.chmod(0o755)  # Postgres runs as `postgres`
            stack.callback(shutil.rmtree, scratch, True)
            if not args.database_url:
                pg = PostgresServer(scratch / "postgres", durable=not args.pg_unsafe)
                stack.callback(pg.stop)
                pg.start()
                info["database_url"] = pg.dsn
                info["postgres_data_dir"] = pg.data_dir
            if not args.redis_url:
                rs = RedisServer(scratch / "redis", persistent=False)
                stack.callback(rs.stop)
                rs.start()
                info["redis_url"] = rs.url
                assert rs.process is not None
                info["pids"]["redis"] = rs.process.pid
        yield info


def git_describe() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}{' + uncommitted changes in src/' if dirty else ''}"


def versions(dists: list[str]) -> str:
    out = []
    for d in dists:
        try:
            out.append(f"{d} {md.version(d)}")
        except md.PackageNotFoundError:
            out.append(f"{d} ?")
    return ", ".join(out)


def durability_note(args: argparse.Namespace) -> str:
    if args.pg_unsafe:
        return ("**NOT durable** (`--pg-unsafe`): private cluster with fsync=off, "
                "synchronous_commit=off, full_page_writes=off; a crash of the server loses "
                "committed tasks")
    return ("**durable**: private cluster with PostgreSQL's defaults (fsync, "
            "synchronous_commit and full_page_writes on: every commit is on disk before it "
            "returns, but Conveyor's starts, which it commits asynchronously by default, "
            "`CONVEYOR_START_COMMIT=async`: a crash can make a task started in its last "
            "moments run again, never lose it)")


async def postgres_durability(url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT name, setting FROM pg_settings WHERE name IN "
                                "('fsync', 'synchronous_commit', 'full_page_writes') "
                                "ORDER BY name")
    finally:
        await conn.close()
    return ", ".join(f"{r['name']}={r['setting']}" for r in rows)


async def postgres_version(url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flow:
        from bench import flow
        return flow.main(["--n", str(args.flow_n), "--rounds", str(args.runs), "--out",
                          str(args.out), *(["--before", str(args.flow_before)]
                                           if args.flow_before else [])])
    if args.topologies:
        from bench import topologies
        return topologies.main(args)
    if args.workflows:
        from bench import workflows
        command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with private_servers(args) as servers:
            return workflows.main(args, servers, command, durability_note(args))
    if args.ui:
        from bench import ui_pages
        args.command = shlex.join([Path(sys.executable).as_posix(), "-m", "bench",
                                   *(sys.argv[1:] if argv is None else argv)])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so its servers are stopped
        return ui_pages.run(args)
    if args.scale:
        args.command = shlex.join([Path(sys.executable).as_posix(), "-m", "bench",
                                   *(sys.argv[1:] if argv is None else argv)])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so its servers are stopped
        from bench import scale
        return scale.run(args)
    all_peers = peer_rows()
    wanted = ("" if args.peers == "none" else ",".join(all_peers) if args.peers == "all"
              else args.peers)
    peer_keys = [k for k in wanted.split(",") if k]
    door_keys = [k for k in ("" if args.doors == "none" else args.doors).split(",") if k]
    unknown = ([k for k in peer_keys if k not in all_peers]
               + [k for k in door_keys if k not in ALL_DOORS])
    if unknown:
        print(f"unknown rows: {', '.join(unknown)}; peers: {', '.join(all_peers)}; "
              f"doors: {', '.join(ALL_DOORS)}", file=sys.stderr)
        return 2
    for key in list(peer_keys):
        why = all_peers[key].missing()
        if why:
            print(f"skipping peer {key}: {why} in {sys.executable} "
                  "(pip install -r bench/requirements-peers.txt)", flush=True)
            peer_keys.remove(key)
    n_for = {k: int(v) for k, v in (item.split("=", 1) for item in args.n_for)}
    # Every file the run writes gets its folder now, not after the first row's minutes.
    for target in (args.logdir, args.out.parent, *([args.json.parent] if args.json else [])):
        target.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).as_posix(), "-m", "bench",
                          *(sys.argv[1:] if argv is None else argv)])

    # SIGTERM becomes SystemExit, so that every `finally` stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with src_snapshot(args.snapshot) as src, private_servers(args) as servers:
            servers["src"] = src
            return Bench(args, (door_keys, peer_keys), n_for, servers, command).run()
    except KeyboardInterrupt:  # everything started is stopped by now
        print(f"interrupted; partial results in {args.out}", file=sys.stderr)
        return 130


@contextlib.contextmanager
def src_snapshot(enabled: bool) -> Iterator[str]:
    """Copy src/conveyor and import Conveyor from the copy, here and (PYTHONPATH) in every
    worker and API process, so that src/ edited during the benchmark does not change what is
    measured. Yields a description for the report."""
    import hashlib
    import shutil

    live = REPO / "src" / "conveyor"
    if not enabled:
        yield f"imported live from {live} (`--no-snapshot`)"
        return
    if "conveyor" in sys.modules:
        raise RuntimeError("conveyor was imported before its snapshot was taken")
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-src-"))
    try:
        shutil.copytree(live, tmp / "conveyor", ignore=shutil.ignore_patterns("__pycache__"))
        digest = hashlib.sha1()
        for path in sorted((tmp / "conveyor").rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(tmp).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
        sys.path.insert(0, str(tmp))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(tmp), os.environ.get("PYTHONPATH")) if p)
        import conveyor

        if not Path(conveyor.__file__ or "").is_relative_to(tmp):
            raise RuntimeError(f"conveyor imported from {conveyor.__file__}, not the snapshot")
        yield (f"a copy of src/conveyor taken at the start (sha1 {digest.hexdigest()[:12]}), "
               "imported by every Conveyor process of the run")
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


class Bench:
    """One benchmark: the rows, their results, the extra Conveyor phases, the report."""

    def __init__(self, args: argparse.Namespace, rows_keys: tuple[list[str], list[str]],
                 n_for: dict[str, int], servers: dict[str, Any], command: str) -> None:
        from conveyor.config import Settings

        self.args, self.n_for, self.servers, self.command = args, n_for, servers, command
        db_url, redis_url = servers["database_url"], servers["redis_url"]
        bp.SETUP.redis_url, bp.SETUP.concurrency = redis_url, args.concurrency
        from bench.pg_peer_apps import URL_ENV

        os.environ.update({
            URL_ENV: db_url,  # the PostgreSQL peers' databases are on this server
            "CONVEYOR_DATABASE_URL": db_url, "CONVEYOR_REDIS_URL": redis_url,
            "CONVEYOR_DATABASE_SCHEMA": args.schema, "CONVEYOR_KEY_PREFIX": args.key_prefix,
            "CONVEYOR_LOG_LEVEL": "warning", "CONVEYOR_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join(
                p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p),
        })
        from conveyor import logs

        logs.configure("warning")  # this process's Conveyor client logs, like the processes'
        settings = Settings(database_url=db_url, redis_url=redis_url,
                            database_schema=args.schema, key_prefix=args.key_prefix,
                            log_level="warning")

        from bench import doors

        self.ctx = doors.Context(settings, timeout=args.timeout,
                                 http_connections=args.http_connections)
        self.doors: dict[str, Any] = doors.make_doors(self.ctx)
        door_keys, peer_keys = rows_keys
        all_peers = bp.all_peers()
        self.rows: dict[str, Any] = {**{k: self.doors[k] for k in door_keys},
                                     **{k: all_peers[k] for k in peer_keys}}
        self.door_keys = door_keys
        self.results: dict[str, list[dict[str, Any]]] = {k: [] for k in self.rows}
        self.latency: dict[str, Any] | None = None
        self.profiles: list[dict[str, Any]] = []
        self.failed = 0
        self.workload_us: float | None = None  # the task body's CPU (bench.cpu.workload_us)
        from bench.procs import ForeignLoad

        self.cpu_start, self.load_start = bp.cpu_jiffies(), ForeignLoad.now()
        self.facts = self.machine_facts()
        if "postgres_data_dir" in servers:
            from bench.procs import postmaster_pid

            pm = postmaster_pid(servers["postgres_data_dir"])
            if pm:
                servers["pids"]["postgres"] = pm

    def machine_facts(self) -> list[str]:
        import redis

        args = self.args
        r = redis.Redis.from_url(self.servers["redis_url"])
        try:
            peers_facts: list[str] = bp.machine_facts(r)
        finally:
            r.close()
        pg_version = asyncio.run(postgres_version(self.servers["database_url"]))
        pg_note = (durability_note(self.args) if "postgres_data_dir" in self.servers
                   else "given by --database-url; its durability settings: "
                   + asyncio.run(postgres_durability(self.servers["database_url"])))
        return [
            *peers_facts,
            f"- Conveyor {versions(['conveyor'])} (git {git_describe()}; src/: "
            f"{self.servers['src']}); PostgreSQL "
            f"{pg_version} ({pg_note}), shared by Conveyor and the PostgreSQL peers (a "
            "database each); " + versions(
                ["asyncpg", "fastapi", "starlette", "uvicorn", "uvloop", "pydantic", "orjson"]),
            f"- Conveyor, split deployment: `conveyor worker --app bench.app:app --concurrency "
            f"{args.concurrency}`, `conveyor cron`, and `conveyor api --app bench.app:app` for "
            "the HTTP doors; run deployment: `conveyor run` (all in one); "
            "CONVEYOR_LOG_LEVEL=warning; HTTP load: "
            f"{args.http_connections} keep-alive connections from the driver process",
            "- Postgres planner statistics of the tasks table: "
            + (f"ANALYZE of the table holding {args.n} queued tasks before the runs (column "
               "statistics survive TRUNCATE), as autovacuum would have done on a live table"
               if args.analyze else "none at the start (`--no-analyze`: a fresh, never "
               "analyzed table until autovacuum analyzes it during the run)"),
        ]

    def api(self, log_path: Path) -> contextlib.AbstractContextManager[Any]:
        from bench.procs import api_server

        argv = [str(bp.BIN / "conveyor"), "api", "--app", "bench.app:app"]
        return api_server(argv, dict(os.environ), REPO, log_path, bp.stop_worker,
                          timeout=self.args.timeout)

    def write(self) -> str:
        from bench.procs import ForeignLoad
        from bench.report import render

        args = self.args
        steal = bp.steal_pct(self.cpu_start, bp.cpu_jiffies())
        foreign = [x["foreign_pct"] for runs in self.results.values() for x in runs
                   if "foreign_pct" in x]
        overall = ForeignLoad.now().pct_since(self.load_start)
        others = (f"- CPU used by processes outside this benchmark (other users of the "
                  f"machine), share of all CPU time: {overall:.0f}% overall, at most "
                  f"{max(foreign):.0f}% in one run" if foreign else "")
        durability = ("NOT durable (fsync=off)" if args.pg_unsafe else "durable") if (
            "postgres_data_dir" in self.servers) else "given (--database-url)"
        ns = argparse.Namespace(n=args.n, runs=args.runs, n_for=self.n_for,
                                durability=durability, workload_us=self.workload_us)
        facts = [*self.facts, f"- CPU steal during the benchmark: {steal:.0f}%",
                 *([others] if others else [])]
        text = render(self.results, self.rows, ns, facts, self.command, self.latency,
                      self.profiles)
        args.out.write_text(sections.kept(args.out, text))
        if args.json:
            profiles = [{**p, "profile": p["profile"].as_dict(25)} if "profile" in p else p
                        for p in self.profiles]
            args.json.write_text(json.dumps(
                {"n": args.n, "runs": args.runs, "concurrency": args.concurrency,
                 "command": self.command, "date": dt.datetime.now().astimezone().isoformat(),
                 "results": self.results, "latency": self.latency, "profiles": profiles},
                indent=1, default=str))
        return text

    def conveyor_run(self, door: Any, n: int, log_path: Path) -> dict[str, Any]:
        """harness.run_once for a Conveyor row, in its deployment (`bench.deploy`)."""
        from bench.cpu import CpuWorkers
        from bench.deploy import Deployment
        from bench.procs import peak_rss_mb

        args, ctx = self.args, self.ctx
        with Deployment(ctx, door, log_path, args.timeout) as deployment:
            watched = WatchedWorkers(ctx, deployment)
            workers = CpuWorkers(watched, self.servers["pids"], deployment.pids)
            res: dict[str, Any] = bp.run_once(door, n, args.timeout, log_path, workers)
            if door.key == "conveyor-http-batch" and args.batch_1000:
                res.update(batch_1000(ctx, n, args.timeout))
            api_pid = deployment.api_hwm_pid()
            if api_pid is not None:
                res["api_hwm_mb"] = peak_rss_mb(api_pid)
        stops = watched.stops
        res["cpu"] = workers.phases
        res["requests"] = door.requests_for(n)
        res["worker_hwm_mb"] = [s["hwm_mb"] for s in stops]
        res["postgres"] = [s["statuses"] for s in stops]
        res["checks_failed"] = check_run(res, n)
        return res

    def peer_run(self, peer: Any, n: int, log_path: Path) -> dict[str, Any]:
        """harness.run_once for a peer, with the CPU of its worker and of the servers."""
        from bench.cpu import CpuWorkers

        workers = CpuWorkers(bp.PlainWorkers(), self.servers["pids"])
        res: dict[str, Any] = bp.run_once(peer, n, self.args.timeout, log_path, workers)
        res["cpu"] = workers.phases
        return res

    def runs(self) -> str:
        """Round-robin: run 1 of every row, then run 2, ..."""
        from bench.procs import ForeignLoad

        text = ""
        for i in range(1, self.args.runs + 1):
            for key, row in self.rows.items():
                n = self.n_for.get(key, self.args.n)
                log_path = self.args.logdir / f"{key}-run{i}.log"
                cpu_before, load_before = bp.cpu_jiffies(), ForeignLoad.now()
                try:
                    res = (self.conveyor_run(row, n, log_path) if key in self.doors
                           else self.peer_run(row, n, log_path))
                except Exception as exc:  # record and go on with the next row
                    res = {"error": f"{type(exc).__name__}: {exc} (log: {log_path})"}
                res["steal_pct"] = bp.steal_pct(cpu_before, bp.cpu_jiffies())
                res["foreign_pct"] = ForeignLoad.now().pct_since(load_before)
                self.results[key].append(res)
                if key in self.doors and ("error" in res or res.get("checks_failed")):
                    self.failed += 1
                summary = res.get("error") or "  ".join(
                    f"{k}={v:.3f}" for k, v in res.items() if k.endswith("_s")
                    and isinstance(v, float))
                print(f"{row.name:58} run {i}: {summary}  steal={res['steal_pct']:.0f}%  "
                      f"others={res['foreign_pct']:.0f}%", flush=True)
                text = self.write()
        return text

    def seed_statistics(self) -> None:
        """--analyze: N queued tasks, ANALYZE, then empty again (the statistics stay); the
        same for each PostgreSQL peer's tables."""
        import redis

        from bench import doors
        from bench.pg_peers import PgPeer

        r = redis.Redis.from_url(self.servers["redis_url"])
        try:
            r.flushdb()
            with bp.deadline(self.args.timeout, "--analyze"):
                doors.ClientDoor(self.ctx, bp.BATCH).enqueue(self.args.n)
            asyncio.run(doors.analyze(self.ctx))
            seeded = set()
            for key, row in self.rows.items():
                if isinstance(row, PgPeer) and row.lib not in seeded:
                    r.flushdb()
                    try:
                        with bp.deadline(self.args.timeout, f"--analyze {key}"):
                            row.seed_statistics(self.args.n)
                        seeded.add(row.lib)
                    except Exception as exc:  # its runs will fail and say why
                        print(f"{key}: seeding its statistics failed: {exc}", flush=True)
        finally:
            r.flushdb()
            r.close()

    def run(self) -> int:
        from bench.cpu import workload_us

        self.workload_us = workload_us(self.servers["redis_url"])
        print(f"the workload's INCR costs its process {self.workload_us:.0f} µs of CPU",
              flush=True)
        if self.args.analyze:
            self.seed_statistics()
        text = self.runs()
        args = self.args
        if self.door_keys and args.latency_seconds > 0:
            self.latency = latency_phase(args, self.ctx, self.doors, self.door_keys,
                                         self.results)
            print(f"latency: {json.dumps(self.latency, default=str)}", flush=True)
            if "error" in self.latency or self.latency.get("checks_failed"):
                self.failed += 1
            text = self.write()
        if args.profile:
            self.profiles = profile_phase(args, self.ctx, self.doors, self.servers, self.api)
            for p in self.profiles:
                print(f"profile: {p['what']}: {p.get('error') or p['raw']}", flush=True)
            text = self.write()
        print("\n" + text)
        print(f"written: {args.out}", flush=True)
        return 1 if self.failed else 0


class WatchedWorkers:
    """The workers of a Conveyor row's `run_once`: each worker's VmHWM is read just before
    it is stopped and, once it has stopped, its tasks are counted per status in Postgres."""

    def __init__(self, ctx: Any, inner: bp.Workers) -> None:
        self.ctx, self.inner = ctx, inner
        self.stops: list[dict[str, Any]] = []

    def start(self, peer: bp.Peer, n: int, log_path: Path) -> subprocess.Popen[bytes]:
        return self.inner.start(peer, n, log_path)

    def began(self, phase: str) -> None:
        self.inner.began(phase)

    def ended(self, phase: str, jobs: int) -> None:
        self.inner.ended(phase, jobs)

    def stop(self, proc: subprocess.Popen[bytes]) -> bool:
        from bench.doors import status_counts
        from bench.procs import peak_rss_mb

        record: dict[str, Any] = {"hwm_mb": peak_rss_mb(proc.pid)}
        clean = self.inner.stop(proc)
        try:
            record["statuses"] = asyncio.run(asyncio.wait_for(status_counts(self.ctx), 30))
        except Exception as exc:
            record["statuses"] = {"error": f"{type(exc).__name__}: {exc}"}
        self.stops.append(record)
        return clean


def check_run(res: dict[str, Any], n: int) -> list[str]:
    """Postgres must hold exactly the tasks of the phase, all succeeded."""
    failed = []
    expected = [{"succeeded": n}, {"succeeded": n + 1}]  # drain; e2e (+ the warm-up task)
    for phase, want, got in zip(("drain", "e2e"), expected, res["postgres"], strict=False):
        if got != want:
            failed.append(f"Postgres after {phase}: {got}, expected {want}")
    if len(res["postgres"]) != 2:
        failed.append(f"{len(res['postgres'])} worker stops seen, expected 2")
    if res.get("b1000_postgres") not in (None, {"queued": n}):
        failed.append(f"Postgres after batch-1000 enqueue: {res['b1000_postgres']}, "
                      f"expected {{'queued': {n}}}")
    if "b1000_error" in res:
        failed.append(f"batch-1000 enqueue: {res['b1000_error']}")
    return failed


def batch_1000(ctx: Any, n: int, timeout: float) -> dict[str, Any]:
    """Enqueue only, POST /v1/tasks/batch with 1000 tasks per request, on the running API."""
    import redis

    from bench import doors as doors_mod

    r = redis.Redis.from_url(bp.SETUP.redis_url)
    big = doors_mod.HttpDoor(ctx, 1000)
    try:
        r.flushdb()
        with bp.deadline(timeout, "batch-1000 enqueue"):
            t0, t1 = big.enqueue(n)
        counts = asyncio.run(doors_mod.status_counts(ctx))
        return {"enqueue_b1000_s": t1 - t0, "requests_b1000": big.requests_for(n),
                "b1000_postgres": counts}
    except Exception as exc:
        return {"b1000_error": f"{type(exc).__name__}: {exc}"}
    finally:
        r.flushdb()
        r.close()


def latency_phase(args: argparse.Namespace, ctx: Any, doors: dict[str, Any],
                  door_keys: list[str], results: dict[str, list[dict[str, Any]]]
                  ) -> dict[str, Any]:
    from bench.latency import run_latency
    from bench.report import best_e2e

    # Half load is half the maximum of the door the producer enqueues through: per-task
    # enqueues (batch 1) cost more per task than bulk ones, so half the bulk door's rate can be
    # more than per-task arrivals sustain, and the figure would measure a growing backlog.
    door_key = "conveyor-bulk" if args.latency_batch > 1 else "conveyor-client"
    own = best_e2e(results, [door_key]) if door_key in door_keys else None
    best = own or best_e2e(results, door_keys)
    if args.latency_rate:
        rate, basis = args.latency_rate, f"{2 * args.latency_rate:,.0f}/s (--latency-rate)"
    elif best:
        rate = best[1] / 2
        which = "the e2e median of the door it enqueues through" if own else (
            "the best Conveyor e2e median")
        basis = f"{best[1]:,.0f}/s, {which} ({doors[best[0]].name})"
    else:
        return {"error": "no Conveyor e2e rate measured to pace at"}
    door = doors[door_key]
    try:
        res = run_latency(ctx, door, rate, args.latency_seconds,
                          args.logdir / "conveyor-latency.log", batch=args.latency_batch)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "rate": rate, "basis": basis}
    res["basis"] = basis
    try:  # the enqueue-and-wait round trip at the same rate
        res["wait"] = run_latency(ctx, door, rate, args.latency_seconds,
                                  args.logdir / "conveyor-wait.log", wait=True)
    except Exception as exc:
        res["wait"] = {"error": f"{type(exc).__name__}: {exc}"}
    checks = []
    if res["done"] != res["count"]:
        checks.append(f"{res['done']} completions counted for {res['count']} tasks")
    if res["samples"] != res["count"]:
        checks.append(f"{res['samples']} latency samples for {res['count']} tasks")
    res["checks_failed"] = checks
    return res


def profile_phase(args: argparse.Namespace, ctx: Any, doors: dict[str, Any],
                  servers: dict[str, Any], api: Callable[[Path], Any]) -> list[dict[str, Any]]:
    from bench.profile import find_py_spy, profile_api, profile_drain

    spy = find_py_spy()
    if spy is None:
        return [{"what": "profiles", "error": "py-spy not found: pip install py-spy"}]
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    server_pids: dict[str, int] = servers["pids"]
    out = []
    try:
        out.append(profile_drain(ctx, doors["conveyor-bulk"], args.profile_n, args.profile_dir,
                                 spy, server_pids, args.logdir / "conveyor-profile-worker.log",
                                 native=args.profile_native))
    except Exception as exc:
        out.append({"what": "conveyor worker, drain", "error": f"{type(exc).__name__}: {exc}"})
    try:
        with api(args.logdir / "conveyor-profile-api.log") as proc:
            ctx.api = (proc.host, proc.port)
            try:
                out.append(profile_api(ctx, doors["conveyor-http"], args.profile_n,
                                       args.profile_dir, spy, server_pids, proc,
                                       native=args.profile_native))
            finally:
                ctx.api = None
    except Exception as exc:
        out.append({"what": "conveyor api, single POSTs", "error": f"{type(exc).__name__}: {exc}"})
    return out


if __name__ == "__main__":
    sys.exit(main())
