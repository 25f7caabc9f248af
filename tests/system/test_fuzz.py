"""Schemathesis against a live `conveyor api` (real Postgres and Redis, an API key set), every
check on: each answer is documented (status, content type, headers, body schema), requests
the schema allows are accepted, requests it does not allow are refused, 405s name the right
methods, and nothing answers 500.

Streams and waits are bounded so that every case is quick, the API staying truthful:
`?wait=S` is capped by `CONVEYOR_MAX_WAIT` (the document's maximum follows it; no worker runs
here, so a wait lasts all of S); a task's stream (`GET /v1/tasks/{id}/events`) is read up to
its first event, the `state` one (no task moves here, so it would then stay silent until the
read timeout); and `GET /v1/events` is left out: an endless stream that, with no task moving,
sends nothing but a keepalive every 15 s, so each accepted case would last the whole read
timeout and check no event. Its parameters' validation (type, status, `Last-Event-ID`) is
covered in tests/integration/api/test_results.py.

The run is bounded by the number of examples per operation (about a minute here; no
`--max-time`, which would repeat fuzzing until the time is spent and make the run depend on
the machine's speed) and seeded, so a failure found here comes back with the same command; the
figures are printed. To hunt rarer failures, run it longer (`--max-time 300`, see the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conveyor.testing.servers import free_port
from tests.system.conftest import Spawner, wait_until

pytestmark = pytest.mark.slow
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
KEY = "fuzz-key-0123456789"
SEED = 20261201
MAX_EXAMPLES = 50  # per operation and phase: ~1,000 cases
MAX_WAIT_S = 1  # CONVEYOR_MAX_WAIT: the longest `?wait=` case
RUN_TIMEOUT_S = 240  # a hard bound, far above the ~60 s the run takes


# Every check on (here rather than `--checks all`, which would override the one exception
# below), and a task's stream read up to its first event (see above). The coverage phase of
# Schemathesis 4.32 finds no valid batch body (the thumbnail payload's base64 pattern with its
# 5,592,409 maxLength, in `tasks[]`'s oneOf, defeats its generator; a single task, whose oneOf
# is the body itself, is fine) and then sends its negative fallback body (`0`) with positive
# query parameters as if the request were valid: its "valid data accepted" check is off for
# that one operation in that one phase; fuzzing and the stateful phase still check it there.
# A schema-valid enqueue may also be refused with a 422 by what no schema can say: a
# `depends_on` id must name an existing task, a workflow's `depends_on` keys its own nodes
# (random ones name none), so the enqueue operations accept a 422 for valid data too; and the
# stateful phase links a task's `workflow_id` (null outside a workflow) to the workflow
# routes' path, sending `None` as the id, so those accept a 422 for it too. A limits change
# is checked against the type's declared limits (a per-key limit needs a `concurrency_key`),
# which the schema cannot say either.
# The check's own default statuses, and a 422.
ACCEPTED = '["2XX", "3XX", "401", "403", "404", "409", "422", "429", "5XX"]'
CONFIG = f"""\
max-stream-events = 1
checks.enabled = true

[[operations]]
include-path = "/v1/tasks/batch"
include-method = "POST"
phases.coverage.checks.positive_data_acceptance.enabled = false
checks.positive_data_acceptance.expected-statuses = {ACCEPTED}

[[operations]]
include-path = "/v1/tasks"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED}

[[operations]]
include-path = "/v1/workflows"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED}

[[operations]]
include-path-regex = "^/v1/workflows/"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED}

[[operations]]
include-path-regex = "^/v1/queues/[^/]+/limits$"
include-method = "PATCH"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED}
"""


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_schemathesis_finds_nothing(spawn: Spawner, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api = spawn("api", CONVEYOR_API_KEYS=KEY, CONVEYOR_HOST="127.0.0.1",
                CONVEYOR_PORT=str(port), CONVEYOR_MAX_WAIT=str(MAX_WAIT_S))
    wait_until(lambda: _ready(base), 30.0, "the API ready")
    report = tmp_path / "schemathesis.json"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        str(SCHEMATHESIS), "--config-file", str(config), "run", f"{base}/openapi.json",
        "--exclude-path", "/v1/events",  # endless (see above)
        "--header", f"Authorization: Bearer {KEY}",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--generation-database", "none",
        "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS_")}
    run = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=RUN_TIMEOUT_S)
    assert report.exists(), f"no report from schemathesis:\n{run.stdout}\n{run.stderr}"
    result = json.loads(report.read_text())
    cases = result["test_cases"]
    phases = ", ".join(f"{name} {phase['status']}" for name, phase in result["phases"].items())
    print(f"\nschemathesis {result['schemathesis_version']} (seed {result['seed']}): "
          f"{cases['generated']} cases generated in {result['running_time']:.0f} s, "
          f"{cases['unique_failures']} failures, {len(result['errors'])} errors; "
          f"phases: {phases}")
    summary = (f"errors: {json.dumps(result['errors'])[:5000]}\n{run.stdout[-20000:]}\n"
               f"{run.stderr[-5000:]}\nAPI log (end):\n{api.output()[-3000:]}")
    assert cases["generated"] > 10 * MAX_EXAMPLES, summary  # the run was meaningful
    assert result["failures"] == [], summary
    assert result["errors"] == [], summary
    assert run.returncode == 0, summary
