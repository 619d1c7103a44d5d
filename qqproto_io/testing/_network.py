# An in-memory network for the real client, and the faults of a real one.
#
# A connection is a `Link`: two `_End` byte streams over two one-way `_Pipe`s. What one end
# sends is queued on its pipe at once (no copy, no task hop) and taken by the other end's
# `receive`, which waits on the pipe until something is due: the queue's head, once the
# link's latency, a partition or a slow-loris trickle allows it; the end of the stream; or
# a close of its own end. So faults need no task of their own: they are times and flags the
# receiving end reads. Everything is on the event loop's clock, virtual in tests.
#
# The client's gateway transport connects through `VirtualNetwork.connect` (the `Network`
# seam of qqproto_io). Its REST client gets httpx's own `AsyncHTTPTransport` whose httpcore
# connection pool dials through `_Backend`, an httpcore network backend over the same links:
# httpx, httpcore and h11 format and parse every request and answer exactly as in
# production, over these streams instead of sockets. TLS is not modelled: `start_tls`
# answers with the same stream, and the client sees an HTTP/1.1 connection as with a
# server that offers no ALPN. The server end of every link goes to a callback, the fake
# gateway's connection handler.
#
# Every link's life and every chunk it carries go into a trace, with the virtual time: the
# bytes as sent, except what RFC 6455 makes random (the handshake key and its answer; the
# client's frame masks, undone here), so that a run's trace repeats byte for byte.
"""In-memory links carrying real HTTP and WebSocket bytes, with scriptable faults."""

# httpcore's network interface fixes the parameters (timeouts included) of these methods.
# ruff: noqa: ASYNC109, ARG002

from __future__ import annotations

import math
import re
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
import httpcore
import httpx
from anyio.abc import ByteStream

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["Link", "VirtualNetwork"]

_READ_SIZE = 65536
_KEEPALIVE_EXPIRY = httpx.Limits().keepalive_expiry or 5.0
_REDACT = re.compile(rb"(?im)^(sec-websocket-(?:key|accept)):[^\r\n]*")

Direction = Literal["c>s", "s>c"]


class _Pipe:
    """One direction of a link: chunks in flight, and the reader waiting for them."""

    __slots__ = ("_changed", "chunks", "eof", "not_before")

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, bytes]] = deque()  # (due, data), FIFO like TCP
        self.eof = False  # the writer closed or half-closed; seen once the chunks are read
        self.not_before = -math.inf  # the next byte is not delivered before this (trickle)
        self._changed: anyio.Event | None = None

    def wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait(self, deadline: float) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        if deadline == math.inf:  # the common case, without the cost of a scope
            await self._changed.wait()
            return
        with anyio.CancelScope(deadline=deadline):
            await self._changed.wait()


class Link:
    """One connection of the :class:`VirtualNetwork`: a client end and a server end.

    Attributes:
        number: 1 for the first connection made, 2 for the next, ...
        host: where the client connected to.
        port: the port it asked for.
        half_open: every byte either way is lost from now on and no close ever arrives (a
            NAT or proxy that silently dropped the flow); set by
            :meth:`VirtualNetwork.half_open`.
        held_until: nothing crosses the link before this time; what was sent meanwhile
            arrives afterwards, in order (a partition, as TCP retransmits once it heals).
        trickle: seconds per byte for what the server sends (a slow-loris answer), or
            ``None``.
        latency: one-way delay in seconds.
    """

    def __init__(
        self, network: VirtualNetwork, number: int, host: str, port: int, latency: float
    ) -> None:
        self.network = network
        self.number = number
        self.host = host
        self.port = port
        self.latency = latency
        self.half_open = False
        self.held_until = -math.inf
        self.trickle: float | None = None
        self.was_reset = False  # both ends see a broken connection (ECONNRESET)
        self.upgraded = False  # the server answered 101: client bytes are masked frames
        self.up = _Pipe()  # client to server
        self.down = _Pipe()  # server to client
        self.client = _End(self, self.down, self.up, "c>s")
        self.server = _End(self, self.up, self.down, "s>c")

    @property
    def closed(self) -> bool:
        """Both ends are closed, or the link was cut."""
        return (self.client.closed and self.server.closed) or self.was_reset

    def reset(self) -> None:
        """Cut the link: both ends see a broken connection at their next read or write."""
        if not self.closed:
            self.was_reset = True
            self.network.record(self, "reset")
            self.up.wake()
            self.down.wake()

    def _record_chunk(self, direction: Direction, data: bytes) -> None:
        network = self.network
        if not network.tracing:
            return
        shown = data
        if direction == "c>s" and self.upgraded:
            shown = _unmasked(data)
        elif direction == "s>c" and not self.upgraded and data.startswith(b"HTTP/1.1 101 "):
            self.upgraded = True
        if not self.upgraded or direction == "s>c":
            shown = _REDACT.sub(rb"\1: <random>", shown)
        network.record(self, f"{direction} {shown!r}")


class _End(ByteStream):
    """One end of a :class:`Link`, as the anyio byte stream its owner reads and writes."""

    def __init__(self, link: Link, incoming: _Pipe, outgoing: _Pipe, direction: Direction) -> None:
        self._link = link
        self._in = incoming
        self._out = outgoing
        self._direction: Direction = direction
        self.closed = False

    @property
    def _peer(self) -> _End:
        link = self._link
        return link.server if self is link.client else link.client

    def readable(self) -> bool:
        """Whether a read would return at once (data or the end of the stream)."""
        link = self._link
        if self.closed or link.half_open:
            return False
        if link.was_reset:
            return True
        now = anyio.current_time()
        if self._in.chunks:
            due = max(self._in.chunks[0][0], link.held_until, self._in.not_before)
            return due <= now
        return self._in.eof

    async def receive(self, max_bytes: int = _READ_SIZE) -> bytes:
        link, pipe = self._link, self._in
        while True:
            if self.closed:
                raise anyio.ClosedResourceError
            if link.was_reset:
                raise anyio.BrokenResourceError
            deadline = math.inf
            if not link.half_open:
                now = anyio.current_time()
                if pipe.chunks:
                    due, data = pipe.chunks[0]
                    deadline = max(due, link.held_until, pipe.not_before)
                    if deadline <= now:
                        return self._take(pipe, data, max_bytes, now)
                elif pipe.eof:
                    raise anyio.EndOfStream
            await pipe.wait(deadline)

    def _take(self, pipe: _Pipe, data: bytes, max_bytes: int, now: float) -> bytes:
        # The client's end receives what the server sent: that is what trickles.
        trickle = self._link.trickle if self._direction == "c>s" else None
        size = min(max_bytes, len(data)) if trickle is None else 1
        if size == len(data):
            pipe.chunks.popleft()
        else:
            pipe.chunks[0] = (pipe.chunks[0][0], data[size:])
        if trickle is not None:
            pipe.not_before = now + trickle
        return data[:size]

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        link = self._link
        if self.closed or self._out.eof:
            raise anyio.ClosedResourceError
        if link.was_reset or (self._peer.closed and not link.half_open):
            raise anyio.BrokenResourceError
        link._record_chunk(self._direction, item)
        if link.half_open:
            return  # lost on the way, silently
        self._out.chunks.append((anyio.current_time() + link.latency, bytes(item)))
        self._out.wake()

    async def send_eof(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._half_close()

    def _half_close(self) -> None:
        if not self._out.eof:
            self._out.eof = True
            self._link.network.record(self._link, f"{self._direction} EOF")
            if not self._link.half_open:
                self._out.wake()

    async def aclose(self) -> None:
        if not self.closed:
            self._half_close()
            self.closed = True
            self._in.wake()  # a receive of our own, waiting, sees the close
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        return {}


def _unmasked(data: bytes) -> bytes:
    """Client WebSocket frames with their random masks undone (the mask bit cleared, the
    key left out); the data as it is when it does not parse as whole frames."""
    out = bytearray()
    i, size = 0, len(data)
    while i < size:
        start = i
        if size - i < 2:
            return data
        second = data[i + 1]
        length, i = second & 0x7F, i + 2
        if length >= 126:
            width = 2 if length == 126 else 8
            length, i = int.from_bytes(data[i : i + width], "big"), i + width
        header = bytearray(data[start:i])
        header[1] &= 0x7F
        key = b"\0\0\0\0"
        if second & 0x80:
            key, i = data[i : i + 4], i + 4
        payload = data[i : i + length]
        if len(key) < 4 or len(payload) < length:
            return data
        i += length
        pad = (key * (length // 4 + 1))[:length]
        clear = int.from_bytes(payload, "big") ^ int.from_bytes(pad, "big")
        out += header + clear.to_bytes(length, "big")
    return bytes(out)


class VirtualNetwork:
    """An in-memory network: every connection the client makes is a :class:`Link` whose
    server end is handed to ``serve``. A :class:`qqproto_io.Network` for
    ``GatewayClient(network=...)``.

    Faults apply to the links open when they are set, and to connections made while they
    last; see :meth:`half_open`, :meth:`partition`, :meth:`outage`, :meth:`slow_loris`.

    Args:
        serve: called with the server end of each new link (e.g.
            :meth:`FakeGatewayServer.serve_stream`).
        latency: one-way delay of every link, in seconds.
        trace: record every link's life and bytes in :attr:`trace`.

    Attributes:
        links: every link made, oldest first.
        trace: one line per link event and chunk, with its time (see ``trace``).
        refused: connections refused by an outage, as ``(time, host)``.
    """

    def __init__(
        self, serve: Callable[[ByteStream], None], *, latency: float = 0.0, trace: bool = True
    ) -> None:
        self._serve = serve
        self.latency = latency
        self.tracing = trace
        self.links: list[Link] = []
        self.trace: list[str] = []
        self.refused: list[tuple[float, str]] = []
        self._outages: list[tuple[float, str | None, bool]] = []  # (until, host, hang)
        self._held_until = -math.inf
        self._trickle: tuple[str | None, float] | None = None  # (host, seconds per byte)
        self._changed = anyio.Event()

    # ------------------------------------------------------------------ the seam

    async def connect(self, host: str, port: int, *, tls: bool = False) -> ByteStream:
        """A new link to ``host:port`` (``tls`` is noted, not modelled); waits out a
        partition or a hanging outage, and raises ``ConnectionRefusedError`` in a refusing
        one."""
        await anyio.lowlevel.checkpoint()
        while True:
            now = anyio.current_time()
            outage = self._outage(host, now)
            if outage is not None and not outage[2]:
                self.refused.append((now, host))
                self.trace_add(f"connect {host}:{port} refused")
                raise ConnectionRefusedError(f"connection to {host}:{port} refused")
            wait_until = max(self._held_until, outage[0] if outage is not None else -math.inf)
            if wait_until <= now:
                break
            with anyio.CancelScope(deadline=wait_until):
                await self._changed.wait()
        link = Link(self, len(self.links) + 1, host, port, self.latency)
        if self._trickle is not None and self._trickle[0] in (None, host):
            link.trickle = self._trickle[1]
        self.links.append(link)
        self.record(link, f"open {host}:{port}{' tls' if tls else ''}")
        self._serve(link.server)
        return link.client

    def http_transport(self) -> httpx.AsyncBaseTransport:
        """httpx's own transport, its connection pool dialling through this network.

        httpcore would judge a kept-alive connection's age by the machine's monotonic
        clock, tying the number of connections to the machine's load; here its own expiry
        is off, and the streams expire idle connections after httpx's default keep-alive
        (5 s) of virtual time instead, as production does on real time.
        """
        transport = httpx.AsyncHTTPTransport()
        pool = getattr(transport, "_pool", None)
        if not isinstance(pool, httpcore.AsyncConnectionPool):  # pragma: no cover - httpx
            raise TypeError("this httpx has no httpcore pool to give a network to")
        limits = httpx.Limits()
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=None,
            network_backend=_Backend(self),
        )
        return transport

    # ------------------------------------------------------------------ faults

    def half_open(self, host: str | None = None) -> int:
        """Every open link (to ``host``, or all) turns half-open: from now on every byte
        either way is lost and no close ever arrives. Returns how many."""
        hit = self._open(host)
        for link in hit:
            link.half_open = True
            self.record(link, "half-open")
        return len(hit)

    def partition(self, seconds: float) -> None:
        """Nothing crosses any link for ``seconds``: what is sent meanwhile arrives
        afterwards, in order, and new connections wait until then to open."""
        until = anyio.current_time() + seconds
        self._held_until = max(self._held_until, until)
        for link in self._open(None):
            link.held_until = max(link.held_until, until)
        self.trace_add(f"partition for {seconds:g} s")
        self._notify()

    def outage(self, seconds: float, *, host: str | None = None, hang: bool = False) -> None:
        """``host`` (every host if ``None``) is unreachable for ``seconds``: its open links
        are reset (``hang``: turn half-open), and new connections to it are refused
        (``hang``: wait until it is back, or until the caller gives up)."""
        until = anyio.current_time() + seconds
        self._outages.append((until, host, hang))
        for link in self._open(host):
            if hang:
                link.half_open = True
                self.record(link, "half-open (outage)")
            else:
                link.reset()
        self.trace_add(f"outage of {host or 'every host'} for {seconds:g} s")
        self._notify()

    def slow_loris(self, seconds_per_byte: float, *, host: str | None = None) -> None:
        """From now on, what the server sends on links to ``host`` (all if ``None``), open
        or new, arrives one byte every ``seconds_per_byte``; ``0`` stops it."""
        trickle = seconds_per_byte if seconds_per_byte > 0 else None
        self._trickle = (host, seconds_per_byte) if trickle is not None else None
        for link in self._open(host):
            link.trickle = trickle
        self.trace_add(f"slow loris {seconds_per_byte:g} s/byte on {host or 'every host'}")

    # ------------------------------------------------------------------ tracing

    def record(self, link: Link, what: str) -> None:
        """Add a trace line about ``link``."""
        if self.tracing:
            self.trace.append(f"{anyio.current_time():.6f} #{link.number} {what}")

    def trace_add(self, what: str) -> None:
        """Add a trace line about the network."""
        if self.tracing:
            self.trace.append(f"{anyio.current_time():.6f} net {what}")

    # ------------------------------------------------------------------ helpers

    def _open(self, host: str | None) -> list[Link]:
        return [
            link
            for link in self.links
            if not link.closed and not link.half_open and host in (None, link.host)
        ]

    def _outage(self, host: str, now: float) -> tuple[float, str | None, bool] | None:
        current = [o for o in self._outages if o[0] > now and o[1] in (None, host)]
        self._outages = [o for o in self._outages if o[0] > now]
        return max(current, default=None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


class _Stream(httpcore.AsyncNetworkStream):
    """A link's client end as httpcore reads and writes it."""

    def __init__(self, end: _End) -> None:
        self._end = end
        self._used_at = anyio.current_time()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._used_at = anyio.current_time()
        try:
            with anyio.fail_after(timeout):
                return await self._end.receive(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("read timed out") from None
        except anyio.EndOfStream:
            return b""
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpcore.ReadError(type(exc).__name__) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._used_at = anyio.current_time()
        try:
            with anyio.fail_after(timeout):
                await self._end.send(buffer)
        except TimeoutError:
            raise httpcore.WriteTimeout("write timed out") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpcore.WriteError(type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._end.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return self  # TLS is not modelled: the bytes stay readable in the trace

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks this of idle connections only, to notice that the server closed
            # one; answering yes also for one idle past httpx's keep-alive expiry gives that
            # expiry on the virtual clock (httpcore's own reads the machine's).
            idle = anyio.current_time() - self._used_at
            return self._end.readable() or idle > _KEEPALIVE_EXPIRY
        return None


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's way out to the network, through a :class:`VirtualNetwork`."""

    def __init__(self, network: VirtualNetwork) -> None:
        self._network = network

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                end = await self._network.connect(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connection to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from None
        assert isinstance(end, _End)
        return _Stream(end)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no Unix sockets on a virtual network")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
