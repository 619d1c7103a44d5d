# The liveness verdict: is this connection doing its job? (docs/operations.md, /readyz)
#
# Ready is judged by the ACK watchdog's own worst case: READY with an ACK (or the Hello) no
# older than two heartbeat intervals plus the close bound. Live is looser, because a bounded
# reconnect is the client working, not failing: ready, or not ready for less than
# `liveness_budget`, or waiting on purpose for the daily identify budget to reset (the budget
# of liveness starts again when that wait ends). STOPPED and ERROR are never live.
"""The evidence of a working session, and the health verdict drawn from it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qqproto._heartbeat import Health
from qqproto._states import SessionState

if TYPE_CHECKING:
    from qqproto._config import SessionConfig
    from qqproto._heartbeat import Keepalive

__all__ = ["Liveness"]

_S = SessionState
_TERMINAL = frozenset({_S.STOPPED, _S.ERROR})


class Liveness:
    """When the session was last seen working, and the planned waits that excuse it."""

    __slots__ = ("acked_at", "budget_from", "live_at", "planned_until", "started_at")

    def __init__(self) -> None:
        self.live_at: float | None = None  # last time the session was found ready
        self.acked_at: float | None = None  # last ACK on any connection
        self.started_at = 0.0
        # The liveness budget runs from here when nothing was ready since: the start, or the
        # end of a planned wait (the daily identify budget), which is not a stuck session.
        self.budget_from = 0.0
        self.planned_until: float | None = None  # BACKOFF is a planned wait until then

    def verdict(
        self, state: SessionState, ka: Keepalive | None, now: float, config: SessionConfig
    ) -> Health:
        """The health of a connection in ``state`` with keepalive ``ka`` at ``now``."""
        ack_age = ka.since_last_ack(now) if ka is not None else None
        ready = False
        if state is _S.READY and ka is not None and ack_age is not None:
            ready = ack_age <= 2 * ka.interval + config.close_timeout
        since = None if self.live_at is None or ready else max(0.0, now - self.live_at)
        if state is _S.IDLE:
            return Health(
                live=True, ready=False, reason="not started", since_live=None, last_ack_age=None
            )
        acked = self.acked_at
        since_ack = max(0.0, now - (acked if acked is not None else self.started_at))
        live = True
        if ready:
            reason = ""
        elif state in _TERMINAL:
            live, reason = False, f"connection {state.name}"
        elif state is _S.BACKOFF and self.planned_until is not None:
            left = max(0.0, self.planned_until - now)
            reason = f"waiting {left:.0f} s for the identify budget to reset"
        else:
            live_at = self.live_at
            waited = now - (self.budget_from if live_at is None else max(live_at, self.budget_from))
            live = waited <= config.liveness_budget
            reason = f"{state.name} for {waited:.0f} s" if state is not _S.READY else "ACKs late"
        return Health(
            live=live,
            ready=ready,
            reason=reason,
            since_live=since,
            last_ack_age=ack_age,
            since_ack=since_ack,
        )
