"""Heartbeat schedule, ACK watchdog and phase deadlines of GatewayConnection, on virtual time.

aioquic style (docs/design.md#time-and-timers): each deterministic deadline is asserted exactly with
``get_timer()`` and then jumped to. Jittered values are recomputed from a ``random.Random``
replica making the same draws as the connection: one ``rng.random()`` per Hello (the first
beat, ``_heartbeat.Keepalive``) and one per BACKOFF entry that uses the backoff formula
(``_backoff.full_jitter_delay``), in that order.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import TYPE_CHECKING

import pytest

from qqproto import (
    AbortTransport,
    CloseConnection,
    Disconnected,
    FetchGateway,
    FetchToken,
    GatewayConnection,
    HeartbeatAcknowledged,
    HelloReceived,
    LocalProtocolError,
    NextStep,
    OpenConnection,
    ProtocolViolation,
    ReconnectScheduled,
    RequestIdentifyPermit,
    SendPayload,
    SessionConfig,
    SessionSnapshot,
    SessionState,
    StateChanged,
    ZombieDetected,
)
from tests.helpers import TOKEN, Driver, advance_to, jump

if TYPE_CHECKING:
    from collections.abc import Callable

S = SessionState
HEARTBEATING = {S.IDENTIFYING, S.RESUMING, S.READY}
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_RESUME = 6


# ----------------------------------------------------------------------------- helpers


def beats(drv: Driver) -> list[tuple[float, object]]:
    """(send time, d) of every heartbeat sent so far."""
    return [(s.at, s.d) for s in drv.sent_ops(OP_HEARTBEAT)]


def gaps(drv: Driver) -> list[float]:
    """Time between consecutive beats."""
    sends = [at for at, _ in beats(drv)]
    return [b - a for a, b in itertools.pairwise(sends)]


def jump_acking(drv: Driver) -> float:
    """Jump to the next timer; if it sent a beat, the server ACKs it at once."""
    before = len(drv.sent_ops(OP_HEARTBEAT))
    due = jump(drv)
    if len(drv.sent_ops(OP_HEARTBEAT)) > before and drv.conn.state in HEARTBEATING:
        drv.ack()
    return due


def state_changes(drv: Driver) -> list[tuple[SessionState, SessionState]]:
    return [(o.old, o.new) for o in drv.of(StateChanged)]


def draws(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.random() for _ in range(n)]


# ---------------------------------------------------------------- schedule before Hello


def test_no_beat_and_no_beat_timer_before_hello() -> None:
    drv = Driver(now=10.0)
    drv.start()
    assert drv.conn.state is S.AWAITING_HELLO
    assert drv.conn.heartbeat_interval is None
    # The only timer is the Hello deadline, not a beat.
    assert drv.conn.get_timer() == pytest.approx(10.0 + 30.0)
    advance_to(drv, 39.999)
    assert drv.sent == []
    assert drv.conn.get_timer() == pytest.approx(40.0)


def test_no_timer_at_all_in_idle() -> None:
    conn = GatewayConnection(rng=random.Random(0))
    assert conn.get_timer() is None
    conn.handle_timer(1e9)
    assert conn.drain() == []
    assert conn.state is S.IDLE


@pytest.mark.parametrize("seed", [0, 1, 7, 2024, 99991])
def test_first_beat_is_jittered_by_the_first_rng_draw(seed: int) -> None:
    drv = Driver(seed=seed, now=100.0)
    drv.start()
    drv.hello(45000)
    drv.ready()  # READY has no deadline: get_timer() is now the beat alone
    due = drv.conn.get_timer()
    assert due is not None
    assert due == pytest.approx(100.0 + 45.0 * draws(seed, 1)[0])
    assert 0.0 <= due - 100.0 < 45.0
    assert beats(drv) == []


def test_first_beat_same_seed_same_due_time_different_seed_differs() -> None:
    def due_for(seed: int) -> float:
        drv = Driver(seed=seed)
        drv.connect_ready()
        timer = drv.conn.get_timer()
        assert timer is not None
        return timer

    assert due_for(5) == due_for(5)
    assert due_for(5) != due_for(6)
    assert len({due_for(s) for s in range(10)}) == 10


def test_each_beat_is_one_interval_after_the_previous_send() -> None:
    drv = Driver(seed=3)
    drv.connect_ready()
    first = drv.conn.get_timer()
    assert first is not None
    expected = first
    for i in range(6):
        assert drv.conn.get_timer() == pytest.approx(expected)
        jump(drv)
        assert beats(drv)[-1][0] == pytest.approx(expected)
        assert len(beats(drv)) == i + 1
        # A slow ACK (0.1 s, then 7 s) does not move the schedule: it counts from the send.
        advance_to(drv, drv.now + (0.1 if i % 2 else 7.0))
        drv.ack()
        expected += 45.0
    assert gaps(drv) == pytest.approx([45.0] * 5)


def test_beat_carries_null_before_ready_and_the_last_seq_after() -> None:
    drv = Driver(seed=4)
    drv.start()
    drv.hello(10000)  # 10 s interval: the first beat falls before the 30 s auth deadline
    assert drv.conn.state is S.IDENTIFYING
    jump(drv)
    assert drv.conn.state is S.IDENTIFYING
    assert beats(drv)[-1][1] is None
    drv.ack()
    drv.ready(seq=1)
    jump(drv)
    assert beats(drv)[-1][1] == 1
    drv.ack()
    for s in (2, 3, 4):
        drv.dispatch(s)
    jump(drv)
    assert beats(drv)[-1][1] == 4
    drv.ack()
    drv.dispatch(9)
    drv.dispatch(None)  # a dispatch without `s` does not touch the seq
    jump(drv)
    assert beats(drv)[-1][1] == 9
    # The wire form is exactly {"op":1,"d":9}.
    assert json.loads(drv.sent_ops(OP_HEARTBEAT)[-1].text) == {"op": 1, "d": 9}


# ------------------------------------------------------------------ min_heartbeat_interval


@pytest.mark.parametrize(
    ("interval_ms", "config", "expected"),
    [
        (1, SessionConfig(), 1.0),  # the default floor
        (0.5, SessionConfig(), 1.0),
        (1, SessionConfig(min_heartbeat_interval=5.0), 5.0),
        (4999, SessionConfig(min_heartbeat_interval=5.0), 5.0),
        (41250, SessionConfig(), 41.25),  # a real value is used as given
        (41250, SessionConfig(min_heartbeat_interval=5.0), 41.25),
        (45000, SessionConfig(), 45.0),
    ],
)
def test_min_heartbeat_interval_floor(
    interval_ms: float, config: SessionConfig, expected: float
) -> None:
    drv = Driver(config, seed=8)
    drv.start()
    drv.hello(interval_ms)
    drv.ready()
    assert [h.heartbeat_interval for h in drv.of(HelloReceived)] == [pytest.approx(expected)]
    assert drv.conn.heartbeat_interval == pytest.approx(expected)
    assert drv.conn.get_timer() == pytest.approx(expected * draws(8, 1)[0])
    for _ in range(3):
        jump(drv)
        drv.ack()
    assert gaps(drv) == pytest.approx([expected] * 2)


# ---------------------------------------------------------------------------- ACK watchdog


def test_zombie_exactly_two_intervals_after_the_last_acked_beat_then_abort_and_resume() -> None:
    seed = 11
    drv = Driver(seed=seed, echo_close=False)
    drv.connect_ready()
    drv.dispatch(2)
    drv.dispatch(3)
    t_acked = jump(drv)  # the last beat that will be ACKed
    advance_to(drv, t_acked + 0.25)
    drv.ack()
    assert drv.conn.last_ack_at == pytest.approx(t_acked + 0.25)
    assert drv.conn.get_timer() == pytest.approx(t_acked + 45.0)
    jump(drv)  # beat 2 goes out; the server never answers again
    assert len(beats(drv)) == 2
    assert drv.of(ZombieDetected) == []

    # Never later than T + 2 * interval.
    assert drv.conn.get_timer() == pytest.approx(t_acked + 90.0)
    advance_to(drv, t_acked + 90.0 - 1e-6)
    assert drv.of(ZombieDetected) == []
    t_zombie = jump(drv)
    assert t_zombie == pytest.approx(t_acked + 90.0)
    (zombie,) = drv.of(ZombieDetected)
    assert zombie.since_last_ack == pytest.approx(90.0 - 0.25)
    assert zombie.interval == pytest.approx(45.0)
    assert len(beats(drv)) == 2  # no third beat on the dead link
    (close,) = drv.of(CloseConnection)
    assert close.code == 4000
    assert drv.conn.state is S.ZOMBIE

    # The close handshake is bounded: abort exactly close_timeout (5 s) later.
    assert drv.conn.get_timer() == pytest.approx(t_zombie + 5.0)
    advance_to(drv, t_zombie + 5.0 - 1e-6)
    assert drv.of(AbortTransport) == []
    t_abort = jump(drv)
    assert t_abort == pytest.approx(t_zombie + 5.0)
    assert len(drv.of(AbortTransport)) == 1
    assert drv.conn.state is S.BACKOFF
    (gone,) = drv.of(Disconnected)
    assert (gone.code, gone.by_server, gone.next_step) == (4000, False, NextStep.RESUME)
    (sched,) = drv.of(ReconnectScheduled)
    # Draw 1 was the first beat; draw 2 is the backoff. The session had stayed up, so the
    # failure counter restarted: attempt 1, window 1 s.
    expected_delay = draws(seed, 2)[1] * 1.0
    assert sched.failures == 1
    assert sched.delay == pytest.approx(expected_delay)
    assert sched.reconnect_at == pytest.approx(t_abort + expected_delay)
    assert drv.conn.get_timer() == pytest.approx(t_abort + expected_delay)

    # The next connection resumes the held session.
    jump(drv)
    assert len(drv.of(OpenConnection)) == 2
    drv.hello()
    resume = drv.sent[-1]
    assert resume.op == OP_RESUME
    assert resume.d == {"token": f"QQBot {TOKEN}", "session_id": "S1", "seq": 3}
    assert drv.sent_ops(OP_IDENTIFY)[1:] == []


def test_zombie_when_the_first_beat_is_never_acked_counts_from_hello() -> None:
    drv = Driver(seed=12)
    drv.start()
    drv.hello()
    drv.ready()
    t_first = jump(drv)
    assert drv.conn.get_timer() == pytest.approx(t_first + 45.0)
    jump(drv)
    (zombie,) = drv.of(ZombieDetected)
    assert zombie.since_last_ack == pytest.approx(t_first + 45.0)  # Hello was at t=0
    assert len(beats(drv)) == 1


def test_ack_that_arrived_during_a_stall_prevents_the_zombie() -> None:
    """S17 false-positive variant: the driver feeds buffered bytes before handle_timer."""
    drv = Driver(seed=13)
    drv.connect_ready()
    t1 = jump(drv)  # beat pending
    late = t1 + 45.0 + 50.0  # the process stalled past the next beat
    drv.now = late
    drv.conn.receive('{"op":11}', late, attempt=drv.attempt)  # it sat in the socket buffer
    drv.pump()
    drv.conn.handle_timer(late)
    drv.pump()
    assert drv.of(ZombieDetected) == []
    assert drv.conn.state is S.READY
    assert len(drv.of(HeartbeatAcknowledged)) == 1
    assert beats(drv)[-1][0] == pytest.approx(late)  # one catch-up beat, not two
    assert len(beats(drv)) == 2
    assert drv.conn.get_timer() == pytest.approx(late + 45.0)


def test_same_stall_without_the_ack_is_a_zombie() -> None:
    drv = Driver(seed=13)
    drv.connect_ready()
    t1 = jump(drv)
    late = t1 + 45.0 + 50.0
    drv.now = late
    drv.conn.handle_timer(late)
    drv.pump()
    assert len(drv.of(ZombieDetected)) == 1
    assert len(beats(drv)) == 1


def test_unrequested_ack_is_ignored() -> None:
    drv = Driver(seed=14)
    drv.connect_ready()
    drv.ack()  # before any beat
    assert drv.of(HeartbeatAcknowledged) == []
    assert drv.conn.last_ack_at is None
    assert drv.conn.latency.samples == ()
    jump(drv)
    advance_to(drv, drv.now + 0.2)
    drv.ack()
    drv.ack()  # a duplicate
    assert len(drv.of(HeartbeatAcknowledged)) == 1
    assert drv.conn.latency.samples == pytest.approx((0.2,))
    assert drv.conn.state is S.READY


def test_ack_before_hello_is_ignored() -> None:
    drv = Driver()
    drv.start()
    drv.ack()
    assert drv.of(HeartbeatAcknowledged) == []
    assert drv.conn.state is S.AWAITING_HELLO


def test_latency_window_keeps_the_last_five_and_resets_on_a_new_hello() -> None:
    drv = Driver(seed=15)
    drv.connect_ready()
    rtts = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    for i, rtt in enumerate(rtts):
        jump(drv)
        advance_to(drv, drv.now + rtt)
        drv.ack()
        acked = drv.of(HeartbeatAcknowledged)[-1]
        window = rtts[max(0, i - 4) : i + 1]
        assert acked.latency == pytest.approx(rtt)
        assert acked.mean_latency == pytest.approx(sum(window) / len(window))
    lat = drv.conn.latency
    assert lat.samples == pytest.approx((0.3, 0.4, 0.5, 0.6, 0.7))
    assert lat.mean == pytest.approx(0.5)

    drv.server_close(1006)
    assert drv.conn.latency.samples == ()
    assert drv.conn.latency.mean is None
    jump(drv)
    drv.hello(30000)  # the new connection's interval, from its own Hello
    assert drv.conn.heartbeat_interval == pytest.approx(30.0)
    assert drv.conn.latency.samples == ()
    drv.resumed(seq=2)
    jump(drv)
    advance_to(drv, drv.now + 0.05)
    drv.ack()
    assert drv.conn.latency.samples == pytest.approx((0.05,))
    assert drv.of(HeartbeatAcknowledged)[-1].mean_latency == pytest.approx(0.05)


def test_server_op1_is_answered_at_once_without_moving_the_schedule() -> None:
    drv = Driver(seed=16)
    drv.connect_ready()
    drv.dispatch(5)
    due = drv.conn.get_timer()
    assert due is not None
    advance_to(drv, due * 0.5)
    drv.recv({"op": 1})
    assert beats(drv) == [(pytest.approx(due * 0.5), 5)]
    assert drv.conn.get_timer() == pytest.approx(due)
    # Its ACK is not an answer to a scheduled beat.
    drv.ack()
    assert drv.of(HeartbeatAcknowledged) == []
    jump(drv)
    assert beats(drv)[-1] == (pytest.approx(due), 5)
    drv.ack()
    assert len(drv.of(HeartbeatAcknowledged)) == 1
    assert drv.conn.get_timer() == pytest.approx(due + 45.0)


def test_server_op1_before_hello_is_a_violation_not_a_beat() -> None:
    drv = Driver()
    drv.start()
    drv.recv({"op": 1})
    assert beats(drv) == []
    assert [v.error.reason for v in drv.of(ProtocolViolation)] == ["unexpected_payload"]
    assert drv.conn.state is S.AWAITING_HELLO


# ------------------------------------------------------------------------ phase deadlines


def test_connecting_deadline_aborts_at_exactly_connect_timeout() -> None:
    seed = 21
    drv = Driver(seed=seed, auto_open=False, now=5.0)
    drv.start()
    assert drv.conn.state is S.CONNECTING
    assert drv.conn.get_timer() == pytest.approx(35.0)
    drv.conn.handle_timer(34.999)
    assert drv.conn.drain() == []
    assert jump(drv) == pytest.approx(35.0)
    (abort,) = drv.of(AbortTransport)
    assert "30 s" in abort.reason
    assert drv.conn.state is S.BACKOFF
    (gone,) = drv.of(Disconnected)
    assert gone.code is None
    (sched,) = drv.of(ReconnectScheduled)
    assert sched.failures == 1
    assert sched.delay == pytest.approx(draws(seed, 1)[0])  # no Hello, so the first draw
    assert drv.conn.get_timer() == pytest.approx(35.0 + sched.delay)
    jump(drv)
    assert len(drv.of(OpenConnection)) == 2  # retried, not hung


def test_hello_deadline_closes_at_exactly_hello_timeout() -> None:
    seed = 22
    drv = Driver(seed=seed, echo_close=False, now=5.0)
    drv.start()
    assert drv.conn.state is S.AWAITING_HELLO
    assert drv.conn.get_timer() == pytest.approx(35.0)
    jump(drv)
    (close,) = drv.of(CloseConnection)
    assert close.code == 4000
    assert drv.conn.state is S.CLOSING
    assert drv.sent == []  # nothing was ever sent on this connection
    assert drv.conn.get_timer() == pytest.approx(40.0)
    jump(drv)
    assert len(drv.of(AbortTransport)) == 1
    assert drv.conn.state is S.BACKOFF
    (sched,) = drv.of(ReconnectScheduled)
    assert sched.delay == pytest.approx(draws(seed, 1)[0])
    jump(drv)
    assert len(drv.of(OpenConnection)) == 2


@pytest.mark.parametrize("resume", [False, True], ids=["identifying", "resuming"])
def test_auth_deadline_closes_at_exactly_auth_timeout(resume: bool) -> None:
    snap = SessionSnapshot(session_id="S0", seq=7, shard=(0, 1), saved_at=0.0)
    drv = Driver(seed=23, snapshot=snap if resume else None, now=5.0)
    drv.start()
    drv.hello(10000)  # beats every 10 s meanwhile, all ACKed: only the deadline can fire
    state = S.RESUMING if resume else S.IDENTIFYING
    assert drv.conn.state is state
    assert drv.sent[-1].op == (OP_RESUME if resume else OP_IDENTIFY)
    due = None
    while drv.conn.state is state:
        due = jump_acking(drv)
    assert due == pytest.approx(5.0 + 30.0)
    assert drv.of(ZombieDetected) == []
    assert len(beats(drv)) >= 2
    (close,) = drv.of(CloseConnection)
    assert close.code == 4000
    assert (state, S.CLOSING) in state_changes(drv)
    assert drv.conn.state is S.BACKOFF  # the Driver echoed the close
    (sched,) = drv.of(ReconnectScheduled)
    assert sched.reconnect_at == pytest.approx(35.0 + sched.delay)
    jump(drv)
    assert len(drv.of(OpenConnection)) == 2


@pytest.mark.parametrize("what", ["token", "gateway"])
def test_http_deadline_in_preparing_backs_off_at_exactly_http_timeout(what: str) -> None:
    seed = 24
    drv = Driver(
        seed=seed,
        auto_token=what != "token",
        auto_gateway=what != "gateway",
        now=5.0,
    )
    drv.start()
    command = FetchToken if what == "token" else FetchGateway
    assert len(drv.of(command)) == 1
    assert drv.conn.state is S.PREPARING
    assert drv.conn.get_timer() == pytest.approx(35.0)
    jump(drv)
    assert drv.conn.state is S.BACKOFF
    assert drv.of(OpenConnection) == []
    assert drv.of(Disconnected) == []  # no transport ever existed
    (sched,) = drv.of(ReconnectScheduled)
    assert f"{what} request took longer than 30 s" in sched.reason
    assert sched.delay == pytest.approx(draws(seed, 1)[0])
    jump(drv)
    assert len(drv.of(command)) == 2  # asked again: not a hang


def test_permit_wait_has_no_deadline() -> None:
    drv = Driver(auto_permit=False, now=5.0)
    drv.start()
    assert len(drv.of(RequestIdentifyPermit)) == 1
    assert drv.conn.state is S.PREPARING
    assert drv.conn.get_timer() is None
    drv.conn.handle_timer(5.0 + 3600.0)
    assert drv.conn.drain() == []
    drv.now = 3605.0
    drv.conn.grant_identify(drv.now)
    drv.pump()
    assert drv.opens == [3605.0]
    assert drv.conn.get_timer() == pytest.approx(3605.0 + 30.0)  # now the Hello deadline


# --------------------------------------------------------------- handle_timer edge cases


def test_handle_timer_called_early_does_nothing() -> None:
    drv = Driver(seed=31)
    drv.connect_ready()
    due = drv.conn.get_timer()
    assert due is not None
    drv.conn.handle_timer(due - 0.001)
    assert drv.conn.drain() == []
    assert drv.conn.get_timer() == due
    jump(drv)
    drv.server_close(1006)
    backoff_due = drv.conn.get_timer()
    assert backoff_due is not None
    assert drv.conn.state is S.BACKOFF
    drv.conn.handle_timer(drv.now)
    assert drv.conn.drain() == []
    assert drv.conn.state is S.BACKOFF
    assert drv.conn.get_timer() == backoff_due


def test_ten_minute_stall_with_a_beat_pending_gives_one_zombie_not_several_beats() -> None:
    drv = Driver(seed=32, echo_close=False)
    drv.connect_ready()
    t1 = jump(drv)
    assert len(beats(drv)) == 1
    late = t1 + 600.0
    drv.conn.handle_timer(late)
    out = drv.conn.drain()
    assert [type(o) for o in out if not isinstance(o, StateChanged)] == [
        CloseConnection,
        ZombieDetected,
    ]
    assert not any(isinstance(o, SendPayload) for o in out)
    (zombie,) = [o for o in out if isinstance(o, ZombieDetected)]
    assert zombie.since_last_ack == pytest.approx(late)  # since Hello at t=0
    assert drv.conn.get_timer() == pytest.approx(late + 5.0)


def test_ten_minute_stall_with_the_last_beat_acked_sends_exactly_one_beat() -> None:
    drv = Driver(seed=33)
    drv.connect_ready()
    jump(drv)
    drv.ack()
    late = drv.now + 600.0
    drv.now = late
    drv.conn.handle_timer(late)
    drv.pump()
    assert len(beats(drv)) == 2
    assert beats(drv)[-1][0] == pytest.approx(late)
    assert drv.conn.get_timer() == pytest.approx(late + 45.0)
    assert drv.of(ZombieDetected) == []


def test_time_going_backwards_is_clamped() -> None:
    drv = Driver(seed=34)
    drv.connect_ready()
    t1 = jump(drv)  # beat sent at t1
    drv.conn.handle_timer(t1 + 10.0)  # nothing due; the core's clock is now t1 + 10
    assert drv.conn.drain() == []
    drv.conn.receive('{"op":11}', t1 + 1.0, attempt=drv.attempt)  # an older clock reading
    drv.pump()
    (acked,) = drv.of(HeartbeatAcknowledged)
    assert acked.latency == pytest.approx(10.0)  # measured at the clamped time, never < 0
    assert drv.conn.last_ack_at == pytest.approx(t1 + 10.0)
    # A handle_timer in the past does nothing.
    drv.conn.handle_timer(0.0)
    assert drv.conn.drain() == []
    assert drv.conn.get_timer() == pytest.approx(t1 + 45.0)


def test_time_going_backwards_after_a_deadline_does_not_rearm_it() -> None:
    drv = Driver(auto_token=False, now=100.0)
    drv.start()
    drv.conn.handle_timer(130.0)  # the token deadline
    drv.pump()
    assert drv.conn.state is S.BACKOFF
    timer = drv.conn.get_timer()
    assert timer is not None
    assert timer >= 130.0  # the backoff counts from the clamped clock
    drv.conn.provide_token(TOKEN, 7200, 50.0)  # older reading: expiry counts from 130
    assert drv.conn._token.expires_at == pytest.approx(130.0 + 7200.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda c, t: c.handle_timer(t),
        lambda c, t: c.receive('{"op":11}', t),
        lambda c, t: c.connection_closed(1006, "", t),
        lambda c, t: c.close(t),
    ],
    ids=["handle_timer", "receive", "connection_closed", "close"],
)
def test_nan_time_raises_and_changes_nothing(
    call: Callable[[GatewayConnection, float], None],
) -> None:
    drv = Driver(seed=35)
    drv.connect_ready()
    timer = drv.conn.get_timer()
    with pytest.raises(LocalProtocolError):
        call(drv.conn, math.nan)
    assert drv.conn.drain() == []
    assert drv.conn.state is S.READY
    assert drv.conn.get_timer() == timer
    jump(drv)  # still usable afterwards
    assert len(beats(drv)) == 1


def test_nan_time_at_start_raises() -> None:
    conn = GatewayConnection(rng=random.Random(0))
    with pytest.raises(LocalProtocolError):
        conn.start(math.nan)
    assert conn.state is S.IDLE
    assert conn.drain() == []
    conn.start(0.0)
    assert conn.state is S.PREPARING
