"""Tracing's switch: off, the enqueue and attempt paths import and make nothing of
OpenTelemetry; on by setting, a provider is built from the OTEL_* variables, flushed after and
kept for the process's later states. Each case runs in a fresh interpreter: the global tracer
provider can be set once only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conveyor import tracing
from conveyor.errors import ConfigError

OFF = """
import asyncio, sys, uuid
from datetime import UTC, datetime

import conveyor.cli  # the whole program, FastAPI (which imports OpenTelemetry's API) too
from conveyor import tracing
from conveyor.api.app import _telemetry
from conveyor.config import Settings
from conveyor.registry import TaskType
from conveyor.store.tasks import Started
from conveyor.worker.executor import Executor
from tests.apps.traced import Echo

before = {m for m in sys.modules if m.startswith("opentelemetry")}

async def handler(payload, ctx):
    return "ok"

def blocking(payload, ctx):
    return "ok"

async def main():
    executor = Executor(Settings(), "w")
    try:
        for fn, run_in in ((handler, "loop"), (blocking, "thread")):
            task_type = TaskType(name="t", payload_model=Echo, handler=fn, run_in=run_in)
            task = Started(uuid.uuid4(), "t", {}, 1, 3, datetime.now(UTC))
            assert (await executor.execute(task_type, task)).status == "succeeded"
            assert tracing.current_context() is None
    finally:
        executor.close()

asyncio.run(main())
assert tracing.current_context() is None
assert not tracing.enabled() and tracing.current_provider() is None
assert _telemetry()["tracing"] is False  # FastAPI's own spans stay off too
after = {m for m in sys.modules if m.startswith("opentelemetry")}
assert after == before, sorted(after - before)  # (FastAPI and redis-py import some anyway)
print("quiet")
"""

ON_BY_SETTING = """
from opentelemetry import trace
from conveyor import tracing

with tracing.enabled_by(True):
    provider = trace.get_tracer_provider()
    assert tracing.current_provider() is provider
    assert provider.resource.attributes["service.name"] == "billing-worker"
    with tracing.enqueue_span([]) as span:
        assert span is not None and span.get_span_context().is_valid
        carried = tracing.current_context()
        assert carried and carried["traceparent"].startswith("00-"), carried
assert not tracing.enabled()
with tracing.enabled_by(True):  # a later state of the process: the same provider, still alive
    assert tracing.current_provider() is provider
    with tracing.enqueue_span([]) as span:
        assert span.is_recording()
print("traced")
"""


def run(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        env={**os.environ, **env}, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_off_the_hot_paths_import_and_make_nothing() -> None:
    assert run(OFF).strip().endswith("quiet")


def test_on_by_setting_builds_a_provider_from_the_otel_variables() -> None:
    out = run(ON_BY_SETTING, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="billing-worker")
    assert "traced" in out
    assert '"name": "enqueue"' in out  # the console exporter printed the spans


def test_an_exporter_conveyor_cannot_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        tracing._build_provider()
