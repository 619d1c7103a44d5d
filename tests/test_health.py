"""GatewayConnection.health(): the verdict supervisors (systemd watchdog, /readyz) act on."""

from __future__ import annotations

import pytest

from qqproto import (
    LocalProtocolError,
    ReconnectScheduled,
    SessionConfig,
    SessionStartLimit,
    SessionState,
)
from tests.helpers import Driver, advance_to

INTERVAL = 45.0


def test_ready_with_fresh_acks_is_ready_and_live() -> None:
    drv = Driver()
    drv.connect_ready()
    health = drv.conn.health(drv.now)
    assert (health.live, health.ready, health.reason) == (True, True, "")
    assert health.since_live is None  # ready now


def test_acks_older_than_the_watchdog_bound_are_not_ready() -> None:
    # The server stops answering but the link is not yet declared a zombie (the watchdog
    # needs a beat to fall due): health already says "not ready", but still live.
    drv = Driver()
    drv.connect_ready()
    t0 = drv.now
    bound = 2 * INTERVAL + drv.conn.config.close_timeout
    health = drv.conn.health(t0 + bound - 0.1)
    assert health.ready
    health = drv.conn.health(t0 + bound + 0.1)
    assert not health.ready
    assert health.live
    assert health.reason == "ACKs late"


def test_a_reconnect_is_live_within_the_budget_and_stuck_beyond_it() -> None:
    config = SessionConfig(liveness_budget=120.0)
    drv = Driver(config, auto_open=False)  # every connection attempt hangs
    drv.start()
    assert drv.conn.health(drv.now).live
    advance_to(drv, 119.0)
    health = drv.conn.health(drv.now)
    assert health.live
    assert not health.ready
    assert health.since_live is None  # never was ready
    advance_to(drv, 121.0)
    health = drv.conn.health(drv.now)
    assert not health.live
    assert health.reason.startswith(drv.conn.state.name)


def test_budget_counts_from_the_last_ready_moment() -> None:
    config = SessionConfig(liveness_budget=100.0)
    drv = Driver(config)
    drv.connect_ready()
    drv.advance_to_timer()  # a beat ...
    drv.ack()  # ... acknowledged: the last evidence of a live session
    drv.auto_open = False
    drv.server_close(1006)  # reconnects hang from now on
    advance_to(drv, drv.now + 95.0)
    assert drv.conn.health(drv.now).live
    advance_to(drv, drv.now + 10.0)
    health = drv.conn.health(drv.now)
    assert not health.live
    assert health.since_live is not None
    assert health.since_live > 100.0


def test_stopped_is_never_live() -> None:
    drv = Driver()
    drv.connect_ready()
    drv.conn.close(drv.now)
    drv.pump()
    health = drv.conn.health(drv.now)
    assert (health.live, health.ready) == (False, False)
    assert health.reason == "connection STOPPED"


def test_a_refused_start_leaves_health_alone() -> None:
    # start() once restarted the liveness budget before it found it was not in IDLE: a
    # second start() made a stuck connection look live again.
    config = SessionConfig(liveness_budget=120.0)
    drv = Driver(config, auto_open=False)  # every connection attempt hangs
    drv.start()
    advance_to(drv, 121.0)
    assert not drv.conn.health(drv.now).live
    with pytest.raises(LocalProtocolError):
        drv.conn.start(drv.now)
    assert not drv.conn.health(drv.now).live


def test_a_budget_wait_lasts_until_the_reset_the_gateway_announced_and_is_live() -> None:
    # The limit arrives at t=0 (one session left, reset in an hour) and the Identify spends
    # it; at t=600 the server invalidates the session. The next Identify must wait for the
    # reset announced at t=0 (not an hour from now), and that wait is live, not stuck.
    limit = SessionStartLimit(total=1000, remaining=1, reset_after=3600.0, max_concurrency=1)
    config = SessionConfig(liveness_budget=120.0)
    drv = Driver(config, start_limit=limit)
    drv.connect_ready()
    while drv.conn.get_timer() < 600.0:  # a healthy session: every beat acknowledged
        drv.advance_to_timer()
        drv.ack()
    assert drv.conn.state is SessionState.READY
    advance_to(drv, 600.0)
    drv.recv({"op": 9, "d": False})  # closed (echoed at once), then the backoff
    assert drv.conn.state is SessionState.BACKOFF
    assert drv.conn.session_id is None
    drv.advance_to_timer()  # no session left: the spent budget is checked, and waited for
    assert drv.conn.state is SessionState.BACKOFF
    wait = drv.of(ReconnectScheduled)[-1]
    assert wait.reconnect_at == pytest.approx(3600.0)
    assert wait.delay == pytest.approx(3600.0 - drv.now)
    health = drv.conn.health(drv.now + 1000.0)
    assert health.live
    assert (
        health.reason
        == f"waiting {wait.reconnect_at - drv.now - 1000.0:.0f} s for the identify budget to reset"
    )
    # When it ends the budget of liveness starts again (the gateway is fetched anew).
    drv.auto_gateway = False
    advance_to(drv, wait.reconnect_at)
    assert drv.conn.state is SessionState.PREPARING
    assert drv.conn.health(wait.reconnect_at + 119.0).live
    assert not drv.conn.health(wait.reconnect_at + 121.0).live
