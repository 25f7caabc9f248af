"""Admission: a bound on enqueue requests in progress. When Postgres or Redis cannot keep up,
requests past the bound get 503 + Retry-After at once instead of piling up in memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from conveyor.errors import Overloaded


class Admission:
    """At most `limit` requests inside `slot()` at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inside = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.inside >= self.limit:
            raise Overloaded(
                f"{self.inside} enqueue requests are already in progress (API_MAX_PENDING)"
            )
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1
