# A bounded memory of ids already delivered, to drop replays across sessions.
#
# Within one session the sequence number is enough (a dispatch with `s` <= the last one
# delivered is a replay). Across sessions it is not: a new session restarts `s` at 1, and QQ
# pushes the same message id twice now and then (docs/protocol.md#sequence-and-dedup). So the
# connection keeps the recent event ids and message ids, bounded by count and by age: hermes'
# unbounded dict is the anti-pattern.
"""A bounded, age-limited set of recently seen ids."""

from __future__ import annotations

from collections import deque

__all__ = ["SeenIds"]

_SLACK = 1 / 64


class SeenIds:
    """Remembers up to ``max_items`` ids for ``max_age`` seconds.

    An id is a duplicate while it is at most ``max_age`` old. The memory holds at most
    ``max_items`` ids, and lets go of older ones in batches (at most ``max_age / 64`` late).

    A dict answers "seen?" and a deque keeps insertion (= age) order, so expiry only ever
    looks at the front. A key added again after it expired leaves a stale entry in the
    deque; it is recognised by its time and skipped. This is 3x cheaper per dispatch than
    an OrderedDict, and far cheaper than a plain dict used as a queue (whose "first key"
    scans over the holes its deletions left).
    """

    __slots__ = ("_expires_at", "_items", "_max_age", "_max_items", "_order")

    def __init__(self, *, max_items: int, max_age: float) -> None:
        self._items: dict[str, float] = {}
        self._order: deque[tuple[float, str]] = deque()
        self._max_items = max_items
        self._max_age = max_age
        # When to look at the queue next: once the oldest entry is a little past its age
        # (``_SLACK`` of it), so that at a steady rate one look expires a batch instead of
        # one look per insertion. Entries kept a little longer change no answer: a hit is
        # judged by its own age.
        self._expires_at = float("-inf")

    def __len__(self) -> int:
        return len(self._items)

    def check_and_add(self, key: str, now: float) -> bool:
        """Return True if ``key`` was seen within the window; otherwise remember it."""
        items = self._items
        seen_at = items.get(key)
        if seen_at is not None and now - seen_at <= self._max_age:
            return True
        items[key] = now
        order = self._order
        order.append((now, key))
        if now > self._expires_at:
            self._expire(now)
        elif len(items) > self._max_items:
            # A busy shard's steady state (more than max_items ids per max_age): one in, one
            # out, here rather than in a call per dispatch to _expire.
            at, oldest = order.popleft()
            if items.get(oldest) == at:
                del items[oldest]
            else:
                self._expire(now)  # that entry was stale: let _expire walk on
        return False

    def _expire(self, now: float) -> None:
        items, order = self._items, self._order
        horizon = now - self._max_age
        while order:
            at, oldest = order[0]
            if len(items) <= self._max_items and at >= horizon:
                break
            order.popleft()
            if items.get(oldest) == at:
                del items[oldest]
        # Never empty here: the entry just added is younger than the horizon.
        self._expires_at = order[0][0] + self._max_age * (1.0 + _SLACK)
