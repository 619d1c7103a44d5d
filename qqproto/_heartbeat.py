# Heartbeat schedule, ACK watchdog and latency for ONE connection (docs/design.md, invariants 1-3).
#
# A Keepalive is created when Hello arrives and dropped when the connection ends, so no beat
# timer can outlive its socket or fire before the next Hello (twilight #1974, hermes #24357).
#
# The schedule: the first beat at `hello + interval * rng.random()` (jittered, so shards that
# connected together do not beat together), then each beat one interval after the previous
# one was sent. The watchdog is one flag: when a beat falls due and the previous one is still
# unacknowledged, the link is a zombie. The worst case is therefore two intervals after the
# last acknowledged beat was sent. The driver feeds every received byte to the core before it
# runs timers (invariant 3), so an ACK that arrived during a process stall clears the flag
# before the watchdog looks at it.
#
# Only op 11 counts as an acknowledgement, not "any frame": QQ always ACKs, and a server
# that keeps pushing dispatches while ignoring beats is about to cut us off anyway.
"""The per-connection heartbeat schedule, ACK watchdog and latency window."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import random

__all__ = ["Health", "Keepalive", "Latency"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """The truth about one connection, for supervisors (systemd watchdog, readiness probes).

    Attributes:
        live: the session is READY with recent ACKs, or it is reconnecting and has been for
            less than ``liveness_budget``. ``False`` means a restart might help.
        ready: READY with an ACK (or Hello) within two heartbeat intervals.
        reason: why not, in words (``""`` when ready).
        since_live: seconds since the last evidence of a ready session (READY, or an ACK in
            READY); ``None`` when ready now, or never ready.
        last_ack_age: seconds since the last ACK on this connection, or ``None``.
        since_ack: seconds since the last ACK on any connection of this shard, or since
            ``start()`` before the first one (``None`` before ``start()``). Unlike
            ``last_ack_age`` it does not start again with each connection, so it grows
            through a loop of links that open, even resume, and never acknowledge a beat.
    """

    live: bool
    ready: bool
    reason: str
    since_live: float | None
    last_ack_age: float | None
    since_ack: float | None = None


@dataclass(frozen=True, slots=True)
class Latency:
    """Heartbeat round-trip times of the current connection, in seconds.

    Attributes:
        samples: the most recent samples, oldest first (empty until the first ACK).
        mean: their mean, or ``None`` when there is none.
    """

    samples: tuple[float, ...]
    mean: float | None


class Keepalive:
    """Beat schedule and ACK state of one connection, from its Hello to its end."""

    __slots__ = (
        "ack_pending",
        "answer_at",
        "created_at",
        "interval",
        "last_ack_at",
        "last_any_beat_at",
        "last_sent_at",
        "next_beat_at",
        "samples",
    )

    def __init__(self, interval: float, now: float, rng: random.Random, samples: int) -> None:
        self.interval = interval
        self.created_at = now
        self.next_beat_at = now + interval * rng.random()
        self.ack_pending = False
        self.last_sent_at: float | None = None
        self.last_ack_at: float | None = None
        self.last_any_beat_at = float("-inf")  # scheduled or answering a server op 1
        self.answer_at: float | None = None  # a server op 1 still to be answered
        self.samples: deque[float] = deque(maxlen=samples)

    def beat_sent(self, now: float) -> None:
        """Record a scheduled beat sent at ``now`` and schedule the next one."""
        self.ack_pending = True
        self.last_sent_at = now
        self.last_any_beat_at = now
        self.next_beat_at = now + self.interval
        self.answer_at = None  # any beat answers a pending server request

    def answer_requested(self, now: float) -> bool:
        """A server op 1 arrived: answer now (``True``), or at ``answer_at``.

        At most one beat per second, so a burst of server requests cannot make us send fast
        enough to earn a 4008; but every request is answered within that second, never left
        for the next regular beat (up to a whole interval later).
        """
        if now - self.last_any_beat_at >= 1.0:
            self.answered(now)
            return True
        if self.answer_at is None:
            self.answer_at = self.last_any_beat_at + 1.0
        return False

    def answered(self, now: float) -> None:
        """Record a beat sent to answer a server op 1 (off the regular schedule)."""
        self.last_any_beat_at = now
        self.answer_at = None

    def ack_received(self, now: float) -> float | None:
        """Record an ACK; return the latency, or ``None`` for an ACK nobody asked for."""
        if not self.ack_pending or self.last_sent_at is None:
            return None
        self.ack_pending = False
        self.last_ack_at = now
        latency = now - self.last_sent_at
        self.samples.append(latency)
        return latency

    def since_last_ack(self, now: float) -> float:
        """Seconds since the last ACK, or since Hello when none came yet."""
        return now - (self.last_ack_at if self.last_ack_at is not None else self.created_at)

    def latency(self) -> Latency:
        """The latency window as an immutable value."""
        samples = tuple(self.samples)
        return Latency(samples, sum(samples) / len(samples) if samples else None)
