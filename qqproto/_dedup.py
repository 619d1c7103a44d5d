# A bounded memory of ids already delivered, to drop replays across sessions.
#
# Within one session the sequence number is enough (a dispatch with `s` <= the last one
# delivered is a replay). Across sessions it is not: a new session restarts `s` at 1, and QQ
# pushes the same message id twice now and then (PROTOCOL.md §4). So the connection keeps the
# recent event ids and message ids, bounded by count and by age: hermes' unbounded dict is
# the anti-pattern (FAILURE_MODES §3 item 12).
"""A bounded, age-limited set of recently seen ids."""

from __future__ import annotations

__all__ = ["SeenIds"]


class SeenIds:
    """Remembers up to ``max_items`` ids for at most ``max_age`` seconds.

    Insertion order is age order (a dict keeps it), so expiry only ever looks at the front.
    """

    __slots__ = ("_items", "_max_age", "_max_items")

    def __init__(self, *, max_items: int, max_age: float) -> None:
        self._items: dict[str, float] = {}
        self._max_items = max_items
        self._max_age = max_age

    def __len__(self) -> int:
        return len(self._items)

    def check_and_add(self, key: str, now: float) -> bool:
        """Return True if ``key`` was seen within the window; otherwise remember it."""
        items = self._items
        if key in items:
            if now - items[key] <= self._max_age:
                return True
            del items[key]
        items[key] = now
        if len(items) > self._max_items:
            del items[next(iter(items))]
        horizon = now - self._max_age
        while True:
            oldest = next(iter(items))
            if items[oldest] >= horizon:
                return False
            del items[oldest]
