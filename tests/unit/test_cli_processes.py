"""`worker --processes`: what it accepts, and the command each child runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conveyor.application import Conveyor
from conveyor.cli import cli, cpu_count, parse_processes, serve_processes, worker_child_command
from conveyor.config import Settings
from conveyor.errors import ConfigError


def test_processes_take_a_positive_number_or_auto() -> None:
    assert parse_processes("1") == 1
    assert parse_processes("4") == 4
    assert parse_processes("auto") == cpu_count() >= 1
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(typer.BadParameter, match="positive whole number or 'auto'"):
            parse_processes(bad)


def test_a_bad_processes_value_is_a_usage_error_naming_it() -> None:
    result = CliRunner().invoke(cli, ["worker", "--processes", "zero"])
    assert result.exit_code == 2
    assert "'zero' is not a positive whole number" in result.output


async def test_unknown_types_are_refused_before_any_child_starts() -> None:
    settings = Settings(database_url="postgresql://127.0.0.1:1/x", redis_url="redis://x:1")
    with pytest.raises(ConfigError, match="worker types not registered: nope"):
        await serve_processes(settings, Conveyor(), 2, ["false"], ["nope"])


def test_each_child_is_this_worker_as_one_process(tmp_path: Path) -> None:
    command = worker_child_command("shop:app", tmp_path, 8, "a,b", None, "debug")
    assert command[:4] == [sys.executable, "-m", "conveyor", "worker"]
    args = command[4:]
    assert args[args.index("--processes") + 1] == "1"
    assert args[args.index("--app") + 1] == "shop:app"
    assert args[args.index("--app-dir") + 1] == str(tmp_path.resolve())
    assert args[args.index("--concurrency") + 1] == "8"
    assert args[args.index("--types") + 1] == "a,b"
    assert args[args.index("--log-level") + 1] == "debug"
    assert "--data-dir" not in args
