"""A test app declared with decorators, for producers: a coroutine and a process handler."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict

from conveyor.application import Conveyor
from conveyor.registry import TaskContext

app = Conveyor()


class Number(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int


@app.task("square", payload=Number)
async def square(payload: Number, ctx: TaskContext) -> dict[str, int]:
    return {"square": payload.n ** 2}


@app.task("cube", payload=Number, process=True)
def cube(payload: Number, ctx: TaskContext) -> dict[str, int]:
    return {"cube": payload.n ** 3, "pid": os.getpid()}
