"""The stall monitor names the code that blocks the event loop (on asyncio and trio)."""

from __future__ import annotations

import logging
import threading
import time

import anyio
import pytest

from qqproto_io._stall import StallMonitor

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def block_the_loop_like_a_careless_handler(seconds: float) -> None:
    time.sleep(seconds)  # the behaviour under test: synchronous code on the event loop


async def test_a_blocked_loop_is_reported_with_the_blocking_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="qqproto_io.stall")
    ended = threading.Event()
    monitor = StallMonitor(threshold=0.3, on_stall=lambda _duration: ended.set())
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(monitor.run)
            block_the_loop_like_a_careless_handler(1.5)
            # The watching thread reports the end of the stall once the loop runs again.
            assert await anyio.to_thread.run_sync(ended.wait, 5.0), (
                monitor.stalled_since,
                monitor.stalls,
                [r.getMessage()[:40] for r in caplog.records],
            )
            tg.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records]
    blocked = [m for m in messages if m.startswith("event loop blocked")]
    assert len(blocked) == 1, messages
    assert "block_the_loop_like_a_careless_handler" in blocked[0]
    assert any(m.startswith("event loop ran again after a stall of") for m in messages)
    assert 1.0 < monitor.stalls[0] < 3.0
    assert monitor.stalled_since is None


async def test_a_healthy_loop_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="qqproto_io.stall")
    monitor = StallMonitor(threshold=1.0)  # generous: a loaded CI machine is not a stall
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(monitor.run)
            for _ in range(10):
                await anyio.sleep(0.05)  # a loop that keeps running: nothing to report
            tg.cancel_scope.cancel()
    assert monitor.stalls == []
    assert [r for r in caplog.records if r.name == "qqproto_io.stall"] == []
