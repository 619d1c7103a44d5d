# OpenConnection.attempt: the core, not every driver, drops reports of dead transports.
#
# A driver that passes `attempt=` back with its reports may deliver them as late as it likes:
# after an AbortTransport, after the transport's own close, while the next transport is open.
# Without it the old contract holds (never report an aborted transport), and the first test
# shows why: a late close of the old transport would kill the new one.
"""Tests for transport attempt numbers on OpenConnection and the transport verbs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qqproto import (
    AbortTransport,
    Dispatch,
    LocalProtocolError,
    OpenConnection,
    Ready,
    SessionConfig,
    SessionState,
)
from tests.helpers import Driver

CONFIG = SessionConfig(connect_timeout=5.0, backoff_base=0.5, backoff_cap=1.0)
READY = json.dumps({"op": 0, "s": 1, "t": "READY", "d": {"session_id": "S1", "user": {"id": "1"}}})
HELLO = json.dumps({"op": 10, "d": {"heartbeat_interval": 45000}})


def attempts(drv: Driver) -> list[int]:
    return [o.attempt for o in drv.of(OpenConnection)]


def timed_out_first_attempt() -> Driver:
    """Attempt 1 never opened and was aborted at connect_timeout; attempt 2 is connecting."""
    drv = Driver(CONFIG, auto_open=False)
    drv.start()
    assert attempts(drv) == [1]
    drv.advance(CONFIG.connect_timeout)
    assert drv.of(AbortTransport)
    drv.advance_to_timer()  # the backoff
    assert attempts(drv) == [1, 2]
    assert drv.conn.state is SessionState.CONNECTING
    return drv


def test_attempts_count_up_one_per_transport():
    drv = Driver(CONFIG)
    drv.connect_ready()
    drv.server_close(4009)
    drv.advance_to_timer()
    drv.server_close(None)
    drv.advance_to_timer()
    assert attempts(drv) == [1, 2, 3]


def test_a_report_without_its_attempt_is_refused_and_changes_nothing():
    # The unsafe form (a report the core cannot tell from the aborted transport's) is gone.
    drv = timed_out_first_attempt()
    conn = drv.conn
    for call in (
        lambda: conn.connection_opened(drv.now),
        lambda: conn.connection_closed(None, "attempt 1's late failure report", drv.now),
        lambda: conn.receive(HELLO, drv.now),
        lambda: conn.connection_opened(drv.now, attempt="2"),
    ):
        with pytest.raises(LocalProtocolError):
            call()
    assert conn.drain() == []
    assert conn.state is SessionState.CONNECTING
    conn.connection_opened(drv.now, attempt=2)
    assert conn.state is SessionState.AWAITING_HELLO


def test_late_reports_of_an_aborted_attempt_are_ignored():
    drv = timed_out_first_attempt()
    conn = drv.conn
    conn.connection_opened(drv.now, attempt=1)  # the aborted one finally connects
    conn.receive(HELLO, drv.now, attempt=1)
    conn.connection_closed(None, "attempt 1 gave up", drv.now, attempt=1)
    assert conn.drain() == []
    assert conn.state is SessionState.CONNECTING
    conn.connection_opened(drv.now, attempt=2)
    conn.receive(HELLO, drv.now, attempt=2)
    drv.pump()
    conn.receive(READY, drv.now, attempt=2)
    conn.connection_closed(1006, "attempt 1, once more", drv.now, attempt=1)
    drv.pump()
    assert conn.state is SessionState.READY
    assert len(drv.of(Ready)) == 1


def test_a_closed_attempt_reports_nothing_more_not_even_in_backoff():
    drv = Driver(CONFIG)
    drv.connect_ready()
    conn = drv.conn
    conn.connection_closed(4009, "rotation", drv.now, attempt=1)
    drv.pump()
    assert conn.state is SessionState.BACKOFF
    seq_before = conn.snapshot()
    # Without attempt= this would raise LocalProtocolError: no transport is open.
    conn.receive('{"op":0,"s":2,"t":"C2C_MESSAGE_CREATE","d":{"id":"x"}}', drv.now, attempt=1)
    conn.connection_closed(4009, "again", drv.now, attempt=1)
    assert conn.drain() == []
    assert conn.snapshot() == seq_before
    assert not drv.of(Dispatch)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["opened", "hello", "ready", "closed", "abort-close"]), max_size=8))
def test_stale_reports_change_nothing(stale):
    # Two identical runs; one also gets a burst of reports about attempt 1 after it died.
    def run(noise: list[str]) -> list[str]:
        drv = timed_out_first_attempt()
        conn = drv.conn
        for kind in noise:
            if kind == "opened":
                conn.connection_opened(drv.now, attempt=1)
            elif kind == "hello":
                conn.receive(HELLO, drv.now, attempt=1)
            elif kind == "ready":
                conn.receive(READY, drv.now, attempt=1)
            else:
                conn.connection_closed(None if kind == "closed" else 1006, "x", drv.now, attempt=1)
        conn.connection_opened(drv.now, attempt=2)
        conn.receive(HELLO, drv.now, attempt=2)
        drv.pump()
        conn.receive(READY, drv.now, attempt=2)
        drv.pump()
        drv.advance(100.0)
        return [repr(o) for o in drv.outputs]

    assert run(stale) == run([])
