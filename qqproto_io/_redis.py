# Identify permits and session snapshots shared by many processes and machines, through Redis
# (docs/design.md#beyond-one-process: Redis is the distributed engine, no home-made coordinator).
#
# The limiter's permit is a lease: one key per bucket `shard_id % max_concurrency`, set with
# SET ... PX <window> by a Lua script that also checks and counts the daily budget, so the
# check and the take are one atomic step on the server. Nobody ever deletes a lease: it ends
# when its TTL does, which is exactly the 5 s window. A holder that crashes therefore blocks
# the others for at most the rest of its window, and there is nothing to release or repair.
#
# The snapshot store keeps the synchronous `SnapshotStore` protocol by writing behind: `save`
# records the latest snapshot of a shard in memory and a flusher task writes it to one Redis
# hash (field "id/count"). The protocol loop never waits on the network, saves keep their
# order (the last one wins), bursts coalesce into one round trip, and a Redis outage is
# retried with backoff instead of failing the live session.
#
# redis.asyncio runs on asyncio only, so these classes do too (not on trio).
"""Redis implementations of :class:`IdentifyLimiter` and :class:`SnapshotStore`."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Self

import anyio
from redis.exceptions import RedisError

from qqproto._backoff import backoff_window
from qqproto_io._stores import (
    IDENTIFY_WINDOW,
    IdentifyBudgetExhausted,
    _shard_key,
    _snapshot_from_text,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from anyio.abc import TaskGroup
    from redis.asyncio import Redis

    from qqproto import SessionSnapshot, SessionStartLimit

__all__ = ["RedisIdentifyLimiter", "RedisSnapshotStore"]

log = logging.getLogger("qqproto_io.redis")

# KEYS[1]: the bucket's lease; KEYS[2]: the daily budget (a counter that expires at the reset).
# ARGV[1]: the window in ms; ARGV[2]: who takes the lease (for an operator reading the key).
# Returns {1, seconds, microseconds} (granted, server time), {0, ms} (bucket busy for ms) or
# {-1, ms} (budget used up; it resets in ms).
_ACQUIRE = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then
  -- A lease without expiry (set by hand?) would block the bucket for ever: bound it.
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return {0, tonumber(ARGV[1])}
end
if ttl >= 0 then
  return {0, ttl}
end
local left = redis.call('GET', KEYS[2])
if left then
  local n = tonumber(left)
  local reset = redis.call('PTTL', KEYS[2])
  if n == nil or reset == -1 then
    -- Unreadable, or it would never reset: forget it (the core still checks its own).
    redis.call('DEL', KEYS[2])
  elseif n <= 0 then
    return {-1, reset}
  else
    redis.call('DECR', KEYS[2])
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
local now = redis.call('TIME')
return {1, tonumber(now[1]), tonumber(now[2])}
"""

# KEYS[1]: the daily budget. ARGV[1]: remaining; ARGV[2]: ms until the reset.
# Within one period `remaining` only falls, so the lowest report wins (a process with an older
# answer must not raise the count); a reset much later than the key's own starts a new period.
_UPDATE_BUDGET = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '')
local ttl = redis.call('PTTL', KEYS[1])
local remaining = tonumber(ARGV[1])
local reset = tonumber(ARGV[2])
if cur == nil or ttl < 0 or remaining < cur or reset > ttl + 60000 then
  redis.call('SET', KEYS[1], remaining, 'PX', reset)
end
return 1
"""


def _backoff(failures: int, first: float, cap: float) -> float:
    # Doubling from `first`, capped, without jitter: one client per process retries.
    return backoff_window(failures + 1, base=first, cap=cap)


class RedisIdentifyLimiter:
    """Identify permits shared by every process that uses the same Redis and ``prefix``.

    Each bucket ``shard_id % max_concurrency`` grants one permit per ``window``, enforced by
    a lease key that expires after the window; a crashed holder can never block the others
    longer than that. Waiters sleep for the lease's remaining TTL (never poll faster), so the
    order among waiters is not first-come-first-served. Once told the budget
    (:meth:`update_limit`), permits are also counted against ``session_start_limit``; past it,
    ``acquire`` sleeps until the reset, or raises :class:`IdentifyBudgetExhausted` when
    ``wait_for_reset`` is false. If Redis is unreachable ``acquire`` retries with backoff
    (logged): it never grants a permit it could not record.

    Args:
        client: a ``redis.asyncio.Redis`` client (yours to close).
        prefix: namespace of the keys; use one per bot (app id). Keys are
            ``{prefix}:identify:<bucket>`` and ``{prefix}:identify-budget`` (one hash slot,
            so the script also works on Redis Cluster).
        window: seconds per permit per bucket (5 s on the real gateway).
        wait_for_reset: wait for the daily reset when the budget is used up, else raise.
        retry_delays: first and longest delay between attempts while Redis fails.
        sleep: how to wait; tests may pass their own.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "qqproto",
        window: float = IDENTIFY_WINDOW,
        wait_for_reset: bool = True,
        retry_delays: tuple[float, float] = (0.1, 5.0),
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._window_ms = max(1, round(window * 1000))
        self._wait_for_reset = wait_for_reset
        self._retry_delays = retry_delays
        self._sleep = sleep
        self._acquire_script = client.register_script(_ACQUIRE)
        self._budget_script = client.register_script(_UPDATE_BUDGET)
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.last_grant: float | None = None
        """Redis server time (Unix seconds) of the last permit this limiter got, if any."""

    def __repr__(self) -> str:
        return f"RedisIdentifyLimiter(prefix={self._prefix!r}, window_ms={self._window_ms})"

    def _bucket_key(self, bucket: int) -> str:
        return f"{{{self._prefix}}}:identify:{bucket}"

    @property
    def _budget_key(self) -> str:
        return f"{{{self._prefix}}}:identify-budget"

    async def update_limit(self, limit: SessionStartLimit) -> None:
        """Record the budget from a fresh ``GET /gateway/bot`` answer, for every process."""
        reset_ms = round(limit.reset_after * 1000)
        try:
            if reset_ms <= 0:
                await self._client.delete(self._budget_key)  # resets now: nothing to count
                return
            await self._budget_script(
                keys=[self._budget_key], args=[max(0, limit.remaining), reset_ms]
            )
        except RedisError as exc:
            # Advisory: the core still refuses to Identify on remaining == 0, and the next
            # /gateway/bot answer brings the budget again. A Redis outage must not stop a shard.
            log.warning("identify budget not recorded in Redis: %s", type(exc).__name__)

    async def identified(self, shard_id: int, max_concurrency: int | None) -> None:
        """Restart the bucket's lease now, when ``shard_id``'s Identify went out.

        The lease is set anew for a whole window (whoever holds it: only a connection that
        took longer than a window to open lets the next holder in before its Identify, and
        then a longer wait is the safe side). A Redis error is logged, not raised.
        """
        key = self._bucket_key(shard_id % max(1, max_concurrency or 1))
        try:
            await self._client.set(key, self._holder, px=self._window_ms)
        except RedisError as exc:
            log.warning("identify lease not renewed in Redis: %s", type(exc).__name__)

    async def acquire(self, shard_id: int, max_concurrency: int | None) -> None:
        """Return once this process holds the bucket's lease for the next window.

        Raises:
            IdentifyBudgetExhausted: the budget is used up and ``wait_for_reset`` is false.
        """
        bucket = shard_id % max(1, max_concurrency or 1)
        keys = [self._bucket_key(bucket), self._budget_key]
        failures = 0
        while True:
            try:
                reply = await self._acquire_script(keys=keys, args=[self._window_ms, self._holder])
            except RedisError as exc:
                delay = _backoff(failures, *self._retry_delays)
                failures += 1
                log.warning(
                    "identify limiter: Redis failed (%s: %s); retrying in %.1f s",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await self._sleep(delay)
                continue
            failures = 0
            status, value = int(reply[0]), int(reply[1])
            if status == 1:
                self.last_grant = value + int(reply[2]) / 1e6
                return
            if status == -1 and not self._wait_for_reset:
                raise IdentifyBudgetExhausted(value / 1000 if value >= 0 else None)
            # Sleep out the lease (or the budget period): at least 1 ms, never a spin.
            await self._sleep(max(value, 1) / 1000)


class RedisSnapshotStore:
    """Snapshots in one Redis hash, written behind so the protocol loop never waits.

    Use it as ``async with RedisSnapshotStore(client) as store:`` around everything that
    saves: entering reads every saved snapshot (one ``HGETALL``) and starts the flusher;
    leaving flushes what is pending (bounded by ``close_timeout``). ``load`` answers from
    what was read then plus this process's own saves; :meth:`fetch` asks Redis again (when a
    process takes over a shard another one ran). A stored snapshot that cannot be read loads
    as ``None``. Saves re-stamp ``saved_at`` with wall-clock time. While Redis fails, the
    latest snapshot of each shard is kept and retried with backoff (logged).

    Args:
        client: a ``redis.asyncio.Redis`` client (yours to close).
        prefix: namespace; the hash is ``{prefix}:snapshots``.
        retry_delays: first and longest delay between write attempts while Redis fails.
        close_timeout: how long leaving the context may spend on the final flush.
        wall_clock: the time to stamp snapshots with.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "qqproto",
        retry_delays: tuple[float, float] = (0.1, 5.0),
        close_timeout: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._key = f"{{{prefix}}}:snapshots"
        self._retry_delays = retry_delays
        self._close_timeout = close_timeout
        self._wall_clock = wall_clock
        self._mirror: dict[tuple[int, int], SessionSnapshot] = {}
        self._pending: dict[str, str | None] = {}  # field -> JSON, or None to delete
        self._in_flight: dict[str, str | None] = {}  # the batch being written
        self._saves: dict[str, int] = {}  # saves per field, to spot one during a fetch
        self._running = False
        self._wake: anyio.Event | None = None
        self._progress: anyio.Event | None = None
        self._tg: TaskGroup | None = None

    def __repr__(self) -> str:
        return f"RedisSnapshotStore(key={self._key!r}, pending={len(self._pending)})"

    async def __aenter__(self) -> Self:
        raw = await self._client.hgetall(self._key)
        for field, value in raw.items():
            name = field.decode("utf-8", "replace") if isinstance(field, bytes) else str(field)
            shard = _parse_shard_key(name)
            snapshot = None if shard is None else _snapshot_from_text(value, shard)
            if shard is not None and snapshot is not None:
                self._mirror[shard] = snapshot
        self._wake = anyio.Event()
        self._progress = anyio.Event()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._running = True
        tg.start_soon(self._flusher, name="qqproto snapshot flusher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.move_on_after(self._close_timeout, shield=True) as scope:
            await self.flush()
        if scope.cancelled_caught:
            log.warning("snapshot store: %d snapshot(s) not written at exit", len(self._pending))
        self._running = False
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None

    def load(self, shard: tuple[int, int]) -> SessionSnapshot | None:
        """The snapshot of ``shard`` as last read or saved here, or ``None``.

        Raises:
            RuntimeError: the store was not entered (``async with``).
        """
        if not self._running:
            raise RuntimeError("RedisSnapshotStore is used outside 'async with'")
        return self._mirror.get(shard)

    def save(self, shard: tuple[int, int], snapshot: SessionSnapshot | None) -> None:
        """Record ``snapshot`` (``None`` deletes) and let the flusher write it soon."""
        if not self._running or self._wake is None:
            log.warning("snapshot store is closed; snapshot of shard %s not saved", shard)
            return
        field = _shard_key(shard)
        self._saves[field] = self._saves.get(field, 0) + 1
        if snapshot is None:
            self._mirror.pop(shard, None)
            self._pending[field] = None
        else:
            stamped = dataclasses.replace(snapshot, saved_at=self._wall_clock())
            self._mirror[shard] = stamped
            self._pending[field] = stamped.to_json()
        self._wake.set()

    async def fetch(self, shard: tuple[int, int]) -> SessionSnapshot | None:
        """Read the snapshot of ``shard`` from Redis now (a save still pending here wins)."""
        field = _shard_key(shard)
        ours = field in self._pending or field in self._in_flight
        saves = self._saves.get(field, 0)
        value = await self._client.hget(self._key, field)
        if ours or self._saves.get(field, 0) != saves:
            return self._mirror.get(shard)  # this process saved it later than Redis knows
        snapshot = _snapshot_from_text(value, shard)
        if snapshot is None:
            self._mirror.pop(shard, None)
        else:
            self._mirror[shard] = snapshot
        return snapshot

    async def flush(self) -> None:
        """Return once everything saved so far is in Redis (waits out outages).

        After the store is closed nothing more can be written, and this returns at once.
        """
        while self._running and (self._pending or self._in_flight):
            assert self._progress is not None
            await self._progress.wait()

    async def _flusher(self) -> None:
        failures = 0
        while True:
            assert self._wake is not None
            await self._wake.wait()
            self._wake = anyio.Event()
            batch, self._pending = self._pending, {}
            self._in_flight = batch
            try:
                await self._write(batch)
            except RedisError as exc:
                for field, value in batch.items():
                    self._pending.setdefault(field, value)  # a newer save wins
                delay = _backoff(failures, *self._retry_delays)
                failures += 1
                log.warning(
                    "snapshot store: Redis failed (%s: %s); %d snapshot(s) retried in %.1f s",
                    type(exc).__name__,
                    exc,
                    len(self._pending),
                    delay,
                )
                self._wake.set()
            else:
                failures = 0
                delay = 0.0
            finally:
                self._in_flight = {}
                assert self._progress is not None
                self._progress.set()
                self._progress = anyio.Event()
            if delay:
                await anyio.sleep(delay)

    async def _write(self, batch: dict[str, str | None]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            for field, value in batch.items():
                if value is None:
                    pipe.hdel(self._key, field)
                else:
                    pipe.hset(self._key, field, value)
            await pipe.execute()


def _parse_shard_key(name: str) -> tuple[int, int] | None:
    head, sep, tail = name.partition("/")
    if not sep or not (head + tail).isascii() or not head.isdigit() or not tail.isdigit():
        return None
    return int(head), int(tail)
