"""The chaos run at CI size: ~2,000 tasks through 3 worker processes while workers are
SIGKILLed, Redis restarts (once wiped) and Postgres restarts. Nothing may be lost or completed
twice."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.system.conftest import ROOT

pytestmark = pytest.mark.slow


def test_chaos_run_loses_nothing_and_completes_nothing_twice() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.testing.chaos", "--tasks", "2000", "--duration", "30",
         "--workers", "3", "--kills", "3", "--redis-restarts", "1", "--redis-wipes", "1",
         "--pg-restarts", "1", "--seed", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    report = done.stdout
    assert done.returncode == 0, report[-3000:] + done.stderr[-3000:]
    assert "tasks enqueued           2000" in report
    assert "tasks succeeded          2000" in report
    assert "lost (never succeeded)   0" in report
    assert "completed twice          0" in report
    assert "3 worker SIGKILL" in report
    assert "1 Redis wipe" in report
    assert "1 Postgres restart" in report
