# Where session snapshots and identify permits come from, as small interfaces.
#
# The defaults here are for one process and one machine: a SQLite file in WAL mode (each save
# is one transaction, so a crash mid-write leaves the previous snapshot readable) and an
# in-process identify limiter with one 5 s window per bucket
# `shard_id % max_concurrency` plus the daily `session_start_limit` budget
# (docs/protocol.md#identify-budget).
# Fleets plug in other implementations of the same protocols (qqproto_io._redis).
#
# `SnapshotStore` is synchronous on purpose. The driver saves from its command loop, which
# must not await, and the core asks for a save on every new seq, so a save must be cheap and
# must keep the order of calls. A local store writes at once; a remote store writes behind
# (remembers the latest snapshot per shard and flushes it from its own task).
"""Snapshot stores and identify limiters: the protocols and the in-process defaults."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

import anyio

from qqproto import InvalidSnapshot, QQProtoError, SessionSnapshot

if TYPE_CHECKING:
    import os
    from collections.abc import Awaitable, Callable

    from qqproto import SessionStartLimit

__all__ = [
    "IdentifyBudgetExhausted",
    "IdentifyLimiter",
    "LocalIdentifyLimiter",
    "SnapshotStore",
    "SqliteSnapshotStore",
]

log = logging.getLogger("qqproto_io.stores")

IDENTIFY_WINDOW = 5.0
BUDGET_PERIOD = 86_400.0  # session_start_limit.total is per 24 h
NEW_PERIOD_SLACK = 60.0
"""Seconds by which two answers' reset times may differ and still name the same period.

They differ by the answers' latency (seconds at worst); a new period's reset is a day later.
"""


class SnapshotStore(Protocol):
    """Keeps one snapshot per shard.

    Both methods are called on the event loop and must return quickly without blocking on
    the network; ``save`` keeps call order (the last call wins).
    """

    def load(self, shard: tuple[int, int]) -> SessionSnapshot | None:
        """The saved snapshot of ``shard``, or ``None``."""

    def save(self, shard: tuple[int, int], snapshot: SessionSnapshot | None) -> None:
        """Save ``snapshot`` (``None`` deletes the saved one)."""


class IdentifyLimiter(Protocol):
    """Grants identify permits."""

    async def acquire(self, shard_id: int, max_concurrency: int | None) -> None:
        """Return when ``shard_id`` may Identify."""

    async def update_limit(self, limit: SessionStartLimit) -> None:
        """Learn the daily budget from a fresh ``/gateway/bot`` answer."""

    async def identified(self, shard_id: int, max_concurrency: int | None) -> None:
        """The Identify of ``shard_id`` went out now: its bucket's window restarts here.

        A permit is taken before the connection opens; the gateway measures the Identifies.
        Restarting the window when the Identify is sent keeps the gateway-side spacing whole
        however long the connection took to open.
        """


class IdentifyBudgetExhausted(QQProtoError):
    """The daily ``session_start_limit`` budget is used up and the limiter may not wait.

    Attributes:
        retry_after: seconds until the budget resets, if known.
    """

    def __init__(self, retry_after: float | None) -> None:
        self.retry_after = retry_after
        when = "unknown" if retry_after is None else f"in {retry_after:.0f} s"
        super().__init__(f"identify budget (session_start_limit) exhausted; resets {when}")


def _shard_key(shard: tuple[int, int]) -> str:
    return f"{shard[0]}/{shard[1]}"


def _snapshot_from_text(text: object, shard: tuple[int, int]) -> SessionSnapshot | None:
    """Parse a stored snapshot of ``shard``; anything unreadable or misfiled is ``None``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(text, str):
        return None
    try:
        snapshot = SessionSnapshot.from_json(text)
    except InvalidSnapshot:
        return None
    # A snapshot filed under another shard's key would Resume the wrong session.
    return snapshot if snapshot.shard == shard else None


class SqliteSnapshotStore:
    """Snapshots in a SQLite file: one row per shard, each save one transaction.

    WAL mode with ``synchronous=NORMAL``: a killed process loses nothing it committed, and a
    power cut can at worst roll back to an earlier snapshot (never a torn one). Saves re-stamp
    ``saved_at`` with wall-clock time so a later process can tell how old a snapshot is.
    Neither ``load`` nor ``save`` raises on a storage error: a snapshot is an optimisation
    (Resume instead of Identify), so an unreadable row loads as ``None`` and a failed write is
    logged. A file that is not a SQLite database is moved aside (``<name>.corrupt-<time>``)
    and a new one started.

    Args:
        path: the database file (its directory is created if missing).
        busy_timeout: longest wait, in seconds, for another process's write lock. The wait
            blocks the event loop, so keep it short; writes take microseconds.
        wall_clock: the time to stamp snapshots with.
    """

    _SCHEMA = "CREATE TABLE IF NOT EXISTS snapshots (shard TEXT PRIMARY KEY, data TEXT NOT NULL)"
    _SELECT = "SELECT data FROM snapshots WHERE shard = ?"
    _UPSERT = (
        "INSERT INTO snapshots (shard, data) VALUES (?, ?) "
        "ON CONFLICT (shard) DO UPDATE SET data = excluded.data"
    )
    _DELETE = "DELETE FROM snapshots WHERE shard = ?"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 0.5,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._wall_clock = wall_clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise  # cannot open at all (permissions, a directory): a configuration error
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(wall_clock())}")
            log.warning("snapshot database %s is unreadable (%s); moved to %s", path, exc, aside)
            self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self.path}{suffix}").unlink()
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        # Autocommit: each statement is its own transaction, so a save is atomic without
        # BEGIN/COMMIT round trips. The module caches the prepared statements by SQL text.
        db = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(self._SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def load(self, shard: tuple[int, int]) -> SessionSnapshot | None:
        """The saved snapshot of ``shard``, or ``None`` (also when unreadable)."""
        try:
            row = self._db.execute(self._SELECT, (_shard_key(shard),)).fetchone()
        except sqlite3.Error as exc:
            log.warning("cannot read snapshot of shard %s from %s: %s", shard, self.path, exc)
            return None
        return None if row is None else _snapshot_from_text(row[0], shard)

    def save(self, shard: tuple[int, int], snapshot: SessionSnapshot | None) -> None:
        """Replace the row of ``shard`` in one transaction (``None`` deletes it)."""
        try:
            if snapshot is None:
                self._db.execute(self._DELETE, (_shard_key(shard),))
            else:
                stamped = dataclasses.replace(snapshot, saved_at=self._wall_clock())
                self._db.execute(self._UPSERT, (_shard_key(shard), stamped.to_json()))
        except sqlite3.Error as exc:
            log.warning("cannot save snapshot of shard %s to %s: %s", shard, self.path, exc)

    def close(self) -> None:
        """Close the database (idempotent). Later loads return ``None``."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class _Ticket:
    period: int  # which budget period the permit was counted in
    wait: float  # seconds until that period starts (0: the current one)


@dataclass(slots=True)
class _Budget:
    """The daily identify budget as this process knows it, in periods of 24 h."""

    total: int
    left: int  # permits left in the current period
    reset_at: float  # when the current period ends
    period: int = 0
    promised: int = 0  # permits already counted against the next period

    def roll(self, now: float) -> None:
        if now < self.reset_at:
            return
        passed = int((now - self.reset_at) // BUDGET_PERIOD) + 1
        self.left = max(0, self.total - (self.promised if passed == 1 else 0))
        self.promised = 0
        self.reset_at += passed * BUDGET_PERIOD
        self.period += passed

    def take(self, now: float, *, may_wait: bool) -> _Ticket:
        self.roll(now)
        if self.left > 0:
            self.left -= 1
            return _Ticket(self.period, 0.0)
        if not may_wait:
            raise IdentifyBudgetExhausted(self.reset_at - now)
        if self.promised >= self.total:  # the next period is spoken for as well
            raise IdentifyBudgetExhausted(self.reset_at + BUDGET_PERIOD - now)
        self.promised += 1
        return _Ticket(self.period + 1, self.reset_at - now)

    def give_back(self, ticket: _Ticket, now: float) -> None:
        self.roll(now)
        if ticket.period == self.period:
            self.left = min(self.total, self.left + 1)
        elif ticket.period == self.period + 1 and self.promised > 0:
            self.promised -= 1


class LocalIdentifyLimiter:
    """One Identify per bucket per 5 s, and the daily budget, for the shards of this process.

    Buckets are ``shard_id % max_concurrency``; each grants one permit per ``window``. Once
    told the daily budget (:meth:`update_limit`), the limiter also counts the permits it
    grants against ``session_start_limit.remaining``. The core already refuses to Identify
    when the ``remaining`` *it* was given is 0 and waits for the reset itself; what it cannot
    see is the permits granted to the other shards since, and that is what the count adds.
    Past the budget, ``acquire`` sleeps once until the reset (or raises
    :class:`IdentifyBudgetExhausted` when ``wait_for_reset`` is false).

    Args:
        window: seconds per permit per bucket; ``None`` follows ``IDENTIFY_WINDOW`` (5 s).
        clock: the time source (seconds, monotonic); tests pass a virtual one.
        sleep: how to wait; tests pass a virtual one.
        wait_for_reset: wait for the daily reset when the budget is used up, else raise.
    """

    def __init__(
        self,
        *,
        window: float | None = None,
        clock: Callable[[], float] = anyio.current_time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        wait_for_reset: bool = True,
    ) -> None:
        self._window = window
        self._clock = clock
        self._sleep = sleep
        self._wait_for_reset = wait_for_reset
        self._next_free: dict[int, float] = {}
        self._granted: dict[int, float] = {}
        self._budget: _Budget | None = None

    async def update_limit(self, limit: SessionStartLimit) -> None:
        """Learn the budget from a fresh ``GET /gateway/bot`` answer.

        Async like :meth:`RedisIdentifyLimiter.update_limit`, so a caller can treat both alike.

        Answers are merged, never simply taken: shards fetch ``/gateway/bot`` concurrently,
        and an answer sent before the permits granted since cannot know of them. Within the
        current period an answer can only lower what is left. Only an answer whose reset
        lies clearly later than the one held (by more than ``NEW_PERIOD_SLACK``) starts a
        new period with its ``remaining``; one whose reset lies clearly earlier describes a
        period already over and is ignored. The reset time is kept absolute, fixed when the
        answer arrived (``now + reset_after``).
        """
        now = self._clock()
        reset_at = now + max(0.0, limit.reset_after)
        total = max(0, limit.total)
        remaining = max(0, limit.remaining)
        budget = self._budget
        if budget is None:
            self._budget = _Budget(total=total, left=remaining, reset_at=reset_at)
            return
        budget.roll(now)
        if reset_at > budget.reset_at + NEW_PERIOD_SLACK:
            # The server's period turned over before ours did: its count is the truth now,
            # less the permits already promised to whoever waits for that turn.
            budget.total = total
            budget.left = max(0, remaining - budget.promised)
            budget.promised = 0
            budget.reset_at = reset_at
            budget.period += 1
        elif reset_at >= budget.reset_at - NEW_PERIOD_SLACK:
            budget.total = total
            budget.left = min(budget.left, remaining)
            # Two answers about one reset differ only by their latency: the later estimate
            # is the safe one (a budget that refills early grants what the server has not).
            budget.reset_at = max(budget.reset_at, reset_at)

    async def acquire(self, shard_id: int, max_concurrency: int | None) -> None:
        """Wait for the budget and the bucket's next free slot, and take them.

        Raises:
            IdentifyBudgetExhausted: the budget is used up and ``wait_for_reset`` is false.
        """
        budget = self._budget
        ticket = (
            None if budget is None else budget.take(self._clock(), may_wait=self._wait_for_reset)
        )
        try:
            if ticket is not None and ticket.wait > 0:
                await self._sleep(ticket.wait)
            window = IDENTIFY_WINDOW if self._window is None else self._window
            bucket = shard_id % max(1, max_concurrency or 1)
            now = self._clock()
            at = max(now, self._next_free.get(bucket, -math.inf))
            self._next_free[bucket] = at + window
            await self._sleep(at - now)
            # The gateway measures the Identifies, not our plan: the window counts from the
            # real grant (a wake-up may be late) or, later, from the Identify itself.
            while (late := self._granted.get(bucket, -math.inf) + window - self._clock()) > 0:
                await self._sleep(late)
            self._granted[bucket] = self._clock()
        except BaseException:
            # A cancelled wait used no Identify; the bucket slot stays taken (harmless).
            if budget is not None and ticket is not None:
                budget.give_back(ticket, self._clock())
            raise

    async def identified(self, shard_id: int, max_concurrency: int | None) -> None:
        """Restart the window of ``shard_id``'s bucket now, when its Identify went out.

        Only ever later, never earlier: a waiter already sleeping re-checks on waking.
        """
        bucket = shard_id % max(1, max_concurrency or 1)
        self._granted[bucket] = max(self._granted.get(bucket, -math.inf), self._clock())
