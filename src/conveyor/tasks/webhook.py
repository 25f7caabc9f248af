"""`webhook` (task type A, I/O-bound): POST a JSON body to a URL, signed with HMAC-SHA256.

Headers: `X-Conveyor-Timestamp` (Unix seconds), `X-Conveyor-Signature` (`sha256=<hex>` of
`<timestamp>.<body>` under CONVEYOR_WEBHOOK_SECRET), `X-Conveyor-Task-Id` (delivery is at least
once: receivers deduplicate on it). 2xx succeeds; 5xx, 408, 429, timeouts and connection errors
are retried (after `Retry-After` when the receiver sends one); any other 4xx fails at once, and
so does a 3xx (redirects are never followed; the error names the `Location`).

Deliveries go through the worker's guarded client (`conveyor.egress`): a destination that is
not public (unless CONVEYOR_WEBHOOK_ALLOW_CIDRS allows it) fails the task at once, naming the
address; a URL whose host is such an address, or whose port is refused, is refused at enqueue.
At most 64 KiB of the answer is read and 200 characters of it kept.

Receivers check a delivery with `verify_request(secret, headers, body)`. Unless
CONVEYOR_WEBHOOK_SECRET is set, deliveries are signed with a development secret that anyone can
read here, and a worker that sends webhooks says so when it starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from conveyor.config import DEV_WEBHOOK_SECRET, Settings
from conveyor.egress.hosts import destination_refusal
from conveyor.egress.policy import current_policy
from conveyor.errors import EgressDenied, Fail, Retry
from conveyor.registry import TaskContext, TaskType

SIGNATURE_HEADER = "X-Conveyor-Signature"
TIMESTAMP_HEADER = "X-Conveyor-Timestamp"
TASK_ID_HEADER = "X-Conveyor-Task-Id"
_RETRYABLE_4XX = {408, 429}
# Headers a payload may not set: those Conveyor sets itself (a second copy would be sent beside
# its own), and those that would change where or how the request goes (`Host` would replace the
# hostname the connection was checked and pinned for).
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
    "trailer", "upgrade", "content-type", "user-agent", SIGNATURE_HEADER.lower(),
    TIMESTAMP_HEADER.lower(), TASK_ID_HEADER.lower(),
})
EXCERPT_CHARS = 200
MAX_RETRY_AFTER_S = 3600.0
log = structlog.get_logger("conveyor.webhook")


class WebhookPayload(BaseModel):
    """Where to POST and what."""

    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="http(s) URL of the receiver: a public destination "
                                     "(a non-public address or a service port is a 422)")
    body: dict[str, Any] | list[Any] = Field(default_factory=dict, description="JSON to send")
    headers: dict[str, str] = Field(default_factory=dict, max_length=32,
                                    description="extra request headers (not Host, framing "
                                                "headers, Content-Type, User-Agent or "
                                                "X-Conveyor-*)")
    timeout_s: float = Field(default=10.0, gt=0, le=120, description="per-attempt timeout")

    @field_validator("headers")
    @classmethod
    def _not_reserved(cls, headers: dict[str, str]) -> dict[str, str]:
        reserved = sorted(name for name in headers if name.lower() in RESERVED_HEADERS)
        if reserved:
            raise ValueError(f"headers {', '.join(reserved)} may not be set: Conveyor sets "
                             "them (or they would change where the request goes)")
        return headers

    @field_validator("url")
    @classmethod
    def _public(cls, url: HttpUrl) -> HttpUrl:
        """Refuse what the URL alone shows the egress guard would refuse at connect."""
        refused = destination_refusal(url.host or "", url.port or 0, current_policy())
        if refused is not None:
            raise ValueError(f"destination refused: {refused}")
        return url


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    digest = hmac.new(_key(secret), timestamp.encode() + b"." + body,
                      hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(
    secret: str | bytes, timestamp: str, body: bytes, signature: str, *,
    tolerance_s: float = 300.0, now: float | None = None,
) -> bool:
    """What a receiver checks: a matching signature on a recent timestamp (within
    `tolerance_s` of `now`, so a recorded delivery cannot be replayed later)."""
    try:
        age = abs((now if now is not None else time.time()) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def verify_request(
    secret: str | bytes, headers: Mapping[str, str], body: bytes, *,
    tolerance_s: float = 300.0, now: float | None = None,
) -> bool:
    """`verify` a delivery as a receiver gets it: its headers (any capitalisation, as web
    frameworks hand them over) and its raw body, before parsing it."""
    lower = {k.lower(): v for k, v in headers.items()}
    return verify(secret, lower.get(TIMESTAMP_HEADER.lower(), ""), body,
                  lower.get(SIGNATURE_HEADER.lower(), ""), tolerance_s=tolerance_s, now=now)


def warn_if_development_secret(settings: Settings, task_types: Iterable[TaskType]) -> bool:
    """Log a warning when these types include webhooks signed with the development secret
    (CONVEYOR_WEBHOOK_SECRET unset); True if so."""
    sends = [t.name for t in task_types if t.handler is send_webhook]
    if not sends or settings.webhook_secret.get_secret_value() != DEV_WEBHOOK_SECRET:
        return False
    log.warning("webhook.secret.development", task_types=sends,
                detail="webhooks are signed with the public development secret; set "
                       "CONVEYOR_WEBHOOK_SECRET so receivers can trust the signature")
    return True


def _retry_after(response: httpx.Response) -> float | None:
    """The receiver's Retry-After in seconds, capped at an hour (it is theirs to choose)."""
    value = response.headers.get("retry-after", "")
    digits = value.isascii() and value.isdigit()  # not "²", which float() refuses
    return min(float(value), MAX_RETRY_AFTER_S) if digits else None


async def send_webhook(payload: WebhookPayload, ctx: TaskContext) -> dict[str, Any]:
    """Deliver one webhook; the result records the receiver's status and the time taken."""
    body = orjson.dumps(payload.body)
    timestamp = str(int(time.time()))
    secret = ctx.settings.webhook_secret.get_secret_value()
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
        async with asyncio.timeout(payload.timeout_s):
            async with ctx.http.client.stream(
                "POST", str(payload.url), content=body, headers=headers,
                timeout=httpx.Timeout(payload.timeout_s, connect=min(payload.timeout_s, 5.0)),
            ) as response:
                answer = await response.aread()  # at most 64 KiB: the transport cuts it
    except EgressDenied:
        raise
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise Retry(f"timed out after {payload.timeout_s} s: {type(exc).__name__}") from exc
    except httpx.TransportError as exc:
        raise Retry(f"connection failed: {type(exc).__name__}: {exc}") from exc
    elapsed_ms = round((time.perf_counter() - began) * 1000, 1)
    code = response.status_code
    if 200 <= code < 300:
        return {"status_code": code, "elapsed_ms": elapsed_ms}
    excerpt = answer[:EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]
    if 300 <= code < 400:
        raise Fail(f"receiver answered {code}, a redirect, which is not followed "
                   f"(Location: {response.headers.get('location', '')[:500]!r})")
    if code >= 500 or code in _RETRYABLE_4XX:
        raise Retry(f"receiver answered {code}: {excerpt}", delay_s=_retry_after(response))
    raise Fail(f"receiver answered {code}: {excerpt}")
