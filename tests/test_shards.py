# Many shards in one process, identify pacing across them, and a restart that resumes.
#
# The 16-shard runs use GatewayClient(shards="auto") against the FakeGatewayServer, whose
# /gateway/bot recommends 16 shards with max_concurrency 2. The limiters run with a short
# window (the real one is 5 s): each grant is recorded on the limiter's own clock, where the
# spacing is exact, and the Identify payloads the fake received are checked as well, with a
# tolerance for the connection set-up that follows a grant. The restart test runs
# `qqproto run --snapshot FILE` as a child process, kills it with SIGKILL once its snapshot
# caught up with what it printed, and starts it again against the same fake: the second
# process Resumes, gets the messages it missed replayed, and together the two print every
# message exactly once.
"""Tests for multi-shard GatewayClient, shard plans, identify pacing and restart-resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from collections import defaultdict

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qqproto import Ready
from qqproto.testing import FakeGatewayConfig
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._shards import ShardPlan
from qqproto_io._stores import LocalIdentifyLimiter, SqliteSnapshotStore
from tests.test_driver import fast_config, gateway_config, make_client

pytestmark = pytest.mark.anyio

SHARDS = 16
MAX_CONCURRENCY = 2
# Long enough that opening a connection on a loaded CI machine (0.24 s seen) stays well
# inside it: only a connection slower to open than a whole window can let the next permit of
# its bucket out before its own Identify.
WINDOW = 0.5


# ------------------------------------------------------------------------------ plans


@pytest.mark.parametrize(
    ("text", "count", "ids"),
    [
        ("auto", None, None),
        ("16", 16, None),
        ("3/16", 16, (3,)),
        ("0-7/16", 16, tuple(range(8))),
        ("0,2,4/8", 8, (0, 2, 4)),
        ("0-1,5/8", 8, (0, 1, 5)),
        (" AUTO ", None, None),
    ],
)
def test_plan_parses(text, count, ids):
    plan = ShardPlan.parse(text)
    assert (plan.count, plan.ids) == (count, ids)


@pytest.mark.parametrize("text", ["", "0", "x", "16/0", "3/3", "1-0/4", "1,1/4", "-1/4", "a/4"])
def test_plan_rejects_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="use auto, N, I/N"):
        ShardPlan.parse(text)


def test_plan_resolves_against_the_recommendation():
    assert ShardPlan.parse("auto").resolve(3) == [(0, 3), (1, 3), (2, 3)]
    assert ShardPlan.parse("auto").resolve(None) == [(0, 1)]
    assert ShardPlan.parse("2-3/4").resolve(99) == [(2, 4), (3, 4)]
    with pytest.raises(ValueError, match="do not fit"):
        ShardPlan(ids=(5,)).resolve(4)


@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_plan_text_round_trips(case):
    count, ids = case
    plan = ShardPlan(count=count, ids=tuple(sorted(ids)) or None)
    assert ShardPlan.parse(str(plan)) == plan


# ------------------------------------------------------------------------- 16 shards


class RecordingLimiter:
    """Records when each shard got its permit, on the limiter's own clock."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.grants: list[tuple[float, int]] = []

    async def acquire(self, shard_id: int, max_concurrency: int | None) -> None:
        await self.inner.acquire(shard_id, max_concurrency)
        self.grants.append((anyio.current_time(), shard_id))

    async def update_limit(self, limit) -> None:
        await self.inner.update_limit(limit)

    async def identified(self, shard_id: int, max_concurrency: int | None) -> None:
        await self.inner.identified(shard_id, max_concurrency)


def assert_paced(grants: list[tuple[float, int]], identifies: list[tuple[float, int]]) -> None:
    assert sorted(s for _, s in grants) == list(range(SHARDS))
    buckets: dict[int, list[float]] = defaultdict(list)
    for at, shard in sorted(grants):
        buckets[shard % MAX_CONCURRENCY].append(at)
    assert len(buckets) == MAX_CONCURRENCY
    for times in buckets.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= WINDOW - 0.005, gaps  # timer precision, nothing more
    # Both buckets start at once: max_concurrency is used, not serialised away.
    firsts = sorted(times[0] for times in buckets.values())
    assert firsts[-1] - firsts[0] < WINDOW
    # What the gateway saw: one Identify per shard, each after its permit (the fake runs on
    # the same clock), and same-bucket Identifies a window apart: the window restarts when
    # an Identify goes out (`identified`), so a connection slow to open cannot squeeze the
    # next one. The tolerance is the time a sent frame takes to be read by the fake server,
    # not the connection set-up.
    assert sorted(s for _, s in identifies) == list(range(SHARDS))
    granted = {shard: at for at, shard in grants}
    assert all(at >= granted[shard] for at, shard in identifies)
    seen: dict[int, list[float]] = defaultdict(list)
    for at, shard in sorted(identifies):
        seen[shard % MAX_CONCURRENCY].append(at)
    for times in seen.values():
        assert min(b - a for a, b in itertools.pairwise(times)) >= WINDOW / 2


def identifies_seen(server: FakeGatewayServer) -> list[tuple[float, int]]:
    return [
        (at, d["shard"][0])
        for conn in server.gateway.connections
        for at, op, d in conn.received
        if op == 2 and isinstance(d, dict)
    ]


async def run_sixteen_shards(limiter) -> None:
    gateway = FakeGatewayConfig(hello_interval_ms=1000, shards=SHARDS, max_concurrency=2)
    with anyio.fail_after(60):
        async with FakeGatewayServer(gateway) as server:
            client = make_client(server, fast_config(), shards="auto", limiter=limiter)
            ready: dict[int, str] = {}
            async with client:
                assert client.shard_ids == list(range(SHARDS))
                async for shard_id, event in client.shard_events():
                    if isinstance(event, Ready):
                        assert shard_id not in ready
                        ready[shard_id] = event.session_id
                        if len(ready) == SHARDS:
                            break
                assert len(set(ready.values())) == SHARDS  # sixteen sessions
                assert {c.config.shard for c in client.connections.values()} == {
                    (i, SHARDS) for i in range(SHARDS)
                }
                # One token for all sixteen shards: a single refresh, never a stampede.
                assert len(server.gateway.tokens) == 1
            assert_paced(limiter.grants, identifies_seen(server))


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_sixteen_shards_obey_max_concurrency_with_the_local_limiter():
    await run_sixteen_shards(RecordingLimiter(LocalIdentifyLimiter(window=WINDOW)))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio is asyncio only
async def test_sixteen_shards_obey_max_concurrency_with_the_redis_limiter(redis_server):
    from redis.asyncio import Redis

    from qqproto_io._redis import RedisIdentifyLimiter

    redis = Redis(host=redis_server.host, port=redis_server.port)
    try:
        prefix = f"test-shards-{os.getpid()}"
        await run_sixteen_shards(
            RecordingLimiter(RedisIdentifyLimiter(redis, prefix=prefix, window=WINDOW))
        )
    finally:
        await redis.aclose()


# ------------------------------------------------------------------ restart, resume


class Child:
    """`qqproto run --log-format json` in a child process, its records read as they come."""

    def __init__(self, server: FakeGatewayServer, snapshot: str) -> None:
        cfg = server.gateway.config
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")},
            "QQBOT_APP_ID": cfg.app_id,
            "QQBOT_CLIENT_SECRET": cfg.client_secret,
            "QQBOT_API_BASE": server.http_base,
            "QQBOT_TOKEN_URL": server.token_url,
            "QQBOT_SNAPSHOT": snapshot,
            "QQBOT_LOG_FORMAT": "json",
        }
        self.records: list[dict] = []
        self._changed = anyio.Event()

    async def run(self, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        # -v: the dispatch records are DEBUG, and this test reads them.
        code = "import sys; from qqproto_io._cli import main; sys.exit(main(['run', '-v']))"
        async with await anyio.open_process(
            [sys.executable, "-c", code], env=self.env, stderr=None
        ) as proc:
            self.proc = proc
            task_status.started()
            assert proc.stdout is not None
            buffer = b""
            async for chunk in proc.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                self.records.extend(json.loads(line) for line in lines if line.strip())
                self._changed.set()
                self._changed = anyio.Event()

    async def until(self, predicate, within: float = 20.0) -> dict:
        with anyio.fail_after(within):
            while True:
                for record in self.records:
                    if predicate(record):
                        return record
                await self._changed.wait()

    def dispatched(self) -> list[str]:
        return [r["event_id"] for r in self.records if r["event"] == "dispatch"]


async def wait_for_snapshot(path: str, seq: int) -> None:
    """Until the SQLite file holds ``seq`` (the child saves it on the next ACK)."""
    with anyio.fail_after(20):
        while True:
            with SqliteSnapshotStore(path) as store:
                snap = store.load((0, 1))
            if snap is not None and snap.seq >= seq:
                return
            await anyio.sleep(0.05)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_killed_process_resumes_from_its_sqlite_snapshot_without_loss_or_duplicates(
    tmp_path,
):
    snapshot = str(tmp_path / "sessions.sqlite3")
    with anyio.fail_after(90):
        async with FakeGatewayServer(gateway_config()) as server:
            first = Child(server, snapshot)
            async with anyio.create_task_group() as tg:
                await tg.start(first.run)
                await first.until(lambda r: r["event"] == "ready")
                for n in range(1, 6):
                    server.message(n)
                last = await first.until(lambda r: r.get("event_id", "").endswith("00000005"))
                await wait_for_snapshot(snapshot, last["seq"])
                first.proc.send_signal(signal.SIGKILL)  # no goodbye, no close frame
            assert first.proc.returncode == -signal.SIGKILL

            # While nobody is connected the gateway keeps producing (and buffering).
            await anyio.lowlevel.checkpoint()
            for n in range(6, 9):
                server.message(n)

            second = Child(server, snapshot)
            async with anyio.create_task_group() as tg:
                await tg.start(second.run)
                resumed = await second.until(lambda r: r["event"] == "resumed")
                await second.until(lambda r: r.get("event_id", "").endswith("00000008"))
                second.proc.send_signal(signal.SIGTERM)

    assert not [r for r in second.records if r["event"] == "ready"], "no new session"
    assert resumed["replayed"] == 3
    assert resumed["seq"] == last["seq"] + 3 + 1  # three replays, then RESUMED's own seq
    every = first.dispatched() + second.dispatched()
    assert every == [f"C2C_MESSAGE_CREATE:fake{n:08d}" for n in range(1, 9)]
    assert len(server.gateway.identifies) == 1


def test_qqproto_run_with_redis_keeps_its_snapshot_in_redis(redis_server):
    # `--redis-url` switches the store (and the limiter) to Redis: the session's snapshot
    # lands in the bot's hash, readable by any other process of the fleet.
    import subprocess

    import redis

    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")}
    code = "import sys; from qqproto_io._cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "run", "--fake", "--redis-url", url, "--seconds", "7"]
    done = subprocess.run(  # noqa: S603 - our interpreter, our module
        argv, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ready: new session" in done.stdout
    app_id = FakeGatewayConfig().app_id  # the embedded fake gateway's
    with redis.Redis(host=redis_server.host, port=redis_server.port) as client:
        stored = client.hgetall(f"{{qqproto:{app_id}}}:snapshots")
    assert list(stored) == [b"0/1"]
    snapshot = json.loads(stored[b"0/1"])
    assert snapshot["session_id"]
    assert snapshot["seq"] >= 1
