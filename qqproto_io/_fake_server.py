# The fake QQ gateway served for real on loopback, around the sans-IO `FakeGateway`.
#
# Theory of operation. One TCP listener serves both the REST endpoints and the WebSocket
# gateway, as the real platform's hosts do from the client's point of view. Every accepted
# socket starts as an h11 HTTP/1.1 server connection: token, gateway-URL and message-send
# requests are answered from `FakeGateway.token_request` / `gateway_request` /
# `post_message` (keep-alive allowed), and an `Upgrade: websocket` GET on the gateway path
# hands the socket, with whatever bytes h11 had already buffered, to wsproto.
#
# A WebSocket connection ("peer") owns one `ServerConnection` of the sans-IO core and three
# tasks in its own task group. The reader feeds every client message to the core. The timer
# task sleeps in a cancel scope whose deadline is the core's `get_timer()`; `_flush` moves
# that deadline after every input, so timers never poll. All of them, and the test's
# scripted actions (`message`, `close_all`, `drop_all`), funnel the core's outputs through
# the synchronous `_flush`, which frames them with wsproto at once (so frame order is the
# order the core produced them in) and queues the bytes for the writer task. The queue is
# bounded: a client too slow to read is hung up on instead of growing the server's memory.
# Hanging up means cancelling the peer's task group; the socket is closed in a `finally`.
#
# Everything runs inside one task group opened by `__aenter__`, so `__aexit__` cancels every
# connection at once and returns only when no task is left. The clock is always
# `anyio.current_time()`, the same clock the core's timers are expressed in.
"""A fake QQ gateway on loopback (HTTP + WebSocket), for tests and local demos."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import http
import logging
import math
import random
import re
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import anyio
import h11
import orjson
from anyio.abc import SocketAttribute
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from qqproto.testing._fake_gateway import (
    FakeGateway,
    FakeGatewayConfig,
    HttpReply,
    ServerClose,
    ServerConnection,
    ServerSend,
)
from qqproto_io._http_server import next_http_event, response_bytes

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

    from anyio.abc import ByteStream, Listener, SocketStream, TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from wsproto.events import Event as WsEvent

    from qqproto._codec import JSONValue

__all__ = ["FakeGatewayServer"]

logger = logging.getLogger("qqproto_io.fake_server")

TOKEN_PATH = "/app/getAppAccessToken"  # noqa: S105 - a URL path, not a secret
WS_PATH = "/websocket"
# Where a bot sends (or passively replies to) C2C and group messages.
_MESSAGE_ROUTE = re.compile(r"/v2/(?:users|groups)/[^/]+/messages")

_READ_SIZE = 65536
# A token request body is ~80 bytes; anything near this cap is not a client we model.
_MAX_BODY = 64 * 1024
# QQ payloads are a few KB; the cap bounds what one client can make the server buffer.
_MAX_MESSAGE = 1 << 20
# Frames queued for one client before it counts as too slow to keep.
_OUTBOX_SIZE = 1024
# How long a server close waits for the client's answering close before hanging up.
_CLOSE_LINGER = 5.0
# FakeGatewayConfig's own URL points nowhere; a served gateway hands out its real one.
_DEFAULT_URL = FakeGatewayConfig().url


class _Hangup(enum.Enum):
    """Writer instructions queued after the frames, so they happen after those are sent."""

    NOW = enum.auto()  # close the TCP stream (a drop, or our answer to a client close)
    AFTER_CLOSE = enum.auto()  # we sent a close: wait for the client's answer, bounded


_Outgoing = bytes | _Hangup


class _Gate:
    """A flag tasks can wait on: open (flowing) or closed (frozen by ``stop_reading``)."""

    def __init__(self) -> None:
        self.is_open = True
        self._opened: anyio.Event | None = None

    def close(self) -> None:
        self.is_open = False

    def open(self) -> None:
        self.is_open = True
        if self._opened is not None:
            self._opened.set()
            self._opened = None

    async def wait_open(self) -> None:
        while not self.is_open:
            if self._opened is None:
                self._opened = anyio.Event()
            await self._opened.wait()


@dataclasses.dataclass(eq=False, slots=True)
class _Peer:
    """One live WebSocket connection and its plumbing."""

    conn: ServerConnection
    ws: WSConnection
    stream: ByteStream
    outbox: MemoryObjectSendStream[_Outgoing]
    scope: anyio.CancelScope
    gate: _Gate = dataclasses.field(default_factory=_Gate)
    timer_scope: anyio.CancelScope | None = None
    pieces: list[str] = dataclasses.field(default_factory=list)
    size: int = 0  # characters in `pieces`
    close_ignored: bool = False  # the client's close arrived under faults.ignore_close
    close_answered: bool = False  # the client answered the close we sent

    def hang_up(self) -> None:
        self.scope.cancel()


class FakeGatewayServer:
    """The fake QQ platform served on a loopback port: REST endpoints and the gateway.

    Use it as an async context manager; it binds on entry and stops on exit::

        async with FakeGatewayServer() as server:
            ...  # point the client at server.token_url, server.http_base, server.ws_url

    Runs on asyncio and trio (anyio). The sans-IO core is :attr:`gateway`: flip
    ``gateway.faults`` at any time, read ``gateway.connections`` for what clients sent.
    ``gateway.config.url`` is set to :attr:`ws_url` unless the config names another URL.

    Args:
        config: how the fake platform behaves; copied, so later changes go through
            ``gateway.config``.
        seed: seeds the ids and tokens the gateway makes up.
        host: where to listen (loopback by default).
        port: the TCP port (0 picks a free one).
        message_interval: if set, produce a numbered C2C message every that many seconds.

    Attributes:
        gateway: the sans-IO fake platform.
        stop_reading: freeze every connection open at the time it is set: the server
            neither reads from nor writes to it, and keeps its TCP stream open (a half-open
            link). What the client sends and what the gateway produces meanwhile is held, and
            flows again when it is cleared. Connections opened later are not affected.
        http_hang: REST requests are read and never answered (the upgrade to the WebSocket
            gateway is not affected). The socket stays open until the client gives up.
    """

    def __init__(
        self,
        config: FakeGatewayConfig | None = None,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        message_interval: float | None = None,
    ) -> None:
        cfg = dataclasses.replace(config) if config is not None else FakeGatewayConfig()
        self.gateway = FakeGateway(cfg, rng=random.Random(seed))  # noqa: S311 - fake ids
        self.http_hang = False
        self._host = host
        self._port = port
        self._message_interval = message_interval
        self._stop_reading = False
        self._peers: dict[ServerConnection, _Peer] = {}
        self._task_group: TaskGroup | None = None
        self._listener: Listener[SocketStream] | None = None

    # ------------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        """The bound port (after entering)."""
        return self._port

    @property
    def http_base(self) -> str:
        """The REST base URL: ``GET {http_base}/gateway`` and ``/gateway/bot``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def token_url(self) -> str:
        """The access-token endpoint (``POST``, JSON body)."""
        return self.http_base + TOKEN_PATH

    @property
    def ws_url(self) -> str:
        """The WebSocket gateway URL."""
        return "ws" + self.http_base.removeprefix("http") + WS_PATH

    # ------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("FakeGatewayServer is already running")
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        self._listener = listener
        self._port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        if self.gateway.config.url == _DEFAULT_URL:
            self.gateway.config.url = self.ws_url
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(listener.serve, self._handle_client, task_group)
        if self._message_interval is not None:
            task_group.start_soon(self._produce_messages, self._message_interval)
        logger.info("fake gateway listening on %s", self.http_base)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, listener = self._task_group, self._listener
        if task_group is None or listener is None:
            return
        # Stopping is not a failure: every connection is cut, nobody waits for clients. The
        # body's own exception is not handed to the task group, so that it propagates as it
        # was raised rather than wrapped in an exception group.
        task_group.cancel_scope.cancel()
        try:
            await task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            self._listener = None
            await anyio.aclose_forcefully(listener)
            logger.info("fake gateway on %s stopped", self.http_base)

    async def serve_forever(self) -> None:
        """Serve until cancelled (enters the server first if it is not running)."""
        if self._task_group is None:
            async with self:
                await anyio.sleep_forever()
        else:
            await anyio.sleep_forever()

    # ------------------------------------------------------------- scripted behaviour

    @property
    def stop_reading(self) -> bool:
        """See the class docstring."""
        return self._stop_reading

    @stop_reading.setter
    def stop_reading(self, value: bool) -> None:
        self._stop_reading = value
        for peer in list(self._peers.values()):
            if value:
                peer.gate.close()
            else:
                peer.gate.open()

    def message(self, n: int, *, shard: int = 0, content: str | None = None) -> int:
        """Produce message ``n`` now (see :meth:`FakeGateway.message`) and send it to every
        live connection of its sessions. Returns how many sessions received it."""
        delivered = self.gateway.message(n, anyio.current_time(), shard=shard, content=content)
        self._flush_all()
        return delivered

    def dispatch(self, t: str, d: JSONValue, *, event_id: str | None = None, shard: int = 0) -> int:
        """Produce one event now (see :meth:`FakeGateway.dispatch`) and send it to every live
        connection of its sessions. Returns how many sessions received it."""
        now = anyio.current_time()
        delivered = self.gateway.dispatch(t, d, now, event_id=event_id, shard=shard)
        self._flush_all()
        return delivered

    def reconnect_all(self) -> None:
        """Send op 7 to every live gateway connection (a rotation: each one is closed with
        4009 a second later unless its client closed it first)."""
        now = anyio.current_time()
        for conn in list(self.gateway.live):
            conn.request_reconnect(now)
        self._flush_all()

    def close_all(self, code: int, reason: str = "closed by the test") -> None:
        """Close every live gateway connection with ``code`` (a close frame, then hang up)."""
        now = anyio.current_time()
        for conn in list(self.gateway.live):
            conn.close(code, reason, now)
        self._flush_all()

    def drop_all(self) -> None:
        """Cut every live gateway connection without a close frame."""
        now = anyio.current_time()
        for conn in list(self.gateway.live):
            conn.drop(now)
        self._flush_all()

    async def _produce_messages(self, interval: float) -> None:
        start = anyio.current_time()
        n = 0
        while True:
            n += 1
            # Absolute deadlines: a slow iteration does not shift the later ones.
            await anyio.sleep_until(start + n * interval)
            self.message(n)

    # ------------------------------------------------------------------------ HTTP

    async def _handle_client(self, stream: SocketStream) -> None:
        try:
            await self._serve_http(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client went away mid-exchange
        except Exception:
            # One misbehaving connection must not take the server (and the test) down.
            logger.exception("fake gateway: connection handler failed")
        finally:
            await anyio.aclose_forcefully(stream)

    async def _serve_http(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            try:
                event = await next_http_event(stream, conn, read_size=_READ_SIZE)
                if not isinstance(event, h11.Request):
                    return  # the client closed an idle keep-alive connection
                body = await _read_body(stream, conn)
            except h11.RemoteProtocolError as err:
                if conn.our_state is h11.SEND_RESPONSE:
                    status = err.error_status_hint
                    await _respond(stream, conn, HttpReply(status, _error(status)), close=True)
                return
            if body is None:
                await _respond(stream, conn, HttpReply(413, _error(413)), close=True)
                return
            path = urlsplit(event.target.decode("ascii", "replace")).path
            if _is_upgrade(event) and path.rstrip("/") == WS_PATH:
                await self._upgrade(stream, conn, event)
                return
            if self.http_hang:
                await _discard_until_eof(stream)
                return
            reply = self._route(event.method, path, event.headers, body)
            logger.debug("fake gateway: %s %s -> %d", event.method.decode(), path, reply.status)
            await _respond(stream, conn, reply)
            if conn.our_state is not h11.DONE:
                return  # h11 decided the connection must close
            conn.start_next_cycle()

    def _route(
        self, method: bytes, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> HttpReply:
        now = anyio.current_time()
        auth = next((v for k, v in headers if k == b"authorization"), None)
        authorization = auth.decode("latin-1") if auth is not None else None
        if method == b"POST" and (path == TOKEN_PATH or _MESSAGE_ROUTE.fullmatch(path)):
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                return HttpReply(400, {"code": 400, "message": "body is not JSON"})
            if not isinstance(parsed, dict):
                return HttpReply(400, {"code": 400, "message": "body is not a JSON object"})
            if path == TOKEN_PATH:
                return self.gateway.token_request(parsed, now)
            return self.gateway.post_message(path, authorization, parsed, now)
        if path in {"/gateway", "/gateway/bot"} and method == b"GET":
            return self.gateway.gateway_request(authorization, now, bot=path == "/gateway/bot")
        return HttpReply(404, _error(404))

    # ------------------------------------------------------------------- WebSocket

    async def _upgrade(
        self, stream: SocketStream, http_conn: h11.Connection, req: h11.Request
    ) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(req.headers), req.target)
        except WsRemoteProtocolError as err:
            hint = err.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            await _respond(stream, http_conn, HttpReply(status, _error(status)), close=True)
            return
        for _ in ws.events():
            pass  # the handshake Request, already checked by wsproto
        # h11 stopped at the protocol switch; what it read past the request is WebSocket data.
        pending, _ = http_conn.trailing_data
        await stream.send(ws.send(AcceptConnection()))
        conn = self.gateway.accept(anyio.current_time())
        logger.debug("fake gateway: WebSocket connection %d opened", conn.number)
        send, receive = anyio.create_memory_object_stream[_Outgoing](_OUTBOX_SIZE)
        try:
            with send, receive:
                async with anyio.create_task_group() as task_group:
                    peer = _Peer(conn, ws, stream, send, task_group.cancel_scope)
                    self._peers[conn] = peer
                    self._flush(peer)  # Hello
                    task_group.start_soon(self._ws_reader, peer, bytes(pending))
                    task_group.start_soon(self._ws_writer, peer, receive)
                    task_group.start_soon(self._ws_timer, peer)
        finally:
            self._peers.pop(conn, None)
            if not conn.closed:
                # Hung up for a reason the core did not decide (shutdown, slow client): it
                # sees the link end like any other.
                conn.client_closed(None, anyio.current_time())
                conn.take_outputs()
            logger.debug("fake gateway: WebSocket connection %d ended", conn.number)

    async def _ws_reader(self, peer: _Peer, pending: bytes) -> None:
        data = pending
        while True:
            # Once closed, wsproto refuses data; what a client sends after the closing
            # handshake is of no interest anyway.
            if data and peer.ws.state is not ConnectionState.CLOSED:
                await peer.gate.wait_open()
                peer.ws.receive_data(data)
                for event in peer.ws.events():
                    self._on_ws_event(peer, event)
                if peer.close_answered:
                    peer.hang_up()  # the closing handshake is complete
                    return
            await peer.gate.wait_open()
            try:
                data = await peer.stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                await peer.gate.wait_open()
                peer.conn.client_closed(None, anyio.current_time())
                self._flush(peer)
                peer.hang_up()
                return

    def _on_ws_event(self, peer: _Peer, event: WsEvent) -> None:
        conn, ws = peer.conn, peer.ws
        now = anyio.current_time()
        if isinstance(event, TextMessage):
            if peer.size + len(event.data) > _MAX_MESSAGE:
                peer.pieces.clear()
                peer.size = 0
                conn.close(1009, "message too big", now)
            elif event.message_finished:
                peer.pieces.append(event.data)
                text = "".join(peer.pieces)
                peer.pieces.clear()
                peer.size = 0
                conn.receive(text, now)
            else:
                peer.pieces.append(event.data)
                peer.size += len(event.data)
        elif isinstance(event, BytesMessage):
            if event.message_finished:
                conn.close(1003, "binary messages are not supported", now)
        elif isinstance(event, Ping):
            if ws.state is ConnectionState.OPEN:
                self._push(peer, ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if ws.state is ConnectionState.OPEN:
                # wsproto reports a frame it could not parse as a close without a close
                # handshake: the server must send it.
                conn.close(event.code, event.reason or "protocol error", now)
            elif ws.state is ConnectionState.REMOTE_CLOSING:
                peer.close_ignored = self.gateway.faults.ignore_close
                conn.client_closed(event.code, now)
            else:  # LOCAL_CLOSING became CLOSED: this answers our close
                peer.close_answered = True
        self._flush(peer)
        # An Identify or Resume that takes a session over closes the connection that had it
        # (4009), and the core has no way to say so: look for outputs on the others too.
        for other in list(self._peers.values()):
            if other.conn.outputs:
                self._flush(other)

    async def _ws_writer(self, peer: _Peer, outbox: MemoryObjectReceiveStream[_Outgoing]) -> None:
        async for item in outbox:
            await peer.gate.wait_open()
            if item is _Hangup.NOW:
                peer.hang_up()
                return
            if item is _Hangup.AFTER_CLOSE:
                # The reader hangs up as soon as the client's close arrives; this is the
                # bound for a client that never answers.
                await anyio.sleep(_CLOSE_LINGER)
                await peer.gate.wait_open()
                peer.hang_up()
                return
            try:
                await peer.stream.send(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                peer.hang_up()
                return

    async def _ws_timer(self, peer: _Peer) -> None:
        conn = peer.conn
        while not conn.closed:
            due = conn.get_timer()
            with anyio.CancelScope(deadline=math.inf if due is None else due) as scope:
                peer.timer_scope = scope
                await anyio.sleep_forever()
            peer.timer_scope = None
            # The deadline may have been moved into the past by `_flush`, or fired for a
            # time that has since moved on: only run the core's timers when they are due.
            due = conn.get_timer()
            now = anyio.current_time()
            if due is not None and due <= now:
                conn.handle_timer(now)
                self._flush(peer)

    # ------------------------------------------------------------------- outputs

    def _flush_all(self) -> None:
        for peer in list(self._peers.values()):
            self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        """Frame the core's outputs for ``peer`` in order, queue them, re-arm its timer."""
        ws = peer.ws
        for out in peer.conn.take_outputs():
            state = ws.state
            if isinstance(out, ServerSend):
                if state is ConnectionState.OPEN:
                    self._push(peer, ws.send(TextMessage(data=out.text)))
            elif isinstance(out, ServerClose):
                if peer.close_ignored:
                    # A close frame now would answer the client's close after all.
                    self._push(peer, _Hangup.NOW)
                elif state in {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}:
                    # 1005 means "no code" and cannot be sent with a reason.
                    reason = out.reason if out.code != 1005 else None
                    self._push(peer, ws.send(CloseConnection(code=out.code, reason=reason)))
                    answered = state is ConnectionState.REMOTE_CLOSING
                    self._push(peer, _Hangup.NOW if answered else _Hangup.AFTER_CLOSE)
            else:
                self._push(peer, _Hangup.NOW)
        timer_scope = peer.timer_scope
        if timer_scope is not None:
            due = peer.conn.get_timer()
            timer_scope.deadline = math.inf if due is None else due

    def _push(self, peer: _Peer, item: _Outgoing) -> None:
        try:
            peer.outbox.send_nowait(item)
        except anyio.WouldBlock:
            logger.warning(
                "fake gateway: connection %d reads too slowly; hanging up", peer.conn.number
            )
            peer.hang_up()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the writer is gone: the connection is being torn down


# ---------------------------------------------------------------------- HTTP helpers


def _error(status: int) -> dict[str, JSONValue]:
    return {"code": status, "message": http.HTTPStatus(status).phrase.lower()}


def _is_upgrade(req: h11.Request) -> bool:
    return req.method == b"GET" and any(
        name == b"upgrade" and value.lower() == b"websocket" for name, value in req.headers
    )


async def _read_body(stream: SocketStream, conn: h11.Connection) -> bytes | None:
    """The request body, or ``None`` when it exceeds the cap."""
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await next_http_event(stream, conn, read_size=_READ_SIZE)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > _MAX_BODY:
                return None
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:  # pragma: no cover - h11 yields only Data and EndOfMessage inside a request
            raise h11.RemoteProtocolError("unexpected event in a request body", 400)


async def _respond(
    stream: SocketStream, conn: h11.Connection, reply: HttpReply, *, close: bool = False
) -> None:
    body = orjson.dumps(reply.body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    reason = http.HTTPStatus(reply.status).phrase.encode()
    await stream.send(response_bytes(conn, reply.status, reason, headers, body))


async def _discard_until_eof(stream: SocketStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.receive(_READ_SIZE)
