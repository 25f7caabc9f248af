"""BENCHMARKS.md's sections of the benchmark's other modes (scale, workflows, flow control,
dashboard pages) and the cost notes: each between `<!-- NAME:start -->` and
`<!-- NAME:end -->`, written in place when its mode runs again, and kept when `python -m bench`
writes the main table afresh. Imports nothing of Conveyor: `bench.run` takes its snapshot of
src/ before Conveyor is imported."""

from __future__ import annotations

import re
from pathlib import Path

_SECTION = re.compile(r"<!-- (?P<name>[\w-]+):start -->.*?<!-- (?P=name):end -->", re.S)


def marks(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def put(path: Path, name: str, body: str) -> None:
    """Write `body` (its heading included) as section `name` of `path`: in place of the one
    there, else at the end."""
    start, end = marks(name)
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, _, rest = text.partition(start)
        text = head + section + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def kept(path: Path, new_text: str) -> str:
    """`new_text` (the main table's report) followed by every section of `path` that it does
    not have, in their order there."""
    if not path.exists():
        return new_text
    have = {m["name"] for m in _SECTION.finditer(new_text)}
    extra = [m.group(0) for m in _SECTION.finditer(path.read_text()) if m["name"] not in have]
    if not extra:
        return new_text
    return new_text.rstrip("\n") + "\n\n" + "\n\n".join(extra) + "\n"
