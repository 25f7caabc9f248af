"""The dashboard's browser tests' app: orders with a customer id, tasks that always fail,
one that runs until cancelled, and a cron job that fires at 03:00."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.registry import RetryPolicy, TaskContext

app = Conveyor()


class Order(BaseModel):
    customer_id: int
    note: str = ""


class Batch(BaseModel):
    batch: str


class Wait(BaseModel):
    seconds: float


@app.task("order", payload=Order)
async def order(payload: Order, ctx: TaskContext) -> dict[str, Any]:
    return {"customer_id": payload.customer_id, "charged": True}


@app.task("doomed", payload=Batch, max_attempts=3,
          retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
async def doomed(payload: Batch, ctx: TaskContext) -> None:
    raise RuntimeError(f"card declined (attempt {ctx.attempt})")


@app.task("long", payload=Wait, timeout=120)
async def long(payload: Wait, ctx: TaskContext) -> str:
    for step in range(int(payload.seconds * 10)):
        await ctx.progress(step / (payload.seconds * 10), "working")
        await asyncio.sleep(0.1)
    return "done"


@app.cron("0 0 3 * * *", name="nightly")
async def nightly(ctx: TaskContext) -> str:
    return "cleaned"
