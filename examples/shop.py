"""An application on Conveyor: its own route, its own table, and a task enqueued in the same
transaction as the business write.

    conveyor run --app examples.shop:app
    curl -s localhost:8080/shop/orders -H 'content-type: application/json' \\
         -d '{"item": "book", "quantity": 2, "notify_url": "https://example.com/hook"}'

The order row and its `webhook` task commit together or not at all: if anything fails after
the task is enqueued (here, `"quantity": 0` is refused after the insert), the transaction rolls
back and no task, no message, no webhook ever exists.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from conveyor import Conveyor
from conveyor.api.deps import StateDep
from conveyor.tasks.thumbnail import ThumbnailPayload, make_thumbnail
from conveyor.tasks.webhook import WebhookPayload, send_webhook

app = Conveyor()
app.task("webhook", payload=WebhookPayload, max_attempts=8, timeout=130)(send_webhook)
app.task("thumbnail", payload=ThumbnailPayload, process=True, timeout=60)(make_thumbnail)

router = APIRouter(prefix="/shop", tags=["shop"])
ORDERS = """CREATE TABLE IF NOT EXISTS public.shop_orders (
    id bigserial PRIMARY KEY, item text NOT NULL, quantity int NOT NULL, task_id uuid)"""


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not dropped

    item: str = Field(min_length=1)
    quantity: int
    notify_url: HttpUrl


@router.post("/orders", status_code=201)
async def place_order(order: Order, state: StateDep) -> dict[str, Any]:
    """Insert the order and enqueue its notification in one transaction."""
    async with state.pool.acquire() as conn:
        await conn.execute(ORDERS)
        async with conn.transaction():
            order_id = await conn.fetchval(
                "INSERT INTO public.shop_orders (item, quantity) VALUES ($1, $2) RETURNING id",
                order.item, order.quantity,
            )
            task = await app.enqueue(conn, "webhook", {
                "url": str(order.notify_url),
                "body": {"order": order_id, "item": order.item, "quantity": order.quantity},
            })
            if order.quantity < 1:  # a check that fails after the enqueue: all of it rolls back
                raise HTTPException(422, "quantity must be at least 1")
            await conn.execute("UPDATE public.shop_orders SET task_id = $1 WHERE id = $2",
                               task.id, order_id)
    return {"order": order_id, "task": str(task.id)}


app.include_router(router, scope="tasks:enqueue")  # its POST enqueues a webhook
