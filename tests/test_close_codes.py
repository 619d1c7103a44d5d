"""The close-code policy (docs/protocol.md#close-codes, qqproto/_close_codes.py), row by row.

Every row is driven through the connection, not read back from the table: a live session S1
at seq 5 meets the server's close code (or op 7 / op 9), and the test watches what the client
does next: the Disconnected event, SessionInvalidated, the token refresh, the delay, and the
first payload of the next connection (Resume or Identify) - or that it never reconnects.

An autouse fixture scans every CloseConnection of every test in this file: no automatic path
may ever send 1000 or 1001 (those may end the session on the server).
"""

from __future__ import annotations

from typing import Any

import pytest

from qqproto import (
    CLOSE_CODE_POLICY,
    CloseConnection,
    Disconnected,
    FatalStop,
    FetchToken,
    NextStep,
    OpenConnection,
    ReconnectScheduled,
    RequestIdentifyPermit,
    SessionConfig,
    SessionInvalidated,
    SessionSnapshot,
    SessionState,
)
from tests.helpers import TOKEN, Driver, Sent

S = SessionState
KEEP = SessionConfig().keep_session_close_code
TEN_MINUTES = 600.0


class Recorder(Driver):
    """A Driver that this file's fixture audits for 1000/1001 close frames."""

    # Set by the one test that asks for end_session=True on purpose.
    user_ended_session = False


_DRIVERS: list[Recorder] = []


def make(**kwargs: Any) -> Recorder:
    drv = Recorder(**kwargs)
    _DRIVERS.append(drv)
    return drv


@pytest.fixture(autouse=True)
def _never_an_automatic_1000_or_1001() -> Any:
    _DRIVERS.clear()
    yield
    for drv in _DRIVERS:
        codes = [o.code for o in drv.outputs if isinstance(o, CloseConnection)]
        if drv.user_ended_session:
            # Only the application's own close(end_session=True) may say 1000.
            assert codes.count(1000) <= 1, codes
            codes = [c for c in codes if c != 1000]
        assert not {1000, 1001} & set(codes), codes
    _DRIVERS.clear()


# ------------------------------------------------------------------------------- helpers


def run_timer(drv: Driver) -> None:
    """Jump exactly to the next timer and run it."""
    timer = drv.conn.get_timer()
    assert timer is not None
    drv.now = max(drv.now, timer)
    drv.conn.handle_timer(drv.now)
    drv.pump()


def stay_up(drv: Driver, seconds: float) -> None:
    """Let ``seconds`` pass with the server ACKing every beat (a healthy link)."""
    end = drv.now + seconds
    while True:
        timer = drv.conn.get_timer()
        if timer is None or timer > end:
            break
        n = len(drv.sent)
        run_timer(drv)
        if any(s.op == 1 for s in drv.sent[n:]):
            drv.ack()
    drv.now = end


def live_session(*, stable: bool = True, config: SessionConfig | None = None) -> Recorder:
    """READY as session S1, dispatches 2..5 delivered; stayed up 40 s (or only 2 s)."""
    drv = make(config=config)
    drv.start()
    drv.hello()
    drv.ready("S1", seq=1)
    for seq in (2, 3, 4, 5):
        drv.dispatch(seq, event_id=f"e{seq}")
    stay_up(drv, 40.0 if stable else 2.0)
    assert drv.conn.state is S.READY
    assert (drv.conn.session_id, drv.conn.seq) == ("S1", 5)
    return drv


def since(drv: Driver, mark: int, kind: type[Any]) -> list[Any]:
    return [o for o in drv.outputs[mark:] if isinstance(o, kind)]


def next_connection(drv: Driver) -> tuple[float, Sent]:
    """Run timers until the next OpenConnection; answer Hello; return (open time, first send)."""
    opens = len(drv.opens)
    for _ in range(20):
        if len(drv.opens) > opens:
            break
        run_timer(drv)
    assert len(drv.opens) == opens + 1, "no new connection"
    assert drv.conn.state is S.AWAITING_HELLO
    sent = len(drv.sent)
    drv.hello()
    assert len(drv.sent) > sent, "nothing sent after Hello"
    return drv.opens[-1], drv.sent[sent]


def assert_resume_of_s1(first: Sent, token: str = TOKEN) -> None:
    assert first.op == 6, first
    assert first.d == {"token": f"QQBot {token}", "session_id": "S1", "seq": 5}


def assert_identify(first: Sent, token: str = TOKEN) -> None:
    assert first.op == 2, first
    assert first.d["token"] == f"QQBot {token}"
    assert "session_id" not in first.d


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


def check_resume_row(drv: Recorder, mark: int, code: int | None) -> ReconnectScheduled:
    disc = only(since(drv, mark, Disconnected))
    assert disc.code == code
    assert disc.by_server
    assert disc.next_step is NextStep.RESUME
    assert since(drv, mark, SessionInvalidated) == []
    assert drv.conn.state is S.BACKOFF
    assert (drv.conn.session_id, drv.conn.seq) == ("S1", 5)
    scheduled = only(since(drv, mark, ReconnectScheduled))
    assert disc.reconnect_at == scheduled.reconnect_at
    opened_at, first = next_connection(drv)
    assert opened_at == scheduled.reconnect_at
    assert_resume_of_s1(first)
    # A Resume does not spend an identify permit, and the cached token is still good.
    assert since(drv, mark, RequestIdentifyPermit) == []
    assert since(drv, mark, FetchToken) == []
    assert drv.conn.state is S.RESUMING
    return scheduled


def check_identify_row(drv: Recorder, mark: int, code: int | None, *, forced: bool) -> None:
    disc = only(since(drv, mark, Disconnected))
    assert disc.code == code
    assert disc.next_step is NextStep.IDENTIFY
    lost = only(since(drv, mark, SessionInvalidated))
    assert (lost.session_id, lost.last_seq) == ("S1", 5)
    assert lost.reason
    assert drv.conn.session_id is None
    assert drv.conn.seq is None
    scheduled = only(since(drv, mark, ReconnectScheduled))
    opened_at, first = next_connection(drv)
    assert opened_at == scheduled.reconnect_at
    assert_identify(first)
    assert len(since(drv, mark, RequestIdentifyPermit)) == 1
    # A session the server failed or lost (49xx, op 9) may come with a silently invalidated
    # token (S10): those force a refresh; 4006/4007 (our seq or id was bad) do not.
    assert [f.force for f in since(drv, mark, FetchToken)] == ([True] if forced else [])
    assert drv.conn.state is S.IDENTIFYING
    # The new session starts over: its seq is READY's, not the old 5 (invariant 7).
    drv.ready("S2", seq=1)
    assert (drv.conn.session_id, drv.conn.seq) == ("S2", 1)
    n = len(drv.sent)
    run_timer(drv)
    beat = only([s for s in drv.sent[n:] if s.op == 1])
    assert beat.d == 1


def check_fatal_row(drv: Recorder, mark: int, code: int) -> FatalStop:
    assert drv.conn.state is S.STOPPED
    disc = only(since(drv, mark, Disconnected))
    assert disc.code == code
    assert disc.next_step is NextStep.STOP
    assert disc.reconnect_at is None
    stop = only(since(drv, mark, FatalStop))
    assert stop.code == code
    assert stop.reason
    assert stop.hint.strip()
    assert since(drv, mark, ReconnectScheduled) == []
    assert drv.conn.get_timer() is None
    opens = len(drv.opens)
    drv.advance(TEN_MINUTES)
    assert len(drv.opens) == opens
    assert since(drv, mark, OpenConnection) == []
    assert drv.conn.state is S.STOPPED
    return stop


# ------------------------------------------------------------------------------ resume rows


def test_4009_after_a_stable_session_resumes_at_once_and_is_not_a_failure() -> None:
    drv = live_session(stable=True)
    mark, t0 = len(drv.outputs), drv.now
    drv.server_close(4009, "Session timed out")
    scheduled = check_resume_row(drv, mark, 4009)
    assert scheduled.delay == 0.0
    assert scheduled.reconnect_at == t0
    assert scheduled.failures == 0
    assert drv.conn.consecutive_failures == 0


def test_4009_two_seconds_after_resumed_counts_as_a_failure() -> None:
    drv = live_session(stable=True)
    drv.server_close(4009)
    next_connection(drv)
    drv.resumed(5)
    assert drv.conn.state is S.READY
    stay_up(drv, 2.0)
    mark = len(drv.outputs)
    drv.server_close(4009)
    scheduled = check_resume_row(drv, mark, 4009)
    assert scheduled.failures == 1
    assert drv.conn.consecutive_failures == 1
    window = drv.conn.config.backoff_base
    assert 0.0 <= scheduled.delay < window


@pytest.mark.parametrize(("up_for", "attempt"), [(30.0, 0), (29.9, 1)])
def test_4009_stable_after_boundary(up_for: float, attempt: int) -> None:
    # READY at t=0; the first beat is due only at ~38 s, so no ACK is needed before 30 s.
    drv = make()
    drv.connect_ready()
    drv.now = up_for
    timer = drv.conn.get_timer()
    assert timer is not None
    assert timer > up_for
    drv.ack()  # the server's last sign of life (its close frame is none)
    mark = len(drv.outputs)
    drv.server_close(4009)
    scheduled = check_resume_row_from_seq1(drv, mark)
    assert scheduled.failures == attempt
    if attempt == 0:
        assert scheduled.delay == 0.0


def check_resume_row_from_seq1(drv: Recorder, mark: int) -> ReconnectScheduled:
    scheduled = only(since(drv, mark, ReconnectScheduled))
    _, first = next_connection(drv)
    assert first.op == 6
    assert first.d["seq"] == 1
    return scheduled


def test_op7_closes_with_4000_and_resumes_at_once_after_a_stable_session() -> None:
    drv = live_session(stable=True)
    mark, t0 = len(drv.outputs), drv.now
    drv.recv({"op": 7})
    close = only(since(drv, mark, CloseConnection))
    assert close.code == KEEP == 4000
    assert close.code not in (1000, 1001)
    # The driver echoed the close handshake with our own code.
    disc = only(since(drv, mark, Disconnected))
    assert disc.next_step is NextStep.RESUME
    scheduled = only(since(drv, mark, ReconnectScheduled))
    assert scheduled.delay == 0.0
    assert scheduled.failures == 0
    assert scheduled.reconnect_at == t0
    assert since(drv, mark, SessionInvalidated) == []
    opened_at, first = next_connection(drv)
    assert opened_at == t0
    assert_resume_of_s1(first)
    assert drv.conn.consecutive_failures == 0


def test_op7_when_the_server_never_answers_our_close_aborts_then_resumes() -> None:
    drv = make(echo_close=False)
    drv.connect_ready()
    for seq in (2, 3, 4, 5):
        drv.dispatch(seq)
    stay_up(drv, 40.0)
    mark, t0 = len(drv.outputs), drv.now
    drv.recv({"op": 7})
    assert only(since(drv, mark, CloseConnection)).code == KEEP
    assert drv.conn.state is S.CLOSING
    opened_at, first = next_connection(drv)
    assert opened_at == t0 + drv.conn.config.close_timeout
    assert_resume_of_s1(first)


@pytest.mark.parametrize(
    "code",
    [1006, None, 1000, 4000, 4003, 4005, 4999],
    ids=lambda c: f"close-{c}",
)
def test_undocumented_codes_and_dropped_links_resume(code: int | None) -> None:
    drv = live_session(stable=True)
    mark = len(drv.outputs)
    drv.server_close(code)
    scheduled = check_resume_row(drv, mark, code)
    # Not a rotation: it is a failure, with a jittered first backoff step.
    assert scheduled.failures == 1
    assert 0.0 <= scheduled.delay < drv.conn.config.backoff_base


@pytest.mark.parametrize("stable", [True, False], ids=["stable", "2s-after-ready"])
def test_4008_waits_exactly_the_cooldown_then_resumes_with_the_kept_seq(stable: bool) -> None:
    drv = live_session(stable=stable)
    cooldown = drv.conn.config.rate_limit_cooldown
    assert cooldown == 60.0
    mark, t0 = len(drv.outputs), drv.now
    drv.server_close(4008, "payload too fast")
    disc = only(since(drv, mark, Disconnected))
    assert disc.next_step is NextStep.RESUME
    assert disc.reconnect_at == t0 + 60.0
    scheduled = only(since(drv, mark, ReconnectScheduled))
    assert scheduled.delay == 60.0  # the cooldown replaces the backoff, it does not add to it
    assert scheduled.reconnect_at == t0 + 60.0
    assert drv.conn.get_timer() == t0 + 60.0
    drv.advance(59.999)
    assert drv.opens[-1] < t0, "reconnected before the cooldown ended"
    assert drv.conn.state is S.BACKOFF
    opened_at, first = next_connection(drv)
    assert opened_at == t0 + 60.0
    assert_resume_of_s1(first)
    assert since(drv, mark, SessionInvalidated) == []


def test_4008_cooldown_is_not_added_to_a_grown_backoff() -> None:
    drv = live_session(stable=True)
    for _ in range(2):  # two failures (the second a failed Resume): the window is now 4 s
        drv.server_close(1006)
        next_connection(drv)
    assert drv.conn.consecutive_failures == 2
    mark, t0 = len(drv.outputs), drv.now
    drv.server_close(4008)
    scheduled = only(since(drv, mark, ReconnectScheduled))
    assert scheduled.delay == 60.0
    opened_at, first = next_connection(drv)
    assert opened_at == t0 + 60.0
    assert_resume_of_s1(first)


# ---------------------------------------------------------------------------- identify rows


@pytest.mark.parametrize("code", [4006, 4007, *range(4900, 4914)], ids=lambda c: f"close-{c}")
def test_session_gone_codes_identify_and_report_the_loss(code: int) -> None:
    drv = live_session(stable=True)
    mark = len(drv.outputs)
    drv.server_close(code)
    check_identify_row(drv, mark, code, forced=code >= 4900)


def test_4004_forces_a_token_refresh_then_identifies() -> None:
    drv = live_session(stable=True)
    mark, t0 = len(drv.outputs), drv.now
    requests_before = len(drv.token_requests)
    drv.server_close(4004, "authentication failed")
    disc = only(since(drv, mark, Disconnected))
    assert disc.next_step is NextStep.IDENTIFY
    lost = only(since(drv, mark, SessionInvalidated))
    assert (lost.session_id, lost.last_seq) == ("S1", 5)
    drv.token = "TOKEN-FRESH-2"
    opened_at, first = next_connection(drv)
    refreshes = drv.token_requests[requests_before:]
    assert refreshes, "no token request after 4004"
    at, force = refreshes[0]
    assert force is True, "4004 must bypass any cached token"
    assert t0 <= at <= opened_at
    assert_identify(first, token="TOKEN-FRESH-2")
    # The forced refresh happens once, not on every later attempt.
    drv.ready("S2", seq=1)
    stay_up(drv, 40.0)
    n = len(drv.token_requests)
    drv.server_close(1006)
    next_connection(drv)
    assert drv.token_requests[n:] == []


def test_op9_false_closes_with_the_keep_code_then_identifies() -> None:
    drv = live_session(stable=True)
    mark = len(drv.outputs)
    drv.recv({"op": 9, "d": False})
    assert only(since(drv, mark, CloseConnection)).code == KEEP
    check_identify_row(drv, mark, KEEP, forced=True)


def test_op9_true_the_first_time_resumes() -> None:
    drv = live_session(stable=True)
    mark = len(drv.outputs)
    drv.recv({"op": 9, "d": True})
    assert only(since(drv, mark, CloseConnection)).code == KEEP
    disc = only(since(drv, mark, Disconnected))
    assert disc.next_step is NextStep.RESUME
    assert since(drv, mark, SessionInvalidated) == []
    _, first = next_connection(drv)
    assert_resume_of_s1(first)


def test_op9_true_twice_in_a_row_falls_back_to_identify() -> None:
    drv = live_session(stable=True)
    drv.recv({"op": 9, "d": True})
    _, first = next_connection(drv)
    assert_resume_of_s1(first)
    mark = len(drv.outputs)
    drv.recv({"op": 9, "d": True})  # answers our Resume
    disc = only(since(drv, mark, Disconnected))
    assert disc.next_step is NextStep.IDENTIFY
    lost = only(since(drv, mark, SessionInvalidated))
    assert (lost.session_id, lost.last_seq) == ("S1", 5)
    _, first = next_connection(drv)
    assert_identify(first)


def test_op9_true_twice_in_a_row_falls_back_to_identify_when_the_first_answers_a_resume() -> None:
    # S11 variant: the server answers a Resume (from a snapshot) with op 9 d=true. One more
    # Resume is allowed; the second op 9 in a row falls back to Identify.
    snap = SessionSnapshot(session_id="S1", seq=5, shard=(0, 1), saved_at=0.0)
    drv = make(snapshot=snap)
    drv.start()
    drv.hello()
    assert_resume_of_s1(drv.sent[-1])
    drv.recv({"op": 9, "d": True})
    _, first = next_connection(drv)
    assert_resume_of_s1(first)
    mark = len(drv.outputs)
    drv.recv({"op": 9, "d": True})
    assert only(since(drv, mark, Disconnected)).next_step is NextStep.IDENTIFY
    assert only(since(drv, mark, SessionInvalidated)).last_seq == 5
    _, first = next_connection(drv)
    assert_identify(first)


# ------------------------------------------------------------------------------- fatal rows

FATAL = [4914, 4915, 4001, 4002, 4010, 4011, 4012, 4013, 4014]


@pytest.mark.parametrize("code", FATAL, ids=lambda c: f"close-{c}")
def test_fatal_codes_stop_for_good(code: int) -> None:
    drv = live_session(stable=True)
    mark = len(drv.outputs)
    drv.server_close(code)
    stop = check_fatal_row(drv, mark, code)
    hint = stop.hint.lower()
    if code in (4013, 4014):
        assert "intent" in hint
    if code == 4010:
        assert "shard" in hint
    if code == 4914:
        assert "sandbox" in hint
    if code == 4915:
        assert "banned" in hint


@pytest.mark.parametrize("code", FATAL, ids=lambda c: f"close-{c}")
def test_fatal_codes_right_after_identify_stop_for_good(code: int) -> None:
    # S13: the server closes right after Identify.
    drv = make()
    drv.start()
    drv.hello()
    assert drv.sent[-1].op == 2
    mark = len(drv.outputs)
    drv.server_close(code)
    check_fatal_row(drv, mark, code)


# -------------------------------------------------------------------- our own close codes


def _op7(drv: Driver) -> None:
    drv.recv({"op": 7})


def _op9_false(drv: Driver) -> None:
    drv.recv({"op": 9, "d": False})


def _op9_true(drv: Driver) -> None:
    drv.recv({"op": 9, "d": True})


def _second_hello(drv: Driver) -> None:
    drv.hello()


def _zombie(drv: Driver) -> None:
    n = len(drv.sent)
    while not any(s.op == 1 for s in drv.sent[n:]):
        run_timer(drv)  # a beat goes out, and is never ACKed
    run_timer(drv)  # the next one falls due: zombie


def _app_close(drv: Driver) -> None:
    drv.conn.close(drv.now)
    drv.pump()


KEEP_SESSION_PATHS = {
    "op7": _op7,
    "op9-false": _op9_false,
    "op9-true": _op9_true,
    "second-hello": _second_hello,
    "zombie": _zombie,
    "close()": _app_close,
}


@pytest.mark.parametrize("keep", [4000, 4321])
@pytest.mark.parametrize("path", sorted(KEEP_SESSION_PATHS))
def test_our_closes_use_the_configured_keep_session_code(path: str, keep: int) -> None:
    drv = live_session(stable=True, config=SessionConfig(keep_session_close_code=keep))
    mark = len(drv.outputs)
    KEEP_SESSION_PATHS[path](drv)
    close = only(since(drv, mark, CloseConnection))
    assert close.code == keep


@pytest.mark.parametrize("keep", [4000, 4321])
def test_phase_deadlines_close_with_the_keep_session_code(keep: int) -> None:
    cfg = SessionConfig(keep_session_close_code=keep)
    # No READY within auth_timeout after Identify.
    drv = make(config=cfg)
    drv.start()
    drv.hello()
    mark = len(drv.outputs)
    drv.advance(cfg.auth_timeout)
    assert only(since(drv, mark, CloseConnection)).code == keep
    # No Hello within hello_timeout.
    drv = make(config=cfg)
    drv.start()
    mark = len(drv.outputs)
    drv.advance(cfg.hello_timeout)
    assert only(since(drv, mark, CloseConnection)).code == keep


def test_close_sends_4000_and_close_end_session_sends_1000() -> None:
    drv = live_session(stable=True)
    mark = len(drv.outputs)
    drv.conn.close(drv.now)
    drv.pump()
    assert only(since(drv, mark, CloseConnection)).code == 4000
    assert drv.conn.state is S.STOPPED
    assert drv.conn.session_id == "S1"  # kept for a restart to Resume

    drv = live_session(stable=True)
    drv.user_ended_session = True
    mark = len(drv.outputs)
    drv.conn.close(drv.now, end_session=True)
    drv.pump()
    assert only(since(drv, mark, CloseConnection)).code == 1000
    assert drv.conn.state is S.STOPPED
    assert drv.conn.session_id is None


def test_every_documented_code_has_a_row_in_this_file() -> None:
    covered = {4004, 4006, 4007, 4008, 4009, *range(4900, 4914), *FATAL}
    assert set(CLOSE_CODE_POLICY) == covered
