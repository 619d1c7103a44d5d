# The server side of the QQ gateway, sans-IO: a fake platform for tests and local runs.
#
# Theory of operation. `FakeGateway` models one bot's view of the QQ platform: the token
# endpoint, `/gateway` and `/gateway/bot`, the message-send endpoints, and the WebSocket
# gateway with its sessions. It follows the platform's documentation (bot.q.qq.com/wiki)
# where there is one and picks the conservative reading where there is not (noted inline).
# Like the client core it never does IO and never reads a clock: whoever hosts it (the
# simulator in `_simulator.py`, or qqproto_io's loopback server) passes `now`, carries
# `ServerOutput`s to the peer and calls `handle_timer`.
#
# Sessions outlive connections: a session keeps its sequence counter and a bounded buffer of
# recent dispatches, so a Resume replays what the client missed. Every fault a real gateway
# (or the network in front of it) has been seen to commit is a switch on `Faults`, flipped
# by the test at any time, or an entry of `FakeGatewayConfig`.
#
# The REST side answers like the platform: `rest_request` routes every call (token,
# gateway URL, message sends in the four scenes, media uploads), records it in `rest_calls`
# (never the Authorization header, never the token request's body) and checks message
# bodies the way the platform does. Every message event the fake dispatches is remembered as
# a reply anchor (its `d.id`, scene, target and time), so a passive reply's `msg_id` can be
# checked for existence, age, count and repeated `msg_seq`. `control_request` is the test's
# own door (`/_fake/...`): it needs no token and lives under no path a bot calls.
"""A sans-IO fake of the QQ gateway and its HTTP endpoints, with scriptable faults."""

from __future__ import annotations

import dataclasses
import datetime as dt
import http
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

import orjson

from qqproto._codec import JSONValue, Opcode, decode_payload
from qqproto._errors import RemoteProtocolError

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Mapping

__all__ = [
    "CONTROL_PREFIX",
    "MESSAGE_KINDS",
    "FakeGateway",
    "FakeGatewayConfig",
    "Faults",
    "HttpReply",
    "MessageKind",
    "RestCall",
    "RestFault",
    "ServerClose",
    "ServerConnection",
    "ServerDrop",
    "ServerOutput",
    "ServerSend",
    "UserMessage",
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
    """An HTTP answer of the fake platform: status and JSON body.

    ``note`` is the fake's reason for a refusal, for its log (:class:`RestCall`); it is not
    part of the answer.
    """

    status: int
    body: dict[str, JSONValue]
    note: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers (``Retry-After``, ``X-Tps-trace-ID``)."""
    hang_up: bool = False
    """Close the connection instead of answering: the request was processed, the answer
    is lost (a :class:`RestFault` ``lose``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RestFault:
    """How the fake answers one future send, upload or interaction acknowledgement; queue
    them in :attr:`FakeGateway.rest_faults` (first in, first used; token and gateway
    requests never take one).

    Attributes:
        status: answer this HTTP status (429, 500, 503, ...) with the platform's error
            body, without processing the request; ``None`` to process it.
        retry_after: with ``status``, the ``Retry-After`` header in seconds.
        lose: process the request (a send is accepted and counted), then close the
            connection without answering: the lost response a retry must not turn into a
            second message.
    """

    status: int | None = None
    retry_after: float | None = None
    lose: bool = False


def _unauthorized() -> HttpReply:
    return HttpReply(401, {"code": 11244, "message": "token not exist or expire"})


def _http_error(status: int) -> HttpReply:
    return HttpReply(status, {"code": status, "message": http.HTTPStatus(status).phrase.lower()})


MessageKind = Literal["c2c", "group", "guild", "direct"]
"""A message scene: QQ C2C (private) chat, QQ group, guild text channel, guild direct message."""

MESSAGE_KINDS: Final[tuple[MessageKind, ...]] = ("c2c", "group", "guild", "direct")

CONTROL_PREFIX: Final = "/_fake"
"""Where :meth:`FakeGateway.control_request` answers: no path a bot calls starts with it."""

TOKEN_PATH: Final = "/app/getAppAccessToken"  # noqa: S105 - a URL path, not a secret

# The event a user's message arrives as, per scene (the `kind` of `user_message`).
_KIND_EVENT: Final[dict[MessageKind, str]] = {
    "c2c": "C2C_MESSAGE_CREATE",
    "group": "GROUP_AT_MESSAGE_CREATE",
    "guild": "AT_MESSAGE_CREATE",
    "direct": "DIRECT_MESSAGE_CREATE",
}
# Message events whose `d.id` a bot may reply to, with their scene. Whatever produced them
# (`message`, `user_message`, a test's own `dispatch`), the fake remembers them as anchors.
_ANCHOR_EVENTS: Final[dict[str, MessageKind]] = {
    "C2C_MESSAGE_CREATE": "c2c",
    "GROUP_AT_MESSAGE_CREATE": "group",
    "GROUP_MESSAGE_CREATE": "group",
    "AT_MESSAGE_CREATE": "guild",
    "MESSAGE_CREATE": "guild",
    "DIRECT_MESSAGE_CREATE": "direct",
}
# Where a bot sends in each scene (bot.q.qq.com/wiki/develop/api-v2/server-inter/message/
# send-receive/send.html), and where it uploads media for C2C and groups (rich-media.html).
_SEND_ROUTES: Final[tuple[tuple[re.Pattern[str], MessageKind], ...]] = (
    (re.compile(r"/v2/users/([^/]+)/messages"), "c2c"),
    (re.compile(r"/v2/groups/([^/]+)/messages"), "group"),
    (re.compile(r"/channels/([^/]+)/messages"), "guild"),
    (re.compile(r"/dms/([^/]+)/messages"), "direct"),
)
_UPLOAD_ROUTES: Final[tuple[tuple[re.Pattern[str], MessageKind], ...]] = (
    (re.compile(r"/v2/users/([^/]+)/files"), "c2c"),
    (re.compile(r"/v2/groups/([^/]+)/files"), "group"),
)
# The acknowledgement of a button click (bot.q.qq.com/wiki/develop/api-v2/server-inter/
# message/trans/msg-btn.html): PUT /interactions/{interaction_id} with {"code": 0..5}.
_INTERACTION_ROUTE: Final = re.compile(r"/interactions/([^/]+)")
# The v2 (C2C and group) message types: 0 text, 2 markdown, 3 ark, 4 embed, 7 media, each
# with the field it needs; 6 (typing status, `input_notify`) is in the page's source only.
_MSG_TYPE_FIELD: Final[dict[int, str]] = {
    0: "content",
    2: "markdown",
    3: "ark",
    4: "embed",
    6: "input_notify",
    7: "media",
}
# A guild send needs one of these (post_messages.html: "至少需要有一个字段").
_GUILD_CONTENT: Final = ("content", "embed", "ark", "image", "markdown")

# How many anchors (message ids a bot may reply to) and REST calls the fake keeps: bounded,
# so that a fake left running for days stays small. An anchor forgotten this way is answered
# like an unknown one.
_ANCHORS_KEPT: Final = 10_000
_REST_CALLS_KEPT: Final = 1_000
_BOT_USER_ID: Final = "1000000000000000001"
_FIXED_TIMESTAMP: Final = "2024-01-01T12:00:00+08:00"
_CHINA: Final = dt.timezone(
    dt.timedelta(hours=8)
)  # the platform stamps in UTC+8  # the READY user id, and who a guild @ names


# --------------------------------------------------------------------- REST refusals
#
# The platform's answers to a message send it refuses; where each code comes from is in
# `FakeGateway.post_message`'s docstring.


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: int
    message: str


_BAD_BODY: Final = _Refusal(12002, "请求体错误")
_EMPTY: Final = _Refusal(50006, "empty msg")
_BAD_MSG_ID: Final = _Refusal(40034024, "请求参数msg_id无效或越权")
_EXPIRED: Final = _Refusal(40034005, "回复消息msg_id已过期")
_DUPLICATE: Final = _Refusal(40054005, "消息被去重\uff0c请检查请求msgseq")
_TOO_MANY: Final = _Refusal(22009, "msg limit exceed")
_GUILD_BAD_MSG_ID: Final = _Refusal(304026, "回复的消息 id 错误")
_GUILD_EXPIRED: Final = _Refusal(304027, "回复的消息过期")


@dataclass(frozen=True, slots=True)
class RestCall:
    """One REST request the fake platform answered (:attr:`FakeGateway.rest_calls`).

    It never holds the Authorization header, nor the token request's body (the secret).

    Attributes:
        at: when it was answered (the host's clock).
        method: the HTTP method.
        path: the request path, without the query.
        endpoint: ``"token"``, ``"gateway"``, ``"message"`` (a send), ``"upload"`` (media),
            ``"interaction"`` (an acknowledgement) or ``"unknown"`` (answered 404).
        status: the HTTP status of the answer.
        code: the platform code in the answer's body (a refusal), else ``None``.
        reason: why the fake refused it, in words (for the log; not sent), else ``None``.
        msg_type: the body's ``msg_type`` as sent (a send; ``None`` when absent).
        msg_id: the body's ``msg_id`` as sent (a send; ``None``: not a passive reply).
        msg_seq: the body's ``msg_seq`` as sent (a send; ``None`` when absent).
        body: the JSON body of a send, an upload (its ``file_data`` cut to its length) or
            an acknowledgement, else ``None``.
    """

    at: float
    method: str
    path: str
    endpoint: str
    status: int
    code: int | None = None
    reason: str | None = None
    msg_type: JSONValue = None
    msg_id: JSONValue = None
    msg_seq: JSONValue = None
    body: JSONValue = None

    def describe(self) -> str:
        """One line for a log: ``POST /v2/users/U/messages -> 400 40054005 msg_type=0 ...``.

        Holds no token, no secret and no message content.
        """
        line = f"{self.method} {self.path} -> {self.status}"
        if self.code is not None:
            line += f" {self.code}"
        if self.endpoint == "message":
            fields = [("msg_type", self.msg_type), ("msg_id", self.msg_id)]
            fields.append(("msg_seq", self.msg_seq))
            line += "".join(f" {name}={_shown(value)}" for name, value in fields)
        if self.reason is not None:
            line += f" ({self.reason})"
        return line

    def to_json(self) -> dict[str, JSONValue]:
        """The call as a JSON object (what ``GET /_fake/rest`` lists)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _shown(value: JSONValue) -> str:
    """A body field for a log line: ``-`` when absent, else its JSON (control characters
    escaped, so that a line stays one line)."""
    if value is None:
        return "-"
    if isinstance(value, str) and value.isprintable() and " " not in value and value:
        return value
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class UserMessage:
    """A message a user sent the bot, as :meth:`FakeGateway.user_message` produced it.

    Attributes:
        kind: its scene.
        type: the event type (``C2C_MESSAGE_CREATE``, ``GROUP_AT_MESSAGE_CREATE``,
            ``AT_MESSAGE_CREATE``, ``DIRECT_MESSAGE_CREATE``).
        event_id: the envelope's ``id``.
        msg_id: the message's ``d.id``: what a passive reply puts in ``msg_id``.
        seqs: the dispatch's ``s`` in each session that got it (sessions without a live
            connection keep it for their Resume).
        reply_path: where the bot replies (``POST``).
        d: the event's ``d``.
    """

    kind: MessageKind
    type: str
    event_id: str
    msg_id: str
    seqs: tuple[int, ...]
    reply_path: str
    d: dict[str, JSONValue]

    def to_json(self) -> dict[str, JSONValue]:
        """What ``POST /_fake/messages`` answers (``seq``: the one session's, else null)."""
        return {
            "kind": self.kind,
            "t": self.type,
            "event_id": self.event_id,
            "msg_id": self.msg_id,
            "seq": self.seqs[0] if len(self.seqs) == 1 else None,
            "seqs": list(self.seqs),
            "delivered": len(self.seqs),
            "reply_path": self.reply_path,
        }


@dataclass(slots=True)
class _Anchor:
    """A message the bot may reply to: its scene, chat, when it was sent, replies taken."""

    kind: MessageKind
    target: str | None  # the openid/group/channel/guild in the reply path; None: any
    at: float
    seqs: set[int] = field(default_factory=set)


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
            new one and the old one stays valid until it expires (the platform's token
            page, bot.q.qq.com/wiki/develop/api-v2/dev-prepare/interface-framework/
            api-use.html).
        rotate_every: send op 7 this long after each connection opened, then close with 4009
            one second later unless the client closed first. ``None`` disables rotation.
        resume_window: a session can be resumed this long after its last connection ended.
        replay_buffer: dispatches kept per session for Resume.
        session_start_total: ``session_start_limit.total`` in the ``/gateway/bot`` answer.
        max_concurrency: ``session_start_limit.max_concurrency`` in that answer.
        shards: the recommended shard count in that answer.
        allowed_intents: intents the bot may ask for; other bits close with 4014.
        reply_window_c2c: how long after a C2C message a passive reply to it (``msg_id``)
            is accepted; later ones are refused as expired. The platform's send-message
            page (bot.q.qq.com/wiki/develop/api-v2/server-inter/message/send-receive/
            send.html) gives 60 minutes for C2C.
        reply_window_group: the same for a group message: 5 minutes on that page.
        reply_window_guild: the same for a guild channel message or a guild direct
            message: 5 minutes on that page.
        replies_per_message: passive replies accepted per C2C or group message (5 on that
            page); the next one is refused. Guild messages have no such limit.
        unix_epoch: the Unix time at the host's ``now == 0``: a message the fake produces
            is stamped ``unix_epoch + now`` (in UTC+8, as the platform stamps them), so that
            a bot checking reply windows against its own wall clock finds them fresh.
            ``None``: every message carries one fixed 2024 timestamp, and seeded runs repeat
            byte for byte. ``FakeGatewayServer`` sets it from the wall clock.
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
    reply_window_c2c: float = 3600.0
    reply_window_group: float = 300.0
    reply_window_guild: float = 300.0
    replies_per_message: int = 5
    unix_epoch: float | None = None


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
        # Asked after every message the connection handles: no list, no min() call.
        timeout = self.gateway.config.heartbeat_timeout
        at = None if timeout is None else self.last_beat_at + timeout
        if self.reconnect_sent_at is not None:
            sent = self.reconnect_sent_at + 1.0
            at = sent if at is None or sent < at else at
        rotation = self.rotation_at
        if rotation is not None:
            at = rotation if at is None or rotation < at else at
        return at

    def take_outputs(self) -> list[ServerOutput]:
        """Return and forget what this connection produced."""
        out = self.outputs
        self.outputs = []
        return out


def _envelope_parts(t: str, d: JSONValue, event_id: str | None) -> tuple[str, str]:
    """The text of a dispatch envelope before and after its ``s``."""
    dumps = orjson.dumps
    tail = b',"t":' + dumps(t) + b',"d":' + dumps(d)
    if event_id is not None:
        tail += b',"id":' + dumps(event_id)
    return '{"op":0,"s":', (tail + b"}").decode()


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
        # Every REST call `rest_request` answered, newest last (the most recent 1000).
        self.rest_calls: deque[RestCall] = deque(maxlen=_REST_CALLS_KEPT)
        # Message ids a bot may reply to, oldest first (bounded, see _ANCHORS_KEPT).
        self._anchors: OrderedDict[str, _Anchor] = OrderedDict()
        # What the next sends, uploads and acknowledgements get instead of an answer.
        self.rest_faults: deque[RestFault] = deque()
        # The platform's other transport: called with (t, d, event_id) of every dispatch,
        # for a host that posts them as signed webhook callbacks (qqproto_io's fake).
        self.webhook_sink: Callable[[str, JSONValue, str | None], None] | None = None
        # The interaction ids acknowledged, with their code, in order.
        self.acknowledged: list[tuple[str, int]] = []
        self._uploads = 0
        self._user_messages = 0
        self._refusals = 0

    # ------------------------------------------------------------------ HTTP endpoints

    def rest_request(
        self, method: str, path: str, authorization: str | None, body: bytes, now: float
    ) -> HttpReply:
        """Answer one REST request as the platform would, and record it in :attr:`rest_calls`.

        Routes ``POST /app/getAppAccessToken``, ``GET /gateway`` and ``/gateway/bot``, the
        message sends (``POST /v2/users/{openid}/messages``, ``/v2/groups/{group_openid}/
        messages``, ``/channels/{channel_id}/messages``, ``/dms/{guild_id}/messages``),
        the media uploads (``POST /v2/users/{openid}/files``, ``/v2/groups/{group_openid}/
        files``) and interaction acknowledgements (``PUT /interactions/{id}``); anything
        else is 404. ``body`` is the raw request body (JSON where one is expected);
        ``authorization`` the ``Authorization`` header, never recorded. A send, upload or
        acknowledgement takes the first of :attr:`rest_faults`, if any.
        """
        method = method.upper()
        endpoint = _endpoint(method, path)
        sent: dict[str, JSONValue] = {}  # a send's or upload's body, as recorded
        fault = None
        if endpoint in ("message", "upload", "interaction") and self.rest_faults:
            fault = self.rest_faults.popleft()
        if endpoint == "unknown":
            reply = _http_error(404)
        elif endpoint == "gateway":
            reply = self.gateway_request(authorization, now, bot=path == "/gateway/bot")
        else:
            parsed = _json_object(body)
            if isinstance(parsed, dict) and endpoint != "token":  # its body is never recorded
                sent = dict(parsed)
                data = sent.get("file_data")
                if isinstance(data, str):
                    sent["file_data"] = f"<{len(data)} characters>"
            if fault is not None and fault.status is not None:
                reply = _faulted(fault.status, fault.retry_after)  # recorded, never looked at
            elif isinstance(parsed, HttpReply):
                reply = parsed
            elif endpoint == "token":
                reply = self.token_request(parsed, now)
            elif endpoint == "message":
                reply = self.post_message(path, authorization, parsed, now)
            elif endpoint == "interaction":
                reply = self.acknowledge_interaction(path, authorization, parsed, now)
            else:
                reply = self.upload_file(path, authorization, parsed, now)
        code = reply.body.get("code")
        message = endpoint == "message"
        call = RestCall(
            at=now,
            method=method,
            path=path,
            endpoint=endpoint,
            status=reply.status,
            code=code if type(code) is int else None,
            reason=reply.note,
            msg_type=sent.get("msg_type") if message else None,
            msg_id=sent.get("msg_id") if message else None,
            msg_seq=sent.get("msg_seq") if message else None,
            body=sent if endpoint in ("message", "upload", "interaction") and sent else None,
        )
        self.rest_calls.append(call)
        if fault is not None and fault.lose:
            return dataclasses.replace(reply, hang_up=True, note="answer lost (RestFault)")
        return reply

    def acknowledge_interaction(
        self, path: str, authorization: str | None, body: Mapping[str, JSONValue], now: float
    ) -> HttpReply:
        """``PUT /interactions/{interaction_id}`` with ``{"code": 0..5}`` (0 success, 1
        failed, 2 too frequent, 3 duplicate, 4 no permission, 5 admin only): recorded in
        :attr:`acknowledged`. Any id is accepted (the fake does not track interactions);
        acknowledging one twice is harmless, as a retry must be.
        """
        if not self.token_valid(authorization, now):
            return _unauthorized()
        found = _INTERACTION_ROUTE.fullmatch(path)
        if found is None:
            return _http_error(404)
        code = body.get("code")
        if type(code) is not int or not 0 <= code <= 5:
            return self._refuse(_BAD_BODY, "code must be an integer from 0 to 5")
        self.acknowledged.append((found.group(1), code))
        return HttpReply(200, {})

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
        """A message send: ``POST /v2/users/{openid}/messages``, ``/v2/groups/{group_openid}/
        messages``, ``/channels/{channel_id}/messages`` or ``/dms/{guild_id}/messages``.

        Nothing is delivered. The body is checked as the platform checks it, and a refusal
        is answered as the platform answers it: HTTP 400 with a JSON body holding the code
        twice (``code``, ``err_code``), a ``message`` and a ``trace_id``, as bots have
        logged it (https://github.com/AstrBotDevs/AstrBot/issues/6931). The rules, their
        codes and where those come from:

        - C2C and group: ``msg_type`` is required (the send-message page,
          bot.q.qq.com/wiki/develop/api-v2/server-inter/message/send-receive/send.html)
          and must be 0 (text), 2 (markdown), 3 (ark), 4 (embed), 6 (typing status, in the
          page's source only) or 7 (media); ``msg_seq``, when given, an integer. Else
          **12002** "请求体错误", RequestInvalid in the OpenAPI error table
          (bot.q.qq.com/wiki/develop/api-v2/openapi/error/error.html): the platform's own
          answer to a missing ``msg_type`` is not documented.
        - The field the ``msg_type`` implies must be there (``content``, ``markdown``,
          ``ark``, ``embed``, ``input_notify``, ``media`` with its ``file_info``); a guild
          or direct send needs one of content/embed/ark/image/markdown (the guild send
          page, .../server-inter/message/post_messages.html). Else **50006** "empty msg",
          CannotSendEmptyMessage in that table, seen live as HTTP 400
          (https://github.com/AstrBotDevs/AstrBot/issues/91).
        - A passive reply's ``msg_id`` must be a message the fake sent, in the same chat.
          Else **40034024** "请求参数msg_id无效或越权" (AstrBot issue 6931 above); for a guild
          or direct send **304026**, MSG_ID in the error table.
        - It must come within the scene's reply window: 60 minutes for C2C, 5 for a group,
          a guild channel or a direct message, per the send-message page
          (``FakeGatewayConfig.reply_window_*``). Else **40034005** "回复消息msg_id已过期",
          the message as logged in https://github.com/NousResearch/hermes-agent/issues/43467
          and the code bots get and handle for it; for a guild or direct send **304027**,
          MSG_EXPIRE in the error table.
        - C2C and group: the same ``msg_id`` + ``msg_seq`` (1 when absent) must not come
          twice (the send-message page: "相同的 msg_id + msg_seq 重复发送会失败"). Else
          **40054005** "消息被去重, 请检查请求msgseq" (a full-width comma), as reported in
          https://github.com/HKUDS/nanobot/pull/1499.
        - C2C and group: a message takes at most ``replies_per_message`` replies (5 on the
          send-message page). Else **22009** "msg limit exceed", the error that page lists
          for these sends ("消息发送超频").

        ``null`` fields count as absent (botpy sends them). ``event_id`` replies and
        proactive sends (no ``msg_id``) are accepted without further checks; rate limits
        and URL checks are not modelled. An accepted send is recorded in ``rest_posts`` and
        answered with a made-up message id.
        """
        if not self.token_valid(authorization, now):
            return _unauthorized()
        route = _match(_SEND_ROUTES, path)
        if route is None:
            return _http_error(404)
        kind, target = route
        refused = self._check_send(kind, target, body, now)
        if refused is not None:
            return refused
        self.rest_posts.append(("POST", path, dict(body)))
        message_id = f"FAKEMSG{len(self.rest_posts):08d}"
        answer: dict[str, JSONValue] = {"id": message_id, "timestamp": "2024-01-01T12:00:00+08:00"}
        if kind == "guild":
            answer["channel_id"] = target
        elif kind == "direct":
            answer["guild_id"] = target
        return HttpReply(200, answer)

    def _check_send(
        self, kind: MessageKind, target: str, body: Mapping[str, JSONValue], now: float
    ) -> HttpReply | None:
        """The refusal a send gets, or ``None`` when it is accepted (and counted)."""
        v2 = kind in ("c2c", "group")
        if v2:
            msg_type = body.get("msg_type")
            if msg_type is None:
                return self._refuse(_BAD_BODY, "msg_type is required")
            if type(msg_type) is not int or msg_type not in _MSG_TYPE_FIELD:
                return self._refuse(_BAD_BODY, f"msg_type {_shown(msg_type)} is not valid")
            needed = _MSG_TYPE_FIELD[msg_type]
            value = body.get(needed)
            if needed == "content" and not (isinstance(value, str) and value):
                return self._refuse(_EMPTY, "msg_type 0 needs a non-empty content")
            if needed != "content" and not isinstance(value, dict):
                return self._refuse(_EMPTY, f"msg_type {msg_type} needs a {needed} object")
            file_info = value.get("file_info") if isinstance(value, dict) else None
            if needed == "media" and not (isinstance(file_info, str) and file_info):
                return self._refuse(_EMPTY, "msg_type 7 needs media.file_info")
        elif not any(_present(body.get(name)) for name in _GUILD_CONTENT):
            return self._refuse(_EMPTY, "one of content/embed/ark/image/markdown is needed")
        msg_id = body.get("msg_id")
        if msg_id is None:
            return None  # proactive, or an event_id reply: not checked
        unknown, expired = (_BAD_MSG_ID, _EXPIRED) if v2 else (_GUILD_BAD_MSG_ID, _GUILD_EXPIRED)
        anchor = self._anchors.get(msg_id) if isinstance(msg_id, str) else None
        if anchor is None:
            return self._refuse(unknown, "msg_id is no message the fake sent")
        if anchor.kind != kind or (anchor.target is not None and anchor.target != target):
            return self._refuse(unknown, f"msg_id is a {anchor.kind} message of another chat")
        age = now - anchor.at
        window = self._reply_window(kind)
        if age > window:
            return self._refuse(expired, f"msg_id is {age:.0f} s old, the window is {window:g} s")
        if not v2:
            return None
        msg_seq = body.get("msg_seq", 1)
        if msg_seq is None:
            msg_seq = 1
        if type(msg_seq) is not int:
            return self._refuse(_BAD_BODY, "msg_seq must be an integer")
        if msg_seq in anchor.seqs:
            return self._refuse(_DUPLICATE, f"msg_seq {msg_seq} was already used for msg_id")
        limit = self.config.replies_per_message
        if len(anchor.seqs) >= limit:
            return self._refuse(_TOO_MANY, f"msg_id already has {limit} replies")
        anchor.seqs.add(msg_seq)
        return None

    def _reply_window(self, kind: MessageKind) -> float:
        cfg = self.config
        if kind == "c2c":
            return cfg.reply_window_c2c
        if kind == "group":
            return cfg.reply_window_group
        return cfg.reply_window_guild

    def _refuse(self, refusal: _Refusal, reason: str) -> HttpReply:
        """HTTP 400 with the platform's body, ``reason`` as the reply's note (not sent)."""
        self._refusals += 1
        body: dict[str, JSONValue] = {
            "message": refusal.message,
            "code": refusal.code,
            "err_code": refusal.code,
            "trace_id": f"{self._refusals:032x}",  # a counter: the seeded ids stay put
        }
        return HttpReply(400, body, reason)

    def upload_file(
        self, path: str, authorization: str | None, body: Mapping[str, JSONValue], now: float
    ) -> HttpReply:
        """A media upload: ``POST /v2/users/{openid}/files`` or ``/v2/groups/{group_openid}/
        files`` with ``file_type`` (1 image, 2 video, 3 voice, 4 file), ``url`` (or
        ``file_data``) and ``srv_send_msg``; answered with a made-up ``file_info`` for a
        ``msg_type`` 7 send's ``media``. Nothing is fetched or delivered.
        """
        if not self.token_valid(authorization, now):
            return _unauthorized()
        if _match(_UPLOAD_ROUTES, path) is None:
            return _http_error(404)
        file_type = body.get("file_type")
        if type(file_type) is not int or not 1 <= file_type <= 4:
            return self._refuse(_BAD_BODY, "file_type must be 1, 2, 3 or 4")
        if not (_present(body.get("url")) or _present(body.get("file_data"))):
            return self._refuse(_BAD_BODY, "url (or file_data) is required")
        srv_send_msg = body.get("srv_send_msg")
        if srv_send_msg is not None and type(srv_send_msg) is not bool:
            return self._refuse(_BAD_BODY, "srv_send_msg must be true or false")
        self._uploads += 1
        n = self._uploads
        answer: dict[str, JSONValue] = {
            "file_uuid": f"FAKEFILE{n:08d}",
            "file_info": f"FAKEFILEINFO{n:08d}",
            "ttl": 3600,
        }
        return HttpReply(200, answer)

    def timestamp(self, now: float) -> str:
        """How the platform would stamp a message sent at ``now``: RFC 3339 in UTC+8,
        whole seconds (see ``FakeGatewayConfig.unix_epoch``)."""
        epoch = self.config.unix_epoch
        if epoch is None:
            return _FIXED_TIMESTAMP
        at = dt.datetime.fromtimestamp(epoch + now, _CHINA)
        return at.isoformat(timespec="seconds")

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

        Sessions without a live connection buffer it for Resume. A message event's ``d.id``
        becomes a message the bot may reply to (see :meth:`post_message`).
        """
        return len(self._dispatch(t, d, now, event_id=event_id, shard=shard))

    def _dispatch(
        self, t: str, d: JSONValue, now: float, *, event_id: str | None, shard: int
    ) -> list[int]:
        """:meth:`dispatch`, returning the event's ``s`` in each session that got it."""
        self._remember(t, d, now)
        if self.webhook_sink is not None:
            self.webhook_sink(t, d, event_id)
        seqs: list[int] = []
        # The envelope's parts are encoded once per event, not once per session; joined
        # around each session's seq they are the very bytes orjson.dumps gives the envelope
        # {"op", "s", "t", "d", "id"} (a test pins the equality).
        head = tail = ""
        replay_buffer = self.config.replay_buffer
        for session in list(self.sessions.values()):
            if session.invalid or not self.resumable(session, now):
                # Expired sessions are forgotten, as the real gateway must: memory stays bounded.
                if session.connection is None:
                    del self.sessions[session.id]
                continue
            if session.shard[0] != shard:
                continue
            if not head:
                head, tail = _envelope_parts(t, d, event_id)
            session.seq += 1
            text = f"{head}{session.seq}{tail}"
            session.buffer.append((session.seq, text))
            if len(session.buffer) > replay_buffer:
                session.buffer.popleft()
            if session.connection is not None:
                session.connection.send_dispatch(text)
            seqs.append(session.seq)
        self.dispatched += 1
        return seqs

    def _remember(self, t: str, d: JSONValue, now: float) -> None:
        """Keep a message event's id as a reply anchor (with its scene and chat)."""
        kind = _ANCHOR_EVENTS.get(t)
        if kind is None or not isinstance(d, dict):
            return
        msg_id = d.get("id")
        if not isinstance(msg_id, str):
            return
        if kind == "c2c":
            author = d.get("author")
            target = author.get("user_openid") if isinstance(author, dict) else None
        else:
            target = d.get({"group": "group_openid", "guild": "channel_id"}.get(kind, "guild_id"))
        anchors = self._anchors
        if msg_id in anchors:  # a new key is already the newest
            anchors.move_to_end(msg_id)
        anchors[msg_id] = _Anchor(kind, target if isinstance(target, str) else None, now)
        while len(anchors) > _ANCHORS_KEPT:
            anchors.popitem(last=False)

    def message(
        self,
        n: int,
        now: float,
        *,
        shard: int = 0,
        content: str | None = None,
        timestamp: str | None = None,
    ) -> int:
        """Produce message number ``n`` as a C2C_MESSAGE_CREATE with unique ids.

        ``timestamp`` is the message's own (RFC 3339); by default it follows
        ``config.unix_epoch``.
        """
        d: JSONValue = {
            "id": f"ROBOT1.0_fake{n:08d}",
            "author": {"id": f"FAKEAUTHOR{n % 97:04d}", "user_openid": f"FAKEOPENID{n % 97:04d}"},
            "content": content if content is not None else f"hello {n} 你好",
            "timestamp": timestamp or self.timestamp(now),
            "attachments": [],
        }
        return self.dispatch(
            "C2C_MESSAGE_CREATE", d, now, event_id=f"C2C_MESSAGE_CREATE:fake{n:08d}", shard=shard
        )

    def user_message(
        self,
        kind: MessageKind,
        content: str,
        now: float,
        *,
        user: str | None = None,
        group: str | None = None,
        channel: str | None = None,
        guild: str | None = None,
        shard: int = 0,
        timestamp: str | None = None,
    ) -> UserMessage:
        """A user sends the bot ``content`` in scene ``kind``: dispatch it, as the platform's
        event of that scene, to every session of ``shard``.

        The ``d`` has the platform's shape (bot.q.qq.com/wiki/develop/api-v2/server-inter/
        message/send-receive/event.html):

        - ``c2c``: ``C2C_MESSAGE_CREATE`` from ``author.user_openid`` = ``user``.
        - ``group``: ``GROUP_AT_MESSAGE_CREATE`` in ``group_openid`` = ``group`` from
          ``author.member_openid`` = ``user``; the content starts with a space, where the
          @ of the bot was, as on the platform.
        - ``guild``: ``AT_MESSAGE_CREATE`` in ``channel_id`` = ``channel`` of ``guild_id``
          = ``guild`` from ``author.id`` = ``user``; the content starts with the bot's
          mention ``<@!{bot id}> ``, as on the platform.
        - ``direct``: ``DIRECT_MESSAGE_CREATE`` in the direct-message guild ``guild``
          (``channel_id`` = ``channel``, ``direct_message: true``).

        Ids left out take a fixed default per scene. The bot may reply with ``msg_id`` =
        the returned ``msg_id`` at ``reply_path``. ``timestamp`` (RFC 3339) follows
        ``config.unix_epoch`` when not given.
        """
        self._user_messages += 1
        n = self._user_messages
        t = _KIND_EVENT[kind]
        msg_id = f"ROBOT1.0_user{n:08d}" if kind in ("c2c", "group") else f"FAKEGUILDMSG{n:08d}"
        d: dict[str, JSONValue] = {"id": msg_id, "timestamp": timestamp or self.timestamp(now)}
        if kind == "c2c":
            openid = user or "FAKEUSEROPENID0001"
            d["author"] = {"id": openid, "user_openid": openid, "union_openid": openid}
            d.update(content=content, attachments=[])
            path = f"/v2/users/{openid}/messages"
        elif kind == "group":
            group_openid = group or "FAKEGROUPOPENID0001"
            member = user or "FAKEMEMBEROPENID0001"
            d["author"] = {"id": member, "member_openid": member, "union_openid": member}
            text = content if content.startswith(" ") else " " + content
            d.update(content=text, group_id=group_openid, group_openid=group_openid)
            d["attachments"] = []
            path = f"/v2/groups/{group_openid}/messages"
        else:
            channel_id = channel or ("FAKECHANNEL0001" if kind == "guild" else "FAKEDMCHANNEL0001")
            guild_id = guild or ("FAKEGUILD0001" if kind == "guild" else "FAKEDMGUILD0001")
            author_id = user or "FAKEGUILDUSER0001"
            d["author"] = {"id": author_id, "username": "fake-user", "avatar": "", "bot": False}
            d.update(channel_id=channel_id, guild_id=guild_id)
            d["member"] = {"joined_at": "2024-01-01T12:00:00+08:00", "roles": ["1"]}
            d.update(seq=n, seq_in_channel=str(n))
            if kind == "guild":
                d["content"] = f"<@!{_BOT_USER_ID}> {content}"
                d["mentions"] = [{"id": _BOT_USER_ID, "username": "fake-bot", "bot": True}]
                path = f"/channels/{channel_id}/messages"
            else:
                d.update(content=content, direct_message=True, src_guild_id="FAKEGUILD0001")
                path = f"/dms/{guild_id}/messages"
        event_id = f"{t}:user{n:08d}"
        seqs = self._dispatch(t, d, now, event_id=event_id, shard=shard)
        return UserMessage(kind, t, event_id, msg_id, tuple(seqs), path, d)

    # ------------------------------------------------------------- scripted server acts

    def reconnect_all(self, now: float) -> int:
        """Send op 7 to every live connection (each closes 4009 a second later unless its
        client closed first); return how many."""
        live = list(self.live)
        for conn in live:
            conn.request_reconnect(now)
        return len(live)

    def close_all(self, code: int, reason: str, now: float) -> int:
        """Close every live connection with ``code``; return how many."""
        live = list(self.live)
        for conn in live:
            conn.close(code, reason, now)
        return len(live)

    def drop_all(self, now: float) -> int:
        """End every live connection without a close frame; return how many."""
        live = list(self.live)
        for conn in live:
            conn.drop(now)
        return len(live)

    # ------------------------------------------------------------------- control door

    def control_request(self, method: str, path: str, body: bytes, now: float) -> HttpReply:
        """The test's (or a person's) own endpoints under ``/_fake/``; no token needed.

        - ``POST /_fake/messages`` ``{"kind": "c2c"|"group"|"guild"|"direct",
          "content": "...", "user"?, "group"?, "channel"?, "guild"?, "shard"?}`` (the
          platform's names ``user_openid``, ``member_openid``, ``group_openid``,
          ``channel_id``, ``guild_id`` work too): a user's message
          (:meth:`user_message`); answers its ``event_id``, ``msg_id``, ``seq`` and
          ``reply_path``.
        - ``POST /_fake/close`` ``{"code": 4009, "reason"?}``: close every connection.
        - ``POST /_fake/reconnect``: op 7 to every connection. ``POST /_fake/drop``: cut
          every connection without a close frame.
        - ``GET /_fake/rest``: the REST calls received (:attr:`rest_calls`).
        - ``GET /_fake/faults``, ``POST /_fake/faults`` ``{"no_ack": true, ...}``: read or
          set :class:`Faults` switches.

        Mistakes are answered 400, 404 or 405 with ``{"error": "..."}``. The host must
        carry the connections' outputs afterwards, as after any scripted act.
        """
        name = path.removeprefix(CONTROL_PREFIX).strip("/")
        methods = {m for (n, m) in _CONTROL if n == name}
        if not methods:
            return HttpReply(404, {"error": f"no control endpoint {path}", "endpoints": _HELP})
        act = _CONTROL.get((name, method.upper()))
        if act is None:
            return HttpReply(405, {"error": f"{path} takes {' or '.join(sorted(methods))}"})
        parsed: dict[str, JSONValue] = {}
        if body.strip():
            obj = _json_object(body)
            if isinstance(obj, HttpReply):
                return HttpReply(400, {"error": "the body must be a JSON object"})
            parsed = obj
        try:
            return HttpReply(200, act(self, parsed, now))
        except _ControlError as exc:
            return HttpReply(400, {"error": str(exc)})

    def set_fault(self, name: str, value: JSONValue) -> None:
        """Set the :class:`Faults` switch ``name``, checked: a known name and a value of its
        type (raises ValueError with the reason)."""
        _check_fault(name, value)
        setattr(self.faults, name, value)


# ----------------------------------------------------------------------- REST helpers


def _endpoint(method: str, path: str) -> str:
    """Which endpoint a request is for (``unknown``: answered 404)."""
    if method == "POST":
        if path == TOKEN_PATH:
            return "token"
        if _match(_SEND_ROUTES, path) is not None:
            return "message"
        if _match(_UPLOAD_ROUTES, path) is not None:
            return "upload"
    if method == "PUT" and _INTERACTION_ROUTE.fullmatch(path) is not None:
        return "interaction"
    if method == "GET" and path in ("/gateway", "/gateway/bot"):
        return "gateway"
    return "unknown"


def _faulted(status: int, retry_after: float | None) -> HttpReply:
    """A RestFault's answer: the platform's error body, and Retry-After when asked."""
    reply = _http_error(status)
    headers = (("Retry-After", f"{retry_after:g}"),) if retry_after is not None else ()
    return dataclasses.replace(reply, headers=headers, note="RestFault")


def _match(
    routes: tuple[tuple[re.Pattern[str], MessageKind], ...], path: str
) -> tuple[MessageKind, str] | None:
    for pattern, kind in routes:
        found = pattern.fullmatch(path)
        if found is not None:
            return kind, found.group(1)
    return None


def _json_object(body: bytes) -> dict[str, JSONValue] | HttpReply:
    """The body as a JSON object, or the 400 the fake answers."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return HttpReply(400, {"code": 400, "message": "body is not JSON"})
    if not isinstance(parsed, dict):
        return HttpReply(400, {"code": 400, "message": "body is not a JSON object"})
    return parsed


def _present(value: JSONValue) -> bool:
    """A body field that carries something (``null``, ``""``, ``{}`` and ``[]`` do not)."""
    return value is not None and value not in ("", {}, [])


# -------------------------------------------------------------------- control helpers

# Each Faults field's kind of value, for checking what a control request sets.
_FAULT_KINDS: Final[dict[str, str]] = {
    "no_ack": "bool",
    "silent": "bool",
    "identify_close": "code",
    "identify_invalid": "bool",
    "resume_close": "code",
    "resume_invalid": "maybe_bool",
    "resume_then_drop": "bool",
    "ignore_close": "bool",
    "rate_limit": "bool",
    "replay_overlap": "count",
    "replay_reversed": "bool",
    "second_hello": "bool",
}
_FAULT_WANTS: Final[dict[str, str]] = {
    "bool": "true or false",
    "count": "an integer >= 0",
    "code": "a close code (1000-4999) or null",
    "maybe_bool": "true, false or null",
}


def _check_fault(name: str, value: JSONValue) -> None:
    kind = _FAULT_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown fault {name!r} (known: {', '.join(_FAULT_KINDS)})")
    if kind == "bool":
        ok = type(value) is bool
    elif kind == "count":
        ok = type(value) is int and value >= 0
    elif kind == "code":
        ok = value is None or (type(value) is int and 1000 <= value <= 4999)
    else:
        ok = value is None or type(value) is bool
    if not ok:
        raise ValueError(f"fault {name} takes {_FAULT_WANTS[kind]}")


class _ControlError(Exception):
    """A mistake in a control request: answered 400 with the message."""


_ControlBody = dict[str, JSONValue]
_ID_ALIASES: Final = {
    "user": "user",
    "user_openid": "user",
    "member_openid": "user",
    "author_id": "user",
    "group": "group",
    "group_openid": "group",
    "channel": "channel",
    "channel_id": "channel",
    "guild": "guild",
    "guild_id": "guild",
}


def _control_message(gw: FakeGateway, body: _ControlBody, now: float) -> _ControlBody:
    kind = body.get("kind")
    if kind not in MESSAGE_KINDS:
        raise _ControlError(f"kind must be one of {', '.join(MESSAGE_KINDS)}")
    content = body.get("content", "")
    if not isinstance(content, str):
        raise _ControlError("content must be a string")
    timestamp = body.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, str):
        raise _ControlError("timestamp must be a string")
    shard = body.get("shard", 0)
    if type(shard) is not int or shard < 0:
        raise _ControlError("shard must be an integer >= 0")
    ids: dict[str, str] = {}
    for key, value in body.items():
        if key in ("kind", "content", "timestamp", "shard"):
            continue
        name = _ID_ALIASES.get(key)
        if name is None:
            raise _ControlError(f"unknown field {key!r}")
        if not isinstance(value, str) or not value or "/" in value:
            raise _ControlError(f"{key} must be a non-empty string without '/'")
        ids[name] = value
    sent = gw.user_message(
        kind,  # checked against MESSAGE_KINDS above
        content,
        now,
        user=ids.get("user"),
        group=ids.get("group"),
        channel=ids.get("channel"),
        guild=ids.get("guild"),
        shard=shard,
        timestamp=timestamp,
    )
    return sent.to_json()


def _sendable_close_code(code: int) -> bool:
    """A code a close frame may carry (RFC 6455 7.4: not 1004-1006, 1015, nor below 1000)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _control_close(gw: FakeGateway, body: _ControlBody, now: float) -> _ControlBody:
    code = body.get("code")
    if type(code) is not int or not _sendable_close_code(code):
        raise _ControlError("code must be a close code: 1000-1003, 1007-1014 or 3000-4999")
    reason = body.get("reason", "closed by the fake's control")
    if not isinstance(reason, str) or len(reason.encode()) > 123:
        raise _ControlError("reason must be a string of at most 123 bytes")
    return {"closed": gw.close_all(code, reason, now)}


def _control_reconnect(gw: FakeGateway, _body: _ControlBody, now: float) -> _ControlBody:
    return {"reconnecting": gw.reconnect_all(now)}


def _control_drop(gw: FakeGateway, _body: _ControlBody, now: float) -> _ControlBody:
    return {"dropped": gw.drop_all(now)}


def _control_rest(gw: FakeGateway, _body: _ControlBody, _now: float) -> _ControlBody:
    return {"calls": [call.to_json() for call in gw.rest_calls]}


def _faults_json(gw: FakeGateway) -> _ControlBody:
    return {name: getattr(gw.faults, name) for name in _FAULT_KINDS}


def _control_get_faults(gw: FakeGateway, _body: _ControlBody, _now: float) -> _ControlBody:
    return {"faults": _faults_json(gw)}


def _control_set_faults(gw: FakeGateway, body: _ControlBody, _now: float) -> _ControlBody:
    try:
        for name, value in body.items():  # all checked first: a mistake changes nothing
            _check_fault(name, value)
    except ValueError as exc:
        raise _ControlError(str(exc)) from None
    for name, value in body.items():
        gw.set_fault(name, value)
    return {"faults": _faults_json(gw)}


def _control_help(_gw: FakeGateway, _body: _ControlBody, _now: float) -> _ControlBody:
    return {"endpoints": _HELP}


_HELP: Final[list[JSONValue]] = [
    (
        "POST /_fake/messages {kind: c2c|group|guild|direct, content, user?, group?, "
        "channel?, guild?, shard?}"
    ),
    "POST /_fake/close {code, reason?}",
    "POST /_fake/reconnect",
    "POST /_fake/drop",
    "GET /_fake/rest",
    "GET /_fake/faults",
    "POST /_fake/faults {name: value, ...}",
]
_CONTROL: Final[
    dict[tuple[str, str], Callable[[FakeGateway, _ControlBody, float], _ControlBody]]
] = {
    ("", "GET"): _control_help,
    ("messages", "POST"): _control_message,
    ("close", "POST"): _control_close,
    ("reconnect", "POST"): _control_reconnect,
    ("drop", "POST"): _control_drop,
    ("rest", "GET"): _control_rest,
    ("faults", "GET"): _control_get_faults,
    ("faults", "POST"): _control_set_faults,
}
