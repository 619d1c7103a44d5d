# Webhook delivery over real sockets: the inbox both HTTP front ends feed, and the h11 one.
#
# Theory of operation. `WebhookInbox` owns the bounded queue between the HTTP side and the
# application, and the steps around the sans-IO receiver that need IO or the loop: the
# clock, the room check, the optional shared claim (Redis), and delivery. A front end (the
# h11 `WebhookServer` here, or the ASGI `WebhookApp`) reads one request, calls
# `inbox.handle`, writes the answer, and only then calls `inbox.deliver`: the handler can
# never delay the ack, so a slow handler never causes a platform retry.
#
# Room is reserved, not hoped for. `handle` checks the room and reserves a slot in one step
# with no await in between, so however many requests are in flight, an acked event always
# has a place in the queue when `deliver` runs: the queue is only ever written by the inbox,
# and reserved slots count as used. Without room the receiver answers 503 and records
# nothing, so the platform's retry is delivered normally.
#
# Shared claims. Behind a load balancer the retry may reach another process. With a
# `DeliveryClaims` (Redis: SET NX PX) the inbox claims the envelope id after the local check;
# the loser answers like a duplicate. If the claim store fails or is slow, the event is
# delivered anyway (logged and counted): a duplicate during an outage is better than a loss.
#
# Why h11 on anyio and not a web framework: the rest of qqproto_io already serves HTTP this
# way (fake gateway, health), it runs on asyncio and trio alike, it adds no dependency, and
# every limit (read size, deadline, body cap) is ours to set. Users who run a web framework
# mount `WebhookApp` instead.
"""Serve QQ webhook callbacks: the inbox, and an HTTP/1.1 endpoint on anyio."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

import anyio
import h11
from anyio.abc import SocketAttribute

from qqproto._outputs import DuplicateDropped, Event
from qqproto._webhook_answers import WebhookOutcome, WebhookResponse, WebhookResult
from qqproto_io._http_server import next_http_event, response_bytes

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable
    from types import TracebackType

    from anyio.abc import SocketStream, TaskGroup

    from qqproto._webhook import WebhookReceiver
    from qqproto._webhook_router import WebhookRouter

__all__ = ["DeliveryClaims", "WebhookInbox", "WebhookServer"]

log = logging.getLogger("qqproto_io.webhook")

DEFAULT_QUEUE_SIZE = 1024
DEFAULT_CLAIM_TIMEOUT = 1.0
_READ_SIZE = 65536
# A request head of the platform is well under 2 KB; this bounds a hostile one.
_MAX_HEAD = 16 * 1024
_SERVER = (b"server", b"qqproto-webhook")


class DeliveryClaims(Protocol):
    """A delivery record shared by several processes (see ``RedisDeliveryClaims``)."""

    async def claim(self, app_id: str, event_id: str) -> bool:
        """Record that this process delivers ``event_id``; False if another one did."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Handled:
    """One request after :meth:`WebhookInbox.handle`: answer ``result.response`` first,
    then pass this to :meth:`WebhookInbox.deliver`.

    Attributes:
        result: the receiver's verdict (possibly turned into a duplicate by a lost claim).
        reserved: whether a queue slot is held for the events.
    """

    result: WebhookResult
    reserved: bool = False


class WebhookInbox:
    """The queue between webhook front ends and the application, and the steps around it.

    Iterate it (``async for app_id, event in inbox``) or :meth:`run` a handler; feed it from
    a :class:`WebhookServer`, a :class:`~qqproto_io.WebhookApp`, or both.

    Args:
        receiver: a :class:`~qqproto.WebhookReceiver`, or a :class:`~qqproto.WebhookRouter`
            for several bots.
        queue_size: events held for the application; with the queue full a new dispatch is
            answered 503 ``{"op":12,"d":1}`` so that the platform retries it later.
        claims: a delivery record shared with other processes, or ``None``.
        claim_timeout: seconds a claim may take before the event is delivered unclaimed.
        clock: the clock of the dedup memory (the driver's, ``anyio.current_time``).
        wall_clock: Unix time, for the receiver's optional timestamp window.
        on_result: called with every result (logging, metrics); must not block.
    """

    def __init__(
        self,
        receiver: WebhookReceiver | WebhookRouter,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        claims: DeliveryClaims | None = None,
        claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
        clock: Callable[[], float] = anyio.current_time,
        wall_clock: Callable[[], float] = time.time,
        on_result: Callable[[WebhookResult], None] | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.receiver = receiver
        """The receiver or router answering requests."""
        self._claims = claims
        self._claim_timeout = claim_timeout
        self._clock = clock
        self._wall_clock = wall_clock
        self._on_result = on_result
        self._size = queue_size
        self._reserved = 0
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, Event]](queue_size)
        self.counts: dict[str, int] = {}
        """Requests by outcome (``"delivered"``, ``"duplicate"``, ``"queue_full"``, ...) and
        by rejection reason, plus ``"claim_lost"`` and ``"claim_failed"``."""

    def __repr__(self) -> str:
        return f"WebhookInbox({self.receiver!r}, queue_size={self._size})"

    @property
    def max_body(self) -> int:
        """Largest body the receiver accepts."""
        return self.receiver.max_body

    @property
    def queued(self) -> int:
        """Events waiting for the application, plus slots reserved for acked ones."""
        return self._send.statistics().current_buffer_used + self._reserved

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _report(self, result: WebhookResult) -> None:
        error = result.error
        self._count(error.reason if error is not None else result.outcome.value)
        if self._on_result is not None:
            self._on_result(result)

    def precheck(
        self,
        *,
        method: bytes | str,
        path: bytes | str,
        headers: Iterable[tuple[bytes, bytes]],
        content_length: int | None,
    ) -> WebhookResult | None:
        """Refuse a request from its head (method, path, size, app id), or ``None``."""
        result = self.receiver.precheck(
            method=method, path=path, headers=headers, content_length=content_length
        )
        if result is not None:
            self._report(result)
        return result

    async def handle(
        self,
        *,
        method: bytes | str,
        path: bytes | str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> Handled:
        """Verify, record and reserve room for one whole request; answer it, then
        :meth:`deliver` the returned value (also when answering failed)."""
        room = self.queued < self._size
        result = self.receiver.receive(
            method=method,
            path=path,
            headers=headers,
            body=body,
            now=self._clock(),
            wall_time=self._wall_clock(),
            room=room,
        )
        if result.outcome is not WebhookOutcome.DELIVERED:
            self._report(result)
            return Handled(result=result)
        self._reserved += 1
        try:
            result = await self._claim(result)
        except BaseException:
            self._reserved -= 1
            raise
        reserved = result.outcome is WebhookOutcome.DELIVERED
        if not reserved:
            self._reserved -= 1
        self._report(result)
        return Handled(result=result, reserved=reserved)

    async def _claim(self, result: WebhookResult) -> WebhookResult:
        claims, event_id, app_id = self._claims, result.event_id, result.app_id
        if claims is None or event_id is None or app_id is None:
            return result
        won: bool | None = None
        try:
            with anyio.move_on_after(self._claim_timeout):
                won = await claims.claim(app_id, event_id)
        except Exception as exc:  # noqa: BLE001 - any store failure means "deliver unclaimed"
            log.warning("webhook claim failed (%s); delivering unclaimed", type(exc).__name__)
        if won is None:
            self._count("claim_failed")
            return result
        if won:
            return result
        self._count("claim_lost")
        dispatch = result.events[0]
        t = getattr(dispatch, "type", "")
        seq = getattr(dispatch, "seq", None)
        return dataclasses.replace(
            result,
            outcome=WebhookOutcome.DUPLICATE,
            events=(DuplicateDropped(type=t, seq=seq, key="event_id"),),
        )

    def deliver(self, handled: Handled) -> None:
        """Queue the events of a request whose answer was written (or failed to be)."""
        app_id = handled.result.app_id or ""
        send = self._send
        if handled.reserved:
            self._reserved -= 1
            for event in handled.result.events:
                try:
                    send.send_nowait((app_id, event))
                except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    # Only after close(): the reservation kept the room.
                    self._count("lost_after_ack")
            return
        for event in handled.result.events:
            # Reports (a DuplicateDropped) never take a slot an acked event reserved.
            if self.queued >= self._size:
                self._count("report_dropped")
                continue
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                send.send_nowait((app_id, event))

    def close(self) -> None:
        """Stop accepting events; iteration ends once the queued ones are taken."""
        self._send.close()

    async def aclose(self) -> None:
        """Close both ends of the queue; events still queued are dropped."""
        self._send.close()
        self._receive.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[str, Event]:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def run(self, handler: Callable[[str, Event], Awaitable[None]]) -> None:
        """Call ``handler(app_id, event)`` for each event, one at a time, until closed."""
        async for app_id, event in self:
            await handler(app_id, event)


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` a request head declares, or ``None`` (absent or not a number)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


_PHRASES = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


class WebhookServer:
    """An HTTP/1.1 endpoint on anyio (h11) that feeds a :class:`WebhookInbox`.

    Serve it behind a TLS reverse proxy (the platform calls HTTPS URLs only). Each
    connection is bounded: reading a request (head and body) must finish within
    ``request_timeout``, the body is read in pieces and refused past the receiver's
    ``max_body`` (413, unread), and a connection's failure ends only that connection.

    Args:
        inbox: where requests go.
        host: the address to listen on.
        port: the port (0: any free one; see :attr:`port`).
        request_timeout: seconds to receive one request, head and body (408 after).
        write_timeout: seconds to write one answer.
        max_connections: open connections served at once; more are answered 503.
    """

    def __init__(
        self,
        inbox: WebhookInbox,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        request_timeout: float = 10.0,
        write_timeout: float = 10.0,
        max_connections: int = 1024,
    ) -> None:
        self.inbox = inbox
        """The inbox fed by this server."""
        self.host = host
        """The address listened on."""
        self._port = port
        self._request_timeout = request_timeout
        self._write_timeout = write_timeout
        self._max_connections = max_connections
        self._active = 0
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"WebhookServer(host={self.host!r}, port={self._port})"

    @property
    def port(self) -> int:
        """The port listened on (the real one once started)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self._port)
            stack.push_async_callback(listener.aclose)
            self._port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            tg.start_soon(listener.serve, self._connection, tg)
            self._tg = tg
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _connection(self, stream: SocketStream) -> None:
        async with stream:
            if self._active >= self._max_connections:
                await self._refuse(stream)
                return
            self._active += 1
            try:
                await self._serve(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
                pass
            except (h11.ProtocolError, OSError, TimeoutError) as exc:
                log.debug("webhook connection ended: %s", type(exc).__name__)
            except Exception:
                # One connection's bug must not end the listener's task group (every other
                # connection): log it and close this one.
                log.exception("webhook connection failed")
            finally:
                self._active -= 1

    async def _refuse(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        response = WebhookResponse(status=503, body=b'{"error":"busy"}')
        event: object = None
        # Read the head so that h11 lets us answer; a client that sends none is dropped.
        with anyio.move_on_after(self._request_timeout), contextlib.suppress(h11.ProtocolError):
            event = await next_http_event(stream, conn, read_size=_READ_SIZE)
        if isinstance(event, h11.Request):
            await self._write(stream, _frame(conn, response, close=True))

    async def _serve(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        inbox = self.inbox
        while True:
            request: h11.Request | None = None
            body = bytearray()
            early: WebhookResponse | None = None
            with anyio.move_on_after(self._request_timeout) as scope:
                try:
                    event = await next_http_event(stream, conn, read_size=_READ_SIZE)
                    if not isinstance(event, h11.Request):
                        return  # ConnectionClosed: the client is done
                    request = event
                    pre = inbox.precheck(
                        method=request.method,
                        path=request.target,
                        headers=request.headers,
                        content_length=content_length(request.headers),
                    )
                    if pre is not None:
                        early = pre.response
                    else:
                        early = await _read_body(stream, conn, body, inbox.max_body)
                except h11.RemoteProtocolError:
                    if conn.our_state is not h11.SEND_RESPONSE:
                        return
                    early = WebhookResponse(status=400, body=b'{"error":"bad_http"}')
            if scope.cancelled_caught:
                if conn.our_state is h11.SEND_RESPONSE:
                    timeout = WebhookResponse(status=408, body=b'{"error":"timeout"}')
                    await self._write(stream, _frame(conn, timeout, close=True))
                return
            if request is None:
                return
            if early is not None:
                # Refused before the body was read whole: close, never resynchronise.
                await self._write(stream, _frame(conn, early, close=True))
                return
            handled = await inbox.handle(
                method=request.method,
                path=request.target,
                headers=request.headers,
                body=bytes(body),
            )
            try:
                await self._write(stream, _frame(conn, handled.result.response, close=False))
            finally:
                inbox.deliver(handled)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _write(self, stream: SocketStream, data: bytes) -> None:
        with anyio.fail_after(self._write_timeout):
            await stream.send(data)


async def _read_body(
    stream: SocketStream, conn: h11.Connection, body: bytearray, limit: int
) -> WebhookResponse | None:
    """Read the body into ``body``; a response if it must be refused (too large)."""
    while True:
        event = await next_http_event(stream, conn, read_size=_READ_SIZE)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                return WebhookResponse(status=413, body=b'{"error":"too_large"}')
        elif isinstance(event, h11.EndOfMessage):
            return None
        else:
            # ConnectionClosed mid-body is raised by h11; anything else ends the request.
            raise h11.RemoteProtocolError("request ended before its body")


def _frame(conn: h11.Connection, response: WebhookResponse, *, close: bool) -> bytes:
    headers = [
        *response.headers,
        _SERVER,
        (b"content-length", str(len(response.body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    reason = _PHRASES.get(response.status, b"")
    return response_bytes(conn, response.status, reason, headers, response.body)
