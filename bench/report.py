"""BENCHMARKS.md: the harness's `render` of every row (Conveyor's and the peers'), with
Conveyor's figures (HTTP doors, latency, memory, Postgres checks, goals, profiles) added."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench import harness as bp

DOOR_KEYS = ("conveyor-bulk", "conveyor-client", "conveyor-http", "conveyor-http-batch")
GOAL_BATCH_TASKS_S = 20_000
GOAL_SINGLE_POST_REQ_S = 3_000
GOAL_P99_MS = 20.0
GOAL_RSS_MB = 100.0
DASH = bp.DASH  # what the table shows for "no value"


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
        "| round trip p50 ms | p99 ms | enqueue→start p50 ms | p99 ms |", "|---|---|---|---|",
        f"| {wait['enqueue_p50_ms']:.1f} | {wait['enqueue_p99_ms']:.1f} "
        f"| {wait['p50_ms']:.1f} | {wait['p99_ms']:.1f} |", ""]


def goals(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any],
          latency: dict[str, Any] | None) -> list[Goal]:
    doors = [k for k in rows if k in DOOR_KEYS]
    peers = [k for k in rows if k not in DOOR_KEYS and not k.startswith("raw-")]
    ours = best_e2e(results, doors)
    theirs = best_e2e(results, peers)
    out = []
    ours_text = f"{ours[1]:,.0f}/s ({rows[ours[0]].name})" if ours else DASH
    if ours and theirs:
        out.append(Goal("e2e, one worker: ≥ 2x the fastest peer in this run", "≥ 2.0x",
                        f"{ours_text} vs {theirs[1]:,.0f}/s ({rows[theirs[0]].name}): "
                        f"{ours[1] / theirs[1]:.2f}x", ours[1] >= 2 * theirs[1]))
    else:
        out.append(Goal("e2e, one worker: ≥ 2x the fastest peer in this run", "≥ 2.0x",
                        f"{ours_text}; no peer in this run", None))
    raw = median_rate(results["raw-stream"], "e2e") if "raw-stream" in results else None
    out.append(Goal("e2e, one worker: ≥ 25 % of the raw Streams baseline", "≥ 25 %",
                    f"{ours_text} vs {raw:,.0f}/s: {100 * ours[1] / raw:.0f} %"
                    if ours and raw else DASH,
                    ours[1] >= 0.25 * raw if ours and raw else None))
    batch = (median_rate(results["conveyor-http-batch"], "enqueue")
             if "conveyor-http-batch" in results else None)
    out.append(Goal("POST /v1/tasks/batch (100 per request): tasks enqueued per second",
                    f"≥ {GOAL_BATCH_TASKS_S:,}/s", fmt(batch, "/s"),
                    None if batch is None else batch >= GOAL_BATCH_TASKS_S))
    single = (median_rate(results["conveyor-http"], "enqueue")
              if "conveyor-http" in results else None)
    out.append(Goal("single POST /v1/tasks: requests per second",
                    f"≥ {GOAL_SINGLE_POST_REQ_S:,}/s", fmt(single, "/s"),
                    None if single is None else single >= GOAL_SINGLE_POST_REQ_S))
    p99 = latency.get("p99_ms") if latency else None
    out.append(Goal("enqueue→start p99 at half the maximum e2e rate (of the producer's door)",
                    f"≤ {GOAL_P99_MS:.0f} ms",
                    DASH if p99 is None else f"{p99:.1f} ms at {latency['achieved_rate']:,.0f}/s"
                    if latency else DASH, None if p99 is None else p99 <= GOAL_P99_MS))
    rss = peak_worker_rss(results, latency)
    out.append(Goal("worker peak RSS (VmHWM)", f"≤ {GOAL_RSS_MB:.0f} MB",
                    DASH if rss is None else f"{rss:.1f} MiB",
                    None if rss is None else rss <= GOAL_RSS_MB))
    return out


def worker_rss_values(results: dict[str, list[dict[str, Any]]]) -> list[float]:
    return [v for k in DOOR_KEYS for x in results.get(k, [])
            for v in x.get("worker_hwm_mb", []) if v is not None]


def peak_worker_rss(results: dict[str, list[dict[str, Any]]],
                    latency: dict[str, Any] | None) -> float | None:
    values = worker_rss_values(results)
    if latency and latency.get("worker_hwm_mb") is not None:
        values.append(latency["worker_hwm_mb"])
    return max(values) if values else None


def pg_problems(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any]) -> list[str]:
    out = []
    for key in DOOR_KEYS:
        for i, x in enumerate(results.get(key, []), 1):
            out += [f"- {rows[key].name} run {i}: {p}" for p in x.get("checks_failed", [])]
    return out


def conveyor_section(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any],
                     latency: dict[str, Any] | None, n: int) -> list[str]:
    doors = [k for k in rows if k in DOOR_KEYS]
    if not doors:
        return []
    out = ["## Conveyor", "",
           "Every Conveyor task is a row in PostgreSQL: enqueue INSERTs and COMMITs it, then XADDs "
           "its id; the worker marks it running and records its outcome there (compare-and-set) "
           "before it XACKs. The worker is `conveyor worker --app bench.app:app --concurrency "
           f"{bp.SETUP.concurrency}` (log level warning); its `noop` handler calls the workload's "
           "`amark_done`. Postgres is emptied (TRUNCATE) whenever Redis is flushed.", ""]
    http = [k for k in doors if k.startswith("conveyor-http")]
    if http:
        out += ["HTTP doors (`conveyor api`, a separate process; load from this process over "
                "keep-alive HTTP/1.1 connections). Median (min-max) over the runs:", "",
                "| door | requests for N | enqueue requests/s | enqueue tasks/s | e2e tasks/s "
                "| API peak RSS MiB |", "|---|---|---|---|---|---|"]
        for key in http:
            ok = ok_runs(results[key])
            req = [x["requests"] / x["enqueue_s"] for x in ok]
            tasks = bp.rates(ok)
            hwm = [x["api_hwm_mb"] for x in ok if x.get("api_hwm_mb")]
            out.append(f"| {rows[key].name} | {ok[0]['requests'] if ok else DASH} | "
                       f"{bp.fmt_rate(req)} | {bp.fmt_rate(tasks['enqueue'])} | "
                       f"{bp.fmt_rate(tasks['e2e'])} | {max(hwm) if hwm else 0:.0f} |")
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


def goals_section(results: dict[str, list[dict[str, Any]]], rows: dict[str, Any],
                  latency: dict[str, Any] | None) -> list[str]:
    if not any(k in DOOR_KEYS for k in rows):
        return []
    out = ["## Goals", "", "Medians of this run; e2e is the best Conveyor row against the "
           "fastest peer row (raw baselines are not peers).", "",
           "| goal | target | measured | verdict |", "|---|---|---|---|"]
    for g in goals(results, rows, latency):
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
                f"raw stacks: `{p['raw']}`.", "",
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
        lines[0] = (f"# Conveyor and Redis task-queue peers: throughput, N={args.n} jobs, "
                    f"{args.runs} runs each")
    text = "\n".join(lines)
    extra = "\n".join([*goals_section(results, rows, latency),
                       *conveyor_section(results, rows, latency, args.n)])
    marker = "\nMedian seconds for N jobs:"
    if marker in text and extra:  # right after the main table
        head, tail = text.split(marker, 1)
        text = f"{head}\n{extra}{marker}{tail}"
    elif extra:
        text = f"{text}\n{extra}"
    if profiles:
        text += "\n" + "\n".join(profile_section(profiles))
    return text.rstrip() + "\n"
