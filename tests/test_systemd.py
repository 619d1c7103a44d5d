# systemd notifications against a fake notify socket: a datagram socket bound by the test
# (a path under tmp_path, or a Linux abstract name), read without threads through
# anyio.wait_readable. Every tick of run_systemd sends exactly one datagram, and the probes
# are scripted per tick, so each datagram is asserted byte for byte in order, whatever the
# scheduling. The only sleep is the deliberate time.sleep that blocks the event loop in the
# stalled-loop test: that blocking is the behaviour under test.
"""Tests for qqproto_io._systemd: sd_notify client, watchdog verdict and the watchdog task."""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
import uuid

import anyio
import pytest

from qqproto import Health, SessionConfig, SessionStartLimit, SessionState
from qqproto_io._systemd import SystemdNotifier, run_systemd, watchdog_verdict
from tests.helpers import Driver, advance_to
from tests.loopback import anyio_backend  # noqa: F401 - fixtures

READY = Health(live=True, ready=True, reason="", since_live=None, last_ack_age=3.0)
RECONNECTING = Health(
    live=True, ready=False, reason="BACKOFF for 12 s", since_live=12.0, last_ack_age=60.0
)
STUCK = Health(
    live=False, ready=False, reason="CONNECTING for 301 s", since_live=301.0, last_ack_age=None
)

OK_READY = "STATUS=1/1 ready; shard 0: ready, last ACK 3 s ago\n"
OK_RECONNECTING = "STATUS=0/1 ready; shard 0: BACKOFF for 12 s, last ACK 60 s ago\n"
WITHHELD_STUCK = (
    "STATUS=watchdog withheld (shard 0 stuck); 0/1 ready; "
    "shard 0: STUCK CONNECTING for 301 s, no ACK yet\n"
)
PING = "WATCHDOG=1\n"
STOPPING = "STOPPING=1\n"


class FakeNotifySocket:
    """What systemd listens on: a bound AF_UNIX datagram socket, read without threads."""

    def __init__(self, bind_address: str, env_address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_address)
        self.sock.setblocking(False)  # noqa: FBT003
        self.env_address = env_address

    async def recv(self) -> str:
        with anyio.fail_after(5):
            while True:
                try:
                    return self.sock.recv(65536).decode()
                except BlockingIOError:
                    await anyio.wait_readable(self.sock)

    def pending(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return out

    def notifier(self, **env: str) -> SystemdNotifier:
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": self.env_address, **env})
        assert notifier is not None
        return notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    fake = FakeNotifySocket(path, path)
    yield fake
    fake.sock.close()


@pytest.fixture
def abstract_socket():
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract-namespace sockets are Linux-only")
    name = f"qqproto-test-{os.getpid()}-{uuid.uuid4().hex}"
    fake = FakeNotifySocket("\0" + name, "@" + name)
    yield fake
    fake.sock.close()


class Script:
    """A probe that returns one scripted answer per tick (the last one repeats).

    An answer is a list of Health, or a callable returning one (or raising).
    """

    def __init__(self, *steps) -> None:
        self.steps = steps
        self.calls = 0
        self.called = anyio.Event()
        self.wanted = 0

    def __call__(self):
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        if self.calls >= self.wanted:
            self.called.set()
        return step() if callable(step) else step


async def collect(fake, notifier, probe, ticks, **kwargs):
    """Run run_systemd for `ticks` datagrams, cancel it, and return (ticks, after-cancel)."""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(run_systemd, notifier, probe, **kwargs))
            got = [await fake.recv() for _ in range(ticks)]
            tg.cancel_scope.cancel()
    return got, fake.pending()


# -------------------------------------------------------------------------- the client


def test_from_env_needs_notify_socket() -> None:
    assert SystemdNotifier.from_env({}) is None
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "1000000"}) is None


def test_from_env_reads_the_watchdog_variables() -> None:
    pid = str(os.getpid())
    cases = [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": pid}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}, 0.1),  # malformed reads as unset
    ]
    for env, interval in cases:
        with SystemdNotifier.from_env({"NOTIFY_SOCKET": "/run/x", **env}) as notifier:
            assert notifier.watchdog_interval == interval, env
            assert notifier.watchdog_enabled is (interval is not None)


def test_reads_os_environ_by_default(monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@abstract")
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with SystemdNotifier.from_env() as notifier:
        assert notifier.address == "@abstract"
        assert notifier.watchdog_interval == 2.0
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert SystemdNotifier.from_env() is None


def test_send_composes_key_value_lines(notify_socket) -> None:
    with notify_socket.notifier(WATCHDOG_USEC="1000000") as notifier:
        assert notifier.ready()
        assert notifier.status("two\nlines\r")
        assert notifier.watchdog()
        assert notifier.send(READY=1, STATUS="up", WATCHDOG=1)
        assert notifier.stopping()
        assert not notifier.send()  # nothing to say: no datagram
        assert (notifier.sent, notifier.errors) == (5, 0)
    assert notify_socket.pending() == [
        "READY=1\n",
        "STATUS=two lines \n",
        PING,
        "READY=1\nSTATUS=up\nWATCHDOG=1\n",
        STOPPING,
    ]


def test_watchdog_is_silent_when_not_expected(notify_socket) -> None:
    with notify_socket.notifier() as notifier:  # no WATCHDOG_USEC
        assert not notifier.watchdog()
    mismatch = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with notify_socket.notifier(**mismatch) as notifier:
        assert not notifier.watchdog()
        assert notifier.errors == 0
    assert notify_socket.pending() == []


def test_closed_notifier_sends_nothing(notify_socket) -> None:
    notifier = notify_socket.notifier()
    assert notifier.ready()
    notifier.close()
    notifier.close()  # idempotent
    assert not notifier.ready()
    assert notify_socket.pending() == ["READY=1\n"]


def test_missing_or_unsupported_socket_never_raises(tmp_path) -> None:
    for address in (str(tmp_path / "absent"), "vsock:2:9999", "relative/notify", "@" + "x" * 200):
        with SystemdNotifier(address, watchdog_usec=1_000_000) as notifier:
            assert not notifier.ready()
            assert not notifier.watchdog()
            assert (notifier.sent, notifier.errors) == (0, 2), address
            assert isinstance(notifier.last_error, OSError)


def test_a_full_receive_queue_drops_instead_of_blocking(notify_socket) -> None:
    # Nobody reads the fake socket: the kernel queue fills up and sends fail with EAGAIN.
    with notify_socket.notifier() as notifier:
        assert notifier.status("first")
        assert notifier._sock is not None
        assert not notifier._sock.getblocking()  # else the loop below could hang
        for _ in range(5000):
            notifier.status("x" * 1000)
            if notifier.errors:
                break
        assert notifier.errors == 1
        assert isinstance(notifier.last_error, BlockingIOError)


def test_a_socket_path_that_is_not_a_socket(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    with SystemdNotifier(str(tmp_path / "file")) as notifier:
        assert not notifier.stopping()
        assert notifier.errors == 1


# -------------------------------------------------------------------------- the verdict


def test_verdict_ok_when_every_shard_is_live() -> None:
    assert watchdog_verdict([READY, RECONNECTING], loop_lag=0.5, max_loop_lag=1.0) == (
        True,
        "1/2 ready; shard 0: ready, last ACK 3 s ago; shard 1: BACKOFF for 12 s, last ACK 60 s ago",
    )


def test_verdict_withheld_for_a_stuck_shard_or_a_late_loop() -> None:
    assert watchdog_verdict(
        [READY, STUCK], loop_lag=2.5, max_loop_lag=1.0, names=["shard 3", "shard 4"]
    ) == (
        False,
        (
            "watchdog withheld (event loop 2.50 s late; shard 4 stuck); 1/2 ready; "
            "shard 3: ready, last ACK 3 s ago; shard 4: STUCK CONNECTING for 301 s, no ACK yet"
        ),
    )
    ok, status = watchdog_verdict([READY], loop_lag=1.01, max_loop_lag=1.0)
    assert not ok
    assert status == "watchdog withheld (event loop 1.01 s late); " + OK_READY[7:-1]
    assert watchdog_verdict([READY], loop_lag=1.0, max_loop_lag=1.0)[0]  # the bound is inclusive


def test_verdict_with_no_shard_is_not_ok() -> None:
    assert watchdog_verdict([], loop_lag=0.0, max_loop_lag=1.0) == (
        False,
        "watchdog withheld (no shard); 0/0 ready",
    )


def test_verdict_names_must_match() -> None:
    with pytest.raises(ValueError, match="1 names for 2 shards"):
        watchdog_verdict([READY, READY], loop_lag=0.0, max_loop_lag=1.0, names=["a"])


# -------------------------------------------------------------------------- the task


@pytest.mark.anyio
async def test_ready_once_after_the_first_ready_health_then_status_and_pings(notify_socket):
    probe = Script([RECONNECTING], [READY], [RECONNECTING], [READY])
    with notify_socket.notifier(WATCHDOG_USEC="100000") as notifier:
        got, after = await collect(notify_socket, notifier, probe, 5)
    assert got == [
        OK_RECONNECTING + PING,  # live while reconnecting: pinged, not READY
        "READY=1\n" + OK_READY + PING,
        OK_RECONNECTING + PING,
        OK_READY + PING,  # READY=1 is sent once
        OK_READY + PING,
    ]
    assert after == [STOPPING]


@pytest.mark.anyio
async def test_pings_stop_while_a_shard_is_stuck_and_resume_when_live(notify_socket):
    probe = Script([READY], [READY], [STUCK], [READY, STUCK], [READY])
    with notify_socket.notifier(WATCHDOG_USEC="100000") as notifier:
        got, after = await collect(notify_socket, notifier, probe, 6)
    two_shards_stuck = (
        "STATUS=watchdog withheld (shard 1 stuck); 1/2 ready; shard 0: ready, last ACK 3 s ago; "
        "shard 1: STUCK CONNECTING for 301 s, no ACK yet\n"
    )
    assert got == [
        "READY=1\n" + OK_READY + PING,
        OK_READY + PING,
        WITHHELD_STUCK,
        two_shards_stuck,  # one stuck shard of two is enough
        OK_READY + PING,
        OK_READY + PING,
    ]
    assert after == [STOPPING]


@pytest.mark.anyio
async def test_pings_stop_when_the_event_loop_is_stalled(notify_socket):
    def blocked_loop():
        time.sleep(0.3)  # a synchronous call blocking the event loop: the case under test
        return [READY]

    probe = Script([READY], blocked_loop, [READY])
    with notify_socket.notifier(WATCHDOG_USEC="200000") as notifier:
        got, after = await collect(notify_socket, notifier, probe, 4, max_loop_lag=0.15)
    assert got[0] == "READY=1\n" + OK_READY + PING
    # The tick that ran while the loop was blocked is at least 0.3 s late.
    head, _, tail = got[1].partition(" s late); ")
    assert head.startswith("STATUS=watchdog withheld (event loop ")
    assert float(head.rpartition(" ")[2]) >= 0.3
    assert tail == OK_READY[7:]  # and no WATCHDOG=1 line
    assert got[2:] == [OK_READY + PING, OK_READY + PING]  # on time again: pings resume
    assert after == [STOPPING]


@pytest.mark.anyio
async def test_a_real_connection_stuck_reconnecting_stops_the_pings(notify_socket):
    # The core on a virtual clock: READY, then the link drops and every reconnect hangs.
    drv = Driver(SessionConfig(liveness_budget=100.0))
    drv.connect_ready()  # t = 0

    def at(t, *, drop=False, reconnect=False):
        def step():
            if drop:
                drv.advance_to_timer()  # a beat...
                drv.ack()  # ...acknowledged: the last evidence of a live session
                drv.auto_open = False
                drv.server_close(1006)
            advance_to(drv, t)
            if reconnect:  # the next connect attempt succeeds, and the session resumes
                while drv.conn.state is not SessionState.CONNECTING:
                    drv.advance_to_timer()
                drv.transport_open = True
                drv.conn.connection_opened(drv.now, attempt=drv.attempt)
                drv.pump()
                drv.hello()
                drv.resumed(1)
            return [drv.conn.health(drv.now)]

        return step

    probe = Script(at(0.0), at(60.0, drop=True), at(140.0), at(200.0), at(210.0, reconnect=True))
    with notify_socket.notifier(WATCHDOG_USEC="100000") as notifier:
        got, after = await collect(notify_socket, notifier, probe, 5)
    # The ACK came with the first beat (t = 38); the budget counts from there.
    assert got == [
        "READY=1\nSTATUS=1/1 ready; shard 0: ready, last ACK 0 s ago\n" + PING,
        "STATUS=0/1 ready; shard 0: CONNECTING for 22 s, no ACK yet\n" + PING,
        WITHHELD_STUCK.replace("301 s", "102 s"),  # 140 - 38 > 100: stuck, no ping
        WITHHELD_STUCK.replace("301 s", "162 s"),
        OK_READY.replace("3 s", "0 s") + PING,  # resumed: pings again (READY=1 only once)
    ]
    assert after == [STOPPING]


@pytest.mark.anyio
async def test_waiting_for_the_daily_identify_budget_keeps_the_pings(notify_socket):
    # The budget is spent: the core waits two hours on purpose. That is live, not stuck, so
    # systemd must not restart the process every few minutes all day.
    limit = SessionStartLimit(total=1000, remaining=0, reset_after=7200.0, max_concurrency=1)
    drv = Driver(SessionConfig(liveness_budget=100.0), start_limit=limit)
    drv.start()

    def at(t):
        def step():
            advance_to(drv, t)
            return [drv.conn.health(drv.now)]

        return step

    probe = Script(at(0.0), at(500.0), at(7000.0))
    with notify_socket.notifier(WATCHDOG_USEC="100000") as notifier:
        got, after = await collect(notify_socket, notifier, probe, 3)
    waiting = [
        "STATUS=0/1 ready; shard 0: waiting 7200 s for the identify budget to reset, no ACK yet\n",
        "STATUS=0/1 ready; shard 0: waiting 6700 s for the identify budget to reset, no ACK yet\n",
        "STATUS=0/1 ready; shard 0: waiting 200 s for the identify budget to reset, no ACK yet\n",
    ]
    assert got == [line + PING for line in waiting]
    assert after == [STOPPING]


@pytest.mark.anyio
async def test_watchdog_pid_mismatch_sends_status_but_no_pings(notify_socket):
    env = {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with notify_socket.notifier(**env) as notifier:
        assert notifier.watchdog_interval is None
        got, after = await collect(
            notify_socket, notifier, Script([READY]), 3, status_interval=0.05
        )
    assert got == ["READY=1\n" + OK_READY, OK_READY, OK_READY]
    assert after == [STOPPING]


@pytest.mark.anyio
async def test_matching_watchdog_pid_gets_pings(notify_socket):
    env = {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    with notify_socket.notifier(**env) as notifier:
        got, _ = await collect(notify_socket, notifier, Script([READY]), 2)
    assert got == ["READY=1\n" + OK_READY + PING, OK_READY + PING]


@pytest.mark.anyio
async def test_a_failing_probe_earns_no_ping(notify_socket):
    def broken():
        raise RuntimeError("boom")

    probe = Script(broken, [READY])
    with notify_socket.notifier(WATCHDOG_USEC="100000") as notifier:
        got, after = await collect(notify_socket, notifier, probe, 2)
    assert got == [
        "STATUS=watchdog withheld (health probe failed: RuntimeError('boom'))\n",
        "READY=1\n" + OK_READY + PING,
    ]
    assert after == [STOPPING]


@pytest.mark.anyio
async def test_stopping_is_sent_when_cancelled(notify_socket):
    with notify_socket.notifier(WATCHDOG_USEC="60000000") as notifier:  # a 30 s interval
        got, after = await collect(notify_socket, notifier, Script([READY]), 1)
        assert (notifier.sent, notifier.errors) == (2, 0)
    assert got == ["READY=1\n" + OK_READY + PING]
    assert after == [STOPPING]  # at once, not at the next tick


@pytest.mark.anyio
async def test_abstract_namespace_socket(abstract_socket):
    name = abstract_socket.env_address[1:]
    assert abstract_socket.sock.getsockname() == b"\0" + name.encode()  # not a file
    with abstract_socket.notifier(WATCHDOG_USEC="100000") as notifier:
        got, after = await collect(abstract_socket, notifier, Script([READY], [STUCK]), 2)
    assert got == ["READY=1\n" + OK_READY + PING, WITHHELD_STUCK]
    assert after == [STOPPING]


@pytest.mark.anyio
async def test_no_listener_never_raises_into_the_app(tmp_path):
    probe = Script([READY])
    probe.wanted = 3
    with SystemdNotifier(str(tmp_path / "absent"), watchdog_usec=100_000) as notifier:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_systemd, notifier, probe)
                await probe.called.wait()
                tg.cancel_scope.cancel()
        assert notifier.sent == 0
        assert notifier.errors == probe.calls + 1  # every tick, and STOPPING=1


@pytest.mark.anyio
async def test_ready_is_not_held_back_by_a_long_watchdog_interval(notify_socket):
    # WatchdogSec=60 pings every 30 s; until READY=1 the task checks every `ready_poll`.
    probe = Script([RECONNECTING], [RECONNECTING], [READY])
    with notify_socket.notifier(WATCHDOG_USEC="60000000") as notifier:
        assert notifier.watchdog_interval == 30.0
        got, after = await collect(notify_socket, notifier, probe, 3, ready_poll=0.05)
    assert got == [OK_RECONNECTING + PING, OK_RECONNECTING + PING, "READY=1\n" + OK_READY + PING]
    assert after == [STOPPING]  # the next tick would be 30 s later


@pytest.mark.anyio
async def test_a_verdict_error_earns_no_ping_either(notify_socket):
    probe = Script([READY, READY])  # two shards, one name
    with notify_socket.notifier(WATCHDOG_USEC="100000") as notifier:
        got, _ = await collect(notify_socket, notifier, probe, 1, names=["shard 0"])
    assert got == [
        "STATUS=watchdog withheld (health probe failed: ValueError('1 names for 2 shards'))\n"
    ]
