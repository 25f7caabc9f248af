"""A test app for workflows: nodes that return their name (or fail), a collector that returns
what its upstreams returned, and a parent that enqueues children and waits for them."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from conveyor.application import Conveyor
from conveyor.errors import Fail
from conveyor.registry import TaskContext

app = Conveyor()
runs: dict[str, int] = {}  # node name -> runs (in-process workers only)


class Node(BaseModel):
    name: str
    fail_runs: int = 0  # its first this many runs fail
    sleep_ms: int = 0


class Fan(BaseModel):
    children: int


@app.task("node", payload=Node, max_attempts=1)
async def node(payload: Node, ctx: TaskContext) -> dict[str, Any]:
    runs[payload.name] = runs.get(payload.name, 0) + 1
    await asyncio.sleep(payload.sleep_ms / 1000)
    if runs[payload.name] <= payload.fail_runs:
        raise Fail(f"{payload.name} was told to fail")
    seen = await ctx.upstream()
    return {"name": payload.name,
            "upstream": {k: [u.status, u.result and u.result.get("name")]
                         for k, u in sorted(seen.items())}}


@app.task("collect", payload=Node, max_attempts=1)
async def collect(payload: Node, ctx: TaskContext) -> dict[str, Any]:
    runs[payload.name] = runs.get(payload.name, 0) + 1
    seen = await ctx.upstream()
    return {"count": len(seen), "ok": sum(1 for u in seen.values() if u.status == "succeeded")}


@app.task("parent", payload=Fan, max_attempts=1)
async def parent(payload: Fan, ctx: TaskContext) -> dict[str, Any]:
    for i in range(payload.children):
        await ctx.enqueue("node", {"name": f"child-{i}"})
    done = await ctx.wait_children(timeout_s=20)
    return {"children": sorted(c.result["name"] for c in done),
            "statuses": sorted({c.status for c in done})}


@app.task("parent_retried", payload=Fan, max_attempts=2)
async def parent_retried(payload: Fan, ctx: TaskContext) -> dict[str, Any]:
    """Enqueues its children, fails its first attempt after that, and enqueues them again."""
    for i in range(payload.children):
        await ctx.enqueue("node", {"name": f"kid-{i}"})
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails after enqueueing")
    done = await ctx.wait_children(timeout_s=20)
    return {"children": sorted(c.result["name"] for c in done)}
