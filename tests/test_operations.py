# The process tells the truth about its health, end to end on loopback.
#
# A GatewayClient runs against the FakeGatewayServer with everything an operator would turn
# on: the stall monitor, the health endpoints (/readyz, /healthz, /metrics) and the systemd
# watchdog task, which sends to a fake notify socket (a datagram socket on the test's own
# path). Two failures are staged, each in one run, and the same run asserts that the
# WATCHDOG=1 pings stop within the configured budget, that /readyz flips to 503, and that
# both come back once the shard is READY again:
#
#   (a) the event loop is blocked (a synchronous sleep in a task: the behaviour under test);
#   (b) the server goes half-open (it stops reading, the TCP link stays up) and every
#       reconnect fails (the fake sends nothing, not even Hello).
#
# The blocked-loop run cannot timestamp datagrams while the loop is frozen, so the blocking
# code sends its own marker datagrams to the same socket before and after the block: order
# on one receive queue is the order of sending. A last test scans every log record of a full
# run (rotation, zombie, resume, invalid session) at DEBUG, all loggers, for secrets.
"""Operations end to end: systemd watchdog, /readyz, /metrics and logs under failures."""

from __future__ import annotations

import functools
import json
import logging
import socket
import time

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qqproto import Dispatch, Ready, ReconnectScheduled, Resumed, SessionInvalidated, ZombieDetected
from qqproto_io import _stores
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._health import HealthServer, Metrics
from qqproto_io._stall import StallMonitor
from qqproto_io._systemd import SystemdNotifier, run_systemd
from tests.test_driver import INTERVAL, Recorder, fast_config, gateway_config, make_client
from tests.test_health_http import get

pytestmark = pytest.mark.anyio

WATCHDOG_USEC = 400_000  # pings every 0.2 s
PERIOD = WATCHDOG_USEC / 2e6
PING = "WATCHDOG=1"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


class NotifyLog:
    """The service manager's side: every datagram, with the time a reader task saw it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)  # noqa: FBT003
        self.datagrams: list[tuple[float, str]] = []
        self._changed = anyio.Event()

    def notifier(self) -> SystemdNotifier:
        env = {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        notifier = SystemdNotifier.from_env(env)
        assert notifier is not None
        return notifier

    def mark(self, text: str) -> None:
        """A marker datagram, sent synchronously (also from a blocked loop)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(text.encode(), self.path)

    async def read_forever(self) -> None:
        while True:
            await anyio.wait_readable(self.sock)
            while True:
                try:
                    data = self.sock.recv(65536).decode()
                except BlockingIOError:
                    break
                self.datagrams.append((anyio.current_time(), data))
            self._changed.set()
            self._changed = anyio.Event()

    async def until(self, predicate, what: str, within: float = 15.0) -> int:
        """Wait for the first datagram (from the start of the log) matching; its index."""
        with anyio.fail_after(within):
            while True:
                for i, (_, text) in enumerate(self.datagrams):
                    if predicate(i, text):
                        return i
                await self._changed.wait()
        raise AssertionError(what)  # pragma: no cover - fail_after raises first

    def index_of(self, text: str) -> int:
        return next(i for i, (_, d) in enumerate(self.datagrams) if d == text)


async def readyz(port: int) -> tuple[int, dict]:
    status, _, body = await get(port, "/readyz")
    return status, json.loads(body)


async def until_readyz(port: int, want: int, within: float = 15.0) -> dict:
    """Poll /readyz until it answers ``want`` (a probe polls; that is what it is for)."""
    with anyio.fail_after(within):
        while True:
            status, body = await readyz(port)
            if status == want:
                return body
            await anyio.sleep(0.05)


class Stack:
    """A client with the operator's whole kit around it, in one task group."""

    def __init__(self, server: FakeGatewayServer, notify: NotifyLog, config, **kwargs) -> None:
        self.metrics = Metrics()
        self.client = make_client(server, config, metrics=self.metrics, **kwargs)
        self.recorder = Recorder()
        self.stall = StallMonitor(threshold=0.3)
        self.notify = notify

    def healths(self):
        return [self.client.connection.health(anyio.current_time())]

    async def run(self, body) -> None:
        with self.notify.notifier() as notifier:
            await self._run(body, notifier)

    async def _run(self, body, notifier: SystemdNotifier) -> None:
        async with anyio.create_task_group() as tg, self.client:
            await tg.start(self.stall.run)
            tg.start_soon(self.recorder.consume, self.client)
            tg.start_soon(self.notify.read_forever)
            async with HealthServer(
                lambda: dict(enumerate(self.healths())),
                self.metrics,
                stall=self.stall,
                stall_grace=1.0,
            ) as health:
                tg.start_soon(
                    functools.partial(run_systemd, notifier, self.healths, max_loop_lag=0.5)
                )
                await body(health.port)
            tg.cancel_scope.cancel()


def pings_after(notify: NotifyLog, start: int) -> list[int]:
    return [i for i, (_, d) in enumerate(notify.datagrams) if i > start and PING in d]


@pytest.fixture
def notify(tmp_path):
    log = NotifyLog(str(tmp_path / "notify"))
    yield log
    log.sock.close()


async def test_blocked_loop_stops_the_pings_and_readyz_then_both_come_back(notify, caplog):
    async with FakeGatewayServer(gateway_config()) as server:
        stack = Stack(server, notify, fast_config())

        async def body(port: int) -> None:
            await stack.recorder.next(Ready)
            ready = await notify.until(lambda _, d: "READY=1" in d, "READY=1")
            await notify.until(lambda i, d: i >= ready and PING in d, "a ping once ready")
            assert (await until_readyz(port, 200))["status"] == "ready"

            notify.mark("X-TEST=blocked")
            time.sleep(1.5)  # noqa: ASYNC251 - blocking the loop is the behaviour under test
            notify.mark("X-TEST=unblocked")

            # A probe that waited through the block is answered once the loop runs: 503.
            status, verdict = await readyz(port)
            assert status == 503
            assert "event loop stalled" in verdict["loop"]

            end = await notify.until(lambda _, d: d == "X-TEST=unblocked", "the end marker")
            start = notify.index_of("X-TEST=blocked")
            assert end == start + 1, "no datagram at all while the loop was blocked"
            # The first tick after the block sees its own lateness and withholds the ping.
            await notify.until(lambda i, _: i > end, "a tick after the block")
            after = notify.datagrams[end + 1][1]
            assert PING not in after
            assert "watchdog withheld (event loop" in after
            # Pings resume, and /readyz turns 200 once the stall is stall_grace old.
            await notify.until(lambda i, d: i > end and PING in d, "pings again")
            assert (await until_readyz(port, 200))["status"] == "ready"
            text = (await get(port, "/metrics"))[2].decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            stalls = families["qqproto_loop_stalls"].samples
            assert any(s.name == "qqproto_loop_stalls_total" and s.value >= 1 for s in stalls)
            # The driver saw its own timers fire late: a histogram sample, and a WARNING on
            # the shard's logger (beside the stall monitor's, which has the stack).
            lag = {s.name: s.value for s in families["qqproto_timer_lag_seconds"].samples}
            assert lag["qqproto_timer_lag_seconds_count"] >= 1
            assert lag["qqproto_timer_lag_seconds_sum"] >= 1.0
            late = [
                r
                for r in caplog.records
                if r.name == "qqproto_io.shard.0" and "fired" in r.getMessage()
            ]
            assert late
            assert late[0].levelno == logging.WARNING
            assert not stack.recorder.of(ZombieDetected), "a blocked loop is not a dead link"

        await stack.run(body)


async def test_half_open_link_with_failing_reconnects_stops_the_pings_within_budget(notify):
    budget = 2.0
    config = fast_config(liveness_budget=budget, hello_timeout=0.5, backoff_cap=0.3)
    async with FakeGatewayServer(gateway_config()) as server:
        stack = Stack(server, notify, config)
        rec = stack.recorder

        async def body(port: int) -> None:
            await rec.next(Ready)
            await notify.until(lambda _, d: PING in d, "a first ping")
            await until_readyz(port, 200)

            fault_at = anyio.current_time()
            mark = len(rec.events)
            server.stop_reading = True  # half-open: nothing read, nothing written, no FIN
            server.gateway.faults.silent = True  # new connections never even get Hello

            stuck = await notify.until(lambda _, d: "shard 0 stuck" in d, "pings withheld")
            stuck_at = notify.datagrams[stuck][0]
            last_ping_at = max(t for t, d in notify.datagrams[:stuck] if PING in d)
            # Live while a reconnect is within the budget (the last ACK came at most one
            # interval before the fault), withheld once it is spent: budget, tick, slack.
            assert stuck_at - fault_at >= budget - INTERVAL - 0.05
            assert stuck_at - fault_at <= budget + PERIOD + 3.0
            assert last_ping_at < stuck_at
            assert PING not in notify.datagrams[stuck][1]
            body503 = await until_readyz(port, 503)
            assert body503["shards"]["0"]["live"] is False
            assert rec.of(ZombieDetected, mark), "the half-open link was found by the watchdog"
            assert len(rec.of(ReconnectScheduled, mark)) >= 2, "reconnects kept failing"

            server.gateway.faults.silent = False
            server.stop_reading = False
            back = len(rec.events)
            await rec.until(lambda ev: any(isinstance(e, Ready | Resumed) for e in ev[back:]))
            await notify.until(lambda i, d: i > stuck and PING in d, "pings again")
            assert (await until_readyz(port, 200))["status"] == "ready"

        await stack.run(body)


async def test_no_secret_or_session_id_in_any_log_record_of_a_rough_session(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)  # every logger: ours, httpx, httpcore, anyio
    monkeypatch.setattr(_stores, "IDENTIFY_WINDOW", 0.0)  # 5 s in production
    async with FakeGatewayServer(gateway_config(rotate_every=1.0)) as server:
        gateway = server.gateway
        client = make_client(server)
        rec = Recorder()
        async with anyio.create_task_group() as tg, client:
            tg.start_soon(rec.consume, client)
            await rec.next(Ready)
            server.message(1)
            await rec.next(Resumed)  # the rotation: op 7, then Resume
            gateway.faults.no_ack = True
            await rec.next(ZombieDetected)
            gateway.faults.no_ack = False
            at = await rec.next(Resumed, count=2)
            gateway.faults.resume_invalid = False
            server.close_all(4009)
            await rec.next(SessionInvalidated, at)
            await rec.next(Ready, at)
            server.message(2)
            await rec.next(Dispatch, at)
            await client.close()
            tg.cancel_scope.cancel()

    text = "\n".join(
        r.getMessage() + " " + json.dumps(getattr(r, "qqproto", {}), ensure_ascii=False)
        for r in caplog.records
    )
    secrets = [gateway.config.client_secret] + [t.value for t in gateway.tokens]
    secrets += [s.id for s in gateway.sessions.values()]
    assert len(secrets) >= 4
    for secret in secrets:
        assert secret not in text
    shard = [r for r in caplog.records if r.name == "qqproto_io.shard.0"]
    by_event = {r.qqproto["event"]: r for r in shard}  # type: ignore[attr-defined]
    for name in ("hello", "ready", "resumed", "zombie", "reconnect", "session_invalidated"):
        assert by_event[name].levelno >= logging.INFO, name
    for name in ("dispatch", "heartbeat_ack"):
        assert by_event[name].levelno == logging.DEBUG, name
    assert "missed events replayed" in by_event["resumed"].getMessage()
    assert "no heartbeat ACK for" in by_event["zombie"].getMessage()
    assert "reconnecting in" in by_event["reconnect"].getMessage()
    assert by_event["ready"].qqproto["session_id"].endswith("…")  # type: ignore[attr-defined]
