"""BENCHMARKS.md's sections: a mode's section is written in place, and every section outlives
a regeneration of the main table."""

from __future__ import annotations

from pathlib import Path

from bench import sections


def test_a_section_is_replaced_in_place_and_appended_when_new(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Table\n\nrows\n")
    sections.put(out, "scale", "## Scale\n\nfirst")
    sections.put(out, "flow", "## Flow control\n\nfirst")
    sections.put(out, "scale", "## Scale\n\nsecond")
    text = out.read_text()
    assert text.startswith("# Table\n\nrows\n\n<!-- scale:start -->\n## Scale\n\nsecond\n")
    assert "first" not in text.partition("<!-- flow:start -->")[0]
    assert text.index("<!-- scale:end -->") < text.index("<!-- flow:start -->")
    assert text.endswith("## Flow control\n\nfirst\n<!-- flow:end -->\n")


def test_a_regenerated_table_keeps_every_section_in_its_order(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Old table\n")
    for name in ("scale", "workflows", "flow", "costs", "ui"):
        sections.put(out, name, f"## {name}\n\nbody of {name}")
    new = sections.kept(out, "# New table\n\nrows\n")
    assert new.startswith("# New table\n\nrows\n\n")
    assert "Old table" not in new
    order = [new.index(f"<!-- {name}:start -->") for name in
             ("scale", "workflows", "flow", "costs", "ui")]
    assert order == sorted(order)
    assert all(f"body of {name}" in new for name in ("scale", "workflows", "flow", "costs", "ui"))
    # a section the new text writes itself is not repeated
    fresh = sections.kept(out, "# New\n\n<!-- flow:start -->\nnew flow\n<!-- flow:end -->\n")
    assert fresh.count("<!-- flow:start -->") == 1
    assert "body of flow" not in fresh
    assert sections.kept(tmp_path / "absent.md", "# New\n") == "# New\n"
