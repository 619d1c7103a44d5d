"""h2-style totality test: every public verb, in every lifecycle state, behaves.

For every (state, input) pair the call either succeeds and moves the connection along edges of
the transition table (each step reported by a StateChanged event, the events it causes after
it), or raises exactly LocalProtocolError and changes nothing. No other exception may escape,
outputs are always Commands or Events, and the timer is never in the past nor infinite. Late
reports (a transport the core gave up on, a request it no longer awaits) are ignored: no
output, nothing changed. Misuse (a wrong argument type, a missing or unknown argument) raises
in every state and leaves state, timer and the queued outputs alone. The pairs are checked
exhaustively (cheap) and, with Hypothesis, as random sequences of inputs from every state.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qqproto import (
    AbandonRequest,
    AbortTransport,
    CloseConnection,
    Command,
    Disconnected,
    Event,
    FailureKind,
    FatalStop,
    FetchGateway,
    FetchToken,
    GatewayConnection,
    HelloReceived,
    LocalProtocolError,
    OpenConnection,
    Output,
    PayloadTooLarge,
    ProtocolViolation,
    Ready,
    ReconnectScheduled,
    RequestIdentifyPermit,
    Resumed,
    SessionConfig,
    SessionSnapshot,
    SessionStartLimit,
    SessionState,
    StateChanged,
    ZombieDetected,
    _states,
)
from qqproto._diagram import edges
from qqproto._lifecycle import _Model
from tests.helpers import GATEWAY_URL, Driver

S = SessionState
SNAPSHOT = SessionSnapshot(session_id="S0", seq=41, shard=(0, 1), saved_at=0.0)

# (source, dest) of every state-changing edge of the table.
EDGES: frozenset[tuple[str, str]] = frozenset(
    (e.source, e.dest) for e in edges() if e.dest is not None and e.dest != e.source
)

# States that wait on the network: each must have a deadline (docs/design.md#inv-8), except
# PREPARING while it waits for an identify permit (the limiter owns that wait).
BOUNDED = frozenset(
    {
        S.PREPARING,
        S.CONNECTING,
        S.AWAITING_HELLO,
        S.IDENTIFYING,
        S.RESUMING,
        S.READY,
        S.ZOMBIE,
        S.CLOSING,
        S.BACKOFF,
    }
)
UNTIMED = frozenset({S.IDLE, S.STOPPED, S.ERROR})


# --------------------------------------------------------------------------- state builders


def _run_timer(drv: Driver) -> None:
    """Jump exactly to the next timer and run it (no float drift from now + delta)."""
    timer = drv.conn.get_timer()
    assert timer is not None
    drv.now = max(drv.now, timer)
    drv.conn.handle_timer(drv.now)
    drv.pump()


def _idle() -> Driver:
    return Driver()


def _preparing_token() -> Driver:
    drv = Driver(auto_token=False)
    drv.start()
    return drv


def _preparing_gateway() -> Driver:
    drv = Driver(auto_gateway=False)
    drv.start()
    return drv


def _preparing_permit() -> Driver:
    drv = Driver(auto_permit=False)
    drv.start()
    return drv


def _connecting() -> Driver:
    drv = Driver(auto_open=False)
    drv.start()
    return drv


def _awaiting_hello() -> Driver:
    drv = Driver()
    drv.start()
    return drv


def _awaiting_hello_with_session() -> Driver:
    drv = Driver(snapshot=SNAPSHOT)
    drv.start()
    return drv


def _identifying() -> Driver:
    drv = Driver()
    drv.start()
    drv.hello()
    return drv


def _resuming_from_snapshot() -> Driver:
    drv = Driver(snapshot=SNAPSHOT)
    drv.start()
    drv.hello()
    return drv


def _resuming_after_drop() -> Driver:
    drv = _ready()
    drv.now += 1.0
    drv.server_close(1006)
    _run_timer(drv)  # backoff elapses, the next connection opens at once
    drv.hello()
    return drv


def _ready() -> Driver:
    drv = Driver()
    drv.connect_ready()
    drv.dispatch(2, event_id="e2")
    return drv


def _ready_after_beat() -> Driver:
    drv = _ready()
    _run_timer(drv)  # the first beat is sent
    return drv


def _zombie() -> Driver:
    drv = Driver(echo_close=False)
    drv.connect_ready()
    _run_timer(drv)  # first beat
    _run_timer(drv)  # the second beat falls due unacknowledged: zombie
    return drv


def _closing_op7() -> Driver:
    drv = Driver(echo_close=False)
    drv.connect_ready()
    drv.recv({"op": 7})
    return drv


def _closing_user() -> Driver:
    drv = Driver(echo_close=False)
    drv.connect_ready()
    drv.conn.close(drv.now)
    drv.pump()
    return drv


def _backoff() -> Driver:
    drv = _ready()
    drv.now += 1.0
    drv.server_close(1006)
    return drv


def _backoff_before_open() -> Driver:
    drv = Driver(auto_token=False)
    drv.start()
    drv.conn.request_failed("HTTP 503", drv.now, request="token", kind=FailureKind.TRANSIENT)
    drv.pump()
    return drv


def _backoff_budget() -> Driver:
    # The identify limiter refused: a planned wait until the daily budget resets.
    drv = Driver(auto_permit=False)
    drv.start()
    drv.conn.refuse_identify("daily budget spent", drv.now, retry_after=3600.0)
    drv.pump()
    return drv


def _stopped_fatal() -> Driver:
    drv = _ready()
    drv.server_close(4914)
    return drv


def _stopped_credentials() -> Driver:
    drv = Driver(auto_token=False)
    drv.start()
    drv.conn.request_failed("error code 100016", drv.now, request="token", kind=FailureKind.FATAL)
    drv.pump()
    return drv


def _stopped_user() -> Driver:
    drv = Driver()
    drv.conn.close(drv.now)
    drv.pump()
    return drv


def _boom(*_args: object, **_kwargs: object) -> float:
    raise RuntimeError("injected internal failure")


def _error() -> Driver:
    drv = _ready()
    conn = drv.conn
    vars(conn)["_clock"] = _boom  # shadows the method on this instance only
    with pytest.raises(RuntimeError, match="injected"):
        conn.handle_timer(drv.now)
    del vars(conn)["_clock"]
    conn.drain()
    return drv


@dataclass(frozen=True)
class Builder:
    name: str
    build: Callable[[], Driver]
    state: SessionState

    def __repr__(self) -> str:
        return self.name


BUILDERS: list[Builder] = [
    Builder("IDLE", _idle, S.IDLE),
    Builder("PREPARING/token", _preparing_token, S.PREPARING),
    Builder("PREPARING/gateway", _preparing_gateway, S.PREPARING),
    Builder("PREPARING/permit", _preparing_permit, S.PREPARING),
    Builder("CONNECTING", _connecting, S.CONNECTING),
    Builder("AWAITING_HELLO", _awaiting_hello, S.AWAITING_HELLO),
    Builder("AWAITING_HELLO/session", _awaiting_hello_with_session, S.AWAITING_HELLO),
    Builder("IDENTIFYING", _identifying, S.IDENTIFYING),
    Builder("RESUMING/snapshot", _resuming_from_snapshot, S.RESUMING),
    Builder("RESUMING/drop", _resuming_after_drop, S.RESUMING),
    Builder("READY", _ready, S.READY),
    Builder("READY/beat-pending", _ready_after_beat, S.READY),
    Builder("ZOMBIE", _zombie, S.ZOMBIE),
    Builder("CLOSING/op7", _closing_op7, S.CLOSING),
    Builder("CLOSING/user", _closing_user, S.CLOSING),
    Builder("BACKOFF", _backoff, S.BACKOFF),
    Builder("BACKOFF/no-transport", _backoff_before_open, S.BACKOFF),
    Builder("BACKOFF/budget", _backoff_budget, S.BACKOFF),
    Builder("STOPPED/fatal", _stopped_fatal, S.STOPPED),
    Builder("STOPPED/credentials", _stopped_credentials, S.STOPPED),
    Builder("STOPPED/user", _stopped_user, S.STOPPED),
    Builder("ERROR", _error, S.ERROR),
]


def test_builders_cover_every_state_and_land_where_they_say() -> None:
    assert {b.state for b in BUILDERS} == set(SessionState)
    for builder in BUILDERS:
        drv = builder.build()
        conn = drv.conn
        assert conn.state is builder.state, builder.name
        timer = conn.get_timer()
        # Every builder leaves its timer strictly in the future, so "early" means early.
        assert timer is None or timer > drv.now, builder.name
    # The three PREPARING builders wait on three different things.
    assert _preparing_token().outputs[-1] == FetchToken(force=False)
    assert isinstance(_preparing_gateway().outputs[-1], FetchGateway)
    assert isinstance(_preparing_permit().outputs[-1], RequestIdentifyPermit)
    assert _preparing_permit().conn.get_timer() is None
    assert isinstance(_connecting().outputs[-1], OpenConnection)
    assert _backoff_budget().of(ReconnectScheduled)[-1].delay == 3600.0
    assert _stopped_credentials().of(FatalStop)
    assert _resuming_after_drop().sent[-1].op == 6
    assert _resuming_from_snapshot().sent[-1].d["session_id"] == "S0"


# -------------------------------------------------------------------------------- inputs


def _payload(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


HELLO = _payload({"op": 10, "d": {"heartbeat_interval": 45000}})
READY = _payload(
    {
        "op": 0,
        "s": 1,
        "t": "READY",
        "d": {"version": 1, "session_id": "S9", "user": {"id": "1", "bot": True}},
    }
)
RESUMED = _payload({"op": 0, "s": 50, "t": "RESUMED", "d": ""})
DISPATCH = _payload({"op": 0, "s": 60, "t": "C2C_MESSAGE_CREATE", "id": "ev60", "d": {"id": "m60"}})
ACK = _payload({"op": 11})
EXHAUSTED = SessionStartLimit(total=1000, remaining=0, reset_after=3600.0, max_concurrency=1)
FRESH_LIMIT = SessionStartLimit(total=1000, remaining=999, reset_after=3600.0, max_concurrency=1)
TOO_LARGE = SessionConfig().max_payload_size + 1

# One public call: ``run(conn, now, attempt)`` makes it and returns the ``now`` it passed.
# ``attempt`` is what a perfect driver holds: the ``OpenConnection.attempt`` of the last
# transport the core asked for (0 before the first).
Run = Callable[[GatewayConnection, float, int], float]


@dataclass(frozen=True)
class Input:
    name: str
    run: Run
    misuse: bool = False  # a wrong call: must raise LocalProtocolError in every state
    stale: bool = False  # a report about an older transport: ignored in every live state

    def __repr__(self) -> str:
        return self.name


def _call(fn: Callable[[GatewayConnection, float, int], object]) -> Run:
    def run(conn: GatewayConnection, now: float, attempt: int) -> float:
        fn(conn, now, attempt)
        return now

    return run


def _recv(payload: str | bytes) -> Run:
    return _call(lambda c, n, a: c.receive(payload, n, attempt=a))


def _closed(code: int | None) -> Run:
    return _call(lambda c, n, a: c.connection_closed(code, "server says so", n, attempt=a))


def _token(token: str, expires_in: float | str) -> Run:
    return _call(lambda c, n, a: c.provide_token(token, expires_in, n))


def _failed(request: str, kind: FailureKind) -> Run:
    return _call(lambda c, n, a: c.request_failed("HTTP 5xx", n, request=request, kind=kind))


def _at_timer(conn: GatewayConnection, now: float, attempt: int) -> float:
    timer = conn.get_timer()
    at = now if timer is None else max(timer, now)
    conn.handle_timer(at)
    return at


def _late(conn: GatewayConnection, now: float, attempt: int) -> float:
    # A driver that slept through a deadline (a stalled process) calls once, late.
    timer = conn.get_timer()
    at = now + 1000.0 if timer is None else max(timer, now) + 1000.0
    conn.handle_timer(at)
    return at


def _misuse(name: str, fn: Callable[[GatewayConnection, float, int], object]) -> Input:
    return Input(name, _call(fn), misuse=True)


def _stale(name: str, fn: Callable[[GatewayConnection, float, int], object]) -> Input:
    # The transport before the current one: what a driver reports after an AbortTransport.
    return Input(name, _call(lambda c, n, a: fn(c, n, a - 1)), stale=True)


INPUTS: list[Input] = [
    Input("start", _call(lambda c, n, a: c.start(n))),
    Input("provide_token(7200)", _token("T2", 7200)),
    Input("provide_token('7200')", _token("T2", "7200")),
    Input("provide_token('abc')", _token("T2", "abc")),
    Input("provide_token(0)", _token("T2", 0)),
    Input("provide_gateway", _call(lambda c, n, a: c.provide_gateway(GATEWAY_URL, n))),
    Input(
        "provide_gateway(limit)",
        _call(lambda c, n, a: c.provide_gateway(GATEWAY_URL, n, session_start_limit=FRESH_LIMIT)),
    ),
    Input(
        "provide_gateway(exhausted)",
        _call(lambda c, n, a: c.provide_gateway(GATEWAY_URL, n, session_start_limit=EXHAUSTED)),
    ),
    Input("grant_identify", _call(lambda c, n, a: c.grant_identify(n))),
    Input(
        "refuse_identify(3600)",
        _call(lambda c, n, a: c.refuse_identify("budget spent", n, retry_after=3600.0)),
    ),
    Input(
        "refuse_identify(0)",
        _call(lambda c, n, a: c.refuse_identify("budget resets now", n, retry_after=0)),
    ),
    Input(
        "refuse_identify(None)",
        _call(lambda c, n, a: c.refuse_identify("limiter down", n, retry_after=None)),
    ),
    *(
        Input(f"request_failed({request},{kind.name})", _failed(request, kind))
        for request in ("token", "gateway")
        for kind in FailureKind
    ),
    Input("connection_opened", _call(lambda c, n, a: c.connection_opened(n, attempt=a))),
    *(
        Input(f"connection_closed({code})", _closed(code))
        for code in (1000, 1006, None, 4009, 4004, 4008, 4914, 4013, 4902)
    ),
    Input("recv Hello", _recv(HELLO)),
    Input("recv Hello (bytes)", _recv(HELLO.encode())),
    Input("recv Hello interval 0", _recv(_payload({"op": 10, "d": {"heartbeat_interval": 0}}))),
    Input("recv READY", _recv(READY)),
    Input(
        "recv READY without session_id",
        _recv(_payload({"op": 0, "s": 1, "t": "READY", "d": {"version": 1}})),
    ),
    Input("recv RESUMED", _recv(RESUMED)),
    Input("recv dispatch", _recv(DISPATCH)),
    Input("recv dispatch no s", _recv(_payload({"op": 0, "t": "X", "d": {}}))),
    Input("recv dispatch no t", _recv(_payload({"op": 0, "s": 61, "d": {}}))),
    Input("recv ACK", _recv(ACK)),
    Input("recv op 1", _recv(_payload({"op": 1, "d": None}))),
    Input("recv op 7", _recv(_payload({"op": 7}))),
    Input("recv op 9 d=false", _recv(_payload({"op": 9, "d": False}))),
    Input("recv op 9 d=true", _recv(_payload({"op": 9, "d": True}))),
    Input("recv op 2", _recv(_payload({"op": 2, "d": {}}))),
    Input("recv op 99", _recv(_payload({"op": 99, "d": None}))),
    Input("recv malformed JSON", _recv('{"op": 0, "d": ')),
    Input("recv JSON array", _recv("[1, 2]")),
    Input("recv invalid UTF-8", _recv(b'{"op": 0, "d": "\xff\xfe"}')),
    Input("recv lone surrogate", _recv('{"op": 0, "t": "X", "d": "\ud800"}')),
    Input("recv oversized", _recv(" " * TOO_LARGE)),
    Input(
        "message_too_large",
        _call(lambda c, n, a: c.message_too_large(TOO_LARGE, n, attempt=a)),
    ),
    Input("handle_timer(get_timer())", _at_timer),
    Input("handle_timer(now)", _call(lambda c, n, a: c.handle_timer(n))),
    Input("handle_timer late", _late),
    Input("handle_timer(now - 100)", _call(lambda c, n, a: c.handle_timer(n - 100.0))),
    Input("close()", _call(lambda c, n, a: c.close(n))),
    Input("close(end_session=True)", _call(lambda c, n, a: c.close(n, end_session=True))),
    # Reports about the transport before the current one (aborted, or already closed).
    _stale("recv ACK (stale)", lambda c, n, a: c.receive(ACK, n, attempt=a)),
    _stale("recv op 7 (stale)", lambda c, n, a: c.receive('{"op": 7}', n, attempt=a)),
    _stale("connection_opened (stale)", lambda c, n, a: c.connection_opened(n, attempt=a)),
    _stale(
        "connection_closed(4914) (stale)",
        lambda c, n, a: c.connection_closed(4914, "", n, attempt=a),
    ),
    _stale(
        "message_too_large (stale)",
        lambda c, n, a: c.message_too_large(TOO_LARGE, n, attempt=a),
    ),
    # Misuse: wrong types, missing or unknown arguments.
    _misuse("provide_token('')", lambda c, n, a: c.provide_token("", 7200, n)),
    _misuse("provide_token(b'abc')", lambda c, n, a: c.provide_token(b"abc", 7200, n)),
    _misuse("provide_token(expires=None)", lambda c, n, a: c.provide_token("T2", None, n)),
    _misuse("provide_token(expires=True)", lambda c, n, a: c.provide_token("T2", True, n)),  # noqa: FBT003
    _misuse("provide_gateway(http://)", lambda c, n, a: c.provide_gateway("http://x/", n)),
    _misuse("provide_gateway(None)", lambda c, n, a: c.provide_gateway(None, n)),
    _misuse("provide_gateway(no host)", lambda c, n, a: c.provide_gateway("wss:///ws", n)),
    _misuse("provide_gateway(bad port)", lambda c, n, a: c.provide_gateway("ws://h:99999/", n)),
    _misuse("provide_gateway(port 0)", lambda c, n, a: c.provide_gateway("ws://h:0/", n)),
    _misuse("provide_gateway(space)", lambda c, n, a: c.provide_gateway("wss://h/a b", n)),
    _misuse(
        "provide_gateway(limit reset_after=inf)",
        lambda c, n, a: c.provide_gateway(
            GATEWAY_URL,
            n,
            session_start_limit=SessionStartLimit(
                total=1, remaining=0, reset_after=math.inf, max_concurrency=1
            ),
        ),
    ),
    _misuse(
        "provide_gateway(limit=dict)",
        lambda c, n, a: c.provide_gateway(GATEWAY_URL, n, session_start_limit={}),
    ),
    _misuse("grant_identify('now')", lambda c, n, a: c.grant_identify("0")),
    _misuse("refuse_identify(-1)", lambda c, n, a: c.refuse_identify("x", n, retry_after=-1.0)),
    _misuse(
        "refuse_identify(nan)", lambda c, n, a: c.refuse_identify("x", n, retry_after=math.nan)
    ),
    _misuse(
        "refuse_identify('60')",
        lambda c, n, a: c.refuse_identify("x", n, retry_after="60"),
    ),
    _misuse(
        "refuse_identify(reason=None)",
        lambda c, n, a: c.refuse_identify(None, n, retry_after=None),
    ),
    _misuse("refuse_identify without retry_after", lambda c, n, a: c.refuse_identify("x", n)),
    _misuse("request_failed without request", lambda c, n, a: c.request_failed("x", n)),
    _misuse(
        "request_failed without kind", lambda c, n, a: c.request_failed("x", n, request="token")
    ),
    _misuse(
        "request_failed(kind='auth')",
        lambda c, n, a: c.request_failed("x", n, request="token", kind="auth"),
    ),
    _misuse(
        "request_failed(request='permit')",
        lambda c, n, a: c.request_failed("x", n, request="permit", kind=FailureKind.TRANSIENT),
    ),
    _misuse(
        "request_failed(reason=None)",
        lambda c, n, a: c.request_failed(None, n, request="token", kind=FailureKind.TRANSIENT),
    ),
    _misuse("connection_opened without attempt", lambda c, n, a: c.connection_opened(n)),
    _misuse(
        "connection_opened(attempt=None)",
        lambda c, n, a: c.connection_opened(n, attempt=None),
    ),
    _misuse(
        "connection_closed('x')",
        lambda c, n, a: c.connection_closed("x", "", n, attempt=a),
    ),
    _misuse(
        "connection_closed(70000)", lambda c, n, a: c.connection_closed(70000, "", n, attempt=a)
    ),
    _misuse(
        "connection_closed(True)",
        lambda c, n, a: c.connection_closed(True, "", n, attempt=a),  # noqa: FBT003
    ),
    _misuse(
        "connection_closed(reason=None)",
        lambda c, n, a: c.connection_closed(1000, None, n, attempt=a),
    ),
    _misuse("connection_closed without attempt", lambda c, n, a: c.connection_closed(1000, "", n)),
    _misuse("receive(123)", lambda c, n, a: c.receive(123, n, attempt=a)),
    _misuse("receive(None)", lambda c, n, a: c.receive(None, n, attempt=a)),
    _misuse("receive(bytearray)", lambda c, n, a: c.receive(bytearray(ACK, "ascii"), n, attempt=a)),
    _misuse("receive without attempt", lambda c, n, a: c.receive(ACK, n)),
    _misuse("receive(attempt=True)", lambda c, n, a: c.receive(ACK, n, attempt=True)),
    _misuse("receive(attempt=1.0)", lambda c, n, a: c.receive(ACK, n, attempt=1.0)),
    _misuse("receive(stale, now='5')", lambda c, n, a: c.receive(ACK, "5", attempt=a - 1)),
    _misuse(
        "connection_closed(stale, now='5')",
        lambda c, n, a: c.connection_closed(1000, "", "5", attempt=a - 1),
    ),
    _misuse("receive(attempt='1')", lambda c, n, a: c.receive(ACK, n, attempt="1")),
    _misuse("receive(extra=1)", lambda c, n, a: c.receive(ACK, n, attempt=a, extra=1)),
    _misuse(
        "message_too_large('big')",
        lambda c, n, a: c.message_too_large("big", n, attempt=a),
    ),
    _misuse("message_too_large(-1)", lambda c, n, a: c.message_too_large(-1, n, attempt=a)),
    _misuse("message_too_large without attempt", lambda c, n, a: c.message_too_large(TOO_LARGE, n)),
    _misuse("handle_timer(nan)", lambda c, n, a: c.handle_timer(math.nan)),
    _misuse("handle_timer('5')", lambda c, n, a: c.handle_timer("5")),
    _misuse("handle_timer(True)", lambda c, n, a: c.handle_timer(True)),  # noqa: FBT003
    _misuse("handle_timer()", lambda c, n, a: c.handle_timer()),
    _misuse("start('0')", lambda c, n, a: c.start("0")),
    _misuse("close(end_session='yes')", lambda c, n, a: c.close(n, end_session="yes")),
    _misuse("close(end_session=1)", lambda c, n, a: c.close(n, end_session=1)),
    _misuse("close(unknown=1)", lambda c, n, a: c.close(n, unknown=1)),
]

ALWAYS_MISUSE = frozenset(i.name for i in INPUTS if i.misuse)
STALE = frozenset(i.name for i in INPUTS if i.stale)
# Where a transport exists, so that a received payload makes sense.
RECEIVING = frozenset({S.AWAITING_HELLO, S.IDENTIFYING, S.RESUMING, S.READY, S.ZOMBIE, S.CLOSING})
# No transport is expected: a transport report here is about one the core gave up on.
NO_TRANSPORT = frozenset({S.IDLE, S.PREPARING, S.BACKOFF, S.STOPPED})
TRANSPORT_REPORTS = ("recv", "message_too_large", "connection_opened", "connection_closed")
# The builder each answer or failure is awaited in; anywhere else it is a late one.
AWAITED_IN = {
    "request_failed(token": "PREPARING/token",
    "request_failed(gateway": "PREPARING/gateway",
    "refuse_identify": "PREPARING/permit",
    "grant_identify": "PREPARING/permit",
}


def misuse_expected(state: SessionState, name: str) -> bool:
    """Exactly the (state, input) pairs that must raise LocalProtocolError."""
    if state is S.ERROR or name in ALWAYS_MISUSE:
        return True
    if name in STALE:
        return False
    if name.startswith(("recv", "message_too_large")):
        # The transport is being opened: nothing can have been received yet.
        return state is S.CONNECTING
    if name == "start":
        return state is not S.IDLE
    if name == "connection_opened":
        return state in RECEIVING  # it is open already
    return False


def ignored_expected(builder: Builder, name: str) -> bool:
    """The (state, input) pairs that must be a no-op: no output, nothing changed."""
    state = builder.state
    if misuse_expected(state, name):
        return False
    if name in STALE:
        return True
    if name.startswith(TRANSPORT_REPORTS):
        return state in NO_TRANSPORT
    for prefix, where in AWAITED_IN.items():
        if name.startswith(prefix):
            return builder.name != where
    if name in ("handle_timer(now)", "handle_timer(now - 100)"):
        return True  # every builder leaves its timer strictly in the future
    if name.startswith("close"):
        return state is S.STOPPED
    return False


def test_inputs_cover_every_public_verb() -> None:
    verbs = {
        "start",
        "provide_token",
        "provide_gateway",
        "grant_identify",
        "refuse_identify",
        "request_failed",
        "connection_opened",
        "connection_closed",
        "receive",
        "message_too_large",
        "handle_timer",
        "close",
    }
    public = {
        name
        for name, value in inspect.getmembers(GatewayConnection)
        if not name.startswith("_") and callable(value)
    }
    assert public - {"drain", "get_timer", "snapshot", "health"} == verbs  # queries
    covered = {i.name.split("(")[0].split(" ")[0] for i in INPUTS}
    covered = {"receive" if c == "recv" else c for c in covered}
    assert verbs <= covered
    # Every verb also has a misuse, and every verb taking an attempt a stale report.
    misused = {i.name.split("(")[0].split(" ")[0] for i in INPUTS if i.misuse}
    assert verbs <= misused
    stale = {i.name.split("(")[0].split(" ")[0] for i in INPUTS if i.stale}
    stale = {"receive" if c == "recv" else c for c in stale}
    assert stale == {"receive", "message_too_large", "connection_opened", "connection_closed"}


# ---------------------------------------------------------------------------- the checks


def _check_outputs(outputs: list[Output]) -> None:
    for out in outputs:
        assert isinstance(out, Command | Event), out
        assert not (isinstance(out, Command) and isinstance(out, Event)), out
        assert dataclasses.is_dataclass(out), out
        assert vars(type(out))["__dataclass_params__"].frozen, out


# The state an event's StateChanged must have entered, when the input changed the state.
_ENTERED_BEFORE: dict[type, frozenset[SessionState]] = {
    HelloReceived: frozenset({S.IDENTIFYING, S.RESUMING}),
    Ready: frozenset({S.READY}),
    Resumed: frozenset({S.READY}),
    ZombieDetected: frozenset({S.ZOMBIE}),
    ReconnectScheduled: frozenset({S.BACKOFF}),
    FatalStop: frozenset({S.STOPPED}),
}


def _check_order(old: SessionState, outputs: list[Output]) -> None:
    """Event order: the StateChanged an input causes comes before the events of that input."""
    entered = old  # the state the latest StateChanged led into
    since_change = 0  # outputs since that StateChanged
    close_since_change = False
    settled = False  # in a BACKOFF / STOPPED entry: Disconnected first
    leaving: SessionState | None = None  # the state the latest StateChanged left
    for out in outputs:
        if isinstance(out, StateChanged):
            entered, since_change, close_since_change = out.new, 0, False
            settled = out.new in (S.BACKOFF, S.STOPPED)
            leaving = out.old
            continue
        since_change += 1
        kind = type(out)
        if kind in _ENTERED_BEFORE:
            assert entered in _ENTERED_BEFORE[kind], (
                f"{kind.__name__} after a change into {entered.name}",
                outputs,
            )
        if isinstance(out, CloseConnection):
            close_since_change = True
        if isinstance(out, ZombieDetected):
            assert close_since_change, ("ZombieDetected before its CloseConnection", outputs)
        if isinstance(out, AbandonRequest):
            # Right after leaving PREPARING, before anything the new state does.
            assert since_change == 1, ("AbandonRequest not right after a StateChanged", outputs)
            assert leaving is S.PREPARING, ("AbandonRequest outside of PREPARING", outputs)
        if isinstance(out, Disconnected):
            assert settled, ("Disconnected outside a BACKOFF / STOPPED entry", outputs)
            assert since_change == 1, ("Disconnected after what settling it caused", outputs)


def _check_chain(old: SessionState, outputs: list[Output], new: SessionState) -> None:
    """Every state change is reported, consecutive, and an edge of the table."""
    changes = [o for o in outputs if isinstance(o, StateChanged)]
    current = old
    for change in changes:
        assert change.old is current, (change, current)
        assert change.new is not change.old, change
        assert (change.old.name, change.new.name) in EDGES, change
        current = change.new
    assert current is new, (old, changes, new)
    _check_order(old, outputs)


def _check_timer(conn: GatewayConnection, now: float) -> None:
    timer = conn.get_timer()
    state = conn.state
    if timer is not None:
        assert isinstance(timer, float), timer
        assert math.isfinite(timer), timer
        assert timer >= now, (timer, now, state)
    if state in UNTIMED:
        assert timer is None, state
    elif state is S.PREPARING:
        # Waiting for a token or the gateway URL is bounded; the permit wait is not.
        assert (timer is None) == (conn._awaiting == "permit"), (conn._awaiting, timer)
    else:
        assert state in BOUNDED
        assert timer is not None, f"{state.name} waits with no deadline"
    # Nothing is awaited outside PREPARING: leaving it abandons (AbandonRequest) what was.
    assert state is S.PREPARING or conn._awaiting is None, (state, conn._awaiting)


def _observe(conn: GatewayConnection) -> tuple[Any, ...]:
    return (
        conn.state,
        conn.get_timer(),
        conn.session_id,
        conn.seq,
        conn.heartbeat_interval,
        conn.last_ack_at,
        conn.consecutive_failures,
    )


def _next_attempt(attempt: int, outputs: list[Output]) -> int:
    for out in outputs:
        if isinstance(out, OpenConnection):
            attempt = out.attempt
    return attempt


def _apply(conn: GatewayConnection, inp: Input, now: float, attempt: int) -> tuple[float, int]:
    """Make one call and check everything; return the clock and the attempt after it."""
    old = conn.state
    before = _observe(conn)
    try:
        used = inp.run(conn, now, attempt)
    except LocalProtocolError:
        assert _observe(conn) == before, inp
        assert conn.drain() == [], inp
        return now, attempt
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(exc).__name__} escaped from {inp!r} in {old.name}: {exc}")
    assert not inp.misuse, f"{inp!r} was accepted in {old.name}"
    assert old is not S.ERROR, f"{inp!r} was accepted in ERROR"
    outputs = conn.drain()
    if inp.stale:
        assert outputs == [], (inp, outputs)
        assert _observe(conn) == before, inp
    _check_outputs(outputs)
    _check_chain(old, outputs, conn.state)
    violations = [o for o in outputs if isinstance(o, ProtocolViolation)]
    if violations and inp.name.startswith(("recv", "message_too_large")):
        # A rejected payload is skipped: state and sequence intact (invariant 11).
        assert conn.state is old, inp
        assert _observe(conn) == before, inp
    _check_timer(conn, max(used, now))
    assert conn.drain() == []
    return max(used, now), _next_attempt(attempt, outputs)


def _still_usable(conn: GatewayConnection, now: float) -> None:
    """After anything, the connection still answers and can be closed down to STOPPED."""
    conn.get_timer()
    conn.drain()
    if conn.state is S.ERROR:
        with pytest.raises(LocalProtocolError, match="unusable"):
            conn.close(now)
        return
    conn.close(now)
    outputs = conn.drain()
    _check_outputs(outputs)
    # Closing needs at most the close timeout: run the timers (no server answers).
    for _ in range(4):
        timer = conn.get_timer()
        if timer is None:
            break
        now = max(now, timer)
        conn.handle_timer(now)
        outputs = conn.drain()
        _check_outputs(outputs)
        assert not any(isinstance(o, OpenConnection) for o in outputs)
    assert conn.state is S.STOPPED
    assert conn.get_timer() is None


def _expect_specific(builder: Builder, inp: Input, awaited: str | None, outs: list[Output]) -> None:
    """What the verbs with a documented consequence must do where they are not ignored."""
    name = inp.name
    kinds = [type(o) for o in outs]
    if name.startswith("request_failed") and not ignored_expected(builder, name):
        # The failed request is done, not abandoned; FATAL stops, the others back off.
        assert AbandonRequest not in kinds, outs
        if name.endswith("FATAL)"):
            assert kinds.count(FatalStop) == 1, outs
            assert ReconnectScheduled not in kinds, outs
        else:
            assert kinds.count(ReconnectScheduled) == 1, outs
            assert FatalStop not in kinds, outs
    if name.startswith("refuse_identify") and not ignored_expected(builder, name):
        assert AbandonRequest not in kinds, outs
        (scheduled,) = (o for o in outs if isinstance(o, ReconnectScheduled))
        if name == "refuse_identify(3600)":
            assert scheduled.delay == 3600.0, scheduled
        else:  # "retry now" (0) backs off like a failure: no tight loop
            assert 0 < scheduled.delay <= SessionConfig().backoff_base, scheduled
    if name == "message_too_large" and builder.state in RECEIVING:
        (violation,) = outs
        assert isinstance(violation, ProtocolViolation), outs
        assert isinstance(violation.error, PayloadTooLarge), violation
        assert violation.error.size == TOO_LARGE
    if builder.state is S.PREPARING and awaited is not None:
        # Leaving PREPARING by a deadline or close() abandons what was awaited, at once.
        leaves = name.startswith("close") or (
            name in ("handle_timer late", "handle_timer(get_timer())") and awaited != "permit"
        )
        if leaves:
            assert isinstance(outs[0], StateChanged), outs
            assert outs[0].old is S.PREPARING, outs
            assert outs[1] == AbandonRequest(request=awaited), outs


# Misuse is checked per builder below (all of it in one test: it raises before anything
# else, whatever the input); here, every other input in every state.
PAIRS = [(b, i) for b in BUILDERS for i in INPUTS if not i.misuse]


@pytest.mark.parametrize(("builder", "inp"), PAIRS, ids=[f"{b.name}-{i.name}" for b, i in PAIRS])
def test_every_input_in_every_state(builder: Builder, inp: Input) -> None:
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    old = conn.state
    awaited = conn._awaiting
    before = _observe(conn)
    raised = False
    outs: list[Output] = []
    try:
        inp.run(conn, drv.now, drv.attempt)
    except LocalProtocolError:
        raised = True
    except Exception:  # noqa: BLE001, S110 - re-run below through _apply, which reports it
        pass
    else:
        outs = conn.drain()
    assert raised == misuse_expected(old, inp.name), (old, inp, raised)
    if ignored_expected(builder, inp.name):
        assert outs == [], (old, inp, outs)
        assert _observe(conn) == before, (old, inp)
    elif not raised:
        _expect_specific(builder, inp, awaited, outs)
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    now, _ = _apply(conn, inp, drv.now, drv.attempt)
    _still_usable(conn, now)


def _outputs_repr(conn: GatewayConnection) -> list[str]:
    return [repr(o) for o in conn.drain()]


MISUSES = [i for i in INPUTS if i.misuse]


@pytest.mark.parametrize("builder", [b for b in BUILDERS if b.state is not S.ERROR], ids=repr)
def test_misuse_leaves_queued_outputs_and_what_follows_alone(builder: Builder) -> None:
    # Twins from the same seed: one gets every misuse, between a call whose outputs are still
    # queued and the next calls; both must then produce exactly the same outputs. (In ERROR
    # every call raises: test_internal_error_moves_to_error_once_then_fails_fast.)
    def twin() -> tuple[Driver, GatewayConnection]:
        drv = builder.build()
        drv.conn.drain()
        return drv, drv.conn

    drv, conn = twin()
    _, control = twin()
    assert conn.state is builder.state
    for queued in (False, True):
        if queued:
            at = max(conn._now, control._now)
            for c in (conn, control):  # queue whatever the next deadline does, undrained
                _late(c, at, drv.attempt)
        for inp in MISUSES:
            before = _observe(conn)
            with pytest.raises(LocalProtocolError):
                inp.run(conn, conn._now, drv.attempt)
            assert _observe(conn) == before, (inp, queued)
        assert _outputs_repr(conn) == _outputs_repr(control), queued
        assert _observe(conn) == _observe(control), queued
    now = max(conn._now, control._now)
    for c in (conn, control):
        _late(c, now, drv.attempt)
        c.close(now + 2000.0)
    assert _outputs_repr(conn) == _outputs_repr(control)
    assert _observe(conn) == _observe(control)


_STEP = st.sampled_from(INPUTS)
_DT = st.sampled_from([0.0, 0.001, 0.5, 3.0, 29.9, 45.0])


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(builder=st.sampled_from(BUILDERS), inp=st.sampled_from(INPUTS))
def test_totality_hypothesis(builder: Builder, inp: Input) -> None:
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    now, _ = _apply(conn, inp, drv.now, drv.attempt)
    _still_usable(conn, now)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    builder=st.sampled_from(BUILDERS),
    steps=st.lists(st.tuples(_DT, _STEP), min_size=1, max_size=12),
)
def test_totality_over_sequences(builder: Builder, steps: list[tuple[float, Input]]) -> None:
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    now, attempt = drv.now, drv.attempt
    for dt, inp in steps:
        # A perfect driver never lets its clock run past a due timer without calling
        # handle_timer: at most it reaches the deadline, and the next input may be anything.
        timer = conn.get_timer()
        now = now + dt if timer is None else max(now, min(now + dt, timer))
        now, attempt = _apply(conn, inp, now, attempt)
    _still_usable(conn, now)


# ------------------------------------------------------------------------------ ERROR


@pytest.mark.parametrize("builder", [b for b in BUILDERS if b.state is not S.ERROR], ids=repr)
def test_internal_error_moves_to_error_once_then_fails_fast(builder: Builder) -> None:
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    vars(conn)["_clock"] = _boom  # shadows the method on this instance only
    with pytest.raises(RuntimeError, match="injected") as raised:
        conn.close(drv.now)
    del vars(conn)["_clock"]
    assert conn.state is S.ERROR
    assert conn.get_timer() is None
    conn.drain()
    for inp in INPUTS:
        with pytest.raises(LocalProtocolError, match="unusable") as info:
            inp.run(conn, drv.now + 1.0, drv.attempt)
        assert info.value.__cause__ is raised.value
        assert conn.state is S.ERROR
        assert conn.drain() == []
        assert conn.get_timer() is None


def test_error_raised_inside_an_entry_action_mid_transition() -> None:
    # The failure happens after pytransitions moved the model (READY -> BACKOFF), inside the
    # settle step: the connection must still end up in ERROR, not stuck in BACKOFF.
    drv = _ready()
    conn = drv.conn
    vars(conn)["_settle"] = _boom
    with pytest.raises(RuntimeError, match="injected"):
        conn.connection_closed(1006, "", drv.now + 1.0, attempt=drv.attempt)
    assert conn.state is S.ERROR
    assert conn.get_timer() is None
    with pytest.raises(LocalProtocolError, match="unusable"):
        conn.connection_closed(1006, "", drv.now + 2.0, attempt=drv.attempt)
    with pytest.raises(LocalProtocolError, match="unusable"):
        conn.receive(DISPATCH, drv.now + 2.0, attempt=drv.attempt)
    with pytest.raises(LocalProtocolError, match="unusable"):
        conn.close(drv.now + 2.0)
    assert conn.state is S.ERROR


def test_error_raised_on_the_dispatch_hot_path() -> None:
    drv = _ready()
    conn = drv.conn
    vars(conn)["_on_dispatch"] = _boom
    with pytest.raises(RuntimeError, match="injected"):
        conn.receive(DISPATCH, drv.now, attempt=drv.attempt)
    assert conn.state is S.ERROR
    with pytest.raises(LocalProtocolError, match="unusable"):
        conn.handle_timer(drv.now + 100.0)


def test_local_protocol_errors_do_not_break_the_connection() -> None:
    drv = _ready()
    conn = drv.conn
    for _ in range(3):
        with pytest.raises(LocalProtocolError):
            conn.start(drv.now)
        with pytest.raises(LocalProtocolError):
            conn.connection_opened(drv.now, attempt=drv.attempt)  # open already
        with pytest.raises(LocalProtocolError, match="attempt"):
            conn.connection_opened(drv.now)  # the call itself is wrong: a TypeError, turned
        with pytest.raises(LocalProtocolError, match="unexpected keyword"):
            conn.receive(DISPATCH, drv.now, attempt=drv.attempt, late=True)
    assert conn.state is S.READY
    drv.dispatch(3)
    assert conn.seq == 3


def _type_error(*_args: object, **_kwargs: object) -> float:
    raise TypeError("injected type error")


@pytest.mark.parametrize(
    "call",
    [
        lambda c, d: c.handle_timer(d.now),
        lambda c, d: c.receive(DISPATCH, d.now, attempt=d.attempt),
        lambda c, d: c.close(d.now),
    ],
    ids=["handle_timer", "receive", "close"],
)
def test_a_type_error_inside_a_verb_is_an_internal_error(call: Callable[..., None]) -> None:
    # Only a TypeError raised by the call itself (its arguments) is misuse; one raised from
    # inside the method is a bug, and the connection moves to ERROR like for any other.
    drv = _ready()
    conn = drv.conn
    vars(conn)["_clock"] = _type_error
    with pytest.raises(TypeError, match="injected"):
        call(conn, drv)
    del vars(conn)["_clock"]
    assert conn.state is S.ERROR
    assert isinstance(conn.drain()[-1], StateChanged)
    with pytest.raises(LocalProtocolError, match="unusable"):
        conn.handle_timer(drv.now + 1.0)


# ----------------------------------------------------------------------------- timers


TIMED = [b for b in BUILDERS if b.state in BOUNDED and b.name != "PREPARING/permit"]


@pytest.mark.parametrize("builder", TIMED, ids=repr)
def test_handle_timer_early_does_nothing(builder: Builder) -> None:
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    timer = conn.get_timer()
    assert timer is not None
    before = (conn.state, conn.seq)
    for at in (drv.now, (drv.now + timer) / 2, timer - 1e-6):
        conn.handle_timer(at)
        assert conn.drain() == []
        assert (conn.state, conn.seq) == before
        assert conn.get_timer() == timer


@pytest.mark.parametrize("builder", [b for b in BUILDERS if b.state is not S.ERROR], ids=repr)
def test_running_every_timer_never_spins_and_never_goes_back(builder: Builder) -> None:
    # With no server answering, each timer moves strictly forward and the connection keeps
    # cycling through bounded waits (or stays put) - never a deadline in the past.
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    now = drv.now
    for _ in range(40):
        timer = conn.get_timer()
        if timer is None:
            break
        assert timer >= now
        now = timer
        old = conn.state
        conn.handle_timer(now)
        outputs = conn.drain()
        _check_outputs(outputs)
        _check_chain(old, outputs, conn.state)
        _check_timer(conn, now)
    assert conn.state is not S.ERROR


@pytest.mark.parametrize("kind", list(FailureKind), ids=lambda k: k.name)
@pytest.mark.parametrize("builder", [_preparing_token, _preparing_gateway], ids=["token", "gw"])
def test_what_follows_a_failed_request(builder: Callable[[], Driver], kind: FailureKind) -> None:
    drv = builder()
    conn = drv.conn
    request = conn._awaiting
    assert request in ("token", "gateway")
    conn.request_failed("HTTP 4xx", drv.now, request=request, kind=kind)
    drv.pump()
    if kind is FailureKind.FATAL:
        assert conn.state is S.STOPPED
        assert conn.get_timer() is None
        (fatal,) = drv.of(FatalStop)
        assert fatal.hint
        return
    assert conn.state is S.BACKOFF
    _run_timer(drv)  # the backoff: PREPARING again, token first
    fetches = drv.of(FetchToken)
    # AUTH (a 401) always fetches a fresh token; TRANSIENT keeps a token still valid.
    assert fetches[-1].force is (kind is FailureKind.AUTH)
    assert len(fetches) == (2 if kind is FailureKind.AUTH or request == "token" else 1)


def test_a_refused_permit_is_a_planned_wait_and_a_failed_one_a_failure() -> None:
    budget = SessionConfig().liveness_budget
    refused = _backoff_budget()
    conn = refused.conn
    assert conn.consecutive_failures == 0  # not a failure: the budget is spent
    health = conn.health(refused.now + budget + 1.0)
    assert health.live
    assert "identify budget" in health.reason
    failed = _preparing_permit()
    failed.conn.refuse_identify("limiter down", failed.now, retry_after=None)
    failed.pump()
    assert failed.conn.state is S.BACKOFF
    assert failed.conn.consecutive_failures == 1
    assert not failed.conn.health(failed.now + budget + 1.0).live


def test_transport_close_is_reported_after_close_connection() -> None:
    drv = _closing_op7()
    conn = drv.conn
    closes = drv.of(CloseConnection)
    assert [c.code for c in closes] == [4000]
    conn.connection_closed(4000, "", drv.now + 0.1, attempt=drv.attempt)
    outputs = conn.drain()
    _check_chain(S.CLOSING, outputs, conn.state)
    assert conn.state is S.BACKOFF
    assert not any(isinstance(o, AbortTransport) for o in outputs)


# ------------------------------------------------------------------------ the table itself


def _guards(spec: dict[str, Any]) -> list[str]:
    return [str(c) for c in spec.get("conditions", [])] + [str(c) for c in spec.get("unless", [])]


def test_every_guard_is_declared_and_is_a_model_method() -> None:
    named = {g for spec in _states.TRANSITIONS for g in _guards(dict(spec))}
    assert named, "the table has guards"
    assert named <= set(_states.GUARDS)
    assert set(_states.GUARDS) <= named, "a declared guard is never used"
    for guard in _states.GUARDS:
        assert callable(getattr(_Model, guard, None)), guard
        model = GatewayConnection(rng=random.Random(0))._model
        assert isinstance(getattr(model, guard)(), bool), guard


def test_every_trigger_is_in_the_trigger_literal_and_vice_versa() -> None:
    literal = set(get_args(_states.Trigger))
    used = {spec["trigger"] for spec in _states.TRANSITIONS}
    assert used <= literal
    assert literal <= used, f"triggers never used: {literal - used}"


def test_sources_and_destinations_are_session_states() -> None:
    for spec in _states.TRANSITIONS:
        sources = spec["source"]
        assert isinstance(sources, list)
        assert sources
        for source in sources:
            assert isinstance(source, SessionState)
        dest = spec["dest"]
        assert dest is None or isinstance(dest, SessionState)


def test_auto_transitions_are_off() -> None:
    conn = GatewayConnection(rng=random.Random(0))
    assert not hasattr(conn._model, "to_READY")
    assert not any(name.startswith("to_") for name in conn._machine.events)
    assert conn._machine.auto_transitions is False
    assert set(conn._machine.events) == set(get_args(_states.Trigger))


def test_every_guarded_spec_has_a_fallback_after_it() -> None:
    # pytransitions fails silently when no spec matches: a guarded spec for (trigger, source)
    # must be followed by an unguarded one for the same pair.
    for i, spec in enumerate(_states.TRANSITIONS):
        if not _guards(dict(spec)):
            continue
        for source in spec["source"]:
            later = [
                s
                for s in _states.TRANSITIONS[i + 1 :]
                if s["trigger"] == spec["trigger"] and source in s["source"]
            ]
            assert later, (spec["trigger"], source)
            assert not _guards(dict(later[0])), (spec["trigger"], source)


def test_every_state_is_reachable_and_stopped_reachable_from_every_live_state() -> None:
    graph: dict[str, set[str]] = {}
    for source, dest in EDGES:
        graph.setdefault(source, set()).add(dest)

    def reach(start: str) -> set[str]:
        seen = {start}
        todo = [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert reach("IDLE") == {s.name for s in SessionState}
    for state in SessionState:
        if state is not S.ERROR:
            assert "STOPPED" in reach(state.name), state
            assert "ERROR" in reach(state.name), state
    assert graph.get("ERROR", set()) == set(), "ERROR is terminal"
    assert graph.get("STOPPED", set()) == {"ERROR"}, "STOPPED is terminal by policy"


@pytest.mark.parametrize("bad_now", [math.inf, 1e300])
def test_absurd_now_is_rejected_as_misuse(bad_now: float) -> None:
    drv = _ready()
    conn = drv.conn
    with pytest.raises(LocalProtocolError):
        conn.handle_timer(bad_now)
    assert conn.state is S.READY


# ----------------------------------------------------------- misuse the core once let through
# Each found while bringing these tests to the verbs with required arguments: a wrong call
# the rule "LocalProtocolError, and nothing changed" covers, which the core once accepted or
# turned into ERROR.


@pytest.mark.parametrize("attempt", [True, 1.0], ids=["True", "1.0"])
def test_receive_refuses_an_attempt_that_only_equals_the_live_one(attempt: object) -> None:
    drv = _ready()
    assert drv.attempt == 1
    with pytest.raises(LocalProtocolError):
        drv.conn.receive(DISPATCH, drv.now, attempt=attempt)
    assert drv.conn.drain() == []
    assert drv.conn.seq == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda c, a: c.receive(ACK, "garbage", attempt=a),
        lambda c, a: c.connection_closed(1000, "", "garbage", attempt=a),
        lambda c, a: c.connection_opened("garbage", attempt=a),
        lambda c, a: c.message_too_large(TOO_LARGE, "garbage", attempt=a),
    ],
    ids=["receive", "connection_closed", "connection_opened", "message_too_large"],
)
def test_a_stale_report_with_a_wrong_now_is_misuse(call: Callable[..., None]) -> None:
    drv = _ready()
    with pytest.raises(LocalProtocolError):
        call(drv.conn, drv.attempt - 1)
    assert drv.conn.drain() == []
    assert drv.conn.state is S.READY


def test_an_expires_in_too_large_for_a_float_is_a_violation() -> None:
    drv = _preparing_token()
    drv.conn.provide_token("T2", 10**400, drv.now)
    assert drv.conn.state is S.PREPARING
    assert isinstance(drv.conn.drain()[0], ProtocolViolation)


@pytest.mark.parametrize(
    ("remaining", "reset_after"),
    [(0, math.inf), (0, math.nan), (0, -1.0), (0, "60"), ("0", 60.0), (True, 60.0)],
    ids=["inf", "nan", "negative", "str", "remaining str", "remaining bool"],
)
def test_a_start_limit_with_bad_fields_is_refused(remaining: object, reset_after: object) -> None:
    # An infinite reset_after once scheduled an infinite timer; a str one moved to ERROR.
    drv = _preparing_gateway()
    limit = SessionStartLimit(
        total=1, remaining=remaining, reset_after=reset_after, max_concurrency=1
    )
    with pytest.raises(LocalProtocolError):
        drv.conn.provide_gateway(GATEWAY_URL, drv.now, session_start_limit=limit)
    assert drv.conn.state is S.PREPARING
    assert drv.conn.drain() == []
    drv.conn.provide_gateway(GATEWAY_URL, drv.now)  # still waiting for it, still usable
    assert isinstance(drv.conn.drain()[-1], RequestIdentifyPermit)
