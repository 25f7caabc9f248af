"""`webhook` (task type A, I/O-bound): POST a JSON body to a URL, signed with HMAC-SHA256.

Headers: `X-Conveyor-Timestamp` (Unix seconds), `X-Conveyor-Signature` (`sha256=<hex>` of
`<timestamp>.<body>` under CONVEYOR_WEBHOOK_SECRET), `X-Conveyor-Task-Id` (delivery is at least
once: receivers deduplicate on it). 2xx succeeds; 5xx, 408, 429, timeouts and connection errors
are retried (after `Retry-After` when the receiver sends one); any other 4xx fails at once.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from conveyor.errors import Fail, Retry
from conveyor.registry import TaskContext

SIGNATURE_HEADER = "X-Conveyor-Signature"
TIMESTAMP_HEADER = "X-Conveyor-Timestamp"
TASK_ID_HEADER = "X-Conveyor-Task-Id"
_RETRYABLE_4XX = {408, 429}
MAX_RETRY_AFTER_S = 3600.0


class WebhookPayload(BaseModel):
    """Where to POST and what."""

    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="http(s) URL of the receiver")
    body: dict[str, Any] | list[Any] = Field(default_factory=dict, description="JSON to send")
    headers: dict[str, str] = Field(default_factory=dict, max_length=32,
                                    description="extra request headers")
    timeout_s: float = Field(default=10.0, gt=0, le=120, description="per-attempt timeout")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(
    secret: bytes, timestamp: str, body: bytes, signature: str, *,
    tolerance_s: float = 300.0, now: float | None = None,
) -> bool:
    """What a receiver checks: a matching signature on a recent timestamp."""
    try:
        age = abs((now if now is not None else time.time()) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def _retry_after(response: httpx.Response) -> float | None:
    """The receiver's Retry-After in seconds, capped at an hour (it is theirs to choose)."""
    value = response.headers.get("retry-after", "")
    return min(float(value), MAX_RETRY_AFTER_S) if value.isdigit() else None


async def send_webhook(payload: WebhookPayload, ctx: TaskContext) -> dict[str, Any]:
    """Deliver one webhook; the result records the receiver's status and the time taken."""
    body = orjson.dumps(payload.body)
    timestamp = str(int(time.time()))
    secret = ctx.settings.webhook_secret.get_secret_value().encode()
    headers = {
        **payload.headers,
        "Content-Type": "application/json",
        "User-Agent": "conveyor-webhook",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        TASK_ID_HEADER: ctx.task_id,
    }
    began = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=payload.timeout_s) as client:
            response = await client.post(str(payload.url), content=body, headers=headers)
    except httpx.TimeoutException as exc:
        raise Retry(f"timed out after {payload.timeout_s} s: {type(exc).__name__}") from exc
    except httpx.TransportError as exc:
        raise Retry(f"connection failed: {type(exc).__name__}: {exc}") from exc
    elapsed_ms = round((time.perf_counter() - began) * 1000, 1)
    code = response.status_code
    if 200 <= code < 300:
        return {"status_code": code, "elapsed_ms": elapsed_ms}
    excerpt = response.text[:200]
    if code >= 500 or code in _RETRYABLE_4XX:
        raise Retry(f"receiver answered {code}: {excerpt}", delay_s=_retry_after(response))
    raise Fail(f"receiver answered {code}: {excerpt}")
