"""BENCHMARKS.md's *Cost per task* notes (what was changed for the cost per task, with before
and after figures), kept when `python -m bench` writes the file again. Imports nothing of
Conveyor: `bench.run` takes its snapshot of src/ before Conveyor is imported."""

from __future__ import annotations

from pathlib import Path

NOTES_START, NOTES_END = "<!-- costs:start -->", "<!-- costs:end -->"


def kept_notes(path: Path, new_text: str) -> str:
    """`new_text` (a regenerated BENCHMARKS.md) with the cost notes section of `path` kept
    (what was changed for the cost per task, with its before/after figures)."""
    if not path.exists():
        return new_text
    old = path.read_text()
    if NOTES_START not in old or NOTES_END not in old or NOTES_START in new_text:
        return new_text
    section = NOTES_START + old.partition(NOTES_START)[2].partition(NOTES_END)[0] + NOTES_END
    return new_text.rstrip("\n") + "\n\n" + section + "\n"
