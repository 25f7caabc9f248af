"""The benchmark harness (`bench/`, `python -m bench`) end to end, small: Conveyor's doors in
both deployments (split processes and `conveyor run`) and the raw Streams baseline (which needs
only redis-py, so no peer packages), N=200, one run, in this venv, plus a peer that is not
installed here, which is skipped with a line, and PgQueuer where it is installed. It runs in a
copy of the repository's tracked files with nothing beside it (no ../shared), and starts its
own (durable) PostgreSQL and redis-server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench.peers import all_peers

ROOT = Path(__file__).resolve().parents[2]
N = 200
DOORS = {
    "conveyor-bulk": "conveyor split (client: enqueue_many, 100 per call)",
    "conveyor-http-batch": "conveyor split (HTTP POST /v1/tasks/batch, 100 per request, "
                           "8 connections)",
    "conveyor-run-bulk": "conveyor run (client: enqueue_many, 100 per call)",
    "conveyor-run-http-batch500-1c": "conveyor run (HTTP POST /v1/tasks/batch, 500 per "
                                     "request, 1 connection)",
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_benchmark_runs_every_row_once_and_writes_one_table(tmp_path: Path) -> None:
    out, raw = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    peers_here = all_peers()
    absent = next((key for key, peer in peers_here.items() if peer.missing()), None)
    pg_peer = "pgqueuer-fast" if not peers_here["pgqueuer-fast"].missing() else None
    peers = ",".join(p for p in ("raw-stream", pg_peer, absent) if p)
    alone = tmp_path / "empty" / "conveyor"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True, timeout=30).stdout.decode().split("\0")
    for name in filter(None, tracked):  # as they are now, edits included
        if (ROOT / name).is_file():
            (alone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, alone / name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONVEYOR_", "PYTEST_", "BENCH_")) and k != "PYTHONPATH"}
    env["PYTHONPATH"] = f"{alone / 'src'}{os.pathsep}{alone}"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--n", str(N), "--runs", "1", "--peers", peers,
         "--doors", ",".join(DOORS),
         "--latency-seconds", "2", "--timeout", "60", "--out", str(out), "--json", str(raw),
         "--logdir", str(tmp_path / "logs")],
        cwd=alone, env=env, capture_output=True, text=True, timeout=290, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    if absent:
        assert f"skipping peer {absent}: its " in proc.stdout, proc.stdout[:2000]
    data = json.loads(raw.read_text())
    results = data["results"]
    assert set(results) == {*DOORS, "raw-stream", *([pg_peer] if pg_peer else [])}

    for key, runs in results.items():
        assert len(runs) == 1, key
        run = runs[0]
        assert "error" not in run, (key, run)
        # Every job ran exactly once: no extra INCRs after the N-th, in either phase.
        assert (run["drain_extra"], run["e2e_extra"]) == (0, 0), key
        assert (run["drain_clean_stop"], run["e2e_clean_stop"]) == (True, True), key
        assert min(run["enqueue_s"], run["drain_s"], run["e2e_s"]) > 0, key
        # CPU time was read at the edges of every phase's window, for the servers too.
        assert {"enqueue", "e2e"} <= set(run["cpu"]), key
        assert {"postgres", "redis", "driver"} <= set(run["cpu"]["e2e"]["cpu_s"]), key
        assert "worker" in run["cpu"]["e2e"]["cpu_s"], key

    for key in DOORS:
        run = results[key][0]
        assert run["checks_failed"] == [], key
        # Durable: each phase's tasks (and the e2e warm-up task) all succeeded in Postgres.
        assert run["postgres"] == [{"succeeded": N}, {"succeeded": N + 1}], key
        assert all(10 < mb < 1000 for mb in run["worker_hwm_mb"]), key
    batch = results["conveyor-http-batch"][0]
    assert batch["b1000_postgres"] == {"queued": N}
    assert batch["requests"] == 2

    latency = data["latency"]
    assert latency["checks_failed"] == []
    assert latency["done"] == latency["count"] == latency["samples"] > 0
    assert 0 <= latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]

    assert "cron" in results["conveyor-bulk"][0]["cpu"]["e2e"]["cpu_s"]  # split: its own
    assert "api" in results["conveyor-http-batch"][0]["cpu"]["enqueue"]["cpu_s"]
    assert "api" in results["conveyor-run-http-batch500-1c"][0]["cpu"]["enqueue"]["cpu_s"]
    assert "cron" not in results["conveyor-run-bulk"][0]["cpu"]["e2e"]["cpu_s"]  # all in one

    table = out.read_text()
    assert table.startswith("# Conveyor and its peers (Redis and PostgreSQL task queues)")
    assert "durable PostgreSQL" in table.split("\n", 1)[0]
    assert "**durable**: private cluster with PostgreSQL's defaults" in table
    for name in [*DOORS.values(), "raw redis-py: stream"]:
        assert f"\n| {name} | {N} | **" in table, name
    for section in ("## Goals", "## Conveyor", "## CPU per task", "Enqueue→start latency",
                    "Worker peak RSS", "Problems:", "against the fastest PostgreSQL peer"):
        assert section in table, section
    assert "- none: every run completed all N jobs exactly once" in table
