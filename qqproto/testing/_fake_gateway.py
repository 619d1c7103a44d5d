# The server side of the QQ gateway, sans-IO: a fake platform for tests and local runs.
#
# Theory of operation. `FakeGateway` models one bot's view of the QQ platform: the token
# endpoint, `/gateway` and `/gateway/bot`, and the WebSocket gateway with its sessions. It
# follows PROTOCOL.md where the protocol is documented and picks the conservative reading
# where it is not (noted inline). Like the client core it never does IO and never reads a
# clock: whoever hosts it (the simulator in `_simulator.py`, or qqproto_io's loopback
# server) passes `now`, carries `ServerOutput`s to the peer and calls `handle_timer`.
#
# Sessions outlive connections: a session keeps its sequence counter and a bounded buffer of
# recent dispatches, so a Resume replays what the client missed. Every fault a real gateway
# (or the network in front of it) has been seen to commit is a switch on `Faults`, flipped
# by the test at any time, or an entry of `FakeGatewayConfig`.
"""A sans-IO fake of the QQ gateway and its HTTP endpoints, with scriptable faults."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from qqproto._codec import JSONValue, Opcode, decode_payload
from qqproto._errors import RemoteProtocolError

if TYPE_CHECKING:
    import random
    from collections.abc import Mapping

__all__ = [
    "FakeGateway",
    "FakeGatewayConfig",
    "Faults",
    "HttpReply",
    "ServerClose",
    "ServerConnection",
    "ServerDrop",
    "ServerOutput",
    "ServerSend",
]


@dataclass(frozen=True, slots=True)
class ServerSend:
    """Send ``text`` to the client as one WebSocket text message."""

    text: str


@dataclass(frozen=True, slots=True)
class ServerClose:
    """Send a close frame; the connection is over for the server."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ServerDrop:
    """Drop the TCP connection without a close frame (the client sees EOF, code 1006)."""


ServerOutput = ServerSend | ServerClose | ServerDrop
"""What :meth:`ServerConnection.take_outputs` returns: frames, closes and drops to carry out."""


@dataclass(frozen=True, slots=True)
class HttpReply:
    """An HTTP answer of the fake platform: status and JSON body."""

    status: int
    body: dict[str, JSONValue]


def _unauthorized() -> HttpReply:
    return HttpReply(401, {"code": 11244, "message": "token not exist or expire"})


@dataclass(slots=True, kw_only=True)
class FakeGatewayConfig:
    """How the fake platform behaves when nothing goes wrong. Times in seconds.

    Attributes:
        app_id: the app id the token endpoint accepts.
        client_secret: the client secret the token endpoint accepts.
        url: the gateway URL handed out by ``/gateway``.
        hello_interval_ms: the Hello ``heartbeat_interval`` (QQ docs show 45000; 41250 is
            the value clients quote).
        heartbeat_timeout: a connection that sent no beat for this long is dropped without a
            close frame (field reports: about 60 s). ``None`` disables it.
        token_ttl: lifetime of a new access token; inside its last 60 s the endpoint issues a
            new one and the old one stays valid until it expires (PROTOCOL.md §1.1).
        rotate_every: send op 7 this long after each connection opened, then close with 4009
            one second later unless the client closed first. ``None`` disables rotation.
        resume_window: a session can be resumed this long after its last connection ended.
        replay_buffer: dispatches kept per session for Resume.
        session_start_total: ``session_start_limit.total`` in the ``/gateway/bot`` answer.
        max_concurrency: ``session_start_limit.max_concurrency`` in that answer.
        shards: the recommended shard count in that answer.
        allowed_intents: intents the bot may ask for; other bits close with 4014.
    """

    app_id: str = "1020000001"
    client_secret: str = "fake-client-secret"  # noqa: S105 - a test fixture
    url: str = "wss://gateway.fake.invalid/websocket"
    hello_interval_ms: int = 41250
    heartbeat_timeout: float | None = 60.0
    token_ttl: float = 7200.0
    rotate_every: float | None = None
    resume_window: float = 300.0
    replay_buffer: int = 1000
    session_start_total: int = 1000
    max_concurrency: int = 1
    shards: int = 1
    allowed_intents: int = (1 << 0) | (1 << 1) | (1 << 12) | (1 << 25) | (1 << 26) | (1 << 30)


@dataclass(slots=True)
class Faults:
    """Misbehaviour switches; flip them at any time. Every one is off by default.

    Attributes:
        no_ack: stop answering heartbeats (S2).
        silent: send nothing at all (no ACK, no dispatch) while still reading (S2, S3).
        identify_close: close every Identify with this code (4004 bad token, 4914 delisted...).
        identify_invalid: answer every Identify with op 9 ``d: false`` then close 4903 (S10).
        resume_close: close every Resume with this code (4006, 4007, 4902...) (S7, S8).
        resume_invalid: answer every Resume with op 9 and this ``d`` (S11); ``None`` = off.
        resume_then_drop: answer Resume with RESUMED, then drop the TCP link (S9).
        ignore_close: never answer the client's close frame (S18).
        rate_limit: close 4008 when more than 2 payloads arrive within one second (S12).
        replay_overlap: on Resume, also replay this many dispatches the client already has
            (duplicates, S15).
        replay_reversed: replay in reverse order (out-of-order replays).
        second_hello: send a second Hello right after READY/RESUMED (S23).
    """

    no_ack: bool = False
    silent: bool = False
    identify_close: int | None = None
    identify_invalid: bool = False
    resume_close: int | None = None
    resume_invalid: bool | None = None
    resume_then_drop: bool = False
    ignore_close: bool = False
    rate_limit: bool = False
    replay_overlap: int = 0
    replay_reversed: bool = False
    second_hello: bool = False


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


@dataclass(slots=True)
class _Session:
    id: str
    shard: tuple[int, int]
    seq: int = 0
    buffer: deque[tuple[int, str]] = field(default_factory=deque)
    connection: ServerConnection | None = None
    ended_at: float | None = None  # when its last connection ended
    invalid: bool = False


class ServerConnection:
    """The server end of one WebSocket connection. Created by :meth:`FakeGateway.accept`."""

    def __init__(self, gateway: FakeGateway, number: int, now: float) -> None:
        self.gateway = gateway
        self.number = number
        self.opened_at = now
        self.last_beat_at = now
        self.session: _Session | None = None
        self.closed = False
        self.close_sent = False
        self.rotation_at: float | None = None
        self.reconnect_sent_at: float | None = None
        self.recent: deque[float] = deque(maxlen=3)
        self.outputs: list[ServerOutput] = []
        self.received: list[tuple[float, int, JSONValue]] = []  # (time, op, d) for assertions
        cfg = gateway.config
        if cfg.rotate_every is not None:
            self.rotation_at = now + cfg.rotate_every
        self._send(Opcode.HELLO, {"heartbeat_interval": cfg.hello_interval_ms})

    # ------------------------------------------------------------------------- inputs

    def receive(self, text: str, now: float) -> None:
        """A text message from the client."""
        if self.closed:
            return
        faults = self.gateway.faults
        if faults.rate_limit:
            self.recent.append(now)
            if len(self.recent) == 3 and now - self.recent[0] < 1.0:
                self._close(4008, "payload sent too fast", now)
                return
        try:
            payload = decode_payload(text)
        except RemoteProtocolError:
            self._close(4002, "invalid payload", now)
            return
        d = payload.d
        self.received.append((now, int(payload.op), d))
        if payload.op is Opcode.HEARTBEAT:
            self.last_beat_at = now
            if not (faults.no_ack or faults.silent):
                self._raw({"op": int(Opcode.HEARTBEAT_ACK)})
        elif payload.op is Opcode.IDENTIFY:
            self._on_identify(d, now)
        elif payload.op is Opcode.RESUME:
            self._on_resume(d, now)
        else:
            self._close(4001, "invalid opcode", now)

    def client_closed(self, code: int | None, now: float) -> None:
        """The client sent a close frame (``code``) or its TCP link ended (``None``)."""
        if self.closed:
            return
        if code is not None and not self.gateway.faults.ignore_close:
            self.outputs.append(ServerClose(code, "closing"))
            # Discord invalidates the session on 1000/1001; QQ does not say. The fake takes
            # the strict reading, which is why the client never sends them by itself.
            if code in (1000, 1001) and self.session is not None:
                self.session.invalid = True
        if code is None or not self.gateway.faults.ignore_close:
            self._end(now)

    # ---------------------------------------------------------------------- handlers

    def _authenticated(self, d: JSONValue, now: float) -> bool:
        """The checks Identify and Resume share; closes the connection when one fails."""
        if self.session is not None:
            self._close(4005, "already authenticated", now)
            return False
        if not isinstance(d, dict) or not self.gateway.token_valid(d.get("token"), now):
            self._close(4004, "authentication failed", now)
            return False
        return True

    def _on_identify(self, d: JSONValue, now: float) -> None:
        gw = self.gateway
        faults = gw.faults
        if not self._authenticated(d, now) or not isinstance(d, dict):
            return
        if faults.identify_close is not None:
            self._close(faults.identify_close, "identify rejected", now)
            return
        if faults.identify_invalid:
            self._send(Opcode.INVALID_SESSION, False)  # noqa: FBT003 - a JSON value
            self._close(4903, "create session error", now)
            return
        intents = d.get("intents")
        if type(intents) is not int or intents & ~gw.config.allowed_intents:
            self._close(4014, "intent not permitted", now)
            return
        shard = d.get("shard")
        if (
            not isinstance(shard, list)
            or len(shard) != 2
            or not all(type(x) is int for x in shard)
            or not 0 <= shard[0] < shard[1]  # type: ignore[operator]
        ):
            self._close(4010, "invalid shard", now)
            return
        gw.identifies.append(now)
        session = gw.new_session((shard[0], shard[1]))  # type: ignore[arg-type]
        self._attach(session, now)
        session.seq += 1
        ready: dict[str, JSONValue] = {
            "version": 1,
            "session_id": session.id,
            "user": {"id": "1000000000000000001", "username": "fake-bot", "bot": True},
            "shard": [session.shard[0], session.shard[1]],
        }
        self._raw({"op": 0, "s": session.seq, "t": "READY", "d": ready})
        if faults.second_hello:
            self._send(Opcode.HELLO, {"heartbeat_interval": gw.config.hello_interval_ms})

    def _on_resume(self, d: JSONValue, now: float) -> None:
        gw = self.gateway
        faults = gw.faults
        if not self._authenticated(d, now) or not isinstance(d, dict):
            return
        gw.resumes.append(now)
        if faults.resume_close is not None:
            self._close(faults.resume_close, "reset by resume", now)
            return
        if faults.resume_invalid is not None:
            self._send(Opcode.INVALID_SESSION, faults.resume_invalid)
            return
        session = gw.sessions.get(d.get("session_id"))  # type: ignore[arg-type]
        seq = d.get("seq")
        if session is None or session.invalid or not gw.resumable(session, now):
            self._close(4006, "invalid session id", now)
            return
        if seq is not None and (type(seq) is not int or seq > session.seq):
            self._close(4007, "invalid seq", now)
            return
        self._attach(session, now)
        start = (seq or 0) - faults.replay_overlap
        replay = [ServerSend(text) for s, text in session.buffer if s > start]
        if faults.replay_reversed:
            replay.reverse()
        self.outputs.extend(replay)
        session.seq += 1
        self._raw({"op": 0, "s": session.seq, "t": "RESUMED", "d": ""})
        if faults.resume_then_drop:
            self.outputs.append(ServerDrop())
            self._end(now)
        elif faults.second_hello:
            self._send(Opcode.HELLO, {"heartbeat_interval": gw.config.hello_interval_ms})

    # ----------------------------------------------------------------------- helpers

    def _attach(self, session: _Session, now: float) -> None:
        old = session.connection
        if old is not None and old is not self:
            old._close(4009, "session taken over", now)
        session.connection = self
        session.ended_at = None
        self.session = session

    def send_dispatch(self, text: str) -> None:
        """Queue a dispatch text (already encoded by the gateway)."""
        if not self.closed and not self.gateway.faults.silent:
            self.outputs.append(ServerSend(text))

    def _send(self, op: Opcode, d: JSONValue) -> None:
        self._raw({"op": int(op), "d": d})

    def _raw(self, obj: dict[str, JSONValue]) -> None:
        if not self.gateway.faults.silent:
            self.outputs.append(ServerSend(orjson.dumps(obj).decode()))

    def _close(self, code: int, reason: str, now: float) -> None:
        if self.closed:
            return
        self.outputs.append(ServerClose(code, reason))
        self._end(now)

    def close(self, code: int, reason: str, now: float) -> None:
        """Close the connection with ``code`` (a test's scripted server close)."""
        self._close(code, reason, now)

    def drop(self, now: float) -> None:
        """End the connection without a close frame."""
        if self.closed:
            return
        self.outputs.append(ServerDrop())
        self._end(now)

    def _end(self, now: float) -> None:
        self.closed = True
        session = self.session
        if session is not None and session.connection is self:
            session.connection = None
            session.ended_at = now
        self.gateway.connection_ended(self)

    def handle_timer(self, now: float) -> None:
        """Run this connection's timers: heartbeat timeout and rotation."""
        if self.closed:
            return
        cfg = self.gateway.config
        # Compare with the very sum get_timer() returned: `now - last >= timeout` can fall
        # short by one ulp and re-arm the same instant forever.
        if cfg.heartbeat_timeout is not None and now >= self.last_beat_at + cfg.heartbeat_timeout:
            self.drop(now)
            return
        if self.reconnect_sent_at is not None and now >= self.reconnect_sent_at + 1.0:
            self._close(4009, "Session timed out", now)
            return
        if self.rotation_at is not None and now >= self.rotation_at:
            self.request_reconnect(now)

    def request_reconnect(self, now: float) -> None:
        """Send op 7 now; close with 4009 one second later unless the client closed first."""
        if self.closed:
            return
        self.rotation_at = None
        self.reconnect_sent_at = now
        self._raw({"op": int(Opcode.RECONNECT)})

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` has work, or ``None``."""
        if self.closed:
            return None
        times = []
        cfg = self.gateway.config
        if cfg.heartbeat_timeout is not None:
            times.append(self.last_beat_at + cfg.heartbeat_timeout)
        if self.reconnect_sent_at is not None:
            times.append(self.reconnect_sent_at + 1.0)
        if self.rotation_at is not None:
            times.append(self.rotation_at)
        return min(times) if times else None

    def take_outputs(self) -> list[ServerOutput]:
        """Return and forget what this connection produced."""
        out = self.outputs
        self.outputs = []
        return out


class FakeGateway:
    """The fake QQ platform: token endpoint, gateway URL, and gateway connections.

    Args:
        config: how it behaves (see :class:`FakeGatewayConfig`).
        rng: randomness for ids and tokens; seed it for reproducible runs.
    """

    def __init__(self, config: FakeGatewayConfig | None = None, *, rng: random.Random) -> None:
        self.config = config if config is not None else FakeGatewayConfig()
        self.faults = Faults()
        self.rng = rng
        self.sessions: dict[str, _Session] = {}
        self.connections: list[ServerConnection] = []
        self.live: list[ServerConnection] = []
        self.tokens: list[_Token] = []
        self.token_requests: list[float] = []
        self.identifies: list[float] = []
        self.resumes: list[float] = []
        self.dispatched = 0
        # (method, path, JSON body) of every accepted REST message send, for assertions.
        self.rest_posts: list[tuple[str, str, JSONValue]] = []

    # ------------------------------------------------------------------ HTTP endpoints

    def token_request(self, body: Mapping[str, object], now: float) -> HttpReply:
        """``POST /app/getAppAccessToken`` with ``{"appId", "clientSecret"}``."""
        self.token_requests.append(now)
        cfg = self.config
        if body.get("appId") != cfg.app_id or body.get("clientSecret") != cfg.client_secret:
            return HttpReply(200, {"code": 100016, "message": "invalid appid or secret"})
        current = self.tokens[-1] if self.tokens else None
        if current is None or current.expires_at - now <= 60.0:
            value = f"fake-token-{len(self.tokens) + 1}-{self.rng.getrandbits(64):016x}"
            current = _Token(value, now + cfg.token_ttl)
            self.tokens.append(current)
        # expires_in arrives as a string, as the real endpoint sends it.
        remaining = max(0, round(current.expires_at - now))
        return HttpReply(200, {"access_token": current.value, "expires_in": str(remaining)})

    def gateway_request(self, authorization: str | None, now: float, *, bot: bool) -> HttpReply:
        """``GET /gateway`` (``bot=False``) or ``GET /gateway/bot`` with its auth header."""
        if not self.token_valid(authorization, now):
            return _unauthorized()
        body: dict[str, JSONValue] = {"url": self.config.url}
        if bot:
            cfg = self.config
            used = len(self.identifies)
            body["shards"] = cfg.shards
            body["session_start_limit"] = {
                "total": cfg.session_start_total,
                "remaining": max(0, cfg.session_start_total - used),
                "reset_after": 86_400_000,
                "max_concurrency": cfg.max_concurrency,
            }
        return HttpReply(200, body)

    def post_message(
        self, path: str, authorization: str | None, body: Mapping[str, JSONValue], now: float
    ) -> HttpReply:
        """``POST /v2/users/{openid}/messages`` or ``/v2/groups/{group_openid}/messages``.

        Nothing is delivered: an authorized request is recorded in ``rest_posts`` and
        answered with a made-up message id.
        """
        if not self.token_valid(authorization, now):
            return _unauthorized()
        self.rest_posts.append(("POST", path, dict(body)))
        message_id = f"FAKEMSG{len(self.rest_posts):08d}"
        return HttpReply(200, {"id": message_id, "timestamp": "2024-01-01T12:00:00+08:00"})

    def token_valid(self, value: object, now: float) -> bool:
        """Whether a ``"QQBot <tok>"`` value (Identify/Resume ``token`` field, REST
        ``Authorization`` header) holds a token valid now."""
        # The prefix is required, as on the real platform: a driver that forgets it must fail.
        if not isinstance(value, str) or not value.startswith("QQBot "):
            return False
        return self._token_ok(value.removeprefix("QQBot "), now)

    def _token_ok(self, token: str, now: float) -> bool:
        return any(t.value == token and now < t.expires_at for t in self.tokens)

    # -------------------------------------------------------------------- connections

    def accept(self, now: float) -> ServerConnection:
        """A client opened a WebSocket: the server end sends Hello at once."""
        conn = ServerConnection(self, len(self.connections) + 1, now)
        self.connections.append(conn)
        self.live.append(conn)
        return conn

    def connection_ended(self, conn: ServerConnection) -> None:
        """Bookkeeping when a connection ends (called by the connection itself)."""
        if conn in self.live:
            self.live.remove(conn)

    def new_session(self, shard: tuple[int, int]) -> _Session:
        """Start a session (READY) for ``shard``."""
        session_id = f"{self.rng.getrandbits(128):032x}"
        session = _Session(session_id, shard)
        self.sessions[session_id] = session
        return session

    def resumable(self, session: _Session, now: float) -> bool:
        """A session can be resumed within ``resume_window`` of its last connection."""
        ended = session.ended_at
        return ended is None or now - ended <= self.config.resume_window

    # ---------------------------------------------------------------------- dispatches

    def dispatch(
        self,
        t: str,
        d: JSONValue,
        now: float,
        *,
        event_id: str | None = None,
        shard: int = 0,
    ) -> int:
        """Produce one event for every session of ``shard``; return how many received it.

        Sessions without a live connection buffer it for Resume.
        """
        delivered = 0
        for session in list(self.sessions.values()):
            if session.invalid or not self.resumable(session, now):
                # Expired sessions are forgotten, as the real gateway must: memory stays bounded.
                if session.connection is None:
                    del self.sessions[session.id]
                continue
            if session.shard[0] != shard:
                continue
            session.seq += 1
            envelope: dict[str, JSONValue] = {"op": 0, "s": session.seq, "t": t, "d": d}
            if event_id is not None:
                envelope["id"] = event_id
            text = orjson.dumps(envelope).decode()
            session.buffer.append((session.seq, text))
            if len(session.buffer) > self.config.replay_buffer:
                session.buffer.popleft()
            if session.connection is not None:
                session.connection.send_dispatch(text)
            delivered += 1
        self.dispatched += 1
        return delivered

    def message(self, n: int, now: float, *, shard: int = 0, content: str | None = None) -> int:
        """Produce message number ``n`` as a C2C_MESSAGE_CREATE with unique ids."""
        d: JSONValue = {
            "id": f"ROBOT1.0_fake{n:08d}",
            "author": {"id": f"FAKEAUTHOR{n % 97:04d}", "user_openid": f"FAKEOPENID{n % 97:04d}"},
            "content": content if content is not None else f"hello {n} 你好",
            "timestamp": "2024-01-01T12:00:00+08:00",
            "attachments": [],
        }
        return self.dispatch(
            "C2C_MESSAGE_CREATE", d, now, event_id=f"C2C_MESSAGE_CREATE:fake{n:08d}", shard=shard
        )
