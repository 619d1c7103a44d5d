# The identify budget: the daily session start limit and the identify permit.
#
# An Identify starts a new session, and the platform counts those against a daily budget
# (`session_start_limit` from `/gateway/bot`, docs/protocol.md#identify-budget); a fleet of
# shards also shares an identify rate (`max_concurrency` per 5 s), which a limiter outside
# the core enforces by granting permits. A Resume spends neither. This module holds what is
# known of the budget and decides when an attempt must not Identify at all but wait.
"""The session start limit and the identify permit of one connection."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from qqproto._close_codes import REQUEST_FAILED, START_LIMIT_EXHAUSTED
from qqproto._reconnect import Exit

if TYPE_CHECKING:
    from qqproto._rest import SessionStartLimit

__all__ = ["StartBudget"]


class StartBudget:
    """What is known of the session start limit, and whether a permit is held."""

    __slots__ = ("limit", "permit", "reset_at")

    def __init__(self) -> None:
        self.limit: SessionStartLimit | None = None
        # Kept as a time, not a duration: it may be acted on long after it arrived.
        self.reset_at = 0.0
        self.permit = False

    def update(self, limit: SessionStartLimit, now: float) -> None:
        """A fresh limit arrived with the gateway URL."""
        self.limit = limit
        self.reset_at = now + limit.reset_after

    @property
    def max_concurrency(self) -> int | None:
        """Identifies allowed per 5 s, if known."""
        return self.limit.max_concurrency if self.limit is not None else None

    def exhausted(self, now: float) -> Exit | None:
        """Refuse to Identify when the budget is spent: it would fail, and might count.

        The attempt then waits for the reset (or backs off when the reset time has passed)
        and fetches the limit again: the limit is forgotten here.
        """
        limit = self.limit
        if limit is None or limit.remaining > 0:
            return None
        self.limit = None
        left = self.reset_at - now
        delay = left if left > 0 else None
        meaning = START_LIMIT_EXHAUSTED.meaning
        return Exit(START_LIMIT_EXHAUSTED, None, meaning, by_server=True, delay=delay)

    def spend(self) -> None:
        """An Identify was sent: one session start fewer until the reset."""
        self.permit = False
        limit = self.limit
        if limit is not None:
            self.limit = replace(limit, remaining=limit.remaining - 1)

    @staticmethod
    def refused(reason: str, retry_after: float | None) -> Exit:
        """The limiter refused (``retry_after``: a planned wait) or failed (``None``)."""
        # "Retry at once" is no planned wait: a limiter that keeps saying it would otherwise
        # cycle PREPARING and BACKOFF as fast as it answers. Back off like a failure instead.
        if retry_after is None or retry_after <= 0:
            return Exit(REQUEST_FAILED, None, f"identify permit failed: {reason}", by_server=False)
        return Exit(
            START_LIMIT_EXHAUSTED,
            None,
            f"identify permit refused: {reason}",
            by_server=True,
            delay=retry_after,
        )
