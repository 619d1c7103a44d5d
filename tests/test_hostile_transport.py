# The real client against peers that misbehave on purpose: WebSocket servers, CONNECT
# proxies and HTTP endpoints written here on loopback, byte for byte, so that each one does
# exactly the wrong thing a test needs (ping across our close, garble its status line,
# trickle a body, nest JSON 100,000 deep, send a message far above the limit).
#
# The rule under test: nothing that arrives from outside ends a transport, HTTP or permit
# task with an exception. A Transport ends with one TransportClosed report; a RestApi call
# raises HttpFailure (with the core's FailureKind) and nothing else; every wait is bounded
# as a whole; no secret reaches a message. Transports are driven directly, with a memory
# stream for an inbox, not through the whole client. Every test body is bounded, nothing
# sleeps to synchronise (a server may sleep to pace its bytes), and an unclosed socket fails
# the test that leaked it (the gc fixture below and the fd counts).
"""Hostile peers against Transport, open_stream, RestApi, TokenSource and the limiter."""

from __future__ import annotations

import contextlib
import ssl
import struct
import tracemalloc
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import h11
import pytest
from anyio.abc import SocketAttribute
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from qqproto import FailureKind, SessionStartLimit
from qqproto_io import _transport
from qqproto_io._http import Credentials, HttpFailure, RestApi, TokenSource
from qqproto_io._proxy import ProxyConfig, ProxyError, open_stream
from qqproto_io._stores import IdentifyBudgetExhausted, LocalIdentifyLimiter
from qqproto_io._transport import (
    Transport,
    TransportClosed,
    TransportLimits,
    TransportMessages,
    TransportOpened,
    TransportOversized,
)
from tests.loopback import anyio_backend, collect_garbage, no_proxy_env  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

BOUND = 15.0  # generous bound on every test body
SECRET = "s3cret-that-must-never-be-shown"
PROXY_PASSWORD = "pr0xy-pa55"

TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9


def open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


async def wait_until(predicate, within: float = 5.0) -> None:
    """Let other tasks run until ``predicate()`` holds (asyncio closes sockets a turn late)."""
    with anyio.fail_after(within):
        while not predicate():
            await anyio.lowlevel.checkpoint()


# ------------------------------------------------------------------- loopback peers


@asynccontextmanager
async def tcp_server(handler):
    """A loopback listener running ``handler(stream)`` per connection; yields its port.

    A handler may end by the client hanging up (the point of most tests): that is not a
    failure of the server. Anything else it raises fails the test.
    """

    async def guarded(stream) -> None:
        async with stream:
            with contextlib.suppress(
                anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError
            ):
                await handler(stream)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, guarded)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


def frame_header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    """A server frame's header (servers do not mask)."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes([first, length])
    if length < 1 << 16:
        return bytes([first, 126]) + struct.pack("!H", length)
    return bytes([first, 127]) + struct.pack("!Q", length)


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    return frame_header(opcode, len(payload), fin=fin) + payload


class Peer:
    """The server side of one WebSocket: wsproto to read, raw frames to misbehave."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self._pending: deque = deque()

    async def accept(self) -> None:
        await self.expect(Request)
        await self.stream.send(self.ws.send(AcceptConnection()))

    async def expect(self, kind):
        """Read until an event of ``kind`` arrives and return it (skipping the others)."""
        while True:
            while self._pending:
                event = self._pending.popleft()
                if isinstance(event, kind):
                    return event
            self._pending.extend(self.ws.events())
            if not self._pending:
                self.ws.receive_data(await self.stream.receive())

    async def send(self, event) -> None:
        await self.stream.send(self.ws.send(event))

    async def raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def rest(self) -> bytes:
        """Every byte the client sends from now until it hangs up."""
        data = b""
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                data += await self.stream.receive()
        return data


class Reports:
    """What a transport put in its inbox."""

    def __init__(self, receive) -> None:
        self._receive = receive
        self.items: list[object] = []

    async def next(self) -> object:
        with anyio.fail_after(10.0):
            item = await self._receive.receive()
        self.items.append(item)
        return item

    async def closed(self) -> TransportClosed:
        """Everything until the transport's final report, which is returned."""
        while not isinstance(item := await self.next(), TransportClosed):
            pass
        return item

    async def flat(self, count: int) -> list[object]:
        """The next ``count`` messages and oversize reports, one by one, in order."""
        out: list[object] = []
        while len(out) < count:
            item = await self.next()
            if isinstance(item, TransportMessages):
                out.extend(item.texts)
            elif isinstance(item, TransportOversized):
                out.append(item)
            else:
                pytest.fail(f"unexpected report {item!r} after {out!r}")
        return out


@asynccontextmanager
async def transport_to(url: str, *, limits=None, proxy=None, ssl_context=None):
    """A started Transport 1 to ``url`` and its reports; aborted (if still alive) on exit.

    The task group waits for the transport's task: an exception escaping it fails the test.
    """
    send, receive = anyio.create_memory_object_stream[object](1000)
    with send, receive:
        async with anyio.create_task_group() as tg:
            transport = Transport(
                1,
                url,
                send,
                limits=limits or TransportLimits(),
                proxy=proxy,
                ssl_context=ssl_context,
            )
            transport.start(tg)
            try:
                yield transport, Reports(receive)
            finally:
                transport.abort()


async def opened(reports: Reports) -> None:
    assert await reports.next() == TransportOpened(1)


# -------------------------------------------------------------- A.1 close and ping


async def test_a_ping_crossing_our_close_is_not_answered():
    # Regression: in a rotation the server pinged before echoing our close; the transport
    # answered with a Pong in LOCAL_CLOSING, wsproto raised LocalProtocolError and the task
    # died, taking the whole client with it.
    after_close = {}

    async def serve(stream) -> None:
        peer = Peer(stream)
        await peer.accept()
        await peer.raw(frame(PING, b"open"))
        after_close["pong"] = await peer.expect(Pong)
        close = await peer.expect(CloseConnection)
        after_close["code"] = close.code
        await peer.raw(frame(PING, b"crossing"))
        await peer.send(close.response())
        after_close["rest"] = await peer.rest()

    with anyio.fail_after(BOUND):
        async with (
            tcp_server(serve) as port,
            transport_to(f"ws://127.0.0.1:{port}/") as (transport, reports),
        ):
            await opened(reports)
            await wait_until(lambda: "pong" in after_close)
            transport.close(4000, "rotate")
            closed = await reports.closed()
            assert closed == TransportClosed(1, 4000, "rotate")
            await wait_until(lambda: "rest" in after_close)
    assert after_close["pong"].payload == b"open"  # a ping while open is answered
    assert after_close["code"] == 4000
    assert after_close["rest"] == b""  # nothing after our close: no Pong, no second close


async def test_a_close_crossing_ours_is_not_echoed():
    seen = {}

    async def serve(stream) -> None:
        peer = Peer(stream)
        await peer.accept()
        seen["ours"] = (await peer.expect(CloseConnection)).code
        # Its own close, not the echo of ours, and then frames that must be ignored.
        await peer.raw(frame(CLOSE, struct.pack("!H", 4009) + b"session timed out"))
        await peer.raw(frame(PING, b"late") + frame(TEXT, b"late"))
        seen["rest"] = await peer.rest()

    with anyio.fail_after(BOUND):
        async with (
            tcp_server(serve) as port,
            transport_to(f"ws://127.0.0.1:{port}/") as (transport, reports),
        ):
            await opened(reports)
            transport.close(4000, "going")
            transport.close(4000, "twice")  # a second close is dropped, not raised
            assert await reports.closed() == TransportClosed(1, 4009, "session timed out")
            await wait_until(lambda: "rest" in seen)
    assert seen == {"ours": 4000, "rest": b""}


async def test_a_framing_error_is_closed_by_us_and_reported():
    seen = {}

    async def serve(stream) -> None:
        peer = Peer(stream)
        await peer.accept()
        await peer.raw(frame(TEXT, b"ok") + frame(TEXT, b"\xff\xfe not utf-8"))
        seen["close"] = (await peer.expect(CloseConnection)).code

    with anyio.fail_after(BOUND):
        async with (
            tcp_server(serve) as port,
            transport_to(f"ws://127.0.0.1:{port}/") as (_, reports),
        ):
            await opened(reports)
            closed = await reports.closed()
            assert closed.code == 1007
            assert TransportMessages(1, ("ok",)) in reports.items  # reported before it
            await wait_until(lambda: "close" in seen)
    assert seen["close"] == 1007


# ------------------------------------------------------ A.2 failures from outside


@pytest.mark.parametrize(
    "url",
    [
        "ws://127.0.0.1:99999/websocket",
        "ws://127.0.0.1:port/websocket",
        "ws://[::1/websocket",
        "ws:///websocket",
        "http://127.0.0.1:1/websocket",
    ],
)
async def test_an_unusable_url_ends_with_a_report(url):
    # Regression: a port out of range raised ValueError out of the transport's task.
    with anyio.fail_after(BOUND):
        async with transport_to(url) as (_, reports):
            closed = await reports.closed()
    assert closed.code is None
    assert "invalid gateway URL" in closed.reason
    assert reports.items == [closed]


async def test_a_refused_upgrade_is_reported_and_closes_its_socket():
    # Regression: a refused upgrade raised after open_stream returned, so the stream was
    # never handed to the code that closes it.
    async def serve(stream) -> None:
        peer = Peer(stream)
        await peer.expect(Request)
        await peer.send(RejectConnection(status_code=403))
        await peer.rest()

    with anyio.fail_after(BOUND):
        async with tcp_server(serve) as port:
            before = open_fds()
            async with transport_to(f"ws://127.0.0.1:{port}/") as (_, reports):
                closed = await reports.closed()
            await wait_until(lambda: open_fds() <= before)
    assert closed.code is None
    assert "HTTP 403" in closed.reason


class ScriptedStream:
    """A byte stream that completes the upgrade, then raises ``failure`` where asked."""

    def __init__(self, failure: BaseException, where: str) -> None:
        self.failure = failure
        self.where = where
        self._server = WSConnection(ConnectionType.SERVER)
        self._replies: list[bytes] = []
        self._upgraded = False
        self.closed = False

    async def send(self, data: bytes) -> None:
        if self._upgraded:
            if self.where == "send":
                raise self.failure
            return
        self._server.receive_data(data)
        if any(isinstance(e, Request) for e in self._server.events()):
            reply = self._server.send(AcceptConnection())
            self._replies.append(reply + frame(TEXT, b'{"op":10}'))
            self._upgraded = True

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._replies:
            return self._replies.pop()
        if self.where == "receive":
            raise self.failure
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


FAILURES = [
    RuntimeError("boom"),
    ValueError("odd value"),
    KeyError("k"),
    ssl.SSLError(1, "bad record mac"),
    h11.RemoteProtocolError("garbage"),
    anyio.BrokenResourceError(),
    ConnectionResetError(104, "Connection reset by peer"),
    ExceptionGroup("several", [OSError("a"), RuntimeError("b")]),
]


@pytest.mark.parametrize("where", ["open", "receive", "send"])
@pytest.mark.parametrize("failure", FAILURES, ids=lambda e: type(e).__name__)
async def test_any_exception_from_outside_ends_in_one_report(monkeypatch, failure, where):
    streams: list[ScriptedStream] = []

    async def scripted_open_stream(*args, **kwargs):
        if where == "open":
            raise failure
        streams.append(ScriptedStream(failure, where))
        return streams[-1]

    monkeypatch.setattr(_transport, "open_stream", scripted_open_stream)
    with anyio.fail_after(BOUND):
        async with transport_to("ws://gateway.qqproto.test/websocket") as (transport, reports):
            if where != "open":
                await opened(reports)
            if where == "send":
                transport.send_text('{"op":1,"d":null}')
            closed = await reports.closed()
    assert closed.code is None
    leaf = failure.exceptions[0] if isinstance(failure, ExceptionGroup) else failure
    assert type(leaf).__name__ in closed.reason
    assert all(s.closed for s in streams)


async def test_abort_still_cancels_a_transport_stuck_anywhere():
    async def serve(stream) -> None:
        await anyio.sleep_forever()  # accepts, then never answers the upgrade

    with anyio.fail_after(BOUND):
        async with tcp_server(serve) as port:
            send, receive = anyio.create_memory_object_stream[object](10)
            with send, receive:
                async with anyio.create_task_group() as tg:
                    transport = Transport(
                        1,
                        f"ws://127.0.0.1:{port}/",
                        send,
                        limits=TransportLimits(),
                        proxy=None,
                        ssl_context=None,
                    )
                    transport.start(tg)
                    await anyio.lowlevel.checkpoint()
                    transport.abort()
                with pytest.raises(anyio.WouldBlock):
                    receive.receive_nowait()  # nothing is reported after an abort


# ---------------------------------------------------- A.3 and A.4 message sizes


async def test_oversized_messages_are_dropped_in_order_and_the_connection_stays_open():
    # Regression: the transport closed with 1009 and the server replayed the same message
    # on every Resume until the session was lost.
    cap = 1024
    seen = {}
    sent = [
        frame(TEXT, b"first"),
        frame(TEXT, ("\u00e9" * 512).encode()),  # exactly the cap in UTF-8 bytes
        frame(TEXT, ("\u00e9" * 512 + "x").encode()),  # one byte more: 1025
        frame(TEXT, ("\u20ac" * 300).encode()),  # 900 bytes in 300 characters
        frame(TEXT, ("\U0001f600" * 257).encode()),  # 1028 bytes in 257 characters
        frame(BINARY, b"\x00\x01binary"),
        frame(BINARY, b"\x00" * (cap + 10)),
        # Fragmented: 600 + a ping in between + 600; reported after its last fragment.
        frame(TEXT, b"a" * 600, fin=False),
        frame(PING, b"between"),
        frame(CONTINUATION, b"b" * 600),
        frame(TEXT, b"last"),
    ]

    async def serve(stream) -> None:
        peer = Peer(stream)
        await peer.accept()
        await peer.raw(b"".join(sent))
        seen["pong"] = (await peer.expect(Pong)).payload
        seen["text"] = (await peer.expect(TextMessage)).data
        await peer.rest()

    limits = TransportLimits(max_message_size=cap)
    with anyio.fail_after(BOUND):
        async with (
            tcp_server(serve) as port,
            transport_to(f"ws://127.0.0.1:{port}/", limits=limits) as (transport, reports),
        ):
            await opened(reports)
            got = await reports.flat(9)
            transport.send_text("still open")
            await wait_until(lambda: "text" in seen)
    assert got == [
        "first",
        "\u00e9" * 512,
        TransportOversized(1, 1025),
        "\u20ac" * 300,
        TransportOversized(1, 1028),
        b"\x00\x01binary",
        TransportOversized(1, cap + 10),
        TransportOversized(1, 1200),
        "last",
    ]
    assert seen == {"pong": b"between", "text": "still open"}


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
async def test_a_message_far_above_the_cap_is_never_held(opcode):
    # 32 MiB against a 64 KiB cap: wsproto streams a frame's payload as it arrives, and the
    # transport keeps none of it once the message is over the cap.
    cap = 64 * 1024
    chunk = b"x" * 65536
    big = 512 * len(chunk)
    measuring = anyio.Event()
    seen = {}

    async def serve(stream) -> None:
        peer = Peer(stream)
        await peer.accept()
        await measuring.wait()
        await peer.raw(frame_header(opcode, big // 2, fin=False))
        for _ in range(256):
            await peer.raw(chunk)
        await peer.raw(frame_header(CONTINUATION, big // 2))
        for _ in range(256):
            await peer.raw(chunk)
        await peer.raw(frame(TEXT, b"after"))
        seen["text"] = (await peer.expect(TextMessage)).data
        await peer.rest()

    limits = TransportLimits(max_message_size=cap)
    with anyio.fail_after(BOUND):
        async with (
            tcp_server(serve) as port,
            transport_to(f"ws://127.0.0.1:{port}/", limits=limits) as (transport, reports),
        ):
            await opened(reports)
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                measuring.set()
                got = await reports.flat(1)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert got == [TransportOversized(1, big)]
            assert await reports.flat(1) == ["after"]
            transport.send_text("still open")
            await wait_until(lambda: "text" in seen)
    # The reads, wsproto's buffer and a decoded piece: a few times 64 KiB, never 32 MiB.
    assert peak - base < 4 * 1024 * 1024
    assert seen["text"] == "still open"


# -------------------------------------------------------------------- B. proxies


def _head_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0]


async def _read_head(stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    return data


@asynccontextmanager
async def rogue_proxy(answer):
    """A CONNECT proxy that reads the request head and then runs ``answer(stream, head)``.

    Yields ``(config, done)``: a ProxyConfig with credentials, and an event set when the
    proxy's side of the last connection is finished.
    """
    state = {"done": anyio.Event()}

    async def handle(stream) -> None:
        try:
            head = _head_of(await _read_head(stream))
            await answer(stream, head)
        finally:
            state["done"].set()

    async with tcp_server(handle) as port:
        config = ProxyConfig.from_url(f"http://bot:{PROXY_PASSWORD}@127.0.0.1:{port}")
        yield config, state


def _echo_credentials(head: bytes) -> bytes:
    # A hostile proxy repeats our Proxy-Authorization in the garbage it answers.
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"proxy-authorization:"):
            return line.partition(b":")[2].strip()
    raise AssertionError("no Proxy-Authorization sent")


async def _garbled_status(stream, head) -> None:
    await stream.send(b"HTTP/1.1 2OO " + _echo_credentials(head) + b"\r\n\r\n")


async def _garbled_header(stream, head) -> None:
    await stream.send(b"HTTP/1.1 200 OK\r\n\x00" + _echo_credentials(head) + b"\r\n\r\n")


async def _endless_head(stream, head) -> None:
    await stream.send(b"HTTP/1.1 200 OK\r\n")
    while True:
        await stream.send(b"X-Padding: " + b"p" * 1000 + b"\r\n")


async def _endless_interim(stream, head) -> None:
    while True:
        await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")


async def _cut_short(stream, head) -> None:
    await stream.send(b"HTTP/1.1 200 Conn")


async def _eager_tunnel(stream, head) -> None:
    await stream.send(b"HTTP/1.1 200 Connection established\r\n\r\nunasked-for bytes")
    await stream.receive()  # until the client hangs up


ROGUE_ANSWERS = [
    _garbled_status,
    _garbled_header,
    _endless_head,
    _endless_interim,
    _cut_short,
    _eager_tunnel,
]


@pytest.mark.parametrize("answer", ROGUE_ANSWERS, ids=lambda f: f.__name__.strip("_"))
async def test_a_rogue_connect_answer_is_a_proxy_error_and_closes_the_socket(answer):
    # Regression: a garbled status line raised h11.RemoteProtocolError out of the transport.
    with anyio.fail_after(BOUND):
        async with rogue_proxy(answer) as (config, _):
            before = open_fds()
            with pytest.raises(ProxyError) as info:
                await open_stream(
                    "gateway.qqproto.test", 443, tls=False, ssl_context=None, proxy=config
                )
            await wait_until(lambda: open_fds() <= before)
    message = f"{info.value} {info.value!r}"
    assert PROXY_PASSWORD not in message
    assert config.authorization not in message
    # No h11 exception rides along either: its text quotes the bytes it choked on.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


@pytest.mark.parametrize("answer", [_garbled_status, _garbled_header])
async def test_a_rogue_proxy_ends_the_transport_with_a_clean_report(answer):
    with anyio.fail_after(BOUND):
        async with (
            rogue_proxy(answer) as (config, _),
            transport_to("wss://gateway.qqproto.test/websocket", proxy=config) as (_, reports),
        ):
            closed = await reports.closed()
    assert closed.code is None
    assert "ProxyError" in closed.reason
    assert PROXY_PASSWORD not in closed.reason
    assert config.authorization not in closed.reason


async def _not_tls_behind_the_tunnel(stream, head) -> None:
    await stream.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await stream.receive()  # the ClientHello
    await stream.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


async def test_a_tls_failure_behind_a_proxy_closes_the_tunnel():
    # Regression: the tunnel socket was left open (until the garbage collector found it).
    with anyio.fail_after(BOUND):
        async with rogue_proxy(_not_tls_behind_the_tunnel) as (config, state):
            before = open_fds()
            with pytest.raises((ssl.SSLError, anyio.BrokenResourceError)):
                await open_stream(
                    "gateway.qqproto.test",
                    443,
                    tls=True,
                    ssl_context=ssl.create_default_context(),
                    proxy=config,
                )
            await state["done"].wait()
            await wait_until(lambda: open_fds() <= before)
            # The same through a transport: a report that names the failure.
            state["done"] = anyio.Event()
            async with transport_to("wss://gateway.qqproto.test/websocket", proxy=config) as (
                _,
                reports,
            ):
                closed = await reports.closed()
            await state["done"].wait()
            await wait_until(lambda: open_fds() <= before)
    assert closed.code is None
    assert "SSL" in closed.reason or "BrokenResourceError" in closed.reason


# ----------------------------------------------------------------------- C. HTTP


def reply(status: int, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} Whatever", f"Content-Length: {len(body)}", "Connection: close"]
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@asynccontextmanager
async def http_server(respond):
    """HTTP/1.1 on loopback; ``respond(method, path, body, stream)`` writes each answer raw.

    Yields ``(base_url, requests)``; every request is ``(method, path, body)``.
    """
    requests: list[tuple[str, str, bytes]] = []

    async def handle(stream) -> None:
        conn = h11.Connection(h11.SERVER)
        method = path = ""
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive())
            elif isinstance(event, h11.Request):
                method, path = event.method.decode(), event.target.decode()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        requests.append((method, path, body))
        await respond(method, path, body, stream)

    async with tcp_server(handle) as port:
        yield f"http://127.0.0.1:{port}", requests


@asynccontextmanager
async def rest_api(base: str, *, timeout: float = 5.0):  # noqa: ASYNC109 - RestApi's own
    api = RestApi(
        Credentials("app-1", SECRET),
        api_base=base,
        token_url=f"{base}/app/getAppAccessToken",
        timeout=timeout,
    )
    try:
        yield api
    finally:
        await api.aclose()


GATEWAY_OK = b'{"url": "ws://127.0.0.1:1/websocket"}'
TOKEN_OK = b'{"access_token": "tok-123", "expires_in": "7200"}'
CALLS = {
    "token": lambda api: api.fetch_token(),
    "gateway": lambda api: api.fetch_gateway("tok-123"),
    "request": lambda api: api.request("GET", "/users/@me", token="tok-123"),
}


@pytest.mark.parametrize("call", list(CALLS))
async def test_a_body_nested_100000_deep_is_an_http_failure(call):
    # Regression: json.loads raised RecursionError out of RestApi.
    deep = b"[" * 100_000 + b"]" * 100_000

    async def respond(method, path, body, stream) -> None:
        await stream.send(reply(200, deep, "Content-Type: application/json"))

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, _), rest_api(base) as api:
            with pytest.raises(HttpFailure) as info:
                await CALLS[call](api)
    assert "not JSON" in str(info.value)
    assert info.value.kind is FailureKind.TRANSIENT


async def _trickle(stream, head: bytes) -> None:
    await stream.send(head)
    while True:
        await stream.send(b" ")
        await anyio.sleep(0.1)  # pacing the bytes, not synchronising


@pytest.mark.parametrize("call", list(CALLS))
async def test_a_slow_loris_body_times_out_as_a_whole(call):
    # Regression: httpx's timeouts are per read; a byte every 0.1 s never tripped them and
    # token fetching for every shard hung for ever.
    timeout = 1.0

    async def respond(method, path, body, stream) -> None:
        await _trickle(stream, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, _), rest_api(base, timeout=timeout) as api:
            start = anyio.current_time()
            with anyio.fail_after(timeout + 2.0), pytest.raises(HttpFailure) as info:
                await CALLS[call](api)
            took = anyio.current_time() - start
    assert "timed out after 1 s" in str(info.value)
    assert info.value.kind is FailureKind.TRANSIENT
    assert took < timeout + 1.0


async def test_the_gateway_fallback_shares_one_timeout():
    timeout = 1.0

    async def respond(method, path, body, stream) -> None:
        if path == "/gateway/bot":
            await anyio.sleep(0.6)  # a slow refusal, then the fallback trickles
            await stream.send(reply(500))
        else:
            await _trickle(stream, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, requests), rest_api(base, timeout=timeout) as api:
            start = anyio.current_time()
            with anyio.fail_after(timeout + 2.0), pytest.raises(HttpFailure) as info:
                await api.fetch_gateway("tok-123")
            took = anyio.current_time() - start
    assert [path for _, path, _ in requests] == ["/gateway/bot", "/gateway"]
    assert "timed out" in str(info.value)
    assert took < timeout + 0.5


async def _endless_chunks(stream) -> None:
    await stream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    while True:
        await stream.send(chunk)


@pytest.mark.parametrize("shape", ["declared", "chunked"])
async def test_a_body_above_the_size_bound_is_refused(shape):
    async def respond(method, path, body, stream) -> None:
        if shape == "declared":
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
            await anyio.sleep_forever()
        await _endless_chunks(stream)

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, _), rest_api(base, timeout=10.0) as api:
            with anyio.fail_after(5.0), pytest.raises(HttpFailure) as info:
                await api.fetch_token()
    assert "larger than" in str(info.value)
    assert info.value.kind is FailureKind.TRANSIENT


TOKEN_CASES = [
    # (status, body, kind): the body's error code wins over the status, by the core's rules
    (200, b'{"code": 100016, "message": "invalid appid or secret"}', FailureKind.FATAL),
    (401, b'{"code": 100016, "message": "invalid appid or secret"}', FailureKind.FATAL),
    (400, b'{"code": 100007, "message": "bot banned"}', FailureKind.FATAL),
    (200, b'{"code": 10004}', FailureKind.FATAL),
    (200, b'{"code": 100001, "message": "too many requests"}', FailureKind.TRANSIENT),
    (401, b"", FailureKind.AUTH),
    (401, b"<html>go away</html>", FailureKind.AUTH),
    (500, b'{"message": "' + SECRET.encode() + b'"}', FailureKind.TRANSIENT),
    (429, b"slow down", FailureKind.TRANSIENT),
    (200, b"<html>not json</html>", FailureKind.TRANSIENT),
    (200, b'{"access_token": 5, "expires_in": "7200"}', FailureKind.TRANSIENT),
    (200, b'["a", "list"]', FailureKind.TRANSIENT),
    (200, b"", FailureKind.TRANSIENT),
]


@pytest.mark.parametrize(("status", "body", "kind"), TOKEN_CASES)
async def test_token_failures_carry_the_cores_kind_and_no_secret(status, body, kind):
    async def respond(method, path, request_body, stream) -> None:
        await stream.send(reply(status, body))

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, requests), rest_api(base) as api:
            with pytest.raises(HttpFailure) as info:
                await api.fetch_token()
    assert info.value.kind is kind
    assert requests[0][0:2] == ("POST", "/app/getAppAccessToken")
    assert SECRET.encode() in requests[0][2]  # it was sent, and so it may never come back
    for text in (str(info.value), repr(info.value)):
        assert SECRET not in text
    if b"100016" in body:
        assert "100016" in str(info.value)


async def test_a_good_token_answer_still_parses():
    async def respond(method, path, body, stream) -> None:
        await stream.send(reply(200, TOKEN_OK))

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, _), rest_api(base) as api:
            grant = await api.fetch_token()
    assert grant.token == "tok-123"
    assert grant.expires_in == 7200.0


GATEWAY_CASES = [
    # (answers by path, expected paths asked, outcome: a kind or the URL)
    ({"/gateway/bot": reply(401)}, ["/gateway/bot"], FailureKind.AUTH),
    (
        {"/gateway/bot": reply(500), "/gateway": reply(200, GATEWAY_OK)},
        ["/gateway/bot", "/gateway"],
        "ws://127.0.0.1:1/websocket",
    ),
    (
        {"/gateway/bot": reply(200, b"{}"), "/gateway": reply(401)},
        ["/gateway/bot", "/gateway"],
        FailureKind.AUTH,
    ),
    (
        {
            "/gateway/bot": reply(200, b'{"url": "ws://127.0.0.1:99999/"}'),
            "/gateway": reply(200, b'{"url": "ws://:80/"}'),
        },
        ["/gateway/bot", "/gateway"],
        FailureKind.TRANSIENT,
    ),
]


@pytest.mark.parametrize(("answers", "asked", "outcome"), GATEWAY_CASES)
async def test_gateway_failures_and_the_fallback(answers, asked, outcome):
    async def respond(method, path, body, stream) -> None:
        await stream.send(answers[path])

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, requests), rest_api(base) as api:
            if isinstance(outcome, FailureKind):
                with pytest.raises(HttpFailure) as info:
                    await api.fetch_gateway("tok-123")
                assert info.value.kind is outcome
                assert "tok-123" not in str(info.value)
            else:
                assert (await api.fetch_gateway("tok-123")).url == outcome
    assert [path for _, path, _ in requests] == asked


@pytest.mark.parametrize(
    ("status", "kind"), [(401, FailureKind.AUTH), (404, FailureKind.TRANSIENT)]
)
async def test_openapi_failures_name_method_path_and_status_only(status, kind):
    async def respond(method, path, body, stream) -> None:
        await stream.send(reply(status, b'{"message": "tok-123 ' + SECRET.encode() + b'"}'))

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, _), rest_api(base) as api:
            with pytest.raises(HttpFailure) as info:
                await api.request("POST", "/v2/users/U1/messages", token="tok-123", json={})
    assert str(info.value) == f"POST /v2/users/U1/messages: HTTP {status}"
    assert info.value.kind is kind


async def test_anything_unexpected_inside_a_call_becomes_an_http_failure():
    async def respond(method, path, body, stream) -> None:
        await stream.send(reply(200, b"{}"))

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, _), rest_api(base) as api:
            with pytest.raises(HttpFailure) as info:
                await api.request("POST", "/v2/x", token="tok-123", json={"bad": object()})
            assert "TypeError" in str(info.value)
        async with rest_api("http://[::1") as api:
            with pytest.raises(HttpFailure):
                await api.fetch_gateway("tok-123")
            with pytest.raises(HttpFailure):
                await api.request("GET", "/x", token="tok-123")


async def test_a_cancelled_token_caller_releases_the_lock_for_the_next():
    arrived = anyio.Event()

    async def respond(method, path, body, stream) -> None:
        if not arrived.is_set():
            arrived.set()
            await anyio.sleep_forever()  # the first fetch is never answered
        await stream.send(reply(200, TOKEN_OK))

    with anyio.fail_after(BOUND):
        async with http_server(respond) as (base, requests), rest_api(base) as api:
            tokens = TokenSource(api)
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def first() -> None:
                    with scope:
                        await tokens.get()

                tg.start_soon(first)
                await arrived.wait()
                scope.cancel()
            grant = await tokens.get()
    assert grant.token == "tok-123"
    assert len(requests) == 2  # the cancelled fetch and the one that answered


# ------------------------------------------------------------- D. identify budget


class VirtualTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def limit(remaining: int, reset_after: float, total: int = 1000) -> SessionStartLimit:
    return SessionStartLimit(
        total=total, remaining=remaining, reset_after=reset_after, max_concurrency=1
    )


def limiter_on(vt: VirtualTime) -> LocalIdentifyLimiter:
    return LocalIdentifyLimiter(window=0.0, clock=vt.clock, sleep=vt.sleep, wait_for_reset=False)


async def test_concurrent_gateway_answers_never_grant_more_than_remaining():
    # Regression: shard B's answer, fetched together with A's, reset the count to 1 after
    # A's permit: two Identifies for a budget of one.
    vt = VirtualTime()
    limiter = limiter_on(vt)
    await limiter.update_limit(limit(1, 3600.0))  # shard A's answer
    await limiter.acquire(0, 1)
    vt.now = 0.2
    await limiter.update_limit(limit(1, 3599.9))  # shard B's, sent before A identified
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(1, 1)
    await limiter.update_limit(limit(0, 3599.0))  # lower is always taken
    vt.now = 1800.0
    await limiter.update_limit(limit(7, 1800.0))  # never higher within the period
    with pytest.raises(IdentifyBudgetExhausted) as info:
        await limiter.acquire(1, 1)
    # The reset stays where the first answer put it, not 1800 s after the last one.
    assert info.value.retry_after == pytest.approx(1800.0, abs=0.2)


async def test_a_later_period_or_a_passed_reset_brings_the_budget_back():
    vt = VirtualTime()
    limiter = limiter_on(vt)
    await limiter.update_limit(limit(0, 100.0, total=2))
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(0, 1)
    vt.now = 100.0  # the reset passed: the whole budget is back
    await limiter.acquire(0, 1)
    await limiter.acquire(1, 1)
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(2, 1)
    vt.now = 101.0
    # A stale answer from before the reset (it resets "in 0.5 s") says nothing of this one.
    await limiter.update_limit(limit(2, 0.5, total=2))
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(2, 1)
    # An answer whose reset lies a period later than the one held: the server turned over.
    await limiter.update_limit(limit(5, 100.0 + 86_400.0 + 3600.0, total=5))
    for shard in range(5):
        await limiter.acquire(shard, 1)
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(5, 1)
