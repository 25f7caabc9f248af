"""Children's restart pause: doubling per quick death, capped."""

from __future__ import annotations

from conveyor.runtime.children import Backoff


def test_the_pause_doubles_per_quick_death_up_to_the_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(0) == 0.5  # after a stable run, the first pause again
