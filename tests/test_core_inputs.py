"""The core's verbs at their edges: misuse, refused permits, failed requests, event order.

Each test here pins one rule a driver relies on: a wrong call raises LocalProtocolError and
changes nothing; every failure a driver can meet has a verb and a documented consequence;
the events of one input come after the StateChanged that input caused.
"""

from __future__ import annotations

from typing import Any

import pytest

from qqproto import (
    AbandonRequest,
    Disconnected,
    FailureKind,
    FatalStop,
    FetchToken,
    HelloReceived,
    InvalidResponse,
    LocalProtocolError,
    PayloadTooLarge,
    PersistSnapshot,
    ProtocolViolation,
    Ready,
    ReconnectScheduled,
    RequestIdentifyPermit,
    Resumed,
    SessionConfig,
    SessionInvalidated,
    SessionSnapshot,
    SessionStartLimit,
    SessionState,
    StateChanged,
    ZombieDetected,
    read_gateway_answer,
    read_token_answer,
)
from tests.helpers import Driver, advance_to, jump

S = SessionState
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_RESUME = 6


def beats(drv: Driver) -> list[float]:
    return [s.at for s in drv.sent_ops(OP_HEARTBEAT)]


def after_state(outputs: list[Any], kind: type, new: SessionState) -> None:
    """``kind`` comes after the StateChanged into ``new`` in ``outputs``."""
    changed = next(i for i, o in enumerate(outputs) if isinstance(o, StateChanged) and o.new is new)
    event = next(i for i, o in enumerate(outputs) if isinstance(o, kind))
    assert changed < event, [type(o).__name__ for o in outputs]


# ------------------------------------------------------------------------- misuse


MISUSES = [
    ("receive(123)", lambda c, d: c.receive(123, d.now, attempt=d.attempt)),
    ("receive(None)", lambda c, d: c.receive(None, d.now, attempt=d.attempt)),
    ("provide_gateway(None)", lambda c, d: c.provide_gateway(None, d.now)),
    ("provide_gateway(bad port)", lambda c, d: c.provide_gateway("ws://h:99999/", d.now)),
    (
        "provide_gateway(limit=dict)",
        lambda c, d: c.provide_gateway("ws://h/", d.now, session_start_limit={}),
    ),
    ("handle_timer('5')", lambda c, d: c.handle_timer("5")),
    ("handle_timer(True)", lambda c, d: c.handle_timer(True)),  # noqa: FBT003  # noqa: FBT003
    ("provide_token(b'abc')", lambda c, d: c.provide_token(b"abc", "7200", d.now)),
    ("provide_token(expires=None)", lambda c, d: c.provide_token("t", None, d.now)),
    ("connection_closed('x')", lambda c, d: c.connection_closed("x", "", d.now, attempt=d.attempt)),
    (
        "connection_closed(70000)",
        lambda c, d: c.connection_closed(70000, "", d.now, attempt=d.attempt),
    ),
    (
        "connection_closed(reason=None)",
        lambda c, d: c.connection_closed(1000, None, d.now, attempt=d.attempt),
    ),
    ("receive without attempt", lambda c, d: c.receive('{"op":11}', d.now)),
    ("receive(attempt='1')", lambda c, d: c.receive('{"op":11}', d.now, attempt="1")),
    ("request_failed without request", lambda c, d: c.request_failed("x", d.now)),
    (
        "request_failed(kind='auth')",
        lambda c, d: c.request_failed("x", d.now, request="token", kind="auth"),
    ),
    ("refuse_identify(retry_after=-1)", lambda c, d: c.refuse_identify("x", d.now, retry_after=-1)),
    ("message_too_large('big')", lambda c, d: c.message_too_large("big", d.now, attempt=d.attempt)),
    ("close(end_session='yes')", lambda c, d: c.close(d.now, end_session="yes")),
    ("close(unknown=1)", lambda c, d: c.close(d.now, unknown=1)),
]


@pytest.mark.parametrize(("name", "call"), MISUSES, ids=[m[0] for m in MISUSES])
def test_misuse_raises_local_protocol_error_and_changes_nothing(name, call) -> None:
    drv = Driver(seed=1)
    drv.connect_ready()
    conn = drv.conn
    before = (conn.state, conn.session_id, conn.seq, conn.get_timer())
    with pytest.raises(LocalProtocolError):
        call(conn, drv)
    assert conn.drain() == []
    assert (conn.state, conn.session_id, conn.seq, conn.get_timer()) == before
    # Still usable: the misuse did not break it.
    drv.dispatch(2)
    assert conn.seq == 2
    jump(drv)
    assert conn.state is S.READY


def test_a_bytes_token_is_refused_not_sent_as_its_repr() -> None:
    drv = Driver(seed=1, auto_token=False)
    drv.start()
    with pytest.raises(LocalProtocolError):
        drv.conn.provide_token(b"abc", "7200", drv.now)
    drv.conn.provide_token("abc", "7200", drv.now)
    drv.pump()
    drv.hello()
    assert drv.sent_ops(OP_IDENTIFY)[0].d["token"] == "QQBot abc"


# ------------------------------------------------------------------- event order


def test_events_come_after_the_state_change_they_cause() -> None:
    drv = Driver(seed=2)
    drv.start()
    hello = drv.hello()
    after_state(hello, HelloReceived, S.IDENTIFYING)
    ready = drv.ready()
    after_state(ready, Ready, S.READY)
    drv.server_close(4009)
    drv.advance_to_timer()
    drv.hello()
    resumed = drv.resumed(seq=1)
    after_state(resumed, Resumed, S.READY)
    jump(drv)  # a beat, never acknowledged
    zombie = jump(drv) and drv.outputs
    after_state(zombie, ZombieDetected, S.ZOMBIE)


def test_session_invalidated_follows_the_disconnected_of_its_connection() -> None:
    drv = Driver(seed=3)
    drv.connect_ready()
    out = drv.server_close(4006)
    kinds = [type(o) for o in out]
    assert kinds.index(Disconnected) < kinds.index(SessionInvalidated)
    assert kinds.index(SessionInvalidated) < kinds.index(ReconnectScheduled)
    assert kinds.index(StateChanged) < kinds.index(Disconnected)


def test_a_phase_deadline_is_not_a_disconnect_by_the_server() -> None:
    drv = Driver(SessionConfig(hello_timeout=5.0), seed=4)
    drv.start()  # open, but the server never sends Hello
    drv.advance(5.0)
    drv.advance(drv.conn.config.close_timeout)
    (gone,) = drv.of(Disconnected)
    assert "Hello" in gone.reason
    assert gone.by_server is False


# --------------------------------------------------------------- signs of life


def test_a_server_that_echoes_closes_but_never_acks_exhausts_the_resume_budget() -> None:
    # RESUMED, then silence: the watchdog closes, the server echoes the close a minute and
    # a half after RESUMED. The echo is no sign of life: each round is a failed resume, the
    # backoff grows, and the budget ends in a fresh Identify instead of resuming forever.
    cfg = SessionConfig()
    drv = Driver(cfg, seed=5)
    drv.connect_ready()
    drv.server_close(1006)
    attempts = []
    for _ in range(cfg.max_failed_resumes + 1):
        drv.advance_to_timer()  # the backoff
        drv.hello()
        if drv.sent[-1].op != OP_RESUME:
            break
        drv.resumed(seq=1)
        while drv.conn.state is not S.BACKOFF:
            jump(drv)  # beats, the zombie, the echoed close
        attempts.append(drv.of(ReconnectScheduled)[-1].failures)
    assert attempts == list(range(2, cfg.max_failed_resumes + 2))
    assert drv.of(SessionInvalidated)
    assert drv.sent[-1].op == OP_IDENTIFY


# ------------------------------------------------------------------ oversized


def test_an_oversized_message_is_a_violation_with_state_and_seq_intact() -> None:
    drv = Driver(seed=6)
    drv.connect_ready()
    drv.dispatch(2)
    drv.conn.message_too_large(5 << 20, drv.now, attempt=drv.attempt)
    (violation,) = drv.conn.drain()
    assert isinstance(violation, ProtocolViolation)
    assert isinstance(violation.error, PayloadTooLarge)
    assert violation.error.size == 5 << 20
    assert drv.conn.state is S.READY
    assert drv.conn.seq == 2
    # A report of an abandoned transport is ignored like its other reports.
    drv.conn.message_too_large(5 << 20, drv.now, attempt=drv.attempt + 1)
    assert drv.conn.drain() == []


# ------------------------------------------------------- permits and the budget


def test_a_refused_permit_waits_exactly_until_the_reset_and_that_wait_is_live() -> None:
    drv = Driver(seed=7, auto_permit=False)
    drv.start()
    assert drv.of(RequestIdentifyPermit)
    drv.conn.refuse_identify("budget spent", drv.now, retry_after=3600.0)
    drv.pump()
    (sched,) = drv.of(ReconnectScheduled)
    assert sched.delay == 3600.0
    assert drv.conn.state is S.BACKOFF
    budget = drv.conn.config.liveness_budget
    health = drv.conn.health(drv.now + budget + 60.0)
    assert health.live
    assert "identify budget" in health.reason
    # After the wait, the liveness budget starts again rather than counting the hour.
    advance_to(drv, 3600.0)
    assert drv.conn.state is S.PREPARING
    assert drv.conn.health(3600.0 + budget - 1.0).live
    assert not drv.conn.health(3600.0 + budget + 1.0).live


def test_a_failed_limiter_backs_off_like_a_failed_attempt() -> None:
    drv = Driver(seed=8, auto_permit=False)
    drv.start()
    drv.conn.refuse_identify("redis down", drv.now, retry_after=None)
    drv.pump()
    (sched,) = drv.of(ReconnectScheduled)
    assert sched.failures == 1
    assert sched.delay <= drv.conn.config.backoff_base
    assert not drv.conn.health(drv.now + drv.conn.config.liveness_budget + 1).live


def test_the_core_daily_budget_wait_is_live_too() -> None:
    limit = SessionStartLimit(total=10, remaining=0, reset_after=7200.0, max_concurrency=1)
    drv = Driver(seed=9, start_limit=limit)
    drv.start()
    assert drv.conn.state is S.BACKOFF
    assert drv.of(ReconnectScheduled)[-1].delay == 7200.0
    assert drv.conn.health(5000.0).live


def test_a_late_permit_refusal_is_ignored() -> None:
    drv = Driver(seed=10)
    drv.connect_ready()
    drv.conn.refuse_identify("late", drv.now, retry_after=5.0)
    assert drv.conn.drain() == []
    assert drv.conn.state is S.READY


# ------------------------------------------------------------ failed requests


def test_wrong_credentials_stop_with_a_hint_instead_of_retrying() -> None:
    drv = Driver(seed=11, auto_token=False)
    drv.start()
    drv.conn.request_failed(
        "token endpoint answered error code 100016",
        drv.now,
        request="token",
        kind=FailureKind.FATAL,
    )
    drv.pump()
    assert drv.conn.state is S.STOPPED
    (fatal,) = drv.of(FatalStop)
    assert "QQBOT_APP_ID" in fatal.hint
    assert drv.conn.get_timer() is None
    assert len(drv.of(FetchToken)) == 1


def test_a_refused_token_on_the_gateway_request_refreshes_it() -> None:
    drv = Driver(seed=12, auto_gateway=False)
    drv.start()
    drv.conn.request_failed("HTTP 401", drv.now, request="gateway", kind=FailureKind.AUTH)
    drv.pump()
    assert drv.conn.state is S.BACKOFF
    drv.advance_to_timer()
    assert [f.force for f in drv.of(FetchToken)] == [False, True]


def test_an_abandoned_request_is_cancelled_and_its_late_failure_ignored() -> None:
    drv = Driver(SessionConfig(http_timeout=10.0), seed=13, auto_token=False)
    drv.start()
    drv.advance(10.0)
    assert drv.of(AbandonRequest) == [AbandonRequest(request="token")]
    assert drv.conn.state is S.BACKOFF
    drv.conn.request_failed("late", drv.now, request="token", kind=FailureKind.FATAL)
    assert drv.conn.drain() == []
    assert drv.conn.state is S.BACKOFF


def test_closing_while_a_permit_is_awaited_abandons_it() -> None:
    drv = Driver(seed=14, auto_permit=False)
    drv.start()
    drv.conn.close(drv.now)
    drv.pump()
    assert drv.of(AbandonRequest) == [AbandonRequest(request="permit")]
    assert drv.conn.state is S.STOPPED


# ------------------------------------------------------------- server op 1


def test_a_server_heartbeat_right_after_our_beat_is_answered_within_a_second() -> None:
    drv = Driver(seed=15)
    drv.connect_ready()
    t1 = jump(drv)  # our regular beat
    drv.ack()
    drv.now = t1 + 0.3
    drv.recv({"op": 1})
    assert beats(drv) == [t1]
    assert drv.conn.get_timer() == pytest.approx(t1 + 1.0)
    # A burst within that second earns no more than the one answer.
    drv.now = t1 + 0.6
    drv.recv({"op": 1})
    drv.advance(1.0)
    assert beats(drv) == [t1, pytest.approx(t1 + 1.0)]
    # Later requests, a second or more after the last beat, are answered at once.
    drv.now = t1 + 2.5
    drv.recv({"op": 1})
    assert beats(drv)[-1] == t1 + 2.5


def test_a_regular_beat_answers_a_pending_server_heartbeat() -> None:
    drv = Driver(SessionConfig(min_heartbeat_interval=0.5), seed=16)
    drv.start()
    drv.hello(interval_ms=500)
    drv.ready()
    t1 = jump(drv)
    drv.ack()
    drv.now = t1 + 0.2
    drv.recv({"op": 1})
    t2 = jump(drv)  # the regular beat at t1 + 0.5 comes first
    assert t2 == pytest.approx(t1 + 0.5)
    drv.ack()
    jump(drv)
    assert beats(drv) == [t1, t2, pytest.approx(t2 + 0.5)]


# ------------------------------------------------------------- close and op 9


def test_close_during_an_invalid_session_close_drops_the_session() -> None:
    snap = SessionSnapshot(session_id="OLD", seq=9, shard=(0, 1), saved_at=0.0)
    drv = Driver(seed=17, snapshot=snap, echo_close=False)
    drv.start()
    drv.hello()
    drv.resumed(seq=9)
    drv.recv({"op": 9, "d": False})
    assert drv.conn.state is S.CLOSING
    drv.conn.close(drv.now)
    drv.pump()
    drv.server_close(4000)
    assert drv.conn.state is S.STOPPED
    assert drv.persisted()[-1] is None
    assert drv.conn.snapshot() is None
    assert drv.of(SessionInvalidated)


def test_close_during_a_rotation_close_keeps_the_session() -> None:
    drv = Driver(seed=18, echo_close=False)
    drv.connect_ready()
    drv.recv({"op": 7})
    drv.conn.close(drv.now)
    drv.pump()
    drv.server_close(4000)
    assert drv.conn.state is S.STOPPED
    last = drv.persisted()[-1]
    assert last is not None
    assert last.session_id == "S1"
    assert [o for o in drv.outputs if isinstance(o, PersistSnapshot)]


def test_the_time_since_the_last_ack_grows_through_a_loop_of_dead_links() -> None:
    # Every connection opens and resumes, none acknowledges a beat: the per-connection ACK
    # age starts again each time, the shard's own keeps growing (what operators alert on).
    drv = Driver(seed=19)
    drv.connect_ready()
    t_ack = jump(drv)
    drv.ack()
    drv.server_close(1006)
    for _ in range(3):
        drv.advance_to_timer()  # the backoff
        drv.hello()
        drv.resumed(seq=1)
        health = drv.conn.health(drv.now)
        assert health.last_ack_age is not None
        assert health.last_ack_age < 1.0
        while drv.conn.state is not S.BACKOFF:
            jump(drv)  # beats, never ACKed; the zombie; the echoed close
    assert drv.conn.health(drv.now).since_ack == pytest.approx(drv.now - t_ack)
    assert drv.now - t_ack > 3 * 45.0


# ------------------------------------------------- what an HTTP answer means


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (200, {"code": 100016, "message": "invalid appid or secret"}, FailureKind.FATAL),
        (401, {"code": 100016}, FailureKind.FATAL),  # the code decides, not the status
        (401, {"message": "no"}, FailureKind.AUTH),
        (503, None, FailureKind.TRANSIENT),
        (429, {"code": 100001}, FailureKind.TRANSIENT),
        (200, None, FailureKind.TRANSIENT),  # not JSON
        (200, {"access_token": "t"}, FailureKind.TRANSIENT),  # no expires_in
    ],
)
def test_the_core_reads_a_token_answer_and_says_what_a_refusal_means(status, body, kind) -> None:
    with pytest.raises(InvalidResponse) as err:
        read_token_answer(status, body)
    assert err.value.kind is kind
    assert "invalid appid" not in str(err.value)  # never the server's own text


def test_a_good_answer_is_read_and_a_gateway_401_means_a_fresh_token() -> None:
    grant = read_token_answer(200, {"access_token": "t", "expires_in": "7200"})
    assert (grant.token, grant.expires_in) == ("t", 7200.0)
    assert read_gateway_answer(200, {"url": "wss://gw.example/websocket"}).url.startswith("wss")
    with pytest.raises(InvalidResponse) as err:
        read_gateway_answer(401, {"url": "wss://gw.example/websocket"})
    assert err.value.kind is FailureKind.AUTH
    with pytest.raises(InvalidResponse) as err:
        read_gateway_answer(200, {"url": "wss://gw.example:99999/"})
    assert err.value.kind is FailureKind.TRANSIENT


def test_a_close_code_outside_the_registered_ranges_is_the_peers_not_a_misuse() -> None:
    # Found by the hostile peer: wsproto reports whatever 16-bit code arrived.
    drv = Driver(seed=20)
    drv.connect_ready()
    drv.server_close(5999)
    assert drv.conn.state is S.BACKOFF
    (gone,) = drv.of(Disconnected)
    assert gone.code == 5999
    assert gone.next_step.value == "resume"


def test_a_close_code_may_be_an_int_enum() -> None:
    # wsproto reports the codes it knows as its CloseReason (an IntEnum).
    from wsproto.frame_protocol import CloseReason

    drv = Driver(seed=21)
    drv.connect_ready()
    drv.conn.connection_closed(CloseReason.GOING_AWAY, "", drv.now, attempt=drv.attempt)
    drv.pump()
    (gone,) = drv.of(Disconnected)
    assert gone.code == 1001
    assert type(gone.code) is int


def test_a_gateway_url_that_cannot_be_reached_is_asked_for_again() -> None:
    # Found by the hostile peer: a /gateway/bot answer naming an address that refuses
    # connections was dialled forever; now every failed connect asks for the URL anew.
    drv = Driver(seed=22, auto_open=False)
    drv.start()
    fetches = len([o for o in drv.outputs if type(o).__name__ == "FetchGateway"])
    assert fetches == 1
    drv.conn.connection_closed(None, "connection refused", drv.now, attempt=drv.attempt)
    drv.pump()
    drv.advance_to_timer()  # the backoff
    fetches = len([o for o in drv.outputs if type(o).__name__ == "FetchGateway"])
    assert fetches == 2


def test_a_limiter_that_says_retry_now_gets_a_growing_backoff_not_a_loop() -> None:
    drv = Driver(seed=23, auto_permit=False)
    drv.start()
    for attempt in (1, 2, 3):
        drv.conn.refuse_identify("budget resets now", drv.now, retry_after=0.0)
        drv.pump()
        assert drv.of(ReconnectScheduled)[-1].failures == attempt
        drv.advance_to_timer()
