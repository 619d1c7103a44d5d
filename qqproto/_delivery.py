# Delivery: which dispatches reach the application, exactly once (docs/design.md#inv-5).
#
# Within one session the sequence number decides: a dispatch at or below the last one
# delivered is a replay and is dropped, unless it fills a hole left by a jump (a replay that
# arrives out of order is late, not lost). Across sessions it cannot: a new session starts
# `s` again at 1, and the platform pushes the same message twice now and then
# (docs/protocol.md#sequence-and-dedup). So recent event ids, and the message ids of the
# configured event types, are remembered too, bounded by count and by age (`SeenIds`).
#
# The in-order case in READY is handled inline in `GatewayConnection.receive` for speed; it
# applies these same rules and is tested against this module's path.
"""The session's sequence and the duplicate filters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qqproto._dedup import SeenIds

if TYPE_CHECKING:
    from qqproto._codec import JSONValue
    from qqproto._config import SessionConfig

__all__ = ["MAX_SEQ_GAPS", "Dedup", "Session"]

MAX_SEQ_GAPS = 1000


@dataclass(slots=True)
class Session:
    """The gateway session held: its id and the last sequence number delivered."""

    id: str
    seq: int | None
    # Seqs skipped over by a jump (a replay arriving out of order): only these may still be
    # delivered below `seq`. Empty in the usual, in-order case; bounded by MAX_SEQ_GAPS.
    gaps: set[int] = field(default_factory=set)

    def admit(self, s: int) -> bool:
        """Take sequence number ``s``; ``False`` when it was delivered before."""
        last = self.seq
        if last is None or s > last:
            if last is not None and s > last + 1:
                gaps = self.gaps
                gaps.update(range(max(last + 1, s - MAX_SEQ_GAPS), s))
                if len(gaps) > 2 * MAX_SEQ_GAPS:
                    # A server whose seq skips all the time: forget the old holes (no
                    # replay reaches that far back). Rebuilt rarely, so O(1) amortised.
                    self.gaps = {g for g in gaps if g > s - MAX_SEQ_GAPS}
            self.seq = s
            return True
        if s in self.gaps:
            self.gaps.discard(s)
            return True
        return False


class Dedup:
    """The ids delivered recently, across sessions."""

    __slots__ = ("events", "messages", "types")

    def __init__(self, config: SessionConfig) -> None:
        self.events = SeenIds(max_items=config.dedup_max_ids, max_age=config.dedup_max_age)
        self.messages = SeenIds(max_items=config.dedup_max_ids, max_age=config.dedup_max_age)
        self.types = config.dedup_event_types

    def duplicate(self, t: str, event_id: str | None, d: JSONValue, now: float) -> str | None:
        """What marks this dispatch as seen (``"event_id"``, ``"message_id"``), or ``None``."""
        if event_id is not None and self.events.check_and_add(event_id, now):
            return "event_id"
        if t in self.types and type(d) is dict:
            message_id = d.get("id")
            if type(message_id) is str and self.messages.check_and_add(message_id, now):
                return "message_id"
        return None
