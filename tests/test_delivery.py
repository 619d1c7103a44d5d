# Exactly once across a crash. The unit tests drive DeliveryRecord by hand: the saved seq is
# always just below the oldest dispatch the application has not finished. The process test
# runs a bot with a handler as a child process, kills it with SIGKILL right after it
# finished a message (long before any heartbeat ACK could have saved a snapshot), restarts
# it on the same SQLite file, and checks that every message was handled exactly once.
"""The delivery record and the exactly-once guarantee across SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from qqproto import SessionSnapshot
from qqproto.testing import FakeGatewayConfig
from qqproto_io._delivery import DeliveryRecord
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._stores import SqliteSnapshotStore

SHARD = (0, 1)


class MemoryStore:
    def __init__(self, snapshot: SessionSnapshot | None = None) -> None:
        self.saved: list[SessionSnapshot | None] = []
        self.initial = snapshot

    def load(self, shard):
        return self.initial

    def save(self, shard, snapshot):
        self.saved.append(snapshot)

    @property
    def seq(self) -> int | None:
        last = self.saved[-1]
        return None if last is None else last.seq


def snap(seq: int | None, session: str = "S1") -> SessionSnapshot:
    return SessionSnapshot(session_id=session, seq=seq, shard=SHARD, saved_at=0.0)


def test_the_saved_seq_follows_what_the_application_finished() -> None:
    store = MemoryStore()
    record = DeliveryRecord(store)
    record.save(SHARD, snap(1))  # READY, seq 1
    assert store.seq == 1
    for seq in (2, 3, 4):
        record.queued(SHARD, seq)
    record.save(SHARD, snap(4))  # an ACK: the core has received up to 4
    assert store.seq == 1  # ... but nothing is finished
    record.finished(SHARD)
    assert store.seq == 2
    record.finished(SHARD)
    record.finished(SHARD)
    assert store.seq == 4
    # Ahead of the core's last snapshot: 5 and 6 finished before the next ACK.
    record.queued(SHARD, 5)
    record.queued(SHARD, 6)
    record.finished(SHARD)
    assert store.seq == 5
    record.finished(SHARD)
    assert store.seq == 6
    saves = len(store.saved)
    record.finished(SHARD)  # nothing queued: nothing changes, nothing written
    assert len(store.saved) == saves


def test_a_replay_that_fills_a_gap_holds_the_seq_below_it() -> None:
    store = MemoryStore()
    record = DeliveryRecord(store)
    record.save(SHARD, snap(1))
    record.queued(SHARD, 2)
    record.queued(SHARD, 5)  # 3 and 4 skipped ...
    record.queued(SHARD, 3)  # ... and 3 replayed late
    record.finished(SHARD)  # 2
    assert store.seq == 2
    record.finished(SHARD)  # 5 finished, 3 not yet: nothing below 3 may be claimed
    assert store.seq == 2
    record.finished(SHARD)  # 3
    assert store.seq == 5


def test_a_new_session_is_saved_with_its_own_progress() -> None:
    store = MemoryStore()
    record = DeliveryRecord(store)
    record.save(SHARD, snap(1, "OLD"))
    record.queued(SHARD, 2)  # the old session's last dispatch, still in the queue
    record.save(SHARD, snap(1, "NEW"))  # invalidated; READY of a new session
    assert store.saved[-1] == snap(1, "NEW")
    record.queued(SHARD, 2)  # the new session's seq 2
    record.finished(SHARD)  # the OLD 2: the new session's progress is unchanged
    assert store.saved[-1] == snap(1, "NEW")
    record.finished(SHARD)
    assert store.saved[-1] == snap(2, "NEW")
    record.save(SHARD, None)  # dropped
    assert store.saved[-1] is None


def test_a_loaded_snapshot_is_the_starting_point() -> None:
    store = MemoryStore(snap(40))
    record = DeliveryRecord(store)
    assert record.load(SHARD) == snap(40)
    record.queued(SHARD, 41)
    record.finished(SHARD)
    assert store.seq == 41


# ----------------------------------------------------------------- the real thing

BOT = textwrap.dedent(
    """
    import random, sys
    import anyio
    from qqproto import SessionConfig
    from qqproto_io import GatewayClient

    app_id, secret, api, token_url, snapshots, handled, seed = sys.argv[1:]

    async def main():
        client = GatewayClient(
            app_id=app_id, client_secret=secret, api_base=api, token_url=token_url,
            snapshot_path=snapshots, rng=random.Random(int(seed)),
            config=SessionConfig(min_heartbeat_interval=0.1),
        )

        @client.on("C2C_MESSAGE_CREATE")
        async def handle(dispatch):
            with open(handled, "a") as out:
                out.write(dispatch.event_id + "\\n")

        async with client:
            await anyio.sleep_forever()

    anyio.run(main)
    """
)


def _late_first_beat_seed(fraction: float) -> int:
    # The first beat comes at interval * rng.random(): pick a seed that puts it late, so no
    # heartbeat ACK (which also saves a snapshot) can hide what this test is about.
    return next(s for s in range(1000) if random.Random(s).random() > fraction)


def _handled(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def _wait(predicate, within: float = 20.0) -> None:
    with anyio.fail_after(within):
        # Another process writes what is polled here: there is no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_message_handled_before_sigkill_is_never_handled_again(tmp_path) -> None:
    snapshots = tmp_path / "sessions.sqlite3"
    handled = tmp_path / "handled.txt"
    with anyio.fail_after(90):
        async with FakeGatewayServer(FakeGatewayConfig(hello_interval_ms=60_000)) as server:
            cfg = server.gateway.config
            argv = [
                sys.executable,
                "-c",
                BOT,
                cfg.app_id,
                cfg.client_secret,
                server.http_base,
                server.token_url,
                str(snapshots),
                str(handled),
                str(_late_first_beat_seed(0.9)),
            ]
            env = {k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")}
            first = await anyio.open_process(argv, env=env)
            try:
                await _wait(lambda: server.gateway.identifies)
                for n in range(1, 6):
                    server.message(n)
                await _wait(lambda: len(_handled(handled)) == 5)
                # The bot finished message 5; its record says so at once, no ACK needed.
                expected_seq = server.gateway.connections[0].session.seq

                def recorded() -> bool:
                    with SqliteSnapshotStore(snapshots) as store:
                        saved = store.load((0, 1))
                    return saved is not None and saved.seq == expected_seq

                await _wait(recorded, within=5.0)
                first.send_signal(signal.SIGKILL)
                await first.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    if first.returncode is None:
                        first.kill()
                    await first.aclose()
            for n in range(6, 9):  # while the bot is down
                server.message(n)
            second = await anyio.open_process(argv, env=env)
            try:
                await _wait(lambda: len(_handled(handled)) >= 8)
            finally:
                with anyio.CancelScope(shield=True):
                    second.terminate()
                    await second.wait()
                    await second.aclose()
    assert _handled(handled) == [f"C2C_MESSAGE_CREATE:fake{n:08d}" for n in range(1, 9)]
    assert len(server.gateway.identifies) == 1
