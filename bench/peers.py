"""Load the peers' benchmark script (`shared/bench/peers/bench_peers.py`) as a module.

The script is not ours and not typed: it is imported as-is, registered in `sys.modules` under
its own name `bench_peers` (the name its worker commands import it by), and handed out as
`Any`. Its directory is `BENCH_PEERS_DIR` when set (the driver sets it from `--peers-dir`, and
the worker and API processes inherit it), else `shared/bench/peers` next to this repository.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

ENV = "BENCH_PEERS_DIR"
MODULE = "bench_peers"


def default_dir() -> Path:
    """`<parent of the repo>/shared/bench/peers` (in CI the repo is cloned next to `shared/`)."""
    return Path(__file__).resolve().parents[2] / "shared" / "bench" / "peers"


def peers_dir() -> Path:
    given = os.environ.get(ENV)
    return Path(given).resolve() if given else default_dir()


def load(directory: Path | None = None) -> Any:
    """The `bench_peers` module (imported once per process)."""
    loaded = sys.modules.get(MODULE)
    if loaded is not None:
        return loaded
    path = (directory or peers_dir()) / f"{MODULE}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass --peers-dir (or set {ENV}) to the directory of "
            f"{MODULE}.py"
        )
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE]
        raise
    return module
