"""`--app`: the module is found in the working directory, or in `--app-dir`, as uvicorn and
celery find theirs; what cannot be imported is a ConfigError naming where it looked."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.cli import load_app
from conveyor.errors import ConfigError

APP = "from conveyor import Conveyor\napp = Conveyor()\nother = 1\n"


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A directory holding `clitestmod.py`; sys.path and sys.modules restored afterwards."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    (tmp_path / "clitestmod.py").write_text(APP)
    yield tmp_path
    sys.modules.pop("clitestmod", None)


def test_the_working_directory_is_searched_first(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(isolated)
    assert load_app("clitestmod:app") is sys.modules["clitestmod"].app
    assert sys.path[0] == str(isolated.resolve())  # absolute: spawned processes inherit it


def test_app_dir_names_another_directory(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with pytest.raises(ConfigError, match=r"cannot import 'clitestmod' \(looked first in "):
        load_app("clitestmod:app")
    assert load_app("clitestmod", isolated) is sys.modules["clitestmod"].app  # attr: `app`
    with pytest.raises(ConfigError, match="other is not a Conveyor instance"):
        load_app("clitestmod:other", isolated)
