# The webhook endpoint as an ASGI application, for bots that already run a web server.
#
# It is the same pipeline as the h11 `WebhookServer`: the head is prechecked before any of
# the body is read, the body is read piece by piece and refused past the limit, reading has
# a deadline, and the events are handed to the inbox only after the answer's last
# `http.response.body` message was sent. Lifespan messages are acknowledged (so the app can
# also be served alone, `uvicorn module:app`); the inbox's consumer is the caller's.
#
# Mounted under a prefix (Starlette's Mount, FastAPI's app.mount), `scope["path"]` is the
# full path in current frameworks; give the receiver `path=None` there and let the router
# of the web framework choose the path.
"""An ASGI application that serves QQ webhook callbacks into a :class:`WebhookInbox`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio

from qqproto._webhook_answers import WebhookResponse
from qqproto_io._webhook import content_length

if TYPE_CHECKING:
    from qqproto_io._webhook import WebhookInbox

__all__ = ["WebhookApp"]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]

_TIMEOUT = WebhookResponse(status=408, body=b'{"error":"timeout"}')
_TOO_LARGE = WebhookResponse(status=413, body=b'{"error":"too_large"}')


class WebhookApp:
    """An ASGI 3 application feeding a :class:`~qqproto_io.WebhookInbox`.

    Mount it in Starlette or FastAPI (``app.mount("/qq/callback", WebhookApp(inbox))``) or
    serve it with any ASGI server; read the events from the inbox in a task of your own.

    Args:
        inbox: where requests go.
        request_timeout: seconds to receive the body (408 after).
    """

    def __init__(self, inbox: WebhookInbox, *, request_timeout: float = 10.0) -> None:
        self.inbox = inbox
        """The inbox fed by this application."""
        self._request_timeout = request_timeout

    def __repr__(self) -> str:
        return f"WebhookApp({self.inbox!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (``http``; ``lifespan`` is acknowledged)."""
        kind = scope.get("type")
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return  # websocket scopes: not ours; returning closes them
        inbox = self.inbox
        method = str(scope.get("method", ""))
        path = str(scope.get("path", ""))
        headers: list[tuple[bytes, bytes]] = [
            (bytes(k), bytes(v)) for k, v in scope.get("headers", ())
        ]
        pre = inbox.precheck(
            method=method, path=path, headers=headers, content_length=content_length(headers)
        )
        if pre is not None:
            await _respond(send, pre.response)
            return
        body = bytearray()
        refused: WebhookResponse | None = None
        with anyio.move_on_after(self._request_timeout) as scope_:
            refused = await _read_body(receive, body, inbox.max_body)
        if scope_.cancelled_caught:
            refused = _TIMEOUT
        if refused is not None:
            if refused.status:
                await _respond(send, refused)
            return
        handled = await inbox.handle(method=method, path=path, headers=headers, body=bytes(body))
        try:
            await _respond(send, handled.result.response)
        finally:
            inbox.deliver(handled)


_GONE = WebhookResponse(status=0)  # the client left: nothing to answer


async def _read_body(receive: Receive, body: bytearray, limit: int) -> WebhookResponse | None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return _GONE
        chunk = message.get("body", b"")
        if chunk:
            body += chunk
            if len(body) > limit:
                return _TOO_LARGE
        if not message.get("more_body", False):
            return None


async def _respond(send: Send, response: WebhookResponse) -> None:
    headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        kind = message.get("type")
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
