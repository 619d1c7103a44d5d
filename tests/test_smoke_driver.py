from __future__ import annotations

from qqproto import Dispatch, SessionState, ZombieDetected
from tests.helpers import Driver


def test_handshake_beats_and_zombie_with_the_helper_driver() -> None:
    drv = Driver()
    drv.connect_ready()
    assert drv.conn.state is SessionState.READY
    first_beat_due = drv.conn.get_timer()
    assert first_beat_due is not None
    assert 0 <= first_beat_due < 45.0
    drv.advance_to_timer()
    drv.ack()
    drv.dispatch(2, event_id="e2")
    assert [d.seq for d in drv.of(Dispatch)] == [2]
    drv.advance(90.0)
    assert drv.of(ZombieDetected)
    assert drv.conn.state in {
        SessionState.BACKOFF,
        SessionState.CONNECTING,
        SessionState.AWAITING_HELLO,
    }
