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
# Nothing the peer, a proxy or the network does may end the task with an exception: the
# task is the driver's child, and an exception there would take every shard down with it.
# Whatever goes wrong ends the transport with one TransportClosed whose reason names what
# happened; only cancellation (abort, or the driver going away) leaves it otherwise.
#
# wsproto does no size limit and does not answer pings or close frames, and it raises
# LocalProtocolError for a frame sent in a state that forbids it (a Pong or a second close
# after our close went out): we answer pings and echo the peer's close only while the state
# allows it, and send the close ourselves when wsproto turns a framing or UTF-8 error into a
# CloseConnection event while the state is still OPEN. wsproto streams a data frame's
# payload out as it arrives, so a message is measured piece by piece: one above
# `max_message_size` is dropped as it streams in (never held), the connection stays open,
# and the core hears of it as a TransportOversized. Closing with 1009 would not help: the
# server replays the same message on every Resume until the session is lost.
"""A WebSocket client transport on anyio + wsproto, driven through an inbox."""

from __future__ import annotations

import contextlib
import functools
import re
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import anyio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from qqproto_io._frames import FrameSplitter, Raw
from qqproto_io._proxy import ProxyConfig, open_stream

if TYPE_CHECKING:
    from anyio.abc import ByteStream, TaskGroup
    from anyio.streams.memory import MemoryObjectSendStream

    from qqproto_io._network import Network

__all__ = [
    "Transport",
    "TransportClosed",
    "TransportLimits",
    "TransportMessages",
    "TransportOpened",
    "TransportOversized",
]


@dataclass(frozen=True, slots=True)
class TransportOpened:
    """The WebSocket of transport ``ident`` is open."""

    ident: int


@dataclass(frozen=True, slots=True)
class TransportMessages:
    """Transport ``ident`` received these complete messages, in order, in one read.

    Text messages are ``str``, binary ones ``bytes`` (the core decodes and judges them).
    One report per network read, not per message: a 64 KiB read holds about sixty 1 KB
    dispatches, and every report costs the protocol loop a pass.
    """

    ident: int
    texts: tuple[str | bytes, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class TransportOversized:
    """Transport ``ident`` received a message above the limit and dropped it unread.

    Reported, in order with the messages around it, once the message's last fragment has
    arrived; the connection stays open.

    Attributes:
        ident: the transport.
        size: the message's size in UTF-8 bytes (bytes for a binary message), above
            ``TransportLimits.max_message_size``.
    """

    ident: int
    size: int


@dataclass(frozen=True, slots=True)
class TransportClosed:
    """Transport ``ident`` ended: a close frame (``code``), or EOF/failure (``None``)."""

    ident: int
    code: int | None
    reason: str


TransportReport = TransportOpened | TransportMessages | TransportOversized | TransportClosed

_READ_SIZE = 65536
# Where h11 ends a response head (it takes a bare LF as a line end), and how long a head may
# get before it is handed to h11 to refuse (h11's own limit is 16 KiB).
_HEAD_END = re.compile(rb"\n\r?\n")
_MAX_HEAD = 1 << 16
# Exception types whose text is safe to put in a reason: they describe the network, the URL
# or the handshake, never a payload or a credential. Anything else is named by type alone.
_TELLING = (OSError, RemoteProtocolError, ValueError)
_MAX_DETAIL = 200


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    # Loading the system CA store takes ~25 ms on the event loop: once per process, and
    # only when a wss:// URL needs it.
    return ssl.create_default_context()


def _describe(exc: BaseException) -> str:
    """``Type: text`` for a failure, the text only when its type cannot carry a secret."""
    # Task groups wrap what their tasks raise: name the first real cause.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    name = type(exc).__name__
    text = str(exc) if isinstance(exc, _TELLING) else ""
    if len(text) > _MAX_DETAIL:
        text = text[:_MAX_DETAIL] + "..."
    return f"{name}: {text}" if text else name


def _utf8_size(data: str | bytes) -> int:
    # isascii() is O(1) on CPython's compact strings: only non-ASCII text pays an encode.
    if isinstance(data, str) and not data.isascii():
        return len(data.encode())
    return len(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportLimits:
    """Bounds of one transport. Times in seconds.

    Attributes:
        max_message_size: a message above this many bytes (UTF-8 for text) is dropped as it
            arrives and reported as :class:`TransportOversized` (1 MiB, the core's payload
            limit).
        write_queue: messages waiting for the socket before the transport gives up (the
            core sends a handful per minute; a full queue means the peer stopped reading).
        open_timeout: DNS + TCP + proxy + TLS + upgrade. The core bounds the attempt too;
            this keeps the task itself from lingering.
    """

    max_message_size: int = 1 << 20
    write_queue: int = 64
    open_timeout: float = 30.0


class Transport:
    """A WebSocket to ``url`` living in ``task_group``; reports go to ``inbox``.

    Whatever the peer, a proxy or the network does, the transport ends with exactly one
    :class:`TransportClosed` (unless aborted) and never raises into its task group.
    """

    def __init__(
        self,
        ident: int,
        url: str,
        inbox: MemoryObjectSendStream[TransportReport],
        *,
        limits: TransportLimits,
        proxy: ProxyConfig | None,
        ssl_context: ssl.SSLContext | None,
        network: Network | None = None,
    ) -> None:
        self.ident = ident
        self.url = url
        self._inbox = inbox
        self._limits = limits
        self._proxy = proxy
        self._ssl_context = ssl_context
        self._network = network
        self._scope = anyio.CancelScope()
        send, receive = anyio.create_memory_object_stream[bytes](limits.write_queue)
        self._outgoing = send
        self._outgoing_receive = receive
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._reported_closed = False
        self._tail: bytes | None = b""  # read with the upgrade's answer, after its head

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
        except Exception as exc:  # noqa: BLE001 - the driver's loop must never see it
            # A close code wsproto cannot encode, say: nothing sent from now on is framed
            # the way the core asked, so end here rather than limp on. By type alone: the
            # text of an encoding error quotes the payload it choked on.
            self._report_closed(None, f"cannot send: {type(exc).__name__}")
            self._scope.cancel()
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

    async def _report_messages(self, batch: list[str | bytes]) -> None:
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
            except RemoteProtocolError as exc:
                self._report_closed(None, f"WebSocket handshake failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - nothing from outside may end the task
                # OSError, TLS, proxy, h11 or wsproto errors, a bad URL, a broken stream, a
                # closed inbox: the core hears of it as a lost connection, and so does a log.
                self._report_closed(None, f"transport error: {_describe(exc)}")
            finally:
                self._report_closed(None, "connection ended")
                self._outgoing.close()
                self._outgoing_receive.close()
                if stream is not None:
                    # Forcefully: a TLS close waits for the peer's close_notify, which a
                    # half-open link never sends. Last, because in an aborted (cancelled)
                    # scope it re-raises the cancellation once the socket is closed.
                    with contextlib.suppress(Exception):
                        await anyio.aclose_forcefully(stream)

    async def _open(self) -> ByteStream:
        try:
            parts = urlsplit(self.url)
            port = parts.port  # raises on a port that is not a number in 0-65535
        except ValueError as exc:
            raise ValueError(f"invalid gateway URL: {exc}") from None
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("invalid gateway URL: not ws:// or wss:// with a host")
        secure = parts.scheme == "wss"
        host = parts.hostname
        if self._network is not None:
            stream = await self._network.connect(host, port or (443 if secure else 80), tls=secure)
        else:
            stream = await open_stream(
                host,
                port or (443 if secure else 80),
                tls=secure,
                ssl_context=(self._ssl_context or _default_ssl_context()) if secure else None,
                proxy=self._proxy,
            )
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            self._tail = await self._upgrade(
                stream, host if port is None else f"{host}:{port}", target
            )
        except BaseException:
            # _run closes only a stream it was handed: a refused upgrade must not leak it.
            with contextlib.suppress(Exception):
                await anyio.aclose_forcefully(stream)
            raise
        return stream

    async def _upgrade(self, stream: ByteStream, netloc: str, target: str) -> bytes | None:
        """Upgrade; return the bytes read after the response head (frames: the splitter's).

        ``None`` when wsproto was given everything (a head too long to find): then the
        splitter is not used on this connection.
        """
        ws = self._ws
        await stream.send(ws.send(Request(host=netloc, target=target)))
        pending = b""
        while True:
            pending += await stream.receive(_READ_SIZE)
            while pending:
                # wsproto gets the response head only, up to the blank line that ends it
                # for h11, so that its frame buffer starts empty and the splitter owns the
                # frames after it.
                match = _HEAD_END.search(pending)
                if match is not None:
                    head, pending = pending[: match.end()], pending[match.end() :]
                elif len(pending) > _MAX_HEAD:
                    head, pending = pending, b""  # h11 judges it (and refuses it)
                else:
                    break  # wait for the rest of the head
                ws.receive_data(head)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        await self._report(TransportOpened(self.ident))
                        return pending if match is not None else None
                    if isinstance(event, RejectConnection | RejectData):
                        status = getattr(event, "status_code", "?")
                        raise RemoteProtocolError(f"upgrade rejected (HTTP {status})", None)

    async def _write(self, stream: ByteStream) -> None:
        try:
            async with self._outgoing_receive:
                async for data in self._outgoing_receive:
                    await stream.send(data)
        except Exception as exc:  # noqa: BLE001 - a broken link, whatever form it takes
            # Ended here rather than raised: the task group would wrap it in a group, and a
            # group that meets an abort is not an Exception any more.
            self._report_closed(None, f"send failed: {_describe(exc)}")
            self._scope.cancel()

    async def _read(self, stream: ByteStream) -> None:
        ws = self._ws
        cap = self._limits.max_message_size
        # A message of at most cap/4 characters fits whatever it holds (UTF-8 needs at most
        # four bytes per character): the common case is one comparison, no encode.
        sure = cap // 4
        pieces: list[str | bytes] = []
        size = 0  # bytes of the message so far: an upper bound until `exact`
        exact = False
        dropping = False  # the message is over the cap: count its pieces, keep none
        lost = "connection lost (EOF)"
        batch: list[str | bytes] = []

        async def absorb() -> bool:
            """Take wsproto's events; True once the connection has ended."""
            nonlocal size, exact, dropping
            for event in ws.events():
                piece: str | bytes
                if isinstance(event, TextMessage):
                    piece = event.data
                    # A whole message in one piece, well within the cap.
                    if (
                        event.message_finished
                        and not pieces
                        and not dropping
                        and (len(piece) <= sure or _utf8_size(piece) <= cap)
                    ):
                        batch.append(piece)
                        continue
                elif isinstance(event, BytesMessage):
                    piece = bytes(event.data)  # the same object when it is bytes already
                else:
                    # Whatever comes next (a close above all) is reported after the messages
                    # before it: order is kept.
                    await self._report_messages(batch)
                    if isinstance(event, Ping):
                        # After our close went out (a rotation: the server may ping before
                        # it echoes), a Pong is forbidden: wsproto would raise.
                        if ws.state is ConnectionState.OPEN:
                            self._send_control(event.response())
                    elif isinstance(event, CloseConnection):
                        if ws.state is ConnectionState.REMOTE_CLOSING:
                            self._send_control(event.response())
                        elif ws.state is ConnectionState.OPEN:
                            # A framing or UTF-8 error found by wsproto: we must send the
                            # close ourselves.
                            self._send_control(CloseConnection(code=event.code))
                        if event.code == 1006:
                            self._report_closed(None, lost)
                        else:
                            self._report_closed(event.code, event.reason or "")
                        return True
                    continue  # a Pong: nothing to do
                # A fragment, a message near the cap, or one being dropped.
                if exact or dropping:
                    size += _utf8_size(piece)
                else:
                    n = len(piece)
                    size += 4 * n if isinstance(piece, str) and not piece.isascii() else n
                    if size > cap:
                        size = sum(map(_utf8_size, pieces)) + _utf8_size(piece)
                        exact = True
                if not dropping:
                    if size > cap:
                        dropping = True
                        pieces.clear()
                    else:
                        pieces.append(piece)
                if event.message_finished:
                    if dropping:
                        await self._report_messages(batch)
                        await self._report(TransportOversized(self.ident, size))
                    elif isinstance(piece, str):
                        batch.append("".join(cast("list[str]", pieces)))
                    else:
                        batch.append(b"".join(cast("list[bytes]", pieces)))
                    pieces.clear()
                    size, exact, dropping = 0, False, False
            return False

        # The common frames are cut and decoded by the splitter; wsproto gets the rest, in
        # order (see _frames.py). Without a tail (a head h11 had to judge whole) wsproto
        # holds the stream already and keeps all of it.
        splitter = FrameSplitter(max_size=cap) if self._tail is not None else None
        # Parse first, read second: the read that completed the handshake may already hold
        # the Hello, and it must not wait for the next packet (which may never come).
        data: bytes | None = self._tail or b""
        self._tail = b""
        while True:
            if splitter is not None and data:
                for item in splitter.feed(data):
                    if type(item) is str:
                        batch.append(item)
                    else:
                        ws.receive_data(cast("Raw", item).data)
                        if await absorb():
                            return
            else:
                ws.receive_data(data)
                if await absorb():
                    return
            await self._report_messages(batch)
            if data is None:
                self._report_closed(None, lost)
                return
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                data = None
            except (anyio.BrokenResourceError, OSError) as exc:
                data = None
                lost = f"connection lost ({_describe(exc)})"

    def _send_control(self, event: Event) -> None:
        # Callers check the state first; this is the last guard against a frame the state
        # forbids, which must never raise out of the reader.
        try:
            data = self._ws.send(event)
        except LocalProtocolError:
            return
        self._queue_raw(data)

    def _queue_raw(self, data: bytes) -> None:
        try:
            self._outgoing.send_nowait(data)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            self._scope.cancel()
