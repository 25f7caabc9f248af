"""Body limit: 413 for a request body over `max_body_bytes`, by its Content-Length or, for a
chunked body (no Content-Length), as soon as the bytes read pass the limit."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.responses import problem


class _TooLarge(BaseException):
    # Not an Exception: FastAPI turns any Exception raised while reading a body into a 400.
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value
                break
        if length is not None and length.isdigit():
            if int(length) > self.max_body_bytes:
                await self._reject(scope, receive, send)
            else:  # the server delivers no more than the declared length
                await self.app(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _TooLarge
            return message

        async def noting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, noting_send)
        except _TooLarge:
            if started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(
            413,
            "Request body too large",
            f"the body exceeds the limit of {self.max_body_bytes} bytes (MAX_BODY_BYTES)",
            request_id=scope.get("state", {}).get("request_id"),
        )
        await response(scope, receive, send)
