"""The SQLite snapshot store and the in-process identify limiter (on virtual clocks)."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter

import anyio
import pytest
import trio.testing

from qqproto import SessionSnapshot, SessionStartLimit
from qqproto_io import IdentifyBudgetExhausted, LocalIdentifyLimiter, SqliteSnapshotStore, _stores

WALL = 1_700_000_000.5
# trio's MockClock jumps to the next deadline as soon as every task sleeps: real concurrency,
# virtual time. A fresh clock per parameter use is not needed: tests measure from their start.
MOCK_TRIO = pytest.param(
    ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}), id="trio-mockclock"
)


def _snapshot(session_id="s-1", seq=7, shard=(0, 1), saved_at=1.0):
    return SessionSnapshot(session_id=session_id, seq=seq, shard=shard, saved_at=saved_at)


@pytest.fixture
def store(tmp_path):
    with SqliteSnapshotStore(tmp_path / "snapshots.db", wall_clock=lambda: WALL) as s:
        yield s


# ------------------------------------------------------------------------- SQLite store


def test_sqlite_round_trip_restamps_saved_at_with_wall_clock(store, tmp_path):
    assert store.load((0, 1)) is None
    store.save((0, 1), _snapshot(saved_at=3.25))  # the core's monotonic time
    assert store.load((0, 1)) == _snapshot(saved_at=WALL)
    store.save((0, 1), _snapshot(seq=None))
    assert store.load((0, 1)) == _snapshot(seq=None, saved_at=WALL)
    with SqliteSnapshotStore(tmp_path / "snapshots.db") as again:  # a restarted process
        assert again.load((0, 1)) == _snapshot(seq=None, saved_at=WALL)


def test_sqlite_delete_and_two_shards(store):
    a = _snapshot("a", 1, (0, 2))
    b = _snapshot("b", 2, (1, 2))
    store.save((0, 2), a)
    store.save((1, 2), b)
    assert store.load((0, 2)).session_id == "a"
    assert store.load((1, 2)).session_id == "b"
    assert store.load((0, 1)) is None  # same id, another shard count: another shard
    store.save((0, 2), None)
    assert store.load((0, 2)) is None
    assert store.load((1, 2)).session_id == "b"
    store.save((0, 2), None)  # deleting nothing is fine


def test_sqlite_uses_wal_and_one_row_per_shard(store):
    store.save((0, 1), _snapshot())
    store.save((0, 1), _snapshot(seq=8))
    store.save((3, 4), _snapshot(shard=(3, 4)))
    db = sqlite3.connect(store.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = sorted(r[0] for r in db.execute("SELECT shard FROM snapshots"))
    finally:
        db.close()
    assert rows == ["0/1", "3/4"]


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        '{"session_id": "", "seq": 1, "shard": [0, 1], "saved_at": 1}',
        '{"session_id": "x", "seq": -1, "shard": [0, 1], "saved_at": 1}',
        "[1, 2]",
        '{"session_id": "x", "seq": 1, "shard": [5, 6], "saved_at": 1}',  # filed wrongly
        b"\xff\xfe\x00",
        42,
        "[" * 100_000,
    ],
)
def test_sqlite_corrupt_row_loads_none_and_is_overwritten(store, data):
    db = sqlite3.connect(store.path)
    try:
        db.execute("INSERT INTO snapshots (shard, data) VALUES ('0/1', ?)", (data,))
        db.commit()
    finally:
        db.close()
    assert store.load((0, 1)) is None
    store.save((0, 1), _snapshot())
    assert store.load((0, 1)) == _snapshot(saved_at=WALL)


def test_sqlite_corrupt_file_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "snapshots.db"
    garbage = b"this is not a database at all" * 100
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, "qqproto_io.stores"):
        store = SqliteSnapshotStore(path, wall_clock=lambda: WALL)
    with store:
        assert store.load((0, 1)) is None
        store.save((0, 1), _snapshot())
        assert store.load((0, 1)) == _snapshot(saved_at=WALL)
    aside = tmp_path / f"snapshots.db.corrupt-{int(WALL)}"
    assert aside.read_bytes() == garbage
    assert "moved to" in caplog.text


def test_sqlite_broken_schema_loads_none_and_save_does_not_raise(store, caplog):
    store.save((0, 1), _snapshot())
    db = sqlite3.connect(store.path)
    try:
        db.execute("DROP TABLE snapshots")
        db.commit()
    finally:
        db.close()
    with caplog.at_level(logging.WARNING, "qqproto_io.stores"):
        assert store.load((0, 1)) is None
        store.save((0, 1), _snapshot())
    assert "cannot read snapshot" in caplog.text
    assert "cannot save snapshot" in caplog.text
    assert "s-1" not in caplog.text  # the session id stays out of the logs


def test_sqlite_after_close_neither_raises(tmp_path):
    store = SqliteSnapshotStore(tmp_path / "snapshots.db")
    store.save((0, 1), _snapshot())
    store.close()
    store.close()
    assert store.load((0, 1)) is None
    store.save((0, 1), None)


def test_sqlite_unopenable_path_raises_at_construction(tmp_path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(sqlite3.OperationalError):
        SqliteSnapshotStore(tmp_path / "dir.db")


_WRITER = textwrap.dedent(
    """
    import sys
    from qqproto import SessionSnapshot
    from qqproto_io import SqliteSnapshotStore

    store = SqliteSnapshotStore(sys.argv[1])
    start = int(sys.argv[2])
    pad = "x" * 6000  # rows larger than a page, so a torn write would show
    seq = start
    while True:
        seq += 1
        for shard in ((0, 2), (1, 2)):
            store.save(shard, SessionSnapshot(
                session_id=f"{pad}-{seq}", seq=seq, shard=shard, saved_at=0.0))
        if seq == start + 300:
            print("ready", flush=True)
    """
)


def test_sqlite_survives_sigkill_in_the_middle_of_saves(tmp_path):
    path = tmp_path / "snapshots.db"
    last = 0
    for _ in range(3):
        child = subprocess.Popen(  # noqa: S603 - our own interpreter and script
            [sys.executable, "-c", _WRITER, str(path), str(last)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        with SqliteSnapshotStore(path) as store:
            snaps = [store.load((0, 2)), store.load((1, 2))]
        assert all(s is not None for s in snaps)
        seqs = [s.seq for s in snaps]
        assert min(seqs) >= last + 300
        assert all(s.session_id.endswith(f"-{s.seq}") for s in snaps)
        last = max(seqs)


# --------------------------------------------------------------- local identify limiter


class VirtualTime:
    """A clock that only moves when a sleep moves it; acquires run one after another."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def _limiter(vt, **kwargs):
    return LocalIdentifyLimiter(clock=vt.clock, sleep=vt.sleep, **kwargs)


def _limit(remaining, *, total=10, reset_after=3600.0, max_concurrency=1):
    return SessionStartLimit(
        total=total, remaining=remaining, reset_after=reset_after, max_concurrency=max_concurrency
    )


async def _grants(limiter, vt, shards, max_concurrency):
    out = []
    for shard in shards:
        await limiter.acquire(shard, max_concurrency)
        out.append(vt.now)
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_local_limiter_window_restarts_when_the_identify_goes_out():
    vt = VirtualTime()
    limiter = _limiter(vt)
    await limiter.acquire(0, 2)
    assert vt.now == 0.0
    vt.now = 3.0  # shard 0's connection took 3 s to open; its Identify goes out now
    await limiter.identified(0, 2)
    await limiter.acquire(1, 2)  # the other bucket is not held up
    assert vt.now == 3.0
    await limiter.acquire(2, 2)  # shard 0's bucket: a whole window after its Identify
    assert vt.now == 8.0
    await limiter.identified(2, 2)  # at once: nothing later than the grant itself
    await limiter.acquire(4, 2)
    assert vt.now == 13.0
    vt.now = 100.0
    await limiter.identified(0, 2)  # an old bucket's late report only ever pushes later
    await limiter.acquire(6, 2)
    assert vt.now == 105.0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("max_concurrency", [None, 1, 4])
async def test_local_limiter_exact_spacing(max_concurrency):
    vt = VirtualTime()
    grants = await _grants(_limiter(vt), vt, range(16), max_concurrency)
    per_window = max_concurrency or 1
    assert grants == [5.0 * (i // per_window) for i in range(16)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_local_limiter_window_is_configurable_and_follows_the_module_default(
    monkeypatch,
):
    vt = VirtualTime()
    assert await _grants(_limiter(vt, window=0.25), vt, [0, 0, 0], 1) == [0.0, 0.25, 0.5]
    monkeypatch.setattr(_stores, "IDENTIFY_WINDOW", 2.0)
    vt = VirtualTime()
    assert await _grants(_limiter(vt), vt, [0, 0], 1) == [0.0, 2.0]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.parametrize("max_concurrency", [1, 4])
async def test_local_limiter_concurrent_shards_on_a_virtual_clock(max_concurrency):
    # Real tasks competing, default clock and sleep; trio's MockClock jumps when all sleep.
    limiter = LocalIdentifyLimiter()
    start = anyio.current_time()
    grants: dict[int, float] = {}

    async def one(shard):
        await limiter.acquire(shard, max_concurrency)
        grants[shard] = anyio.current_time() - start

    async with anyio.create_task_group() as tg:
        for shard in range(16):
            tg.start_soon(one, shard)
    assert Counter(grants.values()) == {
        5.0 * k: max_concurrency for k in range(16 // max_concurrency)
    }
    for bucket in range(max_concurrency):
        times = sorted(t for s, t in grants.items() if s % max_concurrency == bucket)
        assert times == [5.0 * k for k in range(len(times))]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_local_limiter_budget_exhausted_raises_without_waiting():
    vt = VirtualTime()
    limiter = _limiter(vt, wait_for_reset=False)
    await limiter.update_limit(_limit(2))
    assert await _grants(limiter, vt, [0, 1], 1) == [0.0, 5.0]
    sleeps = len(vt.sleeps)
    with pytest.raises(IdentifyBudgetExhausted) as info:
        await limiter.acquire(2, 1)
    assert info.value.retry_after == 3595.0
    assert "session_start_limit" in str(info.value)
    assert "3595 s" in str(info.value)
    assert len(vt.sleeps) == sleeps  # no sleep, no loop
    vt.now = 3600.0  # the day rolled over: the whole budget is back
    assert await _grants(limiter, vt, [3] * 10, 1) == [3600.0 + 5 * i for i in range(10)]
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(4, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_local_limiter_budget_exhausted_waits_once_for_the_reset():
    vt = VirtualTime()
    limiter = _limiter(vt)
    await limiter.update_limit(_limit(0, total=3, reset_after=100.0))  # other shards used it
    assert await _grants(limiter, vt, [0], 1) == [100.0]
    assert vt.sleeps == [100.0, 0.0]  # one sleep for the reset, one (empty) for the slot
    # The permit taken at the reset counts against the new period: two left.
    assert await _grants(limiter, vt, [1, 2], 1) == [105.0, 110.0]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
async def test_local_limiter_never_promises_more_than_the_next_period():
    limiter = LocalIdentifyLimiter()
    await limiter.update_limit(_limit(0, total=3, reset_after=100.0))
    start = anyio.current_time()
    grants = []

    refused = []

    async def one(shard):
        try:
            await limiter.acquire(shard, 1)
        except IdentifyBudgetExhausted as exc:
            refused.append(exc.retry_after)
        else:
            grants.append(anyio.current_time() - start)

    async with anyio.create_task_group() as tg:
        for shard in range(4):
            tg.start_soon(one, shard)
    assert refused == [100.0 + 86_400.0]  # at once: the next period is all promised
    assert sorted(grants) == [100.0, 105.0, 110.0]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
async def test_local_limiter_cancelled_wait_gives_the_budget_back():
    limiter = LocalIdentifyLimiter(wait_for_reset=False)
    await limiter.update_limit(_limit(2))
    await limiter.acquire(0, 1)
    with anyio.move_on_after(1.0) as scope:
        await limiter.acquire(1, 1)  # would wait 5 s for the slot
    assert scope.cancelled_caught
    await limiter.acquire(2, 1)  # the cancelled permit's budget is back
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(3, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_local_limiter_an_answer_of_the_same_period_never_raises_the_count():
    vt = VirtualTime()
    limiter = _limiter(vt, wait_for_reset=False)
    await limiter.update_limit(_limit(1))
    await limiter.acquire(0, 1)
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(1, 1)
    # Another shard's /gateway/bot answer, fetched before the Identify above went out, still
    # says 1 left: it must not be granted a second Identify of a budget of one.
    await limiter.update_limit(_limit(1, reset_after=3599.0))
    with pytest.raises(IdentifyBudgetExhausted):
        await limiter.acquire(1, 1)
    vt.now = t0 = 10.0 + 86_400.0 * 2.5  # idle for days: every period has passed
    assert await _grants(limiter, vt, [0] * 10, 1) == [t0 + 5 * i for i in range(10)]
