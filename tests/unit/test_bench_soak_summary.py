"""The soak's verdict line (bench/scale.py): its size after the fill-up, in two halves."""

from __future__ import annotations

from bench.scale import index_growth, soak_summary

MB = 2**20


def test_the_settled_size_is_given_for_each_half() -> None:
    samples = [(t * 15.0, (20 if t < 60 else 21) * MB, 19_000 + t, 7 * MB) for t in range(100)]
    line = soak_summary(samples)
    assert line.startswith("Settled, in two halves: 300-885 s: table + indexes 20.0 MB-20.0 MB")
    assert "; 900-1485 s: table + indexes 21.0 MB-21.0 MB (table 7.0 MB-7.0 MB)" in line
    assert "rows 19,020-19,059" in line


def test_a_soak_too_short_says_so() -> None:
    assert soak_summary([(0.0, 0, 0, 0)]) == "Too short a soak to tell whether its size settled."


def test_index_growth_names_each_index_after_the_fill_up_and_at_the_end() -> None:
    sizes = [{"tasks_pkey": (1 + t) * MB, "tasks_live": MB} for t in range(10)]
    assert index_growth(sizes) == ("Indexes after the first fifth -> at the end: tasks_pkey "
                                   "3.0 MB -> 10.0 MB, tasks_live 1.0 MB -> 1.0 MB.")
    assert index_growth(sizes[:1]) == ""
