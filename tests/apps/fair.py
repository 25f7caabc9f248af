"""A test app of several task types that share one handler, which logs when each run begins
and ends (in-process workers only): what slot fairness is measured with."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.registry import TaskContext

TYPES = ("busy", "idle1", "idle2", "idle3", "idle4", "other")


@dataclass(frozen=True, slots=True)
class Run:
    task_type: str
    began: float  # time.monotonic()
    ended: float


runs: list[Run] = []
app = Conveyor()


class Work(BaseModel):
    seconds: float


async def work(payload: Work, ctx: TaskContext) -> None:
    began = time.monotonic()
    try:
        await asyncio.sleep(payload.seconds)
    finally:
        runs.append(Run(ctx.task_type, began, time.monotonic()))


for _name in TYPES:
    app.task(_name, payload=Work)(work)


def in_flight(*task_types: str) -> tuple[int, float]:
    """Peak and time-weighted mean of the handlers of `task_types` running at once, from their
    first run's start to their last run's end."""
    mine = [r for r in runs if r.task_type in task_types]
    if not mine:
        return 0, 0.0
    edges = sorted([(r.began, 1) for r in mine] + [(r.ended, -1) for r in mine])
    running = peak = 0
    area = 0.0
    last = edges[0][0]
    for at, step in edges:
        area += running * (at - last)
        running += step
        peak = max(peak, running)
        last = at
    span = edges[-1][0] - edges[0][0]
    return peak, area / span if span > 0 else float(running)
