"""The chaos run at CI size: 2,000 tasks (2 % of them longer than the heartbeat TTL) and a
500-node fan-out/fan-in workflow through 3 worker processes while every kind of fault strikes
at least once: worker SIGKILLs and stalls, Redis restarts, wipes and a live FLUSHALL, a
Postgres restart and each kind of server-raised Postgres error. Nothing may be lost or recorded
twice, no workflow node may start before its upstreams finished, no dead task may have run ok,
no two copies of a task may run at once on live workers, and no process may exit unbidden."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conveyor.testing.chaos import PG_ERRORS
from tests.system.conftest import ROOT

pytestmark = pytest.mark.slow

FAULTS = ["3 worker SIGKILL", "1 worker stall", "1 Redis restart", "1 Redis wipe",
          "1 Redis FLUSHALL", "1 Postgres restart", *(f"1 {kind}" for kind in PG_ERRORS)]


def _rows(report: str) -> dict[str, str]:
    """The report's `label  value` lines (label in the first 34 columns)."""
    return {line[:34].strip(): line[34:].strip() for line in report.splitlines()
            if len(line) > 34 and not line.startswith((" ", "["))}


def test_chaos_run_under_every_fault_keeps_the_record_true() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.testing.chaos", "--tasks", "2000", "--duration", "30",
         "--workers", "3", "--faults-each", "1", "--kills", "3",
         "--pg-errors", str(len(PG_ERRORS)), "--long-share", "0.02", "--long-ms", "5000",
         "--drain-timeout", "45", "--seed", "7", "--workflows", "1",
         "--workflow-nodes", "500"],
        cwd=ROOT, capture_output=True, text=True, timeout=200, check=False,
    )
    report = done.stdout
    rows = _rows(report)
    context = report[-6000:] + done.stderr[-3000:]
    assert rows.get("tasks enqueued", "").startswith("2500 ("), context
    assert rows.get("workflows") == "1", context
    faults = rows.get("faults injected", "")
    for fault in FAULTS:
        assert fault in faults, f"{fault!r} not injected\n{context}"
    assert rows.get("tasks succeeded") == "2500", context
    assert rows.get("lost (never succeeded)") == "0", context
    for check in ("recorded twice", "dead or cancelled, yet ran ok",
                  "concurrent copies, live workers", "exited without being killed",
                  "ran before an upstream finished",
                  "non-zero exit on SIGTERM"):
        assert rows.get(check) == "0", f"{check}: {rows.get(check)}\n{context}"
    assert done.returncode == 0, context
