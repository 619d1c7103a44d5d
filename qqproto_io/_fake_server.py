# The fake QQ gateway served for real on loopback, around the sans-IO `FakeGateway`.
#
# Theory of operation. One TCP listener serves both the REST endpoints and the WebSocket
# gateway, as the real platform's hosts do from the client's point of view. Every accepted
# socket starts as an h11 HTTP/1.1 server connection. REST requests are answered by
# `FakeGateway.rest_request` (token, gateway URL, message sends, media uploads: the core
# routes, checks and records them) and logged at INFO on `qqproto_io.fake_server`, one line
# each, never a token; requests under `/_fake/` go to `FakeGateway.control_request`, the
# test's own door, which needs no token. Keep-alive is allowed. An `Upgrade: websocket` GET
# on the gateway path hands the socket, with whatever bytes h11 had already buffered, to
# wsproto.
#
# A WebSocket connection ("peer") owns one `ServerConnection` of the sans-IO core and three
# tasks in its own task group. The reader feeds every client message to the core. The timer
# task sleeps in a cancel scope whose deadline is the core's `get_timer()`; `_flush` moves
# that deadline after every input, so timers never poll. All of them, and the test's
# scripted actions (`message`, `user_message`, `close_all`, `drop_all`, the control door and
# the `command` lines), funnel the core's outputs through
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

import codecs
import contextlib
import dataclasses
import enum
import http
import logging
import math
import os
import random
import shlex
import threading
import time
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import anyio
import anyio.from_thread
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
    CONTROL_PREFIX,
    MESSAGE_KINDS,
    TOKEN_PATH,
    FakeGateway,
    FakeGatewayConfig,
    HttpReply,
    ServerClose,
    ServerConnection,
    ServerSend,
    UserMessage,
)
from qqproto_io._http_server import next_http_event, response_bytes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import TracebackType

    from anyio.abc import ByteStream, Listener, SocketStream, TaskGroup
    from anyio.from_thread import BlockingPortal
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from wsproto.events import Event as WsEvent

    from qqproto._codec import JSONValue
    from qqproto.testing._fake_gateway import MessageKind

__all__ = ["COMMANDS_HELP", "FakeGatewayServer"]

logger = logging.getLogger("qqproto_io.fake_server")

WS_PATH = "/websocket"

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
    ``gateway.faults`` at any time, read ``gateway.connections`` for what clients sent,
    ``gateway.rest_calls`` for every REST call and ``gateway.rest_posts`` for the accepted
    message sends. ``gateway.config.url`` is set to :attr:`ws_url` unless the config names
    another URL.

    Besides the platform's paths, the same port answers the control door under ``/_fake/``
    (no token; see :meth:`FakeGateway.control_request`): ``POST /_fake/messages`` (a
    user's C2C, group, guild or direct message), ``POST /_fake/close``,
    ``POST /_fake/reconnect``, ``POST /_fake/drop``, ``GET /_fake/rest``,
    ``GET``/``POST /_fake/faults``. :meth:`command` takes the same acts as text lines.
    Every REST call is logged at INFO on the ``qqproto_io.fake_server`` logger (method,
    path, status, the refusal's code and, for a send, ``msg_type``/``msg_id``/``msg_seq``;
    never the Authorization header, a token or message content).

    Args:
        config: how the fake platform behaves; copied, so later changes go through
            ``gateway.config``.
        seed: seeds the ids and tokens the gateway makes up.
        host: where to listen (loopback by default).
        port: the TCP port (0 picks a free one).
        message_interval: if set, produce a numbered C2C message every that many seconds.
        listen: bind the TCP port on entry; ``False`` serves only the streams handed to
            :meth:`serve_stream` (an in-memory network, see :mod:`qqproto_io.testing`).

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
        listen: bool = True,
    ) -> None:
        cfg = dataclasses.replace(config) if config is not None else FakeGatewayConfig()
        self.gateway = FakeGateway(cfg, rng=random.Random(seed))  # noqa: S311 - fake ids
        self.http_hang = False
        self._host = host
        self._port = port
        self._message_interval = message_interval
        self._listen = listen
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

    @property
    def control_url(self) -> str:
        """The control door's base URL: ``POST {control_url}/messages`` and the others."""
        return self.http_base + CONTROL_PREFIX

    # ------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("FakeGatewayServer is already running")
        listener = None
        if self._listen:
            listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
            self._listener = listener
            self._port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio's
        if self.gateway.config.url == _DEFAULT_URL:
            self.gateway.config.url = self.ws_url
        if self.gateway.config.unix_epoch is None:
            # Messages stamped with the wall clock, as on the platform: a bot checks its
            # reply windows against its own.
            self.gateway.config.unix_epoch = time.time() - anyio.current_time()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        if listener is not None:
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
        if task_group is None:
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
            if listener is not None:
                await anyio.aclose_forcefully(listener)
            logger.info("fake gateway on %s stopped", self.http_base)

    def serve_stream(self, stream: ByteStream) -> None:
        """Serve one already-open connection (HTTP, then maybe the WebSocket gateway) as if
        it had been accepted on the port; it is closed when served or when the server stops.

        Raises:
            RuntimeError: the server is not running.
        """
        if self._task_group is None:
            raise RuntimeError("FakeGatewayServer.serve_stream() outside 'async with'")
        self._task_group.start_soon(self._handle_client, stream)

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
        """Produce message ``n`` now (see :meth:`FakeGateway.message`), stamped with the wall
        clock as the platform stamps it (``FakeGatewayConfig.unix_epoch``), and send it to
        every live connection of its sessions. Returns how many sessions received it."""
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

    def user_message(
        self,
        kind: MessageKind,
        content: str,
        *,
        user: str | None = None,
        group: str | None = None,
        channel: str | None = None,
        guild: str | None = None,
        shard: int = 0,
    ) -> UserMessage:
        """A user sends the bot ``content`` in scene ``kind`` now (see
        :meth:`FakeGateway.user_message`), stamped with the wall clock in UTC+8 as the
        platform stamps it, and sent to every live connection of its sessions."""
        sent = self.gateway.user_message(
            kind,
            content,
            anyio.current_time(),
            user=user,
            group=group,
            channel=channel,
            guild=guild,
            shard=shard,
        )
        self._flush_all()
        return sent

    def reconnect_all(self) -> None:
        """Send op 7 to every live gateway connection (a rotation: each one is closed with
        4009 a second later unless its client closed it first)."""
        self.gateway.reconnect_all(anyio.current_time())
        self._flush_all()

    def close_all(self, code: int, reason: str = "closed by the test") -> None:
        """Close every live gateway connection with ``code`` (a close frame, then hang up)."""
        self.gateway.close_all(code, reason, anyio.current_time())
        self._flush_all()

    def drop_all(self) -> None:
        """Cut every live gateway connection without a close frame."""
        self.gateway.drop_all(anyio.current_time())
        self._flush_all()

    def command(self, line: str) -> str:
        """Carry out one command line (what ``qqproto fake-gateway`` reads on stdin) and
        return the answer, one or more lines without a trailing newline.

        The commands are in :data:`COMMANDS_HELP`. A mistake is answered with a line that
        starts with ``error:``; nothing is changed then.
        """
        words = line.strip()
        if not words or words.startswith("#"):
            return ""
        verb, _, rest = words.partition(" ")
        verb, rest = verb.lower(), rest.strip()
        if verb == "dm":
            verb = "direct"
        try:
            if verb in MESSAGE_KINDS:
                sent = self.user_message(verb, rest)
                return _describe_sent(sent)
            if verb == "close":
                return self._command_close(rest)
            if verb in ("rotate", "reconnect"):
                count = len(self.gateway.live)
                self.reconnect_all()
                return f"op 7 sent to {count} connection(s)"
            if verb == "drop":
                count = len(self.gateway.live)
                self.drop_all()
                return f"dropped {count} connection(s) without a close frame"
            if verb == "fault":
                return self._command_fault(rest)
            if verb == "rest":
                calls = [call.describe() for call in self.gateway.rest_calls]
                return "\n".join(calls) if calls else "no REST call yet"
            if verb in ("help", "?"):
                return COMMANDS_HELP
        except ValueError as exc:
            return f"error: {exc}"
        return f"error: unknown command {verb!r}; try: help"

    async def read_commands(self, fd: int, answer: Callable[[str], None]) -> None:
        """Carry out the command lines read from the file descriptor ``fd`` (:meth:`command`)
        until its end, passing every answer to ``answer``; returns at the end of input.

        The reading is done by a daemon thread with plain ``os.read`` calls: a read that
        blocks (a terminal nobody types in) never holds up cancellation or the process's
        exit, and works for any kind of file (terminal, pipe, regular file, /dev/null).
        """
        send, receive = anyio.create_memory_object_stream[str](16)
        async with anyio.from_thread.BlockingPortal() as portal:
            with send, receive:  # closed here too: a reader still blocked in os.read is let be
                reader = threading.Thread(
                    target=_read_lines,
                    args=(fd, portal, send),
                    name="qqproto fake-gateway commands",
                    daemon=True,
                )
                reader.start()
                async for line in receive:
                    reply = self.command(line)
                    if reply:
                        answer(reply)

    def _command_close(self, rest: str) -> str:
        code_text, _, reason = rest.partition(" ")
        try:
            code = int(code_text)
        except ValueError:
            raise ValueError("close takes a close code, e.g. close 4009") from None
        reply = self.gateway.control_request(
            "POST",
            CONTROL_PREFIX + "/close",
            orjson.dumps({"code": code, "reason": reason.strip() or "closed from the console"}),
            anyio.current_time(),
        )
        self._flush_all()
        if reply.status != 200:
            raise ValueError(str(reply.body.get("error")))
        return f"closed {reply.body.get('closed')} connection(s) with {code}"

    def _command_fault(self, rest: str) -> str:
        faults = self.gateway.faults
        if not rest:
            shown = [f"{f.name}={getattr(faults, f.name)!r}" for f in dataclasses.fields(faults)]
            return "faults: " + ", ".join(shown)
        try:
            name, *value = shlex.split(rest)
        except ValueError as exc:
            raise ValueError(f"fault: {exc}") from None
        if len(value) > 1:
            raise ValueError("fault takes NAME [on|off|VALUE]")
        word = value[0].lower() if value else "on"
        parsed: JSONValue
        if word in ("on", "true", "yes", "1"):
            parsed = True
        elif word in ("off", "false", "no", "0"):
            parsed = False
        elif word in ("none", "null"):
            parsed = None
        else:
            try:
                parsed = int(word)
            except ValueError:
                raise ValueError(
                    f"fault {name}: {word!r} is not on, off, none or a number"
                ) from None
        if name in ("identify_close", "resume_close") and parsed is False:
            parsed = None  # "off" for a close-code switch
        if name == "replay_overlap" and type(parsed) is bool:
            parsed = int(parsed)
        self.gateway.set_fault(name, parsed)
        self._flush_all()
        return f"fault {name} = {getattr(faults, name)!r}"

    async def _produce_messages(self, interval: float) -> None:
        start = anyio.current_time()
        n = 0
        while True:
            n += 1
            # Absolute deadlines: a slow iteration does not shift the later ones.
            await anyio.sleep_until(start + n * interval)
            self.message(n)

    # ------------------------------------------------------------------------ HTTP

    async def _handle_client(self, stream: ByteStream) -> None:
        try:
            await self._serve_http(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client went away mid-exchange
        except Exception:
            # One misbehaving connection must not take the server (and the test) down.
            logger.exception("fake gateway: connection handler failed")
        finally:
            await anyio.aclose_forcefully(stream)

    async def _serve_http(self, stream: ByteStream) -> None:
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
            method = event.method.decode("ascii", "replace")
            if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
                # The test's door stays open while REST hangs (http_hang).
                reply = self.gateway.control_request(method, path, body, anyio.current_time())
                self._flush_all()
                logger.info("fake gateway: control %s %s -> %d", method, path, reply.status)
            elif self.http_hang:
                await _discard_until_eof(stream)
                return
            else:
                reply = self._route(method, path, event.headers, body)
                if reply.hang_up:
                    return  # processed; the answer is lost (a RestFault)
            await _respond(stream, conn, reply)
            if conn.our_state is not h11.DONE:
                return  # h11 decided the connection must close
            conn.start_next_cycle()

    def _route(
        self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> HttpReply:
        auth = next((v for k, v in headers if k == b"authorization"), None)
        authorization = auth.decode("latin-1") if auth is not None else None
        gateway = self.gateway
        reply = gateway.rest_request(method, path, authorization, body, anyio.current_time())
        logger.info("fake gateway: %s", gateway.rest_calls[-1].describe())
        return reply

    # ------------------------------------------------------------------- WebSocket

    async def _upgrade(
        self, stream: ByteStream, http_conn: h11.Connection, req: h11.Request
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


# ---------------------------------------------------------------------- commands

COMMANDS_HELP = """\
commands, one a line:
  c2c TEXT          a user's C2C (private) message to the bot
  group TEXT        a user's @-message to the bot in a group
  guild TEXT        a user's @-message to the bot in a guild channel
  direct TEXT       a user's guild direct message (also: dm TEXT)
  close CODE [WHY]  close every gateway connection with CODE (e.g. 4009, 4900)
  rotate            op 7 to every connection (closed 4009 a second later)
  drop              cut every connection without a close frame
  fault NAME [on|off|N]  set a Faults switch (no_ack, silent, ...); fault alone lists them
  rest              the REST calls received so far
  help              this list"""
"""The commands :meth:`FakeGatewayServer.command` takes (``qqproto fake-gateway``'s stdin)."""


_MAX_LINE = 64 * 1024  # a command line longer than this is dropped unread


def _read_lines(fd: int, portal: BlockingPortal, send: MemoryObjectSendStream[str]) -> None:
    """The command reader's thread: split ``fd``'s bytes into lines and hand each to the
    event loop through ``portal``; close ``send`` at the end of input."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    try:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""  # a closed or unreadable descriptor ends the input
            pending += decoder.decode(chunk, final=not chunk)
            *lines, pending = pending.split("\n")
            if not chunk:
                lines.append(pending)
            if len(pending) > _MAX_LINE:
                pending = ""
            for line in lines:
                if len(line) <= _MAX_LINE:
                    portal.call(send.send, line)
            if not chunk:
                return
    except Exception:  # noqa: BLE001, S110 - the server stopped: nobody to deliver to
        pass
    finally:
        with contextlib.suppress(Exception):
            portal.call(send.aclose)


def _describe_sent(sent: UserMessage) -> str:
    seqs = ", ".join(str(s) for s in sent.seqs) or "none: no session"
    return (
        f"{sent.type} event_id {sent.event_id} msg_id {sent.msg_id} seq {seqs}; "
        f"reply: POST {sent.reply_path}"
    )


# ---------------------------------------------------------------------- HTTP helpers


def _error(status: int) -> dict[str, JSONValue]:
    return {"code": status, "message": http.HTTPStatus(status).phrase.lower()}


def _is_upgrade(req: h11.Request) -> bool:
    return req.method == b"GET" and any(
        name == b"upgrade" and value.lower() == b"websocket" for name, value in req.headers
    )


async def _read_body(stream: ByteStream, conn: h11.Connection) -> bytes | None:
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
    stream: ByteStream, conn: h11.Connection, reply: HttpReply, *, close: bool = False
) -> None:
    body = orjson.dumps(reply.body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.encode("latin-1"), value.encode("latin-1")) for name, value in reply.headers),
    ]
    if close:
        headers.append((b"connection", b"close"))
    reason = http.HTTPStatus(reply.status).phrase.encode()
    await stream.send(response_bytes(conn, reply.status, reason, headers, body))


async def _discard_until_eof(stream: ByteStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.receive(_READ_SIZE)
