"""GatewayConnection.health(): the verdict supervisors (systemd watchdog, /readyz) act on."""

from __future__ import annotations

from qqproto import SessionConfig
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
