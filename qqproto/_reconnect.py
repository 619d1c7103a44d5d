# The disconnect-and-backoff decision: what a connection's end costs, and when to try again.
#
# Every way out of a connection is settled here, once, when the connection is really gone
# (BACKOFF or STOPPED): the failure counters, the resume budget, the quick-disconnect storm
# and the delay before the next attempt. The connection records *why* a connection ends (an
# `Exit`) the moment it starts ending, and hands the facts of the link over when it is gone;
# this module turns them into a `Settlement` the connection carries out (drop the session,
# report a storm, schedule the attempt).
#
# "Stayed up" is measured to the server's last sign of life, not to the moment we noticed
# the death: a Resume that the server accepts and then ignores must count as a failed resume,
# however long the watchdog took to notice (docs/design.md#failure-scenarios).
"""The reconnect policy: failure counters, resume budget, storms and backoff delays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qqproto._backoff import full_jitter_delay
from qqproto._close_codes import (
    APPLICATION_CLOSE,
    INVALID_SESSION_RESUMABLE,
    ClosePolicy,
    NextStep,
)
from qqproto._outputs import DisconnectStorm

if TYPE_CHECKING:
    import random

    from qqproto._config import SessionConfig

__all__ = ["Exit", "Reconnects", "Settlement"]

_STORM_HINT = (
    "connections keep ending right after they open: check the network or proxy, "
    "the credentials, and the intents"
)


@dataclass(frozen=True, slots=True)
class Exit:
    """Why the current connection (or attempt) ends, decided when it starts ending."""

    policy: ClosePolicy
    code: int | None
    reason: str
    by_server: bool
    delay: float | None = None  # overrides the backoff (identify budget exhausted)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the end of a connection leads to.

    Attributes:
        step: resume, identify or stop.
        delay: seconds until the next attempt (``0.0`` when stopping).
        failures: consecutive failures so far, after this one.
        drop: drop the held session, for this reason (``None``: keep it).
        storm: a quick-disconnect storm to report first, if this end made one.
    """

    step: NextStep
    delay: float
    failures: int
    drop: str | None
    storm: DisconnectStorm | None


class Reconnects:
    """The counters that outlive a connection, and the decision made from them."""

    __slots__ = (
        "_config",
        "_rng",
        "failed_resumes",
        "failures",
        "op9_resumed",
        "quick_disconnects",
    )

    def __init__(self, config: SessionConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self.failures = 0  # consecutive failed attempts: the backoff window
        self.failed_resumes = 0  # the resume budget; it belongs to the session held
        self.quick_disconnects = 0  # connections in a row that ended soon after opening
        self.op9_resumed = False  # the last connection ended with an op 9 d=true we honoured

    def settle(
        self,
        ex: Exit,
        now: float,
        *,
        had_transport: bool,
        opened_at: float | None,
        up_since: float | None,
        alive_at: float | None,
        sent_resume: bool,
        has_session: bool,
    ) -> Settlement:
        """Count the connection that just ended and decide the next step and its delay."""
        cfg = self._config
        policy = ex.policy
        stayed_up = (
            up_since is not None
            and alive_at is not None
            and alive_at - up_since >= cfg.stable_after
        )
        if stayed_up:
            self.failures = 0
            self.failed_resumes = 0
            self.quick_disconnects = 0
        elif sent_resume:
            self.failed_resumes += 1
        storm = None
        quick = opened_at is None or now - opened_at < cfg.storm_window
        if had_transport and quick and not stayed_up and policy is not APPLICATION_CLOSE:
            self.quick_disconnects += 1
            count = self.quick_disconnects
            if count % cfg.storm_threshold == 0:
                storm = DisconnectStorm(code=ex.code, count=count, hint=policy.hint or _STORM_HINT)
        self.op9_resumed = policy is INVALID_SESSION_RESUMABLE

        step = policy.step
        drop = None
        if step is NextStep.RESUME and not has_session:
            step = NextStep.IDENTIFY
        if step is NextStep.RESUME and self.failed_resumes >= cfg.max_failed_resumes:
            drop = f"resume failed {self.failed_resumes} times in a row"
            step = NextStep.IDENTIFY
        elif step is NextStep.IDENTIFY and has_session:
            drop = policy.meaning
        if step is NextStep.STOP:
            return Settlement(step, 0.0, self.failures, drop, storm)
        if ex.delay is not None:
            return Settlement(step, ex.delay, self.failures, drop, storm)
        if policy.rotation and stayed_up:
            return Settlement(step, 0.0, 0, drop, storm)
        self.failures += 1
        if policy.cooldown:
            delay = cfg.rate_limit_cooldown
        else:
            delay = full_jitter_delay(
                self.failures, self._rng, base=cfg.backoff_base, cap=cfg.backoff_cap
            )
        return Settlement(step, delay, self.failures, drop, storm)
