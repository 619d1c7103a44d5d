"""h2-style totality test: every public verb, in every lifecycle state, behaves.

For every (state, input) pair the call either succeeds and moves the connection along edges of
the transition table (each step reported by a StateChanged event), or raises exactly
LocalProtocolError and changes nothing. No other exception may escape, outputs are always
Commands or Events, and the timer is never in the past nor infinite. The pairs are checked
exhaustively (cheap) and, with Hypothesis, as random sequences of inputs from every state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qqproto import (
    AbortTransport,
    CloseConnection,
    Command,
    Event,
    FetchGateway,
    FetchToken,
    GatewayConnection,
    LocalProtocolError,
    OpenConnection,
    Output,
    ProtocolViolation,
    RequestIdentifyPermit,
    SessionConfig,
    SessionSnapshot,
    SessionStartLimit,
    SessionState,
    StateChanged,
    _states,
)
from qqproto._connection import _Model
from qqproto._diagram import edges
from tests.helpers import GATEWAY_URL, Driver

if TYPE_CHECKING:
    from collections.abc import Callable

S = SessionState
SNAPSHOT = SessionSnapshot(session_id="S0", seq=41, shard=(0, 1), saved_at=0.0)

# (source, dest) of every state-changing edge of the table.
EDGES: frozenset[tuple[str, str]] = frozenset(
    (e.source, e.dest) for e in edges() if e.dest is not None and e.dest != e.source
)

# States that wait on the network: each must have a deadline (DESIGN invariant 8), except
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
    drv.conn.request_failed("HTTP 503", drv.now)
    drv.pump()
    return drv


def _stopped_fatal() -> Driver:
    drv = _ready()
    drv.server_close(4914)
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
    Builder("STOPPED/fatal", _stopped_fatal, S.STOPPED),
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
EXHAUSTED = SessionStartLimit(total=1000, remaining=0, reset_after=3600.0, max_concurrency=1)
FRESH_LIMIT = SessionStartLimit(total=1000, remaining=999, reset_after=3600.0, max_concurrency=1)


@dataclass(frozen=True)
class Input:
    """One public call. ``run(conn, now)`` makes it and returns the ``now`` it passed."""

    name: str
    run: Callable[[GatewayConnection, float], float]

    def __repr__(self) -> str:
        return self.name


def _recv(payload: str | bytes) -> Callable[[GatewayConnection, float], float]:
    def run(conn: GatewayConnection, now: float) -> float:
        conn.receive(payload, now)
        return now

    return run


def _closed(code: int | None) -> Callable[[GatewayConnection, float], float]:
    def run(conn: GatewayConnection, now: float) -> float:
        conn.connection_closed(code, "server says so", now)
        return now

    return run


def _token(token: str, expires_in: float | str) -> Callable[[GatewayConnection, float], float]:
    def run(conn: GatewayConnection, now: float) -> float:
        conn.provide_token(token, expires_in, now)
        return now

    return run


def _at_timer(conn: GatewayConnection, now: float) -> float:
    timer = conn.get_timer()
    at = now if timer is None else max(timer, now)
    conn.handle_timer(at)
    return at


def _late(conn: GatewayConnection, now: float) -> float:
    # A driver that slept through a deadline (a stalled process) calls once, late.
    timer = conn.get_timer()
    at = now + 1000.0 if timer is None else max(timer, now) + 1000.0
    conn.handle_timer(at)
    return at


def _call(fn: Callable[[GatewayConnection, float], object]) -> Callable[..., float]:
    def run(conn: GatewayConnection, now: float) -> float:
        fn(conn, now)
        return now

    return run


INPUTS: list[Input] = [
    Input("start", _call(lambda c, n: c.start(n))),
    Input("provide_token(7200)", _token("T2", 7200)),
    Input("provide_token('7200')", _token("T2", "7200")),
    Input("provide_token('abc')", _token("T2", "abc")),
    Input("provide_token(0)", _token("T2", 0)),
    Input("provide_token('')", _token("", 7200)),
    Input("provide_gateway", _call(lambda c, n: c.provide_gateway(GATEWAY_URL, n))),
    Input(
        "provide_gateway(limit)",
        _call(lambda c, n: c.provide_gateway(GATEWAY_URL, n, session_start_limit=FRESH_LIMIT)),
    ),
    Input(
        "provide_gateway(exhausted)",
        _call(lambda c, n: c.provide_gateway(GATEWAY_URL, n, session_start_limit=EXHAUSTED)),
    ),
    Input("provide_gateway(http://)", _call(lambda c, n: c.provide_gateway("http://x/", n))),
    Input("grant_identify", _call(lambda c, n: c.grant_identify(n))),
    Input("request_failed", _call(lambda c, n: c.request_failed("HTTP 502", n))),
    Input("connection_opened", _call(lambda c, n: c.connection_opened(n))),
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
    Input("recv ACK", _recv(_payload({"op": 11}))),
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
    Input("recv oversized", _recv(" " * (SessionConfig().max_payload_size + 1))),
    Input("handle_timer(get_timer())", _at_timer),
    Input("handle_timer(now)", _call(lambda c, n: c.handle_timer(n))),
    Input("handle_timer late", _late),
    Input("handle_timer(now - 100)", _call(lambda c, n: c.handle_timer(n - 100.0))),
    Input("handle_timer(nan)", _call(lambda c, n: c.handle_timer(math.nan))),
    Input("close()", _call(lambda c, n: c.close(n))),
    Input("close(end_session=True)", _call(lambda c, n: c.close(n, end_session=True))),
]

# Calls that are misuse in every state: they must raise and change nothing.
ALWAYS_MISUSE = frozenset({"provide_token('')", "provide_gateway(http://)", "handle_timer(nan)"})
# Where a transport exists, so that a received payload makes sense.
RECEIVING = frozenset({S.AWAITING_HELLO, S.IDENTIFYING, S.RESUMING, S.READY, S.ZOMBIE, S.CLOSING})


def misuse_expected(state: SessionState, name: str) -> bool:
    """Exactly the (state, input) pairs that must raise LocalProtocolError."""
    if state is S.ERROR or name in ALWAYS_MISUSE:
        return True
    if name.startswith("recv"):
        return state not in RECEIVING
    if name == "start":
        return state is not S.IDLE
    if name == "connection_opened":
        return state is not S.CONNECTING
    if name.startswith("connection_closed"):
        return state is S.IDLE  # nothing was ever opened
    return False


def test_inputs_cover_every_public_verb() -> None:
    verbs = {
        "start",
        "provide_token",
        "provide_gateway",
        "grant_identify",
        "request_failed",
        "connection_opened",
        "connection_closed",
        "receive",
        "handle_timer",
        "close",
    }
    public = {
        name
        for name, value in vars(GatewayConnection).items()
        if not name.startswith("_") and callable(value)
    }
    assert public - {"drain", "get_timer", "snapshot", "health"} == verbs  # queries
    covered = {i.name.split("(")[0].split(" ")[0] for i in INPUTS}
    covered = {"receive" if c == "recv" else c for c in covered}
    assert verbs <= covered


# ---------------------------------------------------------------------------- the checks


def _check_outputs(outputs: list[Output]) -> None:
    for out in outputs:
        assert isinstance(out, Command | Event), out
        assert not (isinstance(out, Command) and isinstance(out, Event)), out
        assert dataclasses.is_dataclass(out), out
        assert vars(type(out))["__dataclass_params__"].frozen, out


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


def _apply(conn: GatewayConnection, inp: Input, now: float) -> float:
    """Make one call and check everything; return the clock after it."""
    old = conn.state
    timer_before = conn.get_timer()
    seq_before = conn.seq
    try:
        used = inp.run(conn, now)
    except LocalProtocolError:
        assert conn.state is old, (inp, old, conn.state)
        assert conn.drain() == [], inp
        assert conn.get_timer() == timer_before, inp
        assert conn.seq == seq_before, inp
        return now
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(exc).__name__} escaped from {inp!r} in {old.name}: {exc}")
    assert inp.name not in ALWAYS_MISUSE, f"{inp!r} was accepted in {old.name}"
    assert old is not S.ERROR, f"{inp!r} was accepted in ERROR"
    outputs = conn.drain()
    _check_outputs(outputs)
    _check_chain(old, outputs, conn.state)
    if any(isinstance(o, ProtocolViolation) for o in outputs) and inp.name.startswith("recv"):
        # A rejected payload is skipped: state and sequence intact (invariant 11).
        assert conn.state is old, inp
        assert conn.seq == seq_before, inp
    _check_timer(conn, max(used, now))
    assert conn.drain() == []
    return max(used, now)


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


PAIRS = [(b, i) for b in BUILDERS for i in INPUTS]


@pytest.mark.parametrize(("builder", "inp"), PAIRS, ids=[f"{b.name}-{i.name}" for b, i in PAIRS])
def test_every_input_in_every_state(builder: Builder, inp: Input) -> None:
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    old = conn.state
    raised = False
    try:
        inp.run(conn, drv.now)
    except LocalProtocolError:
        raised = True
    except Exception:  # noqa: BLE001, S110 - re-run below through _apply, which reports it
        pass
    assert raised == misuse_expected(old, inp.name), (old, inp, raised)
    drv = builder.build()
    conn = drv.conn
    conn.drain()
    now = _apply(conn, inp, drv.now)
    _still_usable(conn, now)


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
    now = _apply(conn, inp, drv.now)
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
    now = drv.now
    for dt, inp in steps:
        # A perfect driver never lets its clock run past a due timer without calling
        # handle_timer: at most it reaches the deadline, and the next input may be anything.
        timer = conn.get_timer()
        now = now + dt if timer is None else max(now, min(now + dt, timer))
        now = _apply(conn, inp, now)
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
            inp.run(conn, drv.now + 1.0)
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
        conn.connection_closed(1006, "", drv.now + 1.0)
    assert conn.state is S.ERROR
    assert conn.get_timer() is None
    with pytest.raises(LocalProtocolError, match="unusable"):
        conn.connection_closed(1006, "", drv.now + 2.0)
    with pytest.raises(LocalProtocolError, match="unusable"):
        conn.receive(DISPATCH, drv.now + 2.0)
    with pytest.raises(LocalProtocolError, match="unusable"):
        conn.close(drv.now + 2.0)
    assert conn.state is S.ERROR


def test_error_raised_on_the_dispatch_hot_path() -> None:
    drv = _ready()
    conn = drv.conn
    vars(conn)["_on_dispatch"] = _boom
    with pytest.raises(RuntimeError, match="injected"):
        conn.receive(DISPATCH, drv.now)
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
            conn.connection_opened(drv.now)
    assert conn.state is S.READY
    drv.dispatch(3)
    assert conn.seq == 3


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


def test_transport_close_is_reported_after_close_connection() -> None:
    drv = _closing_op7()
    conn = drv.conn
    closes = drv.of(CloseConnection)
    assert [c.code for c in closes] == [4000]
    conn.connection_closed(4000, "", drv.now + 0.1)
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
