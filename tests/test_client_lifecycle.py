# The driver and GatewayClient at the edges of their life: a failure inside, a cancelled
# caller, a stalled request, a limiter that refuses or breaks. Over loopback against the fake
# gateway, on asyncio and trio, every body bounded by `fail_after`; ordering comes from the
# events the client reports, never from sleeps.
"""GatewayClient and ShardDriver lifecycle: failures, cancellation, abandoned requests."""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from qqproto import (
    Disconnected,
    GatewayConnection,
    Ready,
    ReconnectScheduled,
    Resumed,
    SessionState,
    TokenGrant,
)
from qqproto_io._driver import ShardDriver
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._http import Credentials, RestApi, TokenSource
from qqproto_io._stores import IdentifyBudgetExhausted, LocalIdentifyLimiter
from tests.loopback import anyio_backend  # noqa: F401 - fixtures
from tests.test_driver import BOUND, Recorder, fast_config, gateway_config, make_client, running

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


async def test_a_failing_driver_raises_its_cause_and_leaves_the_callers_scopes_intact(
    monkeypatch,
):
    # A bug inside a shard's loop (here: applying an inbox item fails once READY).
    original = ShardDriver._apply

    def apply(self, item):
        if self.conn.state is SessionState.READY:
            raise Boom("inside the driver")
        original(self, item)

    monkeypatch.setattr(ShardDriver, "_apply", apply)
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:

            async def consume() -> None:
                async with make_client(server) as client:
                    async for _event in client:
                        pass

            with anyio.CancelScope() as outer:
                with pytest.raises(Boom, match="inside the driver"):
                    await consume()
            assert not outer.cancel_called
            # The caller's own scopes still work: a timeout fires, a sleep returns.
            with anyio.move_on_after(0.01) as timed:
                await anyio.sleep_forever()
            assert timed.cancel_called
            await anyio.lowlevel.checkpoint()


async def test_close_may_be_called_again_after_the_client_stopped():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            async with running(server) as (client, rec):
                await rec.next(Ready)
                await client.close()
                await rec.stopped()
                await client.close()
                await client.close(end_session=True)
            assert client.state is SessionState.STOPPED


async def test_leaving_by_cancellation_sends_a_close_frame_and_keeps_the_session(
    client_closes, tmp_path
):
    snapshots = tmp_path / "s.sqlite"
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            with anyio.CancelScope() as caller:
                async with running(server, snapshot_path=snapshots) as (client, rec):
                    await rec.next(Ready)
                    caller.cancel()
                    await anyio.sleep_forever()
            assert caller.cancelled_caught
            assert client.state is SessionState.STOPPED
            # A close frame, and one that keeps the session (never 1000/1001).
            assert client_closes == [4000]

            # A restart resumes it.
            async with running(server, snapshot_path=snapshots) as (_client2, rec2):
                await rec2.next(Resumed)
                assert rec2.of(Ready) == []


class HangingTokens:
    """A token API whose first fetch never answers (a slow-loris peer); later ones ask
    ``api``."""

    def __init__(self, api: RestApi) -> None:
        self.api = api
        self.started = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.cancelled = 0

    async def fetch_token(self) -> TokenGrant:
        self.started += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.started == 1:
                await anyio.sleep_forever()
            return await self.api.fetch_token()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1


async def test_an_abandoned_token_request_is_cancelled_and_the_next_one_runs():
    rec = Recorder()
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            gw = server.gateway.config
            api = RestApi(
                Credentials(gw.app_id, gw.client_secret),
                api_base=server.http_base,
                token_url=server.token_url,
            )
            tokens_api = HangingTokens(api)
            driver = ShardDriver(
                GatewayConnection(fast_config(http_timeout=0.3), rng=random.Random(1)),
                api=api,
                tokens=TokenSource(tokens_api),  # type: ignore[arg-type]
                limiter=LocalIdentifyLimiter(),
                store=None,
                on_event=rec.add,
            )
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(driver.run)
                    await rec.next(Ready)
                    driver.request_close()
            finally:
                await api.aclose()
    assert tokens_api.cancelled == 1
    assert tokens_api.most_in_flight == 1  # never a second fetch queued behind the first
    assert tokens_api.started == 2


class RefusingLimiter(LocalIdentifyLimiter):
    """Refuses the first permit (budget spent, or a broken store), then grants."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.calls = 0

    async def acquire(self, shard_id: int, max_concurrency: int | None) -> None:
        self.calls += 1
        if self.calls == 1:
            raise self.error
        await super().acquire(shard_id, max_concurrency)


@pytest.mark.parametrize(
    ("error", "planned"),
    [(IdentifyBudgetExhausted(0.2), True), (ConnectionError("redis is down"), False)],
    ids=["budget-exhausted", "limiter-broken"],
)
async def test_a_refused_or_failed_permit_is_a_wait_not_a_crash(error, planned):
    limiter = RefusingLimiter(error)
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, limiter=limiter) as (_client, rec),
        ):
            await rec.next(Ready)
            (sched,) = rec.of(ReconnectScheduled)
            if planned:
                assert sched.delay == pytest.approx(0.2)
                assert "refused" in sched.reason
            else:
                assert "limiter failed" in sched.reason
            assert rec.of(Disconnected) == []
    assert limiter.calls == 2


async def test_closing_while_waiting_for_a_permit_cancels_the_wait():
    entered = anyio.Event()
    cancelled = anyio.Event()

    class Stuck(LocalIdentifyLimiter):
        async def acquire(self, shard_id: int, max_concurrency: int | None) -> None:
            entered.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, limiter=Stuck()) as (client, _rec),
        ):
            await entered.wait()
            await client.close()
            assert cancelled.is_set()
            assert client.state is SessionState.STOPPED
