"""The benchmark harness (`bench/`, `python -m bench`) end to end, small: Conveyor's four rows
and the raw Streams baseline (which needs only redis-py, so no peer packages), N=200, one run,
in this venv, plus a peer that is not installed here, which is skipped with a line. The harness
starts its own PostgreSQL and redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench.peers import all_peers

ROOT = Path(__file__).resolve().parents[2]
N = 200
DOORS = {
    "conveyor-bulk": "conveyor (client: enqueue_many, 100 per call)",
    "conveyor-client": "conveyor (client: enqueue, 1 by 1)",
    "conveyor-http": "conveyor (HTTP POST /v1/tasks)",
    "conveyor-http-batch": "conveyor (HTTP POST /v1/tasks/batch, 100 per request)",
}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_benchmark_runs_every_row_once_and_writes_one_table(tmp_path: Path) -> None:
    out, raw = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    absent = next((key for key, peer in all_peers().items() if peer.missing()), None)
    peers = "raw-stream" + (f",{absent}" if absent else "")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--n", str(N), "--runs", "1", "--peers", peers,
         "--latency-seconds", "2", "--timeout", "60", "--out", str(out), "--json", str(raw),
         "--logdir", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    if absent:
        assert f"skipping peer {absent}: its " in proc.stdout, proc.stdout[:2000]
    data = json.loads(raw.read_text())
    results = data["results"]
    assert set(results) == {*DOORS, "raw-stream"}

    for key, runs in results.items():
        assert len(runs) == 1, key
        run = runs[0]
        assert "error" not in run, (key, run)
        # Every job ran exactly once: no extra INCRs after the N-th, in either phase.
        assert (run["drain_extra"], run["e2e_extra"]) == (0, 0), key
        assert (run["drain_clean_stop"], run["e2e_clean_stop"]) == (True, True), key
        assert min(run["enqueue_s"], run["drain_s"], run["e2e_s"]) > 0, key

    for key in DOORS:
        run = results[key][0]
        assert run["checks_failed"] == [], key
        # Durable: each phase's tasks (and the e2e warm-up task) all succeeded in Postgres.
        assert run["postgres"] == [{"succeeded": N}, {"succeeded": N + 1}], key
        assert all(10 < mb < 1000 for mb in run["worker_hwm_mb"]), key
    batch = results["conveyor-http-batch"][0]
    assert batch["b1000_postgres"] == {"queued": N}
    assert batch["requests"] == 2
    assert results["conveyor-http"][0]["requests"] == N

    latency = data["latency"]
    assert latency["checks_failed"] == []
    assert latency["done"] == latency["count"] == latency["samples"] > 0
    assert 0 <= latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]

    table = out.read_text()
    assert table.startswith("# Conveyor and Redis task-queue peers")
    for name in [*DOORS.values(), "raw redis-py: stream"]:
        assert f"\n| {name} | {N} | **" in table, name
    for section in ("## Goals", "## Conveyor", "Enqueue→start latency", "Worker peak RSS",
                    "Problems:"):
        assert section in table, section
    assert "- none: every run completed all N jobs exactly once" in table
