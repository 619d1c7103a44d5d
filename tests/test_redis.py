"""The Redis identify limiter and snapshot store, against a real redis-server (conftest.py).

Windows are shortened (0.2 s instead of 5 s) so that the tests where real time must pass
stay quick; assertions on spacing use Redis's own clock (the time each permit was granted,
as the server saw it), so a slow machine cannot make them fail.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections import defaultdict

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from qqproto import SessionSnapshot, SessionStartLimit
from qqproto_io import IdentifyBudgetExhausted, RedisIdentifyLimiter, RedisSnapshotStore

pytestmark = pytest.mark.anyio

WINDOW = 0.2
SLACK = 0.002  # Redis expires keys on a millisecond clock; TIME has microseconds
BOUND = 30.0  # generous bound on anything that really waits
WALL = 1_700_000_000.5


@pytest.fixture
def anyio_backend():
    return "asyncio"  # redis.asyncio runs on asyncio only


@pytest.fixture
def prefix():
    return f"test-{uuid.uuid4().hex[:12]}"  # isolates tests sharing the session's server


@pytest.fixture
async def client(redis_server):
    c = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        yield c
    finally:
        await c.aclose()


class Sleeps:
    """Records every sleep the limiter asks for, then really sleeps."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await anyio.sleep(seconds)


def _limit(remaining, *, reset_after=60.0, total=1000, max_concurrency=1):
    return SessionStartLimit(
        total=total, remaining=remaining, reset_after=reset_after, max_concurrency=max_concurrency
    )


def _snapshot(session_id="s-1", seq=7, shard=(0, 1)):
    return SessionSnapshot(session_id=session_id, seq=seq, shard=shard, saved_at=1.0)


# ------------------------------------------------------------------------------ limiter


async def test_one_bucket_is_spaced_by_the_window(client, prefix):
    limiter = RedisIdentifyLimiter(client, prefix=prefix, window=WINDOW)
    grants = []
    with anyio.fail_after(BOUND):
        for shard in (0, 3, 6):
            await limiter.acquire(shard, 3)  # all bucket 0
            grants.append(limiter.last_grant)
    assert all(b - a >= WINDOW - SLACK for a, b in itertools.pairwise(grants))


async def test_distinct_buckets_do_not_wait_and_leases_expire(client, prefix):
    sleeps = Sleeps()
    limiter = RedisIdentifyLimiter(client, prefix=prefix, window=WINDOW, sleep=sleeps)
    for shard in range(4):
        await limiter.acquire(shard, 4)
    assert sleeps.calls == []
    for bucket in range(4):
        key = f"{{{prefix}}}:identify:{bucket}"
        assert 0 < await client.pttl(key) <= WINDOW * 1000  # a lease, not a lock
        holder = (await client.get(key)).decode()
        assert f":{os.getpid()}:" in holder
    assert "prefix" in repr(limiter)


async def test_a_lease_without_expiry_is_bounded(client, prefix):
    await client.set(f"{{{prefix}}}:identify:0", "stuck")  # no TTL: would block for ever
    sleeps = Sleeps()
    limiter = RedisIdentifyLimiter(client, prefix=prefix, window=WINDOW, sleep=sleeps)
    with anyio.fail_after(BOUND):
        await limiter.acquire(0, 1)
    assert sleeps.calls[0] == WINDOW


async def test_budget_exhausted_raises_at_once(client, prefix):
    sleeps = Sleeps()
    limiter = RedisIdentifyLimiter(
        client, prefix=prefix, window=WINDOW, sleep=sleeps, wait_for_reset=False
    )
    await limiter.update_limit(_limit(2, reset_after=60.0))
    await limiter.acquire(0, 4)
    await limiter.acquire(1, 4)
    with pytest.raises(IdentifyBudgetExhausted) as info:
        await limiter.acquire(2, 4)
    assert 50.0 < info.value.retry_after <= 60.0
    assert sleeps.calls == []  # neither waited nor polled
    assert await client.exists(f"{{{prefix}}}:identify:2") == 0  # no lease taken either


async def test_budget_exhausted_waits_for_the_reset(client, prefix):
    sleeps = Sleeps()
    limiter = RedisIdentifyLimiter(client, prefix=prefix, window=WINDOW, sleep=sleeps)
    await limiter.update_limit(_limit(0, reset_after=0.3))  # another process used it all
    with anyio.fail_after(BOUND):
        await limiter.acquire(0, 1)
    assert len(sleeps.calls) == 1  # one sleep until the reset, no loop
    assert 0 < sleeps.calls[0] <= 0.3


async def test_budget_updates_keep_the_lowest_count_within_a_period(client, prefix):
    limiter = RedisIdentifyLimiter(client, prefix=prefix)
    key = f"{{{prefix}}}:identify-budget"
    await limiter.update_limit(_limit(5, reset_after=3600.0))
    await limiter.update_limit(_limit(7, reset_after=3590.0))  # an older answer
    assert int(await client.get(key)) == 5
    await limiter.update_limit(_limit(3, reset_after=3580.0))
    assert int(await client.get(key)) == 3
    await limiter.update_limit(_limit(1000, reset_after=86_000.0))  # a new period
    assert int(await client.get(key)) == 1000
    await limiter.acquire(0, 1)
    assert int(await client.get(key)) == 999
    assert 85_000_000 < await client.pttl(key) <= 86_000_000
    await limiter.update_limit(_limit(0, reset_after=0.0))  # resets now
    assert await client.exists(key) == 0


async def test_unreadable_budget_is_forgotten(client, prefix):
    key = f"{{{prefix}}}:identify-budget"
    await client.set(key, "garbage", px=60_000)
    await RedisIdentifyLimiter(client, prefix=prefix, wait_for_reset=False).acquire(0, 1)
    assert await client.exists(key) == 0


async def test_redis_down_retries_with_backoff_and_logs(caplog):
    class Stop(Exception):
        pass

    calls: list[float] = []

    async def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 4:
            raise Stop

    with socket_nobody_listens_on() as port:
        # No retries inside redis-py (its default adds seconds per call): ours are tested.
        c = aioredis.Redis(
            host="127.0.0.1", port=port, password="SECRET-PW-123", retry=Retry(NoBackoff(), 0)
        )
        try:
            limiter = RedisIdentifyLimiter(c, prefix="x", sleep=sleep, retry_delays=(0.1, 0.5))
            with caplog.at_level(logging.WARNING, "qqproto_io.redis"), pytest.raises(Stop):
                await limiter.acquire(0, 1)
        finally:
            await c.aclose()
    assert calls == [0.1, 0.2, 0.4, 0.5]
    assert "Redis failed" in caplog.text
    assert "SECRET-PW-123" not in caplog.text
    assert "SECRET-PW-123" not in repr(limiter)


class socket_nobody_listens_on:  # noqa: N801 - reads as a context manager
    """A loopback port bound but not listening: connections are refused."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc):
        self.sock.close()


_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    import redis.asyncio as aioredis
    from qqproto_io import RedisIdentifyLimiter

    async def main():
        port, prefix, window, mc, shards, hold = sys.argv[1:]
        port, window, mc, shards = int(port), float(window), int(mc), json.loads(shards)
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            limiter = RedisIdentifyLimiter(client, prefix=prefix, window=window)
            await client.ping()
            print("ready", flush=True)
            sys.stdin.readline()  # "go": both processes start together
            for shard in shards:
                await limiter.acquire(shard, mc)
                print(json.dumps([shard, limiter.last_grant]), flush=True)
            if hold == "hold":
                sys.stdin.readline()  # hold on until killed
        finally:
            await client.aclose()

    asyncio.run(main())
    """
)


def _spawn(redis_server, prefix, window, mc, shards, *, hold=False):
    args = [str(redis_server.port), prefix, str(window), str(mc), json.dumps(shards)]
    return subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _CHILD, *args, "hold" if hold else "go"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_two_processes_share_the_buckets(redis_server, prefix):
    children = [_spawn(redis_server, prefix, WINDOW, 2, [0, 1, 2, 3]) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline() == "ready\n"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=BOUND)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert [child.returncode for child in children] == [0, 0]
    by_bucket = defaultdict(list)
    for n, out in enumerate(outputs):
        grants = [json.loads(line) for line in out.splitlines()]
        assert [shard for shard, _ in grants] == [0, 1, 2, 3]
        for shard, at in grants:
            by_bucket[shard % 2].append((at, n))
    for grants in by_bucket.values():
        grants.sort()
        assert len(grants) == 4
        assert {n for _, n in grants} == {0, 1}  # both processes were served
        times = [at for at, _ in grants]
        assert all(b - a >= WINDOW - SLACK for a, b in itertools.pairwise(times))


async def test_a_holder_killed_mid_lease_blocks_others_only_until_the_lease_ends(
    redis_server, client, prefix
):
    lease = 1.0
    child = _spawn(redis_server, prefix, lease, 1, [0], hold=True)
    try:
        assert child.stdout.readline() == "ready\n"
        child.stdin.write("go\n")
        child.stdin.flush()
        _, child_grant = json.loads(child.stdout.readline())
        holder = (await client.get(f"{{{prefix}}}:identify:0")).decode()
        assert f":{child.pid}:" in holder
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    limiter = RedisIdentifyLimiter(client, prefix=prefix, window=lease)
    with anyio.fail_after(BOUND):
        await limiter.acquire(0, 1)
    assert limiter.last_grant - child_grant >= lease - SLACK


# ------------------------------------------------------------------------ snapshot store


def _store(client, prefix, **kwargs):
    return RedisSnapshotStore(client, prefix=prefix, wall_clock=lambda: WALL, **kwargs)


async def test_store_round_trip_delete_and_two_shards(client, prefix):
    async with _store(client, prefix) as store:
        assert store.load((0, 2)) is None
        store.save((0, 2), _snapshot("a", 1, (0, 2)))
        store.save((1, 2), _snapshot("b", 2, (1, 2)))
        assert store.load((0, 2)).session_id == "a"  # at once, before any write
        store.save((1, 2), _snapshot("b", 3, (1, 2)))
        store.save((1, 2), None)
        store.save((1, 2), _snapshot("c", 4, (1, 2)))
        await store.flush()
        assert await client.hlen(f"{{{prefix}}}:snapshots") == 2
        store.save((0, 2), None)
    async with _store(client, prefix) as again:  # a restarted process
        assert again.load((0, 2)) is None
        assert again.load((1, 2)) == SessionSnapshot(
            session_id="c", seq=4, shard=(1, 2), saved_at=WALL
        )
    assert "pending" in repr(again)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("0/1", "not json"),
        ("0/1", '{"session_id": "x", "seq": 1, "shard": [5, 6], "saved_at": 1}'),
        ("0/1", b"\xff\xfe"),
        ("zero/one", _snapshot().to_json()),
        ("\u00b2/1", _snapshot().to_json()),
    ],
)
async def test_store_unreadable_entries_load_none(client, prefix, field, value):
    await client.hset(f"{{{prefix}}}:snapshots", field, value)
    async with _store(client, prefix) as store:
        assert store.load((0, 1)) is None
        assert await store.fetch((0, 1)) is None


async def test_store_fetch_sees_another_process_and_pending_saves_win(client, prefix):
    async with _store(client, prefix) as mine, _store(client, prefix) as theirs:
        theirs.save((0, 1), _snapshot("theirs", 5))
        await theirs.flush()
        assert mine.load((0, 1)) is None  # read at entry
        assert (await mine.fetch((0, 1))).session_id == "theirs"
        assert mine.load((0, 1)).session_id == "theirs"
        theirs.save((0, 1), None)
        await theirs.flush()
        assert await mine.fetch((0, 1)) is None
        mine.save((0, 1), _snapshot("mine", 6))
        assert (await mine.fetch((0, 1))).session_id == "mine"


async def test_store_retries_while_redis_fails_and_newest_save_wins(
    client, prefix, monkeypatch, caplog
):
    store = _store(client, prefix, retry_delays=(0.001, 0.004))
    real_write = store._write
    failures = []

    async def flaky_write(batch):
        if len(failures) < 3:
            failures.append(dict(batch))
            store.save((0, 1), _snapshot("newer", len(failures)))  # arrives mid-outage
            raise RedisConnectionError("Redis is down")
        await real_write(batch)

    monkeypatch.setattr(store, "_write", flaky_write)
    with caplog.at_level(logging.WARNING, "qqproto_io.redis"), anyio.fail_after(BOUND):
        async with store:
            store.save((0, 1), _snapshot("old", 0))
            await store.flush()
    assert len(failures) == 3
    assert "retried" in caplog.text
    assert "newer" not in caplog.text  # session ids stay out of the logs
    raw = await client.hget(f"{{{prefix}}}:snapshots", "0/1")
    assert SessionSnapshot.from_json(raw).session_id == "newer"
    assert SessionSnapshot.from_json(raw).seq == 3


async def test_store_outside_its_context(client, prefix, caplog):
    store = _store(client, prefix)
    with pytest.raises(RuntimeError):
        store.load((0, 1))
    with caplog.at_level(logging.WARNING, "qqproto_io.redis"):
        store.save((0, 1), _snapshot())
    assert "not saved" in caplog.text


async def test_identified_restarts_the_lease_for_a_whole_window(client, prefix):
    limiter = RedisIdentifyLimiter(client, prefix=prefix, window=1.0)
    key = f"{{{prefix}}}:identify:1"
    await limiter.acquire(3, 2)
    await anyio.sleep(0.4)  # the connection takes its time to open (the behaviour under test)
    assert await client.pttl(key) <= 600
    await limiter.identified(3, 2)
    # A fresh window from the Identify on: the next holder of bucket 1 waits for all of it.
    assert await client.pttl(key) > 900
