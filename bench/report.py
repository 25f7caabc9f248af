"""BENCHMARKS.md: the harness's `render` of every row (Conveyor's and the peers'), with
Conveyor's figures (HTTP doors, latency, memory, Postgres checks, goals, profiles) and every
row's CPU time per task per process (`bench.cpu`) added."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness as bp

_REPO = Path(__file__).resolve().parents[1]

GOAL_VS_REDIS = 2.0  # e2e, best door, against the fastest Redis peer
GOAL_VS_POSTGRES = 1.5  # ... against the fastest PostgreSQL peer
GOAL_BATCH_VS_ANY = 1.2  # HTTP batch door, split deployment, against the fastest peer
GOAL_WORKER_US = 50.0
GOAL_POSTGRES_US = 40.0
GOAL_SINGLE_POST_REQ_S = 3_000
GOAL_P99_MS = 20.0
GOAL_RSS_MB = 100.0
PROCESSES = ("driver", "api", "worker", "cron", "postgres", "redis")
CPU_ROW = "conveyor-bulk"  # whose worker and Postgres CPU the goals quote
DASH = bp.DASH  # what the table shows for "no value"


def is_door(key: str) -> bool:
    return key.startswith("conveyor-")


def is_split_door(key: str) -> bool:
    return is_door(key) and not key.startswith("conveyor-run-")


def door_keys(rows: dict[str, Any]) -> list[str]:
    return [k for k in rows if is_door(k)]


def ok_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [x for x in runs if "error" not in x]


def median_rate(runs: list[dict[str, Any]], kind: str) -> float | None:
    values: list[float] = bp.rates(ok_runs(runs))[kind]
    return statistics.median(values) if values else None


def fmt(value: float | None, unit: str = "") -> str:
    return DASH if value is None else f"{value:,.0f}{unit}"


@dataclass
class Goal:
    what: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return {True: "**met**", False: "**not met**", None: "not measured"}[self.met]


def best_e2e(results: dict[str, list[dict[str, Any]]], keys: list[str]
             ) -> tuple[str, float] | None:
    rated = [(k, r) for k in keys if (r := median_rate(results[k], "e2e")) is not None]
    return max(rated, key=lambda kr: kr[1]) if rated else None


def peer_keys(rows: dict[str, Any], backend: str | None = None) -> list[str]:
    """The peers (raw baselines are not peers), of one backend or all."""
    return [k for k, row in rows.items() if not is_door(k) and not k.startswith("raw-")
            and (backend is None or getattr(row, "backend", "redis") == backend)]


def cpu_per_task(runs: list[dict[str, Any]], phase: str) -> dict[str, float]:
    """Median µs of CPU per task of each process in `phase` over the runs that have it."""
    values: dict[str, list[float]] = {}
    for x in ok_runs(runs):
        window = x.get("cpu", {}).get(phase)
        if not window:
            continue
        for name, seconds in window["cpu_s"].items():
            values.setdefault(name, []).append(1e6 * seconds / window["jobs"])
    return {name: statistics.median(v) for name, v in values.items()}


def _vs(ours: tuple[str, float] | None, theirs: tuple[str, float] | None,
        rows: dict[str, Any], factor: float, what: str) -> Goal:
    target = f"≥ {factor:.1f}x"
    if not ours or not theirs:
        return Goal(what, target, f"{fmt_best(ours, rows)}; {fmt_best(theirs, rows)}", None)
    ratio = ours[1] / theirs[1]
    return Goal(what, target, f"{fmt_best(ours, rows)} vs {fmt_best(theirs, rows)}: "
                f"{ratio:.2f}x", ratio >= factor)


def fmt_best(best: tuple[str, float] | None, rows: dict[str, Any]) -> str:
    return f"{best[1]:,.0f}/s ({rows[best[0]].name})" if best else f"{DASH} (not in this run)"


def wait_rows(wait: dict[str, Any] | None) -> list[str]:
    """The enqueue-and-wait round trip: `Client.enqueue()` then `Client.wait()` per task."""
    if not wait:
        return []
    if "error" in wait:
        return [f"Enqueue-and-wait round trip: failed: {wait['error']}", ""]
    return [
        "Enqueue-and-wait round trip (`Client.enqueue()` then `Client.wait()` for the task's "
        "end, fed by the events stream; from before the enqueue to the answer), at the same "
        f"rate: {wait['count']:,} tasks, achieved {wait['achieved_rate']:,.0f}/s.", "",
        "| round trip p50 ms | p99 ms | completion→waiter p50 ms | p99 ms "
        "| enqueue→start p50 ms | p99 ms |", "|---|---|---|---|---|---|",
        f"| {wait['enqueue_p50_ms']:.1f} | {wait['enqueue_p99_ms']:.1f} "
        f"| {_ms(wait.get('wake_p50_ms'))} | {_ms(wait.get('wake_p99_ms'))} "
        f"| {wait['p50_ms']:.1f} | {wait['p99_ms']:.1f} |", "",
        "*completion→waiter*: from the task's `finished_at` (Postgres's clock, before the "
        "outcome's commit) to the waiter's answer.", ""]


def _ms(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}"


def goals(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any],
          latency: dict[str, Any] | None, workload: float | None = None) -> list[Goal]:
    """The issue's goals; `workload`: µs of CPU the task body costs (bench.cpu.workload_us),
    taken off the worker's figure for its own cost."""
    doors = door_keys(rows)
    ours = best_e2e(results, doors)
    out = [
        _vs(ours, best_e2e(results, peer_keys(rows, "redis")), rows, GOAL_VS_REDIS,
            "e2e, one worker, best door: against the fastest Redis peer"),
        _vs(ours, best_e2e(results, peer_keys(rows, "postgres")), rows, GOAL_VS_POSTGRES,
            "e2e, one worker, best door: against the fastest PostgreSQL peer"),
        _vs(best_e2e(results, [k for k in doors if is_split_door(k) and "http-batch" in k]),
            best_e2e(results, peer_keys(rows)), rows, GOAL_BATCH_VS_ANY,
            "e2e through `POST /v1/tasks/batch`, split deployment: against the fastest peer "
            "of any kind"),
    ]
    name = rows[CPU_ROW].name if CPU_ROW in rows else CPU_ROW
    runs = results.get(CPU_ROW, [])
    drain, e2e, enq = (cpu_per_task(runs, p) for p in ("drain", "e2e", "enqueue"))
    worker = drain.get("worker")
    own = None if worker is None or workload is None else worker - workload
    out.append(Goal(f"worker's own CPU per task, draining ({name}), without the workload's "
                    "INCR", f"≤ {GOAL_WORKER_US:.0f} µs",
                    DASH if worker is None else f"{worker:,.0f} µs measured"
                    + (f" minus {workload:,.0f} µs the INCR (measured alone) = **{own:,.0f} µs**"
                       if own is not None else ""),
                    None if own is None else own <= GOAL_WORKER_US))
    pg = e2e.get("postgres")
    parts = (f" (enqueue alone {enq['postgres']:,.0f} µs, drain alone — start and outcome — "
             f"{drain['postgres']:,.0f} µs)" if "postgres" in enq and "postgres" in drain
             else "")
    out.append(Goal(f"Postgres CPU per task, e2e: insert, start and outcome ({name})",
                    f"≤ {GOAL_POSTGRES_US:.0f} µs",
                    DASH if pg is None else f"{pg:,.0f} µs{parts}",
                    None if pg is None else pg <= GOAL_POSTGRES_US))
    single = None
    if "conveyor-http" in results:
        ok = ok_runs(results["conveyor-http"])
        req = [x["requests"] / x["enqueue_s"] for x in ok if "requests" in x]
        single = statistics.median(req) if req else None
    out.append(Goal("single `POST /v1/tasks` (split deployment): requests per second",
                    f"≥ {GOAL_SINGLE_POST_REQ_S:,}/s", fmt(single, "/s"),
                    None if single is None else single >= GOAL_SINGLE_POST_REQ_S))
    p99 = latency.get("p99_ms") if latency else None
    out.append(Goal("enqueue→start p99 at half the maximum e2e rate (of the producer's door)",
                    f"≤ {GOAL_P99_MS:.0f} ms",
                    DASH if p99 is None else f"{p99:.1f} ms at {latency['achieved_rate']:,.0f}/s"
                    if latency else DASH, None if p99 is None else p99 <= GOAL_P99_MS))
    rss = peak_worker_rss(results, latency)
    out.append(Goal("`conveyor worker` peak RSS (VmHWM)", f"≤ {GOAL_RSS_MB:.0f} MB",
                    DASH if rss is None else f"{rss:.1f} MiB",
                    None if rss is None else rss <= GOAL_RSS_MB))
    return out


def worker_rss_values(results: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Peak RSS of the `conveyor worker` processes (the split deployment's rows)."""
    return [v for k in results if is_split_door(k) for x in results[k]
            for v in x.get("worker_hwm_mb", []) if v is not None]


def peak_worker_rss(results: dict[str, list[dict[str, Any]]],
                    latency: dict[str, Any] | None) -> float | None:
    values = worker_rss_values(results)
    if latency and latency.get("worker_hwm_mb") is not None:
        values.append(latency["worker_hwm_mb"])
    return max(values) if values else None


def pg_problems(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any]) -> list[str]:
    out = []
    for key in door_keys(rows):
        for i, x in enumerate(results.get(key, []), 1):
            out += [f"- {rows[key].name} run {i}: {p}" for p in x.get("checks_failed", [])]
    return out


def conveyor_section(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any],
                     latency: dict[str, Any] | None, n: int) -> list[str]:
    doors = door_keys(rows)
    if not doors:
        return []
    out = ["## Conveyor", "",
           "Every Conveyor task is a row in PostgreSQL: enqueue INSERTs and COMMITs it, then XADDs "
           "its id; the worker marks it running and records its outcome there (compare-and-set) "
           "before it XACKs. Two deployments: *split*, separate `conveyor api` (for the HTTP "
           "doors), `conveyor worker --app bench.app:app --concurrency "
           f"{bp.SETUP.concurrency}` and `conveyor cron` processes; *run*, `conveyor run` (API, "
           "worker and cron in one process; the enqueue phase, which has no worker, posts to "
           "`conveyor run --no-worker`). Log level warning; the `noop` handler calls the "
           "workload's `amark_done`. Postgres is emptied (TRUNCATE) whenever Redis is flushed.",
           ""]
    http = [k for k in doors if "-http" in k]
    if http:
        out += ["HTTP doors (load from this process over keep-alive HTTP/1.1 connections). "
                "Median (min-max) over the runs:", "",
                "| door | requests for N | enqueue requests/s | enqueue tasks/s | e2e tasks/s "
                "| API peak RSS MiB |", "|---|---|---|---|---|---|"]
        for key in http:
            ok = ok_runs(results[key])
            req = [x["requests"] / x["enqueue_s"] for x in ok]
            tasks = bp.rates(ok)
            hwm = [x["api_hwm_mb"] for x in ok if x.get("api_hwm_mb")]
            out.append(f"| {rows[key].name} | {ok[0]['requests'] if ok else DASH} | "
                       f"{bp.fmt_rate(req)} | {bp.fmt_rate(tasks['enqueue'])} | "
                       f"{bp.fmt_rate(tasks['e2e'])} | {f'{max(hwm):.0f}' if hwm else DASH} |")
        big = [x for x in ok_runs(results.get("conveyor-http-batch", []))
               if "enqueue_b1000_s" in x]
        if big:
            tasks_s = [x["n"] / x["enqueue_b1000_s"] for x in big]
            req_s = [x["requests_b1000"] / x["enqueue_b1000_s"] for x in big]
            out += ["", f"`POST /v1/tasks/batch` with **1000** tasks per request, enqueue only "
                    f"(no worker), N={n}: {bp.fmt_rate(tasks_s)} tasks/s, "
                    f"{bp.fmt_rate(req_s)} requests/s."]
        out.append("")
    if latency:
        if "error" in latency:
            out += [f"Enqueue→start latency: failed: {latency['error']}", ""]
        else:
            how = ("`Client.enqueue()` per task" if latency["batch"] == 1
                   else f"`Client.enqueue_many()` of ≤ {latency['batch']} due tasks per tick")
            out += [
                "Enqueue→start latency (`time.time()` in the handler minus the one taken just "
                "before the enqueue call, carried in the payload), one warm worker, a paced "
                f"open-loop producer ({how}, up to 64 in flight) at "
                f"{latency['rate']:,.0f} tasks/s = half of {latency['basis']}: "
                f"{latency['count']:,} tasks, achieved {latency['achieved_rate']:,.0f}/s; "
                f"other processes used {latency['foreign_pct']:.0f}% of the machine "
                "meanwhile.", "",
                "| p50 ms | p90 ms | p99 ms | max ms | samples | the enqueue call alone: p50 ms "
                "| p99 ms |", "|---|---|---|---|---|---|---|",
                f"| {latency['p50_ms']:.1f} | {latency['p90_ms']:.1f} | {latency['p99_ms']:.1f} "
                f"| {latency['max_ms']:.1f} | {latency['samples']} "
                f"| {latency['enqueue_p50_ms']:.1f} | {latency['enqueue_p99_ms']:.1f} |", ""]
            out += wait_rows(latency.get("wait"))
    values = worker_rss_values(results)
    by_phase: list[str] = []
    for label, i in (("drain", 0), ("e2e", 1)):
        phase = [v for k in doors for x in ok_runs(results[k])
                 for j, v in enumerate(x.get("worker_hwm_mb", [])) if j == i and v is not None]
        if phase:
            by_phase.append(f"{label} median {statistics.median(phase):.1f}, max {max(phase):.1f}")
    if latency and latency.get("worker_hwm_mb") is not None:
        by_phase.append(f"latency phase {latency['worker_hwm_mb']:.1f}")
    peak = peak_worker_rss(results, latency)
    if values or by_phase:
        out += [f"Worker peak RSS (VmHWM from /proc/<pid>/status, read just before SIGTERM): "
                f"**{peak:.1f} MiB** at most ({'; '.join(by_phase)}; MiB).", ""]
    problems = pg_problems(results, rows)
    out += ["Postgres after each phase: " + (
        "every task of every Conveyor run is `succeeded` in Postgres after each drain and e2e "
        "phase (N, and N + 1 with the warm-up task), and every batch-1000 task is `queued`; "
        "each completion was counted exactly once." if not problems else "problems:"), ""]
    if problems:
        out += [*problems, ""]
    return out


def cpu_section(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any],
                workload: float | None = None) -> list[str]:
    """µs of CPU per task per process and phase, medians over the runs."""
    out = ["## CPU per task", "",
           "µs of CPU (user + system, from /proc/<pid>/stat) per task, median over the runs, "
           "per process and phase. *driver*: this process (the client calls or the HTTP load "
           "generator); *api*: `conveyor api` (split) or, in the enqueue phase, `conveyor run "
           "--no-worker`; *worker*: the worker process and its children (for the *run* rows, "
           "`conveyor run`: API, worker and cron); *cron*: `conveyor cron`; *postgres*: the "
           "postmaster and its backends; *redis*: redis-server. Windows: *enqueue*, the "
           "enqueue call (no worker); *drain*, first completion seen to the N-th; *e2e*, first "
           "enqueue call to the N-th completion. The task body (INCR through redis-py) is in "
           "*worker*" + (f"; alone, awaited in a loop on uvloop, it costs "
                         f"{workload:,.0f} µs" if workload is not None else "") + ".", "",
           f"| row | phase | {' | '.join(PROCESSES)} | total |",
           "|---|---|" + "---|" * (len(PROCESSES) + 1)]
    for key, row in rows.items():
        for phase in ("enqueue", "drain", "e2e"):
            cpu = cpu_per_task(results.get(key, []), phase)
            if not cpu:
                continue
            cells = [f"{cpu[p]:,.0f}" if p in cpu else DASH for p in PROCESSES]
            out.append(f"| {row.name} | {phase} | {' | '.join(cells)} | "
                       f"{sum(cpu.values()):,.0f} |")
    return [*out, ""] if len(out) > 8 else []


def goals_section(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any],
                  latency: dict[str, Any] | None, workload: float | None = None) -> list[str]:
    if not door_keys(rows):
        return []
    out = ["## Goals", "", "Medians of this run, on the same Postgres as every row (see its "
           "durability above); e2e is the best Conveyor row against the fastest peer row "
           "(raw baselines are not peers); CPU per task is from /proc, see *CPU per task*.",
           "",
           "| goal | target | measured | verdict |", "|---|---|---|---|"]
    for g in goals(results, rows, latency, workload):
        out.append(f"| {g.what} | {g.target} | {g.measured} | {g.verdict} |")
    return [*out, ""]


def profile_section(profiles: list[dict[str, Any]], top: int = 15) -> list[str]:
    out = ["## Profiles (py-spy)", "",
           "A separate pass after the measured runs: `py-spy record --gil` at 100 Hz attached "
           "to the process (which slows it a little). Shares are of the samples in which the "
           "process held the GIL (idle waits left out); *busy* is that count against the "
           "samples the phase's wall time allows. *self*: the sampled frame itself (time in C "
           "code, e.g. uvloop's loop or asyncpg's protocol, is charged to the Python frame "
           "that called it unless `--profile-native`); *total*: Conveyor's functions, "
           "anywhere on the stack.", ""]
    for p in profiles:
        if "error" in p:
            out += [f"### {p['what']}", "", f"failed: {p['error']}", ""]
            continue
        prof = p["profile"]
        cpu = ", ".join(f"{k} {v:.2f} s" for k, v in p["cpu_s"].items())
        per_task = {k: 1e6 * v / p["jobs"] for k, v in p["cpu_s"].items()}
        out += [f"### {p['what']}", "",
                f"{p['jobs']:,} tasks in {p['wall_s']:.2f} s ({p['rate']:,.0f}/s under the "
                f"profiler); {prof.samples} samples, busy "
                f"{prof.samples / (p['rate_hz'] * p['wall_s']):.0%}; "
                f"raw stacks: `{_shown(p['raw'])}`.", "",
                f"CPU time during the phase: {cpu}. Per task: "
                + ", ".join(f"{k} {v:,.0f} µs" for k, v in per_task.items()) + ".", "",
                "Per task: Redis commands "
                + ", ".join(f"{k} {v:.2f}" for k, v in p["redis_per_task"].items() if v >= 0.005)
                + f"; Postgres transactions {p['pg_xacts_per_task']:.2f}. Other processes "
                f"used {p['foreign_pct']:.0f}% of the machine meanwhile.", "",
                "| by package (self) | % | | function (self) | % | | Conveyor function (total) "
                "| % |",
                "|---|---|---|---|---|---|---|---|"]
        d = prof.as_dict(top)
        for i in range(top):
            cells = []
            for col in ("packages", "self", "total"):
                rows_ = d[col]
                cells += ([f"`{rows_[i][0]}`", f"{rows_[i][1]:.1f}"] if i < len(rows_)
                          else ["", ""])
            out.append(f"| {cells[0]} | {cells[1]} | | {cells[2]} | {cells[3]} | | "
                       f"{cells[4]} | {cells[5]} |")
        out.append("")
    return out


def render(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any], args: Any,
           facts: list[str], command: str, latency: dict[str, Any] | None,
           profiles: list[dict[str, Any]]) -> str:
    """The whole BENCHMARKS.md."""
    base: str = bp.render(results, rows, args, facts, command)
    lines = base.split("\n")
    if lines and lines[0].startswith("# "):
        durability = getattr(args, "durability", "")
        lines[0] = (f"# Conveyor and its peers (Redis and PostgreSQL task queues): throughput, "
                    f"N={args.n} jobs, {args.runs} runs each"
                    + (f", {durability} PostgreSQL" if durability else ""))
    text = "\n".join(lines)
    extra = "\n".join([*goals_section(results, rows, latency,
                                      getattr(args, "workload_us", None)),
                       *conveyor_section(results, rows, latency, args.n)])
    marker = "\nMedian seconds for N jobs:"
    if marker in text and extra:  # right after the main table
        head, tail = text.split(marker, 1)
        text = f"{head}\n{extra}{marker}{tail}"
    elif extra:
        text = f"{text}\n{extra}"
    cpu = cpu_section(results, rows, getattr(args, "workload_us", None))
    if cpu:
        text += "\n" + "\n".join(cpu)
    if profiles:
        text += "\n" + "\n".join(profile_section(profiles))
    return text.rstrip() + "\n"


def _shown(path: str) -> str:
    """A path in the repository as relative to it (the report names no local directory)."""
    where = Path(path).resolve()
    return str(where.relative_to(_REPO)) if where.is_relative_to(_REPO) else path
