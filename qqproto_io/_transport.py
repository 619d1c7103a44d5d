# One WebSocket connection, carried by two tasks, reporting to the driver's inbox.
#
# Theory of operation. The driver's protocol loop must never block on the network: a write
# to a half-open peer can block until the kernel buffer drains, which may be never, and a
# blocked loop sends no heartbeats. So a Transport owns its socket in its own task group: a
# reader task (connect, TLS, upgrade, then frames -> inbox) and a writer task (a bounded
# queue -> socket). The driver only ever calls the non-blocking `send_text`, `close` and
# `abort`. Everything the transport learns goes into the inbox as a small tuple tagged with
# the transport's id, so that reports from an aborted transport can be told apart.
#
# wsproto does no size limit and does not answer pings or close frames (LIBRARY_NOTES C.1):
# we join message fragments up to `max_message_size` (close 1009 above), answer pings, echo
# the peer's close, and send the close ourselves when wsproto turns a framing or UTF-8 error
# into a CloseConnection event while the state is still OPEN.
"""A WebSocket client transport on anyio + wsproto, driven through an inbox."""

from __future__ import annotations

import contextlib
import functools
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from qqproto_io._proxy import ProxyConfig, open_stream

if TYPE_CHECKING:
    from anyio.abc import ByteStream, TaskGroup
    from anyio.streams.memory import MemoryObjectSendStream

__all__ = [
    "Transport",
    "TransportClosed",
    "TransportLimits",
    "TransportMessages",
    "TransportOpened",
]


@dataclass(frozen=True, slots=True)
class TransportOpened:
    """The WebSocket of transport ``ident`` is open."""

    ident: int


@dataclass(frozen=True, slots=True)
class TransportMessages:
    """Transport ``ident`` received these complete text messages, in order, in one read.

    One report per network read, not per message: a 64 KiB read holds about sixty 1 KB
    dispatches, and every report costs the protocol loop a pass.
    """

    ident: int
    texts: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class TransportClosed:
    """Transport ``ident`` ended: a close frame (``code``), or EOF/failure (``None``)."""

    ident: int
    code: int | None
    reason: str


TransportReport = TransportOpened | TransportMessages | TransportClosed

_READ_SIZE = 65536


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    # Loading the system CA store takes ~25 ms on the event loop: once per process, and
    # only when a wss:// URL needs it.
    return ssl.create_default_context()


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportLimits:
    """Bounds of one transport. Times in seconds.

    Attributes:
        max_message_size: a text message above this closes with 1009 (1 MiB, the core's
            payload limit).
        write_queue: messages waiting for the socket before the transport gives up (the
            core sends a handful per minute; a full queue means the peer stopped reading).
        open_timeout: DNS + TCP + proxy + TLS + upgrade. The core bounds the attempt too;
            this keeps the task itself from lingering.
    """

    max_message_size: int = 1 << 20
    write_queue: int = 64
    open_timeout: float = 30.0


class Transport:
    """A WebSocket to ``url`` living in ``task_group``; reports go to ``inbox``."""

    def __init__(
        self,
        ident: int,
        url: str,
        inbox: MemoryObjectSendStream[TransportReport],
        *,
        limits: TransportLimits,
        proxy: ProxyConfig | None,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.ident = ident
        self.url = url
        self._inbox = inbox
        self._limits = limits
        self._proxy = proxy
        self._ssl_context = ssl_context
        self._scope = anyio.CancelScope()
        send, receive = anyio.create_memory_object_stream[bytes](limits.write_queue)
        self._outgoing = send
        self._outgoing_receive = receive
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._reported_closed = False

    def start(self, task_group: TaskGroup) -> None:
        """Begin connecting in the background."""
        task_group.start_soon(self._run, name=f"qqproto transport {self.ident}")

    # --------------------------------------------------------------- driver's side

    def send_text(self, text: str) -> None:
        """Queue one text message; never blocks."""
        self._queue(TextMessage(data=text))

    def close(self, code: int, reason: str) -> None:
        """Queue a close frame; the reader keeps going until the peer answers or EOF."""
        self._queue(CloseConnection(code=code, reason=reason))

    def abort(self) -> None:
        """Drop the connection now; nothing more is reported."""
        self._reported_closed = True
        self._scope.cancel()

    def _queue(self, event: TextMessage | CloseConnection) -> None:
        if self._ws.state is not ConnectionState.OPEN:
            return  # not open yet, or already closing: the core's timers cover this
        try:
            data = self._ws.send(event)
        except LocalProtocolError:
            return
        try:
            self._outgoing.send_nowait(data)
        except anyio.ClosedResourceError:
            return
        except anyio.WouldBlock:
            # The peer has stopped reading: nothing sent from now on would arrive.
            self._report_closed(None, "write queue full: the peer stopped reading")
            self._scope.cancel()

    # ----------------------------------------------------------------- the tasks

    async def _report(self, item: TransportReport) -> None:
        # Awaiting a full inbox gives TCP backpressure when the driver is slow; nothing is
        # dropped. The next socket read is this task's trip through the event loop, so a
        # report that fits needs none of its own.
        if not self._reported_closed:
            try:
                self._inbox.send_nowait(item)
            except anyio.WouldBlock:
                await self._inbox.send(item)

    async def _report_messages(self, batch: list[str]) -> None:
        if batch:
            texts = tuple(batch)
            batch.clear()
            await self._report(TransportMessages(self.ident, texts))

    def _report_closed(self, code: int | None, reason: str) -> None:
        if self._reported_closed:
            return
        self._reported_closed = True
        # The inbox is unbounded for the driver's own items and bounded only by this
        # transport's awaits, so a final report from synchronous code fits, or the driver
        # is gone and nobody needs it.
        with contextlib.suppress(
            anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError
        ):
            self._inbox.send_nowait(TransportClosed(self.ident, code, reason))

    async def _run(self) -> None:
        with self._scope:
            stream: ByteStream | None = None
            try:
                with anyio.fail_after(self._limits.open_timeout):
                    stream = await self._open()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._write, stream)
                    await self._read(stream)
                    # Let the writer send what is queued (our close reply), within a bound.
                    self._outgoing.close()
                    tg.cancel_scope.deadline = anyio.current_time() + 1.0
            except TimeoutError:
                self._report_closed(None, "connection not open in time")
            except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                self._report_closed(None, f"transport error: {type(exc).__name__}: {exc}")
            except RemoteProtocolError as exc:
                self._report_closed(None, f"WebSocket handshake failed: {exc}")
            finally:
                self._report_closed(None, "connection ended")
                self._outgoing.close()
                self._outgoing_receive.close()
                if stream is not None:
                    # Forcefully: a TLS close waits for the peer's close_notify, which a
                    # half-open link never sends. Last, because in an aborted (cancelled)
                    # scope it re-raises the cancellation once the socket is closed.
                    await anyio.aclose_forcefully(stream)

    async def _open(self) -> ByteStream:
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        stream = await open_stream(
            host,
            port,
            tls=secure,
            ssl_context=(self._ssl_context or _default_ssl_context()) if secure else None,
            proxy=self._proxy,
        )
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        await stream.send(self._ws.send(Request(host=netloc, target=target)))
        while True:
            data = await stream.receive(_READ_SIZE)
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, AcceptConnection):
                    await self._report(TransportOpened(self.ident))
                    return stream
                if isinstance(event, RejectConnection | RejectData):
                    status = getattr(event, "status_code", "?")
                    raise RemoteProtocolError(f"upgrade rejected (HTTP {status})", None)

    async def _write(self, stream: ByteStream) -> None:
        async with self._outgoing_receive:
            async for data in self._outgoing_receive:
                await stream.send(data)

    async def _read(self, stream: ByteStream) -> None:
        ws = self._ws
        pieces: list[str] = []
        size = 0
        # Parse first, read second: the read that completed the handshake may already hold
        # the Hello, and it must not wait for the next packet (which may never come).
        data: bytes | None = b""
        batch: list[str] = []
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage):
                    pieces.append(event.data)
                    size += len(event.data)
                    if size > self._limits.max_message_size:
                        await self._report_messages(batch)
                        self._queue_raw(ws.send(CloseConnection(code=1009, reason="too big")))
                        self._report_closed(1009, "message larger than the limit")
                        return
                    if event.message_finished:
                        batch.append("".join(pieces) if len(pieces) > 1 else pieces[0])
                        pieces.clear()
                        size = 0
                    continue
                # Whatever comes next (a close above all) is reported after the messages
                # before it: order is kept.
                await self._report_messages(batch)
                if isinstance(event, Ping):
                    self._queue_raw(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        self._queue_raw(ws.send(event.response()))
                    elif ws.state is ConnectionState.OPEN:
                        # A framing or UTF-8 error found by wsproto: we must send the close.
                        self._queue_raw(ws.send(CloseConnection(code=event.code)))
                    code = None if event.code == 1006 else event.code
                    self._report_closed(code, event.reason or "")
                    return
                # BytesMessage and Pong: nothing to do (QQ sends text only).
            await self._report_messages(batch)
            if data is None:
                self._report_closed(None, "connection lost (EOF)")
                return
            try:
                data = await stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = None
            ws.receive_data(data)

    def _queue_raw(self, data: bytes) -> None:
        try:
            self._outgoing.send_nowait(data)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            self._scope.cancel()
