# A hostile QQ gateway on loopback: the adversary of tests/test_hostile_peer.py.
#
# Theory of operation. Three anyio TCP listeners on 127.0.0.1 stand in for the platform:
#
#   * an HTTP/1.1 server (h11) for the token endpoint and `/gateway/bot` (and `/gateway`);
#   * a WebSocket gateway (wsproto for the handshake and for parsing what the client sends,
#     a small frame encoder of our own for everything we send, so that we can also send
#     frames no library would: bad opcodes, masked server frames, half frames, close codes
#     out of range);
#   * optionally an HTTP CONNECT proxy in front of the gateway (the client's `proxy=`).
#
# What each of them does is a `Script`, chosen per example by Hypothesis: a list of answers
# for the token requests, one for the gateway-URL requests, one for the CONNECTs, and one
# `Conn` (a list of server actions) per WebSocket connection, in the order the client opens
# them. Once a list is used up, that side behaves. `HostilePeer.flip()` makes everything
# behave from then on (the test calls it when the script is done): new requests are answered
# correctly, new connections are served by the sans-IO `FakeGateway` core of qqproto.testing
# exactly as `qqproto_io._fake_server.FakeGatewayServer` serves them. Connections opened
# before the flip keep whatever state the script left them in (muted, frozen...): a correct
# client escapes those by its own timers.
#
# The sans-IO core serves *every* connection, hostile ones included: Identify, Resume,
# READY, RESUMED, replays, ACKs and sessions are always the core's, and a connection's
# script only decides what of it reaches the wire, when, and what else is sent around it
# (Hold/Serve buffer the core's frames, Mute drops kinds of them, the other steps write raw
# frames or break the link). So sessions stay consistent across hostile and behaving
# connections: a Resume after a hostile connection replays what the client missed, and the
# test can demand that every dispatch is delivered exactly once.
#
# Everything the peer does and sees is recorded in `PeerLog` with `anyio.current_time()`
# (the clock of the client's core), for the invariants the test checks afterwards. A failure
# inside the peer itself is recorded in `PeerLog.errors` (a harness bug, never blamed on the
# client) instead of being raised into the listener's task group.
"""A hostile loopback QQ gateway (HTTP + WebSocket + CONNECT proxy) driven by a script."""

from __future__ import annotations

import contextlib
import json
import math
import random
import socket
import struct
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import h11
from anyio.abc import SocketAttribute
from wsproto import ConnectionType, WSConnection
from wsproto import events as wse
from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from qqproto.testing import (
    FakeGateway,
    FakeGatewayConfig,
    Faults,
    ServerClose,
    ServerConnection,
    ServerSend,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from anyio.abc import SocketStream
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "Accept",
    "AckFirst",
    "BadAccept",
    "BadFrame",
    "BadUrl",
    "BadUtf8",
    "Binary",
    "Body",
    "Close",
    "Conn",
    "Dispatch",
    "Echo",
    "EchoCode",
    "Fault",
    "Fine",
    "Flood",
    "Fragment",
    "Freeze",
    "Garbage",
    "HalfClose",
    "Hangup",
    "Hold",
    "HostilePeer",
    "Ignore",
    "Junk",
    "Mute",
    "OkThenGarbage",
    "OkThenHangup",
    "Pause",
    "PeerLog",
    "Ping",
    "PingFirst",
    "Pong",
    "Reconnect",
    "Reset",
    "Script",
    "Serve",
    "SlowHead",
    "SlowLoris",
    "Stall",
    "StallMidFrame",
    "StallWrites",
    "Status",
    "Truncated",
    "Tunnel",
    "Unmute",
    "WaitFor",
]

TOKEN_PATH = "/app/getAppAccessToken"
WS_PATH = "/websocket"
PROXIED_HOST = "gateway.hostile.test"  # not loopback to the client: only the proxy reaches it
FATAL_TOKEN_CODE = 100016  # the token endpoint's "wrong app id or client secret"
TRANSIENT_TOKEN_CODE = 11255  # an error code the platform documents as worth a retry

_READ = 65536
_MAX_REQUEST = 1 << 20  # bytes of one HTTP request the peer reads before it gives up
_CLOSE_WAIT = 1.0  # how long a close we sent waits for the client's answer
_HANDSHAKE_READ = 5.0  # bound on reading a WebSocket upgrade request


# =============================================================================== the script
#
# Every step is a small frozen dataclass, so a script prints as Python that rebuilds it:
# `from tests.hostile_gateway import *` and paste the printed `Script(...)`.


# ----------------------------------------------------------- steps shared by several sides


@dataclass(frozen=True)
class Fine:
    """A correct answer (HTTP), a correct tunnel (proxy)."""


@dataclass(frozen=True)
class Status:
    """An HTTP answer with this status (a JSON error body); a CONNECT refused with it; an
    upgrade rejected with it."""

    code: int


@dataclass(frozen=True)
class Garbage:
    """These raw bytes instead of an answer (an HTTP status line, a CONNECT answer, an
    upgrade answer), then hang up."""

    data: bytes


@dataclass(frozen=True)
class Hangup:
    """Close the TCP connection without a word (FIN)."""


@dataclass(frozen=True)
class Reset:
    """Reset the TCP connection (RST: SO_LINGER 0, then close)."""


@dataclass(frozen=True)
class Stall:
    """Say nothing for ``seconds``, then: HTTP hangs up; proxy and upgrade go on normally."""

    seconds: float


# -------------------------------------------------------------------------- HTTP answers


@dataclass(frozen=True)
class Body:
    """200 with an unusual body. Kinds: ``not_json``, ``empty``, ``array``, ``null``,
    ``wrong_types``, ``error_code`` (a retryable platform error), ``fatal_code`` (wrong app
    id or secret), ``bogus_token`` (a token the gateway does not know), ``zero_expiry``,
    ``junk_expiry``, ``nan_expiry``, ``inf_expiry``, ``deep`` (JSON nested 100,000 deep),
    ``huge`` (a correct answer padded to 3 MB), ``no_budget`` (``session_start_limit``
    used up, resets in 0.7 s)."""

    kind: str


@dataclass(frozen=True)
class BadUrl:
    """``/gateway`` answers with this ``url``; ``{ws_port}``, ``{http_port}`` and
    ``{closed_port}`` are filled in."""

    url: str


@dataclass(frozen=True)
class SlowLoris:
    """Correct headers, then the body one byte per ``every`` seconds (each byte within any
    per-read timeout). ``finish_after``: send the rest after that long; ``None``: never
    (until the client hangs up)."""

    every: float
    finish_after: float | None = None


@dataclass(frozen=True)
class SlowHead:
    """A correct answer whose status line and headers come one byte per ``every`` seconds."""

    every: float


@dataclass(frozen=True)
class Truncated:
    """Headers promise 100 bytes more than the body has; hang up after the body."""


# ------------------------------------------------------------------------ proxy answers


@dataclass(frozen=True)
class Tunnel:
    """A correct CONNECT tunnel."""


@dataclass(frozen=True)
class OkThenHangup:
    """Answer the CONNECT with 200, then hang up."""


@dataclass(frozen=True)
class OkThenGarbage:
    """Answer the CONNECT with 200, then send garbage instead of the upstream's bytes."""


# ---------------------------------------------------------------- the WebSocket handshake


@dataclass(frozen=True)
class Accept:
    """Accept the upgrade."""


@dataclass(frozen=True)
class BadAccept:
    """Answer 101 with a wrong ``Sec-WebSocket-Accept``."""


# ------------------------------------------------------- reactions to the client's close


@dataclass(frozen=True)
class Echo:
    """Answer the client's close frame with its own code, then hang up (correct)."""


@dataclass(frozen=True)
class EchoCode:
    """Answer the client's close frame with another code, then hang up."""

    code: int


@dataclass(frozen=True)
class Ignore:
    """Never answer the client's close frame; keep the socket open."""


@dataclass(frozen=True)
class PingFirst:
    """Send a Ping after the client's close frame arrived (it crosses the close), then echo."""


@dataclass(frozen=True)
class AckFirst:
    """Send a heartbeat ACK text after the client's close frame arrived, then echo."""


# ------------------------------------------------------------- WebSocket server actions


@dataclass(frozen=True)
class Hold:
    """Buffer the gateway core's frames (as the first step: the Hello too) until ``Serve``."""


@dataclass(frozen=True)
class Serve:
    """Send what was held, and the core's frames as they come from now on."""


@dataclass(frozen=True)
class Mute:
    """Drop the core's frames of a kind: ``hello``, ``ack``, ``auth`` (READY, RESUMED, op 9)."""

    kind: str


@dataclass(frozen=True)
class Unmute:
    """Stop dropping frames of ``kind``."""

    kind: str


@dataclass(frozen=True)
class WaitFor:
    """Wait (at most ``timeout`` s) until ``what``: ``auth`` (Identify or Resume received),
    ``beat`` (a heartbeat received after this step began), ``ready`` (READY or RESUMED
    sent), ``close`` (the client's close frame received)."""

    what: str
    timeout: float = 2.0


@dataclass(frozen=True)
class Pause:
    """Do nothing for ``seconds`` (the connection keeps being served meanwhile)."""

    seconds: float


@dataclass(frozen=True)
class Dispatch:
    """Produce ``count`` messages on the gateway (sent to the session's live connection,
    buffered for Resume otherwise)."""

    count: int = 1


@dataclass(frozen=True)
class Ping:
    """A Ping frame with a ``size``-byte payload (at most 125)."""

    size: int = 0


@dataclass(frozen=True)
class Pong:
    """An unsolicited Pong frame."""

    size: int = 0


@dataclass(frozen=True)
class Binary:
    """A binary message of ``size`` bytes."""

    size: int = 4


@dataclass(frozen=True)
class BadUtf8:
    """A text frame whose payload is not UTF-8."""


@dataclass(frozen=True)
class BadFrame:
    """A frame a server must not send. Kinds: ``rsv1``, ``opcode3``, ``masked``,
    ``long_ping``, ``fragmented_ping``, ``orphan_continuation``, ``text_in_fragment``,
    ``close_1byte``, ``huge_length`` (a header announcing 2**62 bytes)."""

    kind: str


@dataclass(frozen=True)
class Junk:
    """A text message the client must survive. Kinds: see ``JUNK_KINDS``."""

    kind: str


@dataclass(frozen=True)
class Fragment:
    """Send the core's text messages from now on in ``pieces`` fragments (split anywhere,
    mid-character included), with a Ping between fragments if ``ping_between``."""

    pieces: int
    ping_between: bool = False


@dataclass(frozen=True)
class Reconnect:
    """The core sends op 7 now (and closes with 4009 a second later unless the client did)."""


@dataclass(frozen=True)
class Close:
    """Send a close frame with ``code`` (``None``: no payload) and ``reason``; then:
    ``await`` (the client's answer, at most 1 s, then hang up), ``hangup``, ``rst`` or
    ``linger`` (keep the socket until the client closes it)."""

    code: int | None
    then: str = "await"
    reason: bytes = b"hostile"


@dataclass(frozen=True)
class HalfClose:
    """Send FIN (shut down our writing side) and keep reading."""


@dataclass(frozen=True)
class StallWrites:
    """Write nothing at all (no ACK either) for ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class StallMidFrame:
    """Write only the first half of the next frame, wait ``seconds``, then ``finish``,
    ``rst`` or ``fin``."""

    seconds: float
    then: str = "finish"


@dataclass(frozen=True)
class Freeze:
    """Stop writing and processing for good (a half-open link); EOF is still noticed."""


@dataclass(frozen=True)
class Flood:
    """``count`` frames at once: ``ping`` (each one wants a Pong), ``dispatch`` (real
    messages of the session), ``junk`` (unparsable text)."""

    kind: str
    count: int


@dataclass(frozen=True)
class Fault:
    """Turn on a misbehaviour of the gateway core until the peer behaves:
    ``replay_overlap`` (Resume replays 3 dispatches the client already has),
    ``replay_reversed`` (replays come in reverse order), ``second_hello`` (a Hello right
    after READY/RESUMED), ``resume_invalid`` (op 9 ``d: true`` answers every Resume)."""

    name: str


Handshake = Accept | Status | Garbage | Hangup | Reset | Stall | BadAccept
Reaction = Echo | EchoCode | Ignore | PingFirst | AckFirst | Hangup | Reset
HttpStep = Fine | Status | Body | BadUrl | Garbage | SlowLoris | SlowHead | Hangup | Reset | Stall
HttpStep |= Truncated
ProxyStep = Tunnel | Status | Garbage | Hangup | Reset | Stall | OkThenHangup | OkThenGarbage
WsStep = (
    Hold
    | Serve
    | Mute
    | Unmute
    | WaitFor
    | Pause
    | Dispatch
    | Ping
    | Pong
    | Binary
    | BadUtf8
    | BadFrame
    | Junk
    | Fragment
    | Reconnect
    | Close
    | HalfClose
    | Reset
    | StallWrites
    | StallMidFrame
    | Freeze
    | Flood
    | Fault
)


@dataclass(frozen=True)
class Conn:
    """The script of one WebSocket connection.

    Attributes:
        steps: the server actions, in order (they start when the upgrade is done).
        hello_ms: the Hello ``heartbeat_interval``.
        handshake: how the upgrade is answered.
        on_close: how a close frame *from the client* is answered.
    """

    steps: tuple[WsStep, ...] = ()
    hello_ms: int = 200
    handshake: Handshake = Accept()
    on_close: Reaction = Echo()


@dataclass(frozen=True)
class Script:
    """What the peer does, by request and connection order; then it behaves.

    Attributes:
        token: answers to the token requests, in order.
        gateway: answers to the ``/gateway/bot`` (and ``/gateway``) requests, in order.
        conns: one script per WebSocket connection, in order.
        proxy: ``None``: the client connects directly; else the client uses the CONNECT
            proxy, and these are its answers to the CONNECTs, in order.
    """

    token: tuple[HttpStep, ...] = ()
    gateway: tuple[HttpStep, ...] = ()
    conns: tuple[Conn, ...] = ()
    proxy: tuple[ProxyStep, ...] | None = None


# ============================================================================ frame bytes


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = False):
    """One WebSocket frame as a server sends it (unmasked unless ``mask``)."""
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(bit | 127)
        head += n.to_bytes(8, "big")
    if mask:
        key = b"\x37\xfa\x21\x3d"
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason[:123]


def bad_frame(kind: str) -> bytes:
    ack = b'{"op":11}'
    frames = {
        "rsv1": frame(0x1, ack, rsv=4),
        "opcode3": frame(0x3, b"x"),
        "masked": frame(0x1, ack, mask=True),
        "long_ping": b"\x89\x7e\x00\x7e" + b"p" * 126,
        "fragmented_ping": frame(0x9, b"p", fin=False),
        "orphan_continuation": frame(0x0, ack),
        "text_in_fragment": frame(0x1, b'{"op"', fin=False) + frame(0x1, b":11}"),
        "close_1byte": frame(0x8, b"\x03"),
        "huge_length": b"\x81\x7f" + (1 << 62).to_bytes(8, "big") + b'{"op":11}',
    }
    return frames[kind]


BAD_FRAME_KINDS = (
    "rsv1",
    "opcode3",
    "masked",
    "long_ping",
    "fragmented_ping",
    "orphan_continuation",
    "text_in_fragment",
    "close_1byte",
    "huge_length",
)

_DEPTH = 100_000
JUNK_KINDS = (
    "not_json",
    "array",
    "null",
    "unknown_op",
    "no_op",
    "dispatch_no_t",
    "dispatch_noseq",
    "hello_bad",
    "hello_again",
    "heartbeat_request",
    "invalid_session",
    "invalid_session_true",
    "reconnect",
    "ack",
    "ready_again",
    "resumed_again",
    "deep",
    "huge",
    "wrong_types",
    "lone_surrogate",
    "big_number",
)


def junk_text(kind: str, n: int) -> str:
    """The text of a ``Junk(kind)`` message (``n`` makes hostile event ids unique)."""
    if kind == "deep":
        return "[" * _DEPTH + "]" * _DEPTH
    if kind == "huge":  # above the client's 1 MiB payload limit
        return '{"op":0,"t":"HUGE","d":"' + "x" * (2 << 20) + '"}'
    texts = {
        "not_json": "not json {",
        "array": "[1,2,3]",
        "null": "null",
        "unknown_op": '{"op":42,"d":null}',
        "no_op": '{"d":{}}',
        "dispatch_no_t": '{"op":0,"s":null,"d":{}}',
        # No "s": a hostile dispatch must not move the client's sequence number.
        "dispatch_noseq": json.dumps(
            {"op": 0, "t": "GUILD_CREATE", "id": f"HOSTILE:{n}", "d": {"id": f"G{n}"}}
        ),
        "hello_bad": '{"op":10,"d":{"heartbeat_interval":-1}}',
        "hello_again": '{"op":10,"d":{"heartbeat_interval":200}}',
        "heartbeat_request": '{"op":1,"d":null}',
        "invalid_session": '{"op":9,"d":false}',
        "invalid_session_true": '{"op":9,"d":true}',
        "reconnect": '{"op":7}',
        "ack": '{"op":11}',
        "ready_again": '{"op":0,"s":null,"t":"READY","d":{"session_id":"bogus"}}',
        "resumed_again": '{"op":0,"s":null,"t":"RESUMED","d":""}',
        "wrong_types": '{"op":"0","s":"1","t":5,"d":[]}',
        "lone_surrogate": '{"op":0,"t":"\\ud800","d":{}}',
        "big_number": '{"op":1e400,"d":null}',
    }
    return texts[kind]


# ================================================================================ the log


@dataclass
class LinkRecord:
    """One WebSocket connection as the peer saw it.

    ``events`` is the link's history in order: ``("wrote", kind, detail)`` is appended just
    before the bytes are handed to the socket (``kind`` ``text`` with ``(op, t, s)``,
    ``close`` with ``(code, origin)`` where origin is ``peer`` for a close we started and
    ``reply`` for an answer to the client's close, ``ping``, ``pong``, ``raw``, ``partial``,
    ``fin``, ``rst``); ``("muted", kind, detail)`` a core frame dropped by ``Mute``;
    ``("got", op, d)`` a client payload; ``("got_close", code, None)`` its close frame.
    """

    number: int
    accepted_at: float
    script: Conn | None
    conn: ServerConnection | None = None
    events: list[tuple[float, str, object, object]] = field(default_factory=list)
    ended_at: float | None = None
    director_done: bool = False

    def note(self, what: str, kind: object, detail: object = None) -> None:
        self.events.append((anyio.current_time(), what, kind, detail))


@dataclass
class Produced:
    """One dispatch the gateway produced on one session."""

    at: float
    session: str
    seq: int
    event_id: str
    probe: bool


@dataclass
class PeerLog:
    """Everything the peer did and saw, for the invariants."""

    attempts: list[float] = field(default_factory=list)  # client-facing WS connection attempts
    links: list[LinkRecord] = field(default_factory=list)
    http: list[tuple[float, str, object]] = field(default_factory=list)  # (time, endpoint, step)
    connects: list[tuple[float, str, object]] = field(default_factory=list)  # CONNECTs
    produced: list[Produced] = field(default_factory=list)
    junk_ids: set[str] = field(default_factory=set)
    client_faults: list[str] = field(default_factory=list)  # what the client did wrong
    errors: list[str] = field(default_factory=list)  # failures of the peer itself


class Notifier:
    """Wakes whoever waits whenever anything was recorded (no polling, no sleeps)."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def poke(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    async def until(self, predicate: Callable[[], bool], within: float) -> bool:
        with anyio.move_on_after(within):
            while not predicate():
                await self.wait()
            return True
        return False


# =============================================================================== the peer


def _classify(text: str) -> tuple[str, tuple[object, object, object]]:
    """The kind of a frame the core produced (for Mute) and its ``(op, t, s)``."""
    obj = json.loads(text)
    op, t, s = obj.get("op"), obj.get("t"), obj.get("s")
    kinds = {10: "hello", 11: "ack", 9: "auth", 7: "reconnect"}
    kind = kinds.get(op, "dispatch")
    if op == 0 and t in ("READY", "RESUMED"):
        kind = "auth"
    return kind, (op, t, s)


def _rst(stream: SocketStream) -> None:
    """Make the next close of ``stream`` a TCP reset."""
    with contextlib.suppress(OSError):
        sock = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - anyio
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


_NETWORK_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)


def _network_error(exc: BaseException) -> bool:
    """The client went away mid-exchange (every leaf of a group, if it is one)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_network_error(e) for e in exc.exceptions)
    return isinstance(exc, _NETWORK_ERRORS)


def _closed_port() -> int:
    """A loopback port nobody listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HostilePeer:
    """The hostile platform for one example. ``async with peer.serve(): ...``.

    Args:
        script: what to do.
        notifier: poked on every recorded change (the test's waits use it).
        seed: seeds the fake gateway's ids and tokens.
        behave_hello_ms: the Hello interval of behaving connections.
    """

    def __init__(
        self,
        script: Script,
        notifier: Notifier,
        *,
        seed: int = 0,
        behave_hello_ms: int = 200,
    ) -> None:
        self.script = script
        self.notifier = notifier
        self.behave_hello_ms = behave_hello_ms
        self.gateway = FakeGateway(
            FakeGatewayConfig(hello_interval_ms=behave_hello_ms, replay_buffer=100_000),
            rng=random.Random(seed),
        )
        self.log = PeerLog()
        self.behaving = False
        self.proxy_mode = script.proxy is not None
        self._queues: dict[str, list[object]] = {
            "token": list(script.token),
            "gateway": list(script.gateway),
            "conns": list(script.conns),
            "proxy": list(script.proxy or ()),
        }
        self._links: list[_Link] = []
        self._running_directors = 0
        self.epoch = 0  # moves whenever a scripted connection starts or finishes its steps
        self._messages = 0
        self.http_port = self.ws_port = self.proxy_port = self.closed_port = 0

    # --------------------------------------------------------------------- addresses

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def token_url(self) -> str:
        return self.http_base + TOKEN_PATH

    @property
    def ws_url(self) -> str:
        host = PROXIED_HOST if self.proxy_mode else "127.0.0.1"
        return f"ws://{host}:{self.ws_port}{WS_PATH}"

    @property
    def proxy_url(self) -> str | None:
        return f"http://127.0.0.1:{self.proxy_port}" if self.proxy_mode else None

    # --------------------------------------------------------------------- lifecycle

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[HostilePeer]:
        http = await anyio.create_tcp_listener(local_host="127.0.0.1")
        ws = await anyio.create_tcp_listener(local_host="127.0.0.1")
        proxy = await anyio.create_tcp_listener(local_host="127.0.0.1") if self.proxy_mode else None
        self.http_port = http.extra(SocketAttribute.local_port)  # noqa: S610 - anyio
        self.ws_port = ws.extra(SocketAttribute.local_port)  # noqa: S610 - anyio
        if proxy is not None:
            self.proxy_port = proxy.extra(SocketAttribute.local_port)  # noqa: S610 - anyio
        self.closed_port = _closed_port()
        self.gateway.config.url = self.ws_url
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(http.serve, self._guard(self._on_http), tg)
                tg.start_soon(ws.serve, self._guard(self._on_ws), tg)
                if proxy is not None:
                    tg.start_soon(proxy.serve, self._guard(self._on_proxy), tg)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            for listener in (http, ws, proxy):
                if listener is not None:
                    await anyio.aclose_forcefully(listener)

    def _guard(self, handler: Callable[[SocketStream], object]) -> Callable[[SocketStream], object]:
        async def guarded(stream: SocketStream) -> None:
            try:
                await handler(stream)  # type: ignore[misc]
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # noqa: BLE001 - a peer failure must not pass for a client's
                if not _network_error(exc):
                    self.log.errors.append(traceback.format_exc())
            finally:
                await anyio.aclose_forcefully(stream)
                self.notifier.poke()

        return guarded

    # ------------------------------------------------------------------ the script

    def _take(self, queue: str) -> object | None:
        items = self._queues[queue]
        if self.behaving or not items:
            return None
        return items.pop(0)

    def flip(self) -> None:
        """Behave from now on: drop what is left of the script, stop running steps."""
        self.behaving = True
        self.gateway.faults = Faults()
        for items in self._queues.values():
            items.clear()
        for link in self._links:
            link.director_scope.cancel()
        self.notifier.poke()

    def consumed(self) -> bool:
        """Every scripted item has been used, and every connection's steps have run."""
        return not any(self._queues.values()) and self._running_directors == 0

    def directors_idle(self) -> bool:
        return self._running_directors == 0

    def disturbing(self) -> bool:
        """A live connection is left in a state the client must still escape: frames held
        or frozen, ACKs dropped, a Hello or READY/RESUMED dropped before any was sent, or
        the link is ending."""
        return any(link.disturbing() for link in self._links)

    def _director_started(self) -> None:
        self._running_directors += 1
        self.epoch += 1

    def _director_finished(self) -> None:
        self._running_directors -= 1
        self.epoch += 1
        self.notifier.poke()

    # ------------------------------------------------------------------- dispatches

    def has_session(self) -> bool:
        now = anyio.current_time()
        return any(
            not s.invalid and self.gateway.resumable(s, now) for s in self.gateway.sessions.values()
        )

    def produce(self, *, probe: bool = False) -> str:
        """One message on every live session; returns its event id."""
        self._messages += 1
        n = self._messages
        now = anyio.current_time()
        before = {sid: s.seq for sid, s in self.gateway.sessions.items()}
        self.gateway.message(n, now)
        event_id = f"C2C_MESSAGE_CREATE:fake{n:08d}"
        for sid, session in self.gateway.sessions.items():
            if sid in before and session.seq != before[sid]:
                self.log.produced.append(Produced(now, sid, session.seq, event_id, probe))
        self.flush_all()
        self.notifier.poke()
        return event_id

    def next_junk_number(self) -> int:
        self._messages += 1
        return self._messages

    def flush_all(self) -> None:
        for link in list(self._links):
            link.flush()

    # ------------------------------------------------------------------------- HTTP

    async def _on_http(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        while True:
            try:
                event = await _next_event(stream, conn)
                if not isinstance(event, h11.Request):
                    return
                body = b""
                while True:
                    part = await _next_event(stream, conn)
                    if isinstance(part, h11.Data):
                        body += bytes(part.data)
                        if len(body) > _MAX_REQUEST:
                            return
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
            except h11.RemoteProtocolError as exc:
                self.log.client_faults.append(f"client sent malformed HTTP: {exc}")
                return
            now = anyio.current_time()
            target = event.target.decode("ascii", "replace")
            path = urlsplit(target).path
            headers = dict(event.headers)
            if headers.get(b"upgrade", b"").lower() == b"websocket":
                # A gateway URL pointing at the HTTP port: the client's attempt lands here.
                if not self.proxy_mode:
                    self.log.attempts.append(now)
                await _send_json(stream, conn, 404, {"code": 404, "message": "not a gateway"})
                return
            if event.method == b"POST" and path == TOKEN_PATH:
                endpoint = "token"
            elif event.method == b"GET" and path in ("/gateway", "/gateway/bot"):
                endpoint = "gateway"
            else:
                endpoint = "other"
            step = self._take(endpoint) if endpoint != "other" else Status(404)
            step = step or Fine()
            self.log.http.append((now, endpoint, step))
            self.notifier.poke()
            auth = headers.get(b"authorization")
            keep = await self._answer(
                stream, conn=conn, endpoint=endpoint, path=path, auth=auth, body=body, step=step
            )
            if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    def _fine(
        self, endpoint: str, path: str, auth: bytes | None, body: bytes
    ) -> tuple[int, object]:
        now = anyio.current_time()
        if endpoint == "token":
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                self.log.client_faults.append("client sent a token request that is not JSON")
                return 400, {"code": 400, "message": "body is not a JSON object"}
            reply = self.gateway.token_request(parsed, now)
            return reply.status, reply.body
        if endpoint == "gateway":
            authorization = auth.decode("latin-1") if auth is not None else None
            reply = self.gateway.gateway_request(authorization, now, bot=path.endswith("/bot"))
            return reply.status, reply.body
        return 404, {"code": 404, "message": "not found"}

    def _body(self, endpoint: str, kind: str, fine: object) -> bytes:
        good = fine if isinstance(fine, dict) else {}
        if kind == "deep":
            return b"[" * _DEPTH + b"]" * _DEPTH
        raw = {"not_json": b"<html>hostile</html>", "empty": b"", "array": b"[]", "null": b"null"}
        if kind in raw:
            return raw[kind]
        bodies: dict[str, object]
        if endpoint == "token":
            token = good.get("access_token", "x")
            bodies = {
                "wrong_types": {"access_token": 12345, "expires_in": [1]},
                "error_code": {"code": TRANSIENT_TOKEN_CODE, "message": "hostile"},
                "fatal_code": {"code": FATAL_TOKEN_CODE, "message": "invalid appid or secret"},
                "bogus_token": {"access_token": "bogus-token", "expires_in": "7200"},
                "zero_expiry": {"access_token": token, "expires_in": "0"},
                "junk_expiry": {"access_token": token, "expires_in": "soon"},
                "huge": {**good, "pad": "x" * 3_000_000},
                "no_budget": good,
            }
            text = {
                "nan_expiry": '{"access_token": "' + token + '", "expires_in": NaN}',
                "inf_expiry": '{"access_token": "' + token + '", "expires_in": 1e400}',
            }
        else:
            limit = {"total": 1000, "remaining": 0, "reset_after": 700, "max_concurrency": 1}
            bodies = {
                "wrong_types": {"url": 12345, "shards": "1"},
                "error_code": {"code": 11244, "message": "hostile"},
                "fatal_code": {"code": 11244, "message": "hostile"},
                "bogus_token": good,
                "zero_expiry": good,
                "junk_expiry": {**good, "session_start_limit": "none"},
                "huge": {**good, "pad": "x" * 3_000_000},
                "no_budget": {**good, "session_start_limit": limit},
            }
            text = {
                "nan_expiry": '{"url": "' + str(good.get("url", "")) + '", "shards": NaN}',
                "inf_expiry": '{"url": "' + str(good.get("url", "")) + '", "shards": 1e400}',
            }
        if kind in text:
            return text[kind].encode()
        return json.dumps(bodies[kind]).encode()

    async def _answer(
        self,
        stream: SocketStream,
        *,
        conn: h11.Connection,
        endpoint: str,
        path: str,
        auth: bytes | None,
        body: bytes,
        step: object,
    ) -> bool:
        """Answer one request per ``step``; whether the connection may be kept."""
        if isinstance(step, Garbage):
            await stream.send(step.data)
            return False
        if isinstance(step, Hangup):
            return False
        if isinstance(step, Reset):
            _rst(stream)
            return False
        if isinstance(step, Stall):
            await anyio.sleep(step.seconds)
            return False
        if isinstance(step, Status):
            if step.code in (204, 304):  # no body allowed
                response = h11.Response(status_code=step.code, headers=[], reason=b"Hostile")
                await stream.send(
                    (conn.send(response) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                )
                return True
            await _send_json(stream, conn, step.code, {"code": step.code, "message": "hostile"})
            return True
        status, fine = self._fine(endpoint, path, auth, body)
        data = json.dumps(fine).encode()
        if isinstance(step, Body):
            status, data = 200, self._body(endpoint, step.kind, fine)
            if endpoint == "token" and step.kind == "fatal_code":
                self.log.http.append((anyio.current_time(), "fatal", step))
        elif isinstance(step, BadUrl) and endpoint == "gateway" and isinstance(fine, dict):
            url = step.url.format(
                ws_port=self.ws_port, http_port=self.http_port, closed_port=self.closed_port
            )
            data = json.dumps({**fine, "url": url}).encode()
        if isinstance(step, SlowLoris):
            pad = 1_000_000 if step.finish_after is None else 2_000
            data = b" " * pad + data  # JSON whitespace: the body is still the right answer
            await stream.send(_head(conn, status, len(data)))
            started = anyio.current_time()
            for i in range(len(data)):
                if step.finish_after is not None and (
                    anyio.current_time() - started >= step.finish_after
                ):
                    await stream.send(data[i:])
                    return False
                await stream.send(data[i : i + 1])
                await anyio.sleep(step.every)
            return False
        if isinstance(step, SlowHead):
            whole = _head(conn, status, len(data)) + data
            for i in range(len(whole)):
                await stream.send(whole[i : i + 1])
                await anyio.sleep(step.every)
            return False
        if isinstance(step, Truncated):
            await stream.send(_head(conn, status, len(data) + 100) + data)
            return False
        await _send_bytes(stream, conn, status, data)
        return True

    # ------------------------------------------------------------------------ proxy

    async def _on_proxy(self, client: SocketStream) -> None:
        head = b""
        with anyio.move_on_after(_HANDSHAKE_READ):
            while b"\r\n\r\n" not in head and len(head) < _MAX_REQUEST:
                try:
                    head += await client.receive(_READ)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
        if b"\r\n\r\n" not in head:
            return
        head, _, rest = head.partition(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, target = line.partition(" ")
        target = target.rpartition(" ")[0]
        if method != "CONNECT":
            # REST calls through the proxy (absolute-form): forwarded faithfully; the HTTP
            # side has its own script.
            port = urlsplit(target).port or 80
            await self._pipe_to(client, port, head + b"\r\n\r\n" + rest)
            return
        now = anyio.current_time()
        self.log.attempts.append(now)
        step = self._take("proxy") or Tunnel()
        self.log.connects.append((now, target, step))
        self.notifier.poke()
        if isinstance(step, Status):
            await client.send(f"HTTP/1.1 {step.code} Hostile\r\n\r\n".encode())
            return
        if isinstance(step, Garbage):
            await client.send(step.data)
            return
        if isinstance(step, Hangup):
            return
        if isinstance(step, Reset):
            _rst(client)
            return
        if isinstance(step, OkThenHangup):
            await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return
        if isinstance(step, OkThenGarbage):
            await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n\x00\xffgarbage\r\n\r\n")
            return
        if isinstance(step, Stall):
            await anyio.sleep(step.seconds)
        try:
            port = int(target.rpartition(":")[2])
        except ValueError:
            port = 0
        await self._pipe_to(
            client, port, rest, answer=b"HTTP/1.1 200 Connection established\r\n\r\n"
        )

    async def _pipe_to(self, client: SocketStream, port: int, first: bytes, answer: bytes = b""):
        try:
            upstream = await anyio.connect_tcp("127.0.0.1", port)  # our "DNS": loopback
        except (OSError, OverflowError, ValueError):
            await client.send(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return
        async with upstream, anyio.create_task_group() as tg:
            if answer:
                await client.send(answer)
            if first:
                await upstream.send(first)
            tg.start_soon(_pipe, client, upstream)
            tg.start_soon(_pipe, upstream, client)

    # -------------------------------------------------------------------- WebSocket

    async def _on_ws(self, stream: SocketStream) -> None:
        now = anyio.current_time()
        if not self.proxy_mode:
            self.log.attempts.append(now)
        script = self._take("conns")
        assert script is None or isinstance(script, Conn)
        record = LinkRecord(len(self.log.links) + 1, now, script)
        self.log.links.append(record)
        self.notifier.poke()
        if script is not None:
            self._director_started()
        try:
            ws = await self._handshake(stream, script, record)
            if ws is None:
                return
            self.gateway.config.hello_interval_ms = (
                script.hello_ms if script is not None else self.behave_hello_ms
            )
            record.conn = self.gateway.accept(anyio.current_time())
            link = _Link(self, record, stream, ws, script)
            self._links.append(link)
            try:
                await link.run()
            finally:
                self._links.remove(link)
        finally:
            record.ended_at = anyio.current_time()
            if script is not None and not record.director_done:
                record.director_done = True
                self._director_finished()

    async def _handshake(
        self, stream: SocketStream, script: Conn | None, record: LinkRecord
    ) -> WSConnection | None:
        ws = WSConnection(ConnectionType.SERVER)
        request = None
        with anyio.move_on_after(_HANDSHAKE_READ):
            while request is None:
                try:
                    data = await stream.receive(_READ)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return None
                try:
                    ws.receive_data(data)
                    request = next((e for e in ws.events() if isinstance(e, wse.Request)), None)
                except (RemoteProtocolError, LocalProtocolError) as exc:
                    record.note("bad_upgrade", str(exc))
                    return None
        if request is None:
            return None
        hs = script.handshake if script is not None else Accept()
        if isinstance(hs, Status):
            await stream.send(f"HTTP/1.1 {hs.code} Hostile\r\ncontent-length: 0\r\n\r\n".encode())
            return None
        if isinstance(hs, Garbage):
            await stream.send(hs.data)
            return None
        if isinstance(hs, Hangup):
            return None
        if isinstance(hs, Reset):
            _rst(stream)
            return None
        if isinstance(hs, BadAccept):
            await stream.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
            )
            return None
        if isinstance(hs, Stall):
            await anyio.sleep(hs.seconds)
        await stream.send(ws.send(wse.AcceptConnection()))
        return ws


# ============================================================================ one link


@dataclass(frozen=True)
class _Frame:
    data: bytes
    kind: str  # for the record: text, close, ping, pong, raw, fragment
    detail: object = None


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _Control:
    what: str  # fin, rst, hangup, await_close, freeze


@dataclass(frozen=True)
class _Split:
    seconds: float
    then: str


_Item = _Frame | _Sleep | _Control | _Split


class _Link:
    """One served WebSocket connection: a reader, a writer, a timer and (if scripted) a
    director running the steps, in one task group; hanging up cancels it."""

    def __init__(
        self,
        peer: HostilePeer,
        record: LinkRecord,
        stream: SocketStream,
        ws: WSConnection,
        script: Conn | None,
    ) -> None:
        assert record.conn is not None
        self.peer = peer
        self.record = record
        self.conn: ServerConnection = record.conn
        self.stream = stream
        self.ws = ws
        self.script = script
        steps = script.steps if script is not None else ()
        self.held = bool(steps) and isinstance(steps[0], Hold)
        self.held_items: list[_Item] = []
        self.muted: set[str] = set()
        self.pieces = 1
        self.ping_between = False
        self.we_closed = False
        self.frozen = False
        self.fin_sent = False
        self.reset = False
        self.text_parts: list[str] = []
        self.client_closed = anyio.Event()
        self.scope = anyio.CancelScope()
        self.director_scope = anyio.CancelScope()
        self.timer_scope: anyio.CancelScope | None = None
        send, receive = anyio.create_memory_object_stream[_Item](math.inf)
        self._out: MemoryObjectSendStream[_Item] = send
        self._out_receive: MemoryObjectReceiveStream[_Item] = receive

    async def run(self) -> None:
        try:
            with self._out, self._out_receive, self.scope:
                async with anyio.create_task_group() as tg:
                    self.flush()  # the Hello
                    tg.start_soon(self._reader)
                    tg.start_soon(self._writer)
                    tg.start_soon(self._timer)
                    if self.script is not None:
                        tg.start_soon(self._director)
        finally:
            self.end_core()
            if self.reset:
                _rst(self.stream)

    def hang_up(self) -> None:
        self.scope.cancel()

    def disturbing(self) -> bool:
        if self.held or self.frozen or self.fin_sent or self.we_closed or "ack" in self.muted:
            return True
        if self.client_closed.is_set() or self.conn.closed:
            return True
        wrote = [e[3] for e in self.record.events if e[1] == "wrote" and e[2] == "text"]
        if "hello" in self.muted and not any(isinstance(d, tuple) and d[0] == 10 for d in wrote):
            return True
        return "auth" in self.muted and not any(_is_auth_reply(d) for d in wrote)

    def end_core(self, code: int | None = None, *, by_client: bool = False) -> None:
        """Tell the gateway core the connection ended (its own frames about it are dropped:
        the script decides what goes on the wire)."""
        conn = self.conn
        if conn.closed:
            return
        now = anyio.current_time()
        if by_client:
            conn.client_closed(code, now)
        elif code is not None:
            conn.close(code, "hostile", now)
        else:
            conn.drop(now)
        conn.take_outputs()
        self.peer.notifier.poke()

    # ----------------------------------------------------------------- core frames

    def flush(self) -> None:
        """Route the core's outputs: muted, held, or queued for the writer."""
        for out in self.conn.take_outputs():
            items: list[_Item]
            if isinstance(out, ServerSend):
                kind, detail = _classify(out.text)
                if kind in self.muted:
                    self.record.note("muted", kind, detail)
                    continue
                items = self._text_frames(out.text.encode(), detail)
            elif isinstance(out, ServerClose):
                self.we_closed = True
                items = [
                    _Frame(frame(0x8, close_payload(out.code)), "close", (out.code, "peer")),
                    _Control("await_close"),
                    _Control("hangup"),
                ]
            else:  # ServerDrop
                items = [_Control("hangup")]
            if self.held:
                self.held_items.extend(items)
            else:
                for item in items:
                    self._push(item)
        if self.timer_scope is not None:
            due = self.conn.get_timer()
            self.timer_scope.deadline = math.inf if due is None else due

    def _text_frames(self, data: bytes, detail: object) -> list[_Item]:
        pieces = min(self.pieces, max(1, len(data)))
        if pieces == 1:
            return [_Frame(frame(0x1, data), "text", detail)]
        cuts = [len(data) * i // pieces for i in range(pieces + 1)]
        items: list[_Item] = []
        for i in range(pieces):
            last = i == pieces - 1
            part = frame(0x1 if i == 0 else 0x0, data[cuts[i] : cuts[i + 1]], fin=last)
            items.append(_Frame(part, "text" if last else "fragment", detail if last else None))
            if self.ping_between and not last:
                items.append(_Frame(frame(0x9, b"between"), "ping"))
        return items

    def _push(self, item: _Item) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._out.send_nowait(item)

    # ---------------------------------------------------------------------- tasks

    async def _reader(self) -> None:
        while True:
            try:
                data = await self.stream.receive(_READ)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            except OSError:
                data = b""
            if not data:
                self.record.note("eof", None)
                self.end_core(by_client=True)
                self.hang_up()
                return
            if self.frozen:
                continue
            try:
                self.ws.receive_data(data)
                events = list(self.ws.events())
            except LocalProtocolError:
                continue  # data after the closing handshake
            for event in events:
                self._on_ws_event(event)
            self.peer.flush_all()
            self.peer.notifier.poke()

    def _on_ws_event(self, event: object) -> None:
        now = anyio.current_time()
        if isinstance(event, wse.TextMessage):
            self.text_parts.append(event.data)
            if event.message_finished:
                text = "".join(self.text_parts)
                self.text_parts.clear()
                try:
                    obj = json.loads(text)
                    op, d = obj.get("op"), obj.get("d")
                except (ValueError, AttributeError):
                    op, d = None, None
                self.record.events.append((now, "got", op, d))
                self.conn.receive(text, now)
                for out in self.conn.outputs:
                    if isinstance(out, ServerClose) and out.code in (4001, 4002, 4005, 4010):
                        fault = f"the gateway closed link {self.record.number} with {out.code}"
                        self.peer.log.client_faults.append(f"{fault} ({out.reason})")
        elif isinstance(event, wse.BytesMessage):
            self.peer.log.client_faults.append("client sent a binary message")
        elif isinstance(event, wse.Ping):
            if not self.we_closed and not self.client_closed.is_set():
                self._push(_Frame(frame(0xA, bytes(event.payload)), "pong"))
        elif isinstance(event, wse.CloseConnection):
            if self.ws.state is ConnectionState.OPEN:
                # wsproto found a framing error in what the client sent.
                fault = f"client sent an invalid WebSocket frame ({event.code}: {event.reason})"
                self.peer.log.client_faults.append(fault)
                self.hang_up()
                return
            self.record.events.append((now, "got_close", event.code, None))
            self.client_closed.set()
            if self.we_closed:
                return  # the answer to our close: the writer hangs up
            self.end_core(event.code, by_client=True)
            self._react(event.code)

    def _react(self, code: int) -> None:
        reaction = self.script.on_close if self.script is not None else Echo()
        wire = None if code == 1005 else code
        echo = _Frame(frame(0x8, close_payload(wire)), "close", (wire, "reply"))
        items: list[_Item]
        if isinstance(reaction, Echo):
            items = [echo, _Control("hangup")]
        elif isinstance(reaction, EchoCode):
            answer = frame(0x8, close_payload(reaction.code))
            items = [_Frame(answer, "close", (reaction.code, "reply")), _Control("hangup")]
        elif isinstance(reaction, Ignore):
            items = []
        elif isinstance(reaction, PingFirst):
            items = [_Frame(frame(0x9, b"crossing"), "ping"), echo, _Control("hangup")]
        elif isinstance(reaction, AckFirst):
            ack = _Frame(frame(0x1, b'{"op":11}'), "text", (11, None, None))
            items = [ack, echo, _Control("hangup")]
        elif isinstance(reaction, Hangup):
            items = [_Control("hangup")]
        else:
            items = [_Control("rst")]
        for item in items:
            self._push(item)

    async def _writer(self) -> None:
        split: _Split | None = None
        try:
            async for item in self._out_receive:
                if isinstance(item, _Split):
                    split = item
                elif isinstance(item, _Sleep):
                    await anyio.sleep(item.seconds)
                elif isinstance(item, _Frame):
                    if self.fin_sent:
                        continue
                    if split is not None:
                        now_split, split = split, None
                        if await self._write_split(item, now_split):
                            return
                        continue
                    self.record.note("wrote", item.kind, item.detail)
                    await self.stream.send(item.data)
                elif item.what == "fin":
                    self.record.note("wrote", "fin")
                    self.fin_sent = True
                    await self.stream.send_eof()
                elif item.what == "rst":
                    self.record.note("wrote", "rst")
                    self.reset = True
                    self.hang_up()
                    return
                elif item.what == "hangup":
                    self.hang_up()
                    return
                elif item.what == "await_close":
                    with anyio.move_on_after(_CLOSE_WAIT):
                        await self.client_closed.wait()
                elif item.what == "freeze":
                    self.frozen = True
                    await anyio.sleep_forever()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.hang_up()

    async def _write_split(self, item: _Frame, split: _Split) -> bool:
        """Half a frame, a stall, then the rest or a break; True if the link is over."""
        half = max(1, len(item.data) // 2)
        self.record.note("wrote", "partial", item.detail)
        await self.stream.send(item.data[:half])
        await anyio.sleep(split.seconds)
        if split.then == "finish":
            self.record.note("wrote", item.kind, item.detail)
            await self.stream.send(item.data[half:])
            return False
        if split.then == "rst":
            self.record.note("wrote", "rst")
            self.reset = True
            self.end_core()
            self.hang_up()
            return True
        self.record.note("wrote", "fin")
        self.fin_sent = True
        self.end_core()
        await self.stream.send_eof()
        return False

    async def _timer(self) -> None:
        conn = self.conn
        while not conn.closed:
            due = conn.get_timer()
            with anyio.CancelScope(deadline=math.inf if due is None else due) as scope:
                self.timer_scope = scope
                await anyio.sleep_forever()
            self.timer_scope = None
            due = conn.get_timer()
            now = anyio.current_time()
            if due is not None and due <= now:
                conn.handle_timer(now)
                self.flush()

    # ------------------------------------------------------------------- the steps

    async def _director(self) -> None:
        assert self.script is not None
        with self.director_scope:
            for step in self.script.steps:
                await self._step(step)
        if not self.record.director_done:
            self.record.director_done = True
            self.peer._director_finished()

    async def _step(self, step: WsStep) -> None:
        peer, conn = self.peer, self.conn
        now = anyio.current_time()
        if isinstance(step, Hold):
            self.held = True
        elif isinstance(step, Serve):
            self.held = False
            items, self.held_items = self.held_items, []
            for item in items:
                self._push(item)
        elif isinstance(step, Mute):
            self.muted.add(step.kind)
        elif isinstance(step, Unmute):
            self.muted.discard(step.kind)
        elif isinstance(step, WaitFor):
            await peer.notifier.until(self._condition(step.what), step.timeout)
        elif isinstance(step, Pause):
            await anyio.sleep(step.seconds)
        elif isinstance(step, Dispatch):
            for _ in range(step.count):
                peer.produce()
        elif isinstance(step, Ping):
            self._push(_Frame(frame(0x9, b"p" * min(step.size, 125)), "ping"))
        elif isinstance(step, Pong):
            self._push(_Frame(frame(0xA, b"q" * min(step.size, 125)), "pong"))
        elif isinstance(step, Binary):
            self._push(_Frame(frame(0x2, b"\x00\xff" * (step.size // 2 + 1)), "raw", "binary"))
        elif isinstance(step, BadUtf8):
            self._push(_Frame(frame(0x1, b'{"op":11,"d":"\xff\xfe"}'), "raw", "bad_utf8"))
        elif isinstance(step, BadFrame):
            self._push(_Frame(bad_frame(step.kind), "raw", step.kind))
        elif isinstance(step, Junk):
            n = peer.next_junk_number()
            if step.kind == "dispatch_noseq":
                peer.log.junk_ids.add(f"HOSTILE:{n}")
            text = junk_text(step.kind, n).encode("utf-8", "surrogatepass")
            self._push(_Frame(frame(0x1, text), "text", ("junk", step.kind, None)))
        elif isinstance(step, Fragment):
            self.pieces = max(1, step.pieces)
            self.ping_between = step.ping_between
        elif isinstance(step, Reconnect):
            conn.request_reconnect(now)
            self.flush()
        elif isinstance(step, Close):
            self.we_closed = True
            self.end_core(step.code if step.code is not None else 1000)
            payload = close_payload(step.code, step.reason)
            self._push(_Frame(frame(0x8, payload), "close", (step.code, "peer")))
            then = {
                "await": [_Control("await_close"), _Control("hangup")],
                "hangup": [_Control("hangup")],
                "rst": [_Control("rst")],
                "linger": [],
            }[step.then]
            for item in then:
                self._push(item)
        elif isinstance(step, HalfClose):
            self.end_core()
            self._push(_Control("fin"))
        elif isinstance(step, Reset):
            self.end_core()
            self._push(_Control("rst"))
        elif isinstance(step, StallWrites):
            self._push(_Sleep(step.seconds))
        elif isinstance(step, StallMidFrame):
            self._push(_Split(step.seconds, step.then))
        elif isinstance(step, Freeze):
            self._push(_Control("freeze"))
        elif isinstance(step, Flood):
            for _ in range(step.count):
                if step.kind == "ping":
                    self._push(_Frame(frame(0x9, b"flood"), "ping"))
                elif step.kind == "dispatch":
                    peer.produce()
                else:
                    self._push(_Frame(frame(0x1, b"not json {"), "text", ("junk", "flood", None)))
        elif isinstance(step, Fault):
            faults = peer.gateway.faults
            if step.name == "replay_overlap":
                faults.replay_overlap = 3
            elif step.name == "resume_invalid":
                faults.resume_invalid = True
            else:
                setattr(faults, step.name, True)

    def _condition(self, what: str) -> Callable[[], bool]:
        events = self.record.events
        start = len(events)
        if what == "auth":
            return lambda: any(e[1] == "got" and e[2] in (2, 6) for e in events)
        if what == "beat":
            return lambda: any(e[1] == "got" and e[2] == 1 for e in events[start:])
        if what == "ready":
            return lambda: any(
                e[1] == "wrote" and e[2] == "text" and _is_auth_reply(e[3]) for e in events
            )
        return self.client_closed.is_set


def _is_auth_reply(detail: object) -> bool:
    return isinstance(detail, tuple) and detail[:2] in ((0, "READY"), (0, "RESUMED"))


# =========================================================================== HTTP helpers


async def _next_event(stream: SocketStream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive(_READ)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data = b""
        conn.receive_data(data)


def _head(conn: h11.Connection, status: int, length: int) -> bytes:
    headers = [("content-type", "application/json"), ("content-length", str(length))]
    return conn.send(h11.Response(status_code=status, headers=headers, reason=b"Hostile")) or b""


async def _send_json(stream: SocketStream, conn: h11.Connection, status: int, body: object):
    await _send_bytes(stream, conn, status, json.dumps(body).encode())


async def _send_bytes(stream: SocketStream, conn: h11.Connection, status: int, data: bytes):
    out = _head(conn, status, len(data))
    out += conn.send(h11.Data(data=data)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send(out)


async def _pipe(source: SocketStream, sink: SocketStream) -> None:
    with contextlib.suppress(
        anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
    ):
        async for chunk in source:
            await sink.send(chunk)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await sink.send_eof()
