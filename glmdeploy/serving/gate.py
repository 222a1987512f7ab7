"""The outermost layer of the server: the API key check, and a count of the API's response statuses.

A plain ASGI wrapper around the whole application (not a Starlette `BaseHTTPMiddleware`, which
would buffer streams and hide client disconnects), so that it also sees the 500s of Starlette's
own error middleware. `/health` stays open without a key, as load balancers expect.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from glmdeploy.serving.protocol import error_body
from glmdeploy.serving.state import ServerState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
CLIENT_GONE = 499  # the status a handler answers a client that has left (never counted)


class Gate:
    """ASGI app: refuse `/v1/*` without the API key (when one is set), count response statuses."""

    def __init__(self, app: ASGIApp, state: ServerState, api_key: str | None) -> None:
        self.app, self.state = app, state
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith("/v1/")  # health checks are not counted
        if self._expected is not None and api:
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await self._refuse(send)
                return

        async def counted(message: Message) -> None:
            start = message["type"] == "http.response.start"
            if api and start and message["status"] != CLIENT_GONE:
                self.state.statuses[int(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counted)

    async def _refuse(self, send: Send) -> None:
        body = error_body("Incorrect API key provided: send it as 'Authorization: Bearer KEY'.",
                          "invalid_request_error", code="invalid_api_key")  # fmt: skip
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        headers.append((b"content-length", str(len(payload)).encode()))
        self.state.statuses[401] += 1
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
