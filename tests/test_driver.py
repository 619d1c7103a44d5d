# The anyio driver and GatewayClient over real loopback sockets, on asyncio and trio.
#
# The driver tests run a GatewayClient (or a ShardDriver, for wss:// behind a TLS front made
# in this file) against the FakeGatewayServer on 127.0.0.1 with a fast configuration (300 ms
# Hello interval, 0.5 s close timeout, tiny backoff), so a test takes about a second.
# Ordering comes from the events the client reports (`Recorder.until` waits for a predicate
# over them); nothing sleeps to synchronise. Every test body is bounded by
# `anyio.fail_after`, so a driver that hangs fails instead of blocking the suite. The proxy
# configuration, the snapshot store and the token source have plain unit tests at the end.
"""Tests for qqproto_io: ShardDriver, Transport and GatewayClient against the fake server."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import ssl
import subprocess
import sys
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSStream

from qqproto import (
    ApiError,
    ApiErrorKind,
    Disconnected,
    Dispatch,
    Event,
    EventsDropped,
    FatalStop,
    GatewayConnection,
    HeartbeatAcknowledged,
    HelloReceived,
    NextStep,
    ProtocolViolation,
    Ready,
    ReconnectScheduled,
    Resumed,
    SessionConfig,
    SessionInvalidated,
    SessionState,
    StateChanged,
    TokenGrant,
    ZombieDetected,
)
from qqproto.testing import FakeGatewayConfig, ServerSend
from qqproto_io import _cli, _stores
from qqproto_io._client import GatewayClient
from qqproto_io._driver import ShardDriver
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._http import Credentials, RestApi, TokenSource
from qqproto_io._proxy import ProxyConfig, ProxyError, open_stream, proxy_from_env
from qqproto_io._stores import LocalIdentifyLimiter
from qqproto_io._transport import Transport, TransportLimits, TransportMessages, TransportOpened
from tests.loopback import anyio_backend, collect_garbage, no_proxy_env  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

BOUND = 15.0  # generous bound on every test body
HELLO_MS = 300
INTERVAL = HELLO_MS / 1000


def fast_config(**changes) -> SessionConfig:
    values = {
        "min_heartbeat_interval": 0.1,
        "close_timeout": 0.5,
        "connect_timeout": 3.0,
        "hello_timeout": 3.0,
        "auth_timeout": 3.0,
        "http_timeout": 3.0,
        "backoff_base": 0.05,
        "backoff_cap": 0.5,
        "stable_after": 1.0,
    }
    values.update(changes)
    return SessionConfig(**values)


def gateway_config(**changes) -> FakeGatewayConfig:
    return FakeGatewayConfig(hello_interval_ms=HELLO_MS, **changes)


class Recorder:
    """Every event a client reported, with the time it was seen; waits on predicates."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.times: list[float] = []
        self.ended = False
        self._changed = anyio.Event()

    def add(self, event: Event) -> None:
        self.events.append(event)
        self.times.append(anyio.current_time())
        self._changed.set()
        self._changed = anyio.Event()

    def end(self) -> None:
        self.ended = True
        self._changed.set()

    async def consume(self, client: GatewayClient) -> None:
        try:
            async for event in client:
                self.add(event)
        finally:
            self.end()

    def of(self, kind, start: int = 0) -> list:
        return [e for e in self.events[start:] if isinstance(e, kind)]

    def index(self, kind, start: int = 0) -> int:
        """Position of the first event of ``kind`` at or after ``start``."""
        for i in range(start, len(self.events)):
            if isinstance(self.events[i], kind):
                return i
        raise LookupError(kind)

    async def until(self, predicate, what: str = "", within: float = 10.0):
        """Wait until ``predicate(events)`` is truthy and return its value."""
        with anyio.fail_after(within):
            while True:
                result = predicate(self.events)
                if result:
                    return result
                if self.ended:
                    names = [type(e).__name__ for e in self.events]
                    pytest.fail(f"events ended before {what or predicate}: {names}")
                await self._changed.wait()

    async def next(self, kind, start: int = 0, count: int = 1) -> int:
        """Wait until ``count`` events of ``kind`` exist from ``start``; the last one's index."""

        def found(events):
            hits = [i for i in range(start, len(events)) if isinstance(events[i], kind)]
            return hits[count - 1] + 1 if len(hits) >= count else 0

        return await self.until(found, f"{count} x {kind.__name__}") - 1

    async def stopped(self) -> None:
        """Wait until the client's event iteration has ended."""
        with anyio.fail_after(10.0):
            while not self.ended:
                await self._changed.wait()


def make_client(server: FakeGatewayServer, config: SessionConfig | None = None, **kwargs):
    cfg = server.gateway.config
    kwargs.setdefault("app_id", cfg.app_id)
    kwargs.setdefault("client_secret", cfg.client_secret)
    return GatewayClient(
        config=config or fast_config(),
        api_base=server.http_base,
        token_url=server.token_url,
        **kwargs,
    )


@asynccontextmanager
async def running(server: FakeGatewayServer, config: SessionConfig | None = None, **kwargs):
    """A started client whose events go to a Recorder; closed on exit."""
    client = make_client(server, config, **kwargs)
    recorder = Recorder()
    async with anyio.create_task_group() as tg, client:
        tg.start_soon(recorder.consume, client)
        yield client, recorder


def ops(server_conn) -> list[int]:
    return [op for _, op, _ in server_conn.received]


async def wait_until(predicate) -> None:
    """Let other tasks run until ``predicate()`` holds (bounded by the caller's fail_after)."""
    while not predicate():
        await anyio.lowlevel.checkpoint()


# ------------------------------------------------------------------------- handshake


async def test_handshake_beats_and_dispatch():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (client, rec):
            ready_at = await rec.next(Ready)
            hello = rec.of(HelloReceived)
            assert len(hello) == 1
            assert hello[0].heartbeat_interval == pytest.approx(INTERVAL)
            assert rec.index(HelloReceived) < ready_at
            ready = rec.events[ready_at]
            assert ready.session_id == server.gateway.connections[0].session.id
            assert ready.seq == 1
            await rec.next(HeartbeatAcknowledged, ready_at, count=3)
            acks = rec.of(HeartbeatAcknowledged)
            assert all(a.latency > 0 for a in acks)
            assert all(a.mean_latency > 0 for a in acks)
            assert server.message(1) == 1
            got = rec.events[await rec.next(Dispatch)]
            assert got.type == "C2C_MESSAGE_CREATE"
            assert got.event_id == "C2C_MESSAGE_CREATE:fake00000001"
            assert got.seq == 2
            assert got.data["id"] == "ROBOT1.0_fake00000001"
            assert client.state is SessionState.READY
            assert client.connection.seq == 2
            # What the server saw: Identify first (nothing before it), then beats only.
            conn = server.gateway.connections[0]
            received = ops(conn)
            assert received[0] == 2
            assert set(received[1:]) == {1}
            identify = conn.received[0][2]
            assert identify["token"].startswith("QQBot fake-token-")
            assert identify["shard"] == [0, 1]
            assert len(server.gateway.connections) == 1
        assert client.state is SessionState.STOPPED


# ---------------------------------------------------------------- dead links and closes


async def test_zombie_is_detected_and_the_session_resumed():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (client, rec):
            ready = rec.events[await rec.next(Ready)]
            server.message(1)
            await rec.next(Dispatch)
            acked = await rec.next(HeartbeatAcknowledged, rec.index(Dispatch))
            server.gateway.faults.no_ack = True
            z = await rec.next(ZombieDetected, acked)
            server.gateway.faults.no_ack = False
            zombie = rec.events[z]
            assert zombie.interval == pytest.approx(INTERVAL)
            # The beat after the last ACK went unanswered until the next one fell due.
            assert INTERVAL * 0.9 <= zombie.since_last_ack <= 2 * INTERVAL + 0.25
            d = await rec.next(Disconnected, z)
            gone = rec.events[d]
            assert (gone.code, gone.by_server, gone.next_step) == (4000, False, NextStep.RESUME)
            # The server answered our close: no waiting for the close timeout.
            assert rec.times[d] - rec.times[z] < client.config.close_timeout
            backoff = [s for s in rec.of(StateChanged, z) if s.new is SessionState.BACKOFF]
            assert backoff[0].reason == "transport closed (4000)"
            r = await rec.next(ReconnectScheduled, d)
            resumed = rec.events[await rec.next(Resumed, r)]
            assert resumed.seq == 3  # RESUMED carries the next seq of the session
            assert rec.of(Ready) == [ready]
            conns = server.gateway.connections
            assert len(conns) == 2
            assert ops(conns[1])[0] == 6
            resume = conns[1].received[0][2]
            assert resume["session_id"] == ready.session_id
            assert resume["seq"] == 2
            assert len(server.gateway.identifies) == 1
            assert len(server.gateway.resumes) == 1
            assert client.state is SessionState.READY


async def test_half_open_link_close_is_never_answered_and_the_transport_aborted():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (client, rec):
            ready = rec.events[await rec.next(Ready)]
            acked = await rec.next(HeartbeatAcknowledged)
            server.stop_reading = True  # no bytes either way, no FIN: a dead NAT entry
            z = await rec.next(ZombieDetected, acked)
            d = await rec.next(Disconnected, z)
            gone = rec.events[d]
            assert gone.code == 4000
            assert gone.next_step is NextStep.RESUME
            # The close frame was never answered: the transport was aborted at close_timeout.
            close_timeout = client.config.close_timeout
            assert rec.times[d] - rec.times[z] >= close_timeout - 0.1
            aborted = [s for s in rec.of(StateChanged, z) if s.new is SessionState.BACKOFF]
            assert (
                aborted[0].reason == f"close handshake did not complete within {close_timeout:g} s"
            )
            await rec.next(Resumed, d)
            conns = server.gateway.connections
            assert len(conns) == 2
            assert conns[1].received[0][1] == 6
            assert conns[1].received[0][2]["session_id"] == ready.session_id
            assert client.state is SessionState.READY


async def test_server_close_4009_resumes_at_once():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (client, rec):
            ready_at = await rec.next(Ready)
            # Five ACKs after READY span four intervals (1.2 s): more than stable_after.
            await rec.next(HeartbeatAcknowledged, ready_at, count=5)
            server.close_all(4009)
            d = await rec.next(Disconnected, ready_at)
            gone = rec.events[d]
            assert (gone.code, gone.by_server, gone.next_step) == (4009, True, NextStep.RESUME)
            scheduled = rec.events[await rec.next(ReconnectScheduled, d)]
            assert scheduled.delay == 0.0
            assert scheduled.failures == 0
            await rec.next(Resumed, d)
            conns = server.gateway.connections
            assert [ops(c)[0] for c in conns] == [2, 6]
            assert len(rec.of(Ready)) == 1
            assert len(server.gateway.identifies) == 1
            assert client.connection.consecutive_failures == 0


async def test_op7_rotation_resumes_at_once():
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config(rotate_every=1.5)) as server,
            running(server) as (client, rec),
        ):
            ready = rec.events[await rec.next(Ready)]
            d = await rec.next(Disconnected)
            gone = rec.events[d]
            # We closed the rotated connection ourselves (4000), before the server's 4009.
            assert (gone.code, gone.by_server, gone.next_step) == (4000, True, NextStep.RESUME)
            assert gone.reason == "server requested a reconnect (op 7)"
            scheduled = rec.events[await rec.next(ReconnectScheduled, d)]
            assert (scheduled.delay, scheduled.failures) == (0.0, 0)
            await rec.next(Resumed, d)
            conns = server.gateway.connections
            assert conns[1].received[0][1] == 6
            assert conns[1].received[0][2]["session_id"] == ready.session_id
            assert len(server.gateway.identifies) == 1
            assert client.connection.consecutive_failures == 0


async def test_4006_on_resume_invalidates_the_session_and_identifies(monkeypatch):
    monkeypatch.setattr(_stores, "IDENTIFY_WINDOW", 0.3)  # 5 s in production
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (client, rec):
            first = rec.events[await rec.next(Ready)]
            server.message(1)
            await rec.next(Dispatch)
            server.gateway.faults.resume_close = 4006
            server.close_all(4009)
            i = await rec.next(SessionInvalidated)
            invalidated = rec.events[i]
            assert invalidated.session_id == first.session_id
            assert invalidated.last_seq == 2
            second = rec.events[await rec.next(Ready, i)]
            closes = [(e.code, e.next_step) for e in rec.of(Disconnected)]
            assert closes == [(4009, NextStep.RESUME), (4006, NextStep.IDENTIFY)]
            assert second.session_id != first.session_id
            assert second.seq == 1
            await rec.next(HeartbeatAcknowledged, rec.index(Ready, i))
            conns = server.gateway.connections
            assert [ops(c)[0] for c in conns] == [2, 6, 2]
            # The new session's beats carry its own seq, not the old session's 2.
            assert {d for _, op, d in conns[2].received if op == 1} == {1}
            # The identify limiter's window held between the two Identifies.
            first_at, second_at = server.gateway.identifies
            assert second_at - first_at >= 0.3 - 0.01
            assert client.connection.session_id == second.session_id


@pytest.mark.parametrize(("code", "exit_code"), [(4914, 3), (4013, 4)])
async def test_fatal_close_stops_for_good(code, exit_code):
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            server.gateway.faults.identify_close = code
            async with running(server) as (client, rec):
                await rec.stopped()
                assert client.state is SessionState.STOPPED
                fatal = rec.of(FatalStop)
                assert len(fatal) == 1
                assert fatal[0].code == code
                assert fatal[0].hint
                assert isinstance(rec.events[-1], FatalStop)
                assert rec.of(Disconnected)[-1].next_step is NextStep.STOP
                assert not rec.of(ReconnectScheduled)
                assert len(server.gateway.connections) == 1
                assert _cli._exit_code(fatal[0]) == exit_code
    assert _cli._exit_code(None) == _cli.EXIT_OK
    assert (_cli.EXIT_FATAL, _cli.EXIT_CONFIG) == (3, 4)


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("QQBOT_") and "proxy" not in k.lower()
    }


def test_cli_run_against_the_embedded_fake_gateway_prints_json_events():
    # The embedded fake's Hello interval is 5 s and the first beat is jittered over it, so
    # only a run longer than 5 s is sure to show a heartbeat ACK: `--seconds 3` shows one
    # in about 60 % of runs.
    argv = ["run", "--fake", "--seconds", "7", "--log-format", "json"]
    code = f"import sys; from qqproto_io._cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    records = [r for r in lines if r["event"] != "log"]  # "log": not a core event
    assert all({"t", "level", "logger", "message"} <= r.keys() for r in lines if r not in records)
    names = [r["event"] for r in records]
    assert {"hello", "ready", "heartbeat_ack"} <= set(names)
    assert names.index("hello") < names.index("ready") < names.index("heartbeat_ack")
    assert all(r["shard"] == 0 for r in records)
    output = proc.stdout + proc.stderr
    assert "fake-token-" not in output
    assert FakeGatewayConfig().client_secret not in output


def test_cli_liveness_budget_reaches_the_session_config(monkeypatch, capsys):
    args = _cli._parse(["run", "--fake", "--liveness-budget", "42"])
    assert _cli._session_config(args)[0].liveness_budget == 42.0
    monkeypatch.setenv("QQBOT_LIVENESS_BUDGET", "90")
    args = _cli._parse(["run", "--fake"])
    assert _cli._session_config(args)[0].liveness_budget == 90.0
    assert _cli.main(["run", "--fake", "--liveness-budget", "-1"]) == _cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "qqproto: --liveness-budget -1: must be a number of seconds above 0\n"
    )
    monkeypatch.setenv("QQBOT_LIVENESS_BUDGET", "soon")
    assert _cli.main(["run", "--fake"]) == _cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "qqproto: QQBOT_LIVENESS_BUDGET=soon: must be a number of seconds\n"
    )


def test_cli_fake_gateway_rejects_an_unknown_fault(capsys):
    # `--fault NAME` only turns a switch on (sets it to True): it cannot script a close code
    # such as identify_close=4914, so the fatal exit codes are tested through GatewayClient
    # and _cli._exit_code above.
    assert _cli.main(["fake-gateway", "--fault", "no_such_fault"]) == _cli.EXIT_USAGE
    assert "unknown fault 'no_such_fault'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ proxy


class TinyProxy:
    """An HTTP proxy on loopback: CONNECT tunnels and absolute-form forwarding.

    Its "DNS" sends every host name to 127.0.0.1, as a real proxy resolves names for its
    clients; that is how a client can reach a loopback server through it under a name the
    client itself does not treat as loopback.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.port = 0

    @asynccontextmanager
    async def serve(self):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._handle)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _handle(self, client) -> None:
        async with client:
            head = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while b"\r\n\r\n" not in head:
                    head += await client.receive()
            if b"\r\n\r\n" not in head:
                return
            head, _, rest = head.partition(b"\r\n\r\n")
            line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for raw in header_lines:
                name, _, value = raw.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.requests.append((line, headers))
            method, target, _ = line.split(" ")
            if method == "CONNECT":
                port = int(target.rpartition(":")[2])
                if self.status != 200:
                    await client.send(f"HTTP/1.1 {self.status} Nope\r\n\r\n".encode())
                    return
                upstream = await anyio.connect_tcp("127.0.0.1", port)
                await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = rest
            else:
                upstream = await anyio.connect_tcp("127.0.0.1", urlsplit(target).port or 80)
                first = head + b"\r\n\r\n" + rest
            async with upstream, anyio.create_task_group() as tg:
                if first:
                    await upstream.send(first)
                tg.start_soon(_pipe, client, upstream)
                tg.start_soon(_pipe, upstream, client)

    def connects(self) -> list[str]:
        return [line.split(" ")[1] for line, _ in self.requests if line.startswith("CONNECT ")]


async def _pipe(source, sink) -> None:
    with contextlib.suppress(
        anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
    ):
        async for chunk in source:
            await sink.send(chunk)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await sink.send_eof()


async def test_client_reaches_ready_through_an_http_connect_proxy():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, TinyProxy().serve() as proxy:
            # Under a name that is not loopback to the client, the gateway is only reachable
            # through the proxy, which resolves it to 127.0.0.1.
            gateway_name = f"gateway.qqproto.test:{server.port}"
            server.gateway.config.url = f"ws://{gateway_name}/websocket"
            proxy_url = f"http://127.0.0.1:{proxy.port}"
            async with running(server, proxy=proxy_url) as (client, rec):
                await rec.next(Ready)
                assert client.state is SessionState.READY
                server.message(1)
                await rec.next(Dispatch)
            assert proxy.connects() == [gateway_name]
            _, headers = next(r for r in proxy.requests if r[0].startswith("CONNECT"))
            assert headers["host"] == gateway_name
            assert "proxy-authorization" not in headers
            # The REST calls went through it too (plain HTTP: absolute-form requests).
            forwarded = [line for line, _ in proxy.requests if not line.startswith("CONNECT")]
            assert any("/app/getAppAccessToken" in line for line in forwarded)


async def test_open_stream_tunnels_with_credentials_and_bypasses_loopback():
    async def echo(stream):
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                async for chunk in stream:
                    await stream.send(chunk)

    ctx = ssl.create_default_context()
    with anyio.fail_after(BOUND):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        echo_port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        async with (
            listener,
            anyio.create_task_group() as tg,
            TinyProxy().serve() as proxy,
        ):
            tg.start_soon(listener.serve, echo)
            config = ProxyConfig.from_url(f"http://bot:p%40ss@127.0.0.1:{proxy.port}")
            stream = await open_stream(
                "echo.qqproto.test", echo_port, tls=False, ssl_context=ctx, proxy=config
            )
            async with stream:
                await stream.send(b"ping through the tunnel")
                assert await stream.receive() == b"ping through the tunnel"
            line, headers = proxy.requests[-1]
            assert line == f"CONNECT echo.qqproto.test:{echo_port} HTTP/1.1"
            expected = "Basic " + base64.b64encode(b"bot:p@ss").decode()
            assert headers["proxy-authorization"] == expected
            # Loopback targets never go through the proxy.
            for host in ("127.0.0.1", "localhost"):
                stream = await open_stream(
                    host, echo_port, tls=False, ssl_context=ctx, proxy=config
                )
                async with stream:
                    await stream.send(b"direct")
                    assert await stream.receive() == b"direct"
            assert len(proxy.requests) == 1
            tg.cancel_scope.cancel()


async def test_open_stream_reports_a_refused_connect():
    with anyio.fail_after(BOUND):
        async with TinyProxy(status=407).serve() as proxy:
            config = ProxyConfig.from_url(f"http://127.0.0.1:{proxy.port}")
            with pytest.raises(ProxyError, match="407"):
                await open_stream(
                    "gateway.qqproto.test",
                    443,
                    tls=True,
                    ssl_context=ssl.create_default_context(),
                    proxy=config,
                )


# -------------------------------------------------------------------- transport bounds


async def test_oversized_message_is_dropped_and_the_session_goes_on():
    # Closing with 1009 (the old behaviour) lost the session: the server replays the same
    # message on every Resume. The transport drops it unread and the core reports it.
    limit = 64 * 1024
    config = fast_config(max_payload_size=limit)
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, config) as (client, rec),
        ):
            await rec.next(Ready)
            conn = server.gateway.live[0]
            # Exactly at the limit: delivered to the core, which rejects it as not JSON.
            conn.outputs.append(ServerSend("x" * limit))
            server._flush_all()
            violation = rec.events[await rec.next(ProtocolViolation)]
            assert violation.error.reason == "malformed_json"
            # One character more: dropped by the transport, a violation of its own.
            start = len(rec.events)
            conn.outputs.append(ServerSend("x" * (limit + 1)))
            server._flush_all()
            too_big = rec.events[await rec.next(ProtocolViolation, start)]
            assert too_big.error.reason == "too_large"
            assert too_big.error.size == limit + 1
            # The same connection carries on.
            server.message(1)
            await rec.next(Dispatch, start)
            assert not rec.of(Disconnected)
            assert len(server.gateway.connections) == 1
            assert client.state is SessionState.READY


async def test_plain_ws_connections_build_no_tls_context(monkeypatch):
    made_by_transport = []
    real = ssl.create_default_context

    def counting(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") == "qqproto_io._transport":
            made_by_transport.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (_, rec):
            await rec.next(Ready)
            server.close_all(4009)
            await rec.next(Resumed)
    assert made_by_transport == []


def open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


async def test_unanswered_closes_leak_neither_tasks_nor_fds(monkeypatch):
    # Every connection is rotated (op 7) 30 ms after it opens; the server never answers the
    # client's close frame, so each cycle ends with the close timeout aborting the transport.
    monkeypatch.setattr(_stores, "IDENTIFY_WINDOW", 0.0)
    config = fast_config(
        close_timeout=0.03,
        backoff_base=0.005,
        backoff_cap=0.01,
        max_failed_resumes=1000,
    )

    def aborted(events) -> int:
        return sum(
            1
            for e in events
            if isinstance(e, StateChanged) and e.reason.startswith("close handshake did not")
        )

    with anyio.fail_after(30):
        async with FakeGatewayServer(gateway_config(rotate_every=0.03)) as server:
            server.gateway.faults.ignore_close = True
            before = open_fds()
            client = make_client(server, config)
            rec = Recorder()
            async with anyio.create_task_group() as tg:
                async with client:
                    tg.start_soon(rec.consume, client)
                    await rec.until(lambda ev: aborted(ev) >= 10, "10 aborted closes")
                    after_10 = open_fds()
                    await rec.until(lambda ev: aborted(ev) >= 50, "50 aborted closes")
                    after_50 = open_fds()
                    closing_at = anyio.current_time()
                closed_in = anyio.current_time() - closing_at
            assert client.state is SessionState.STOPPED
            assert closed_in < config.close_timeout + 1.0
            assert rec.ended
            assert len(server.gateway.connections) >= 50
            # A leak would be two sockets (ours and the server's) per cycle: 80 over 40
            # cycles. The slack covers the connections in flight at the moment of counting:
            # the REST keep-alive, the current WebSocket and the one just aborted, both ends.
            assert after_50 <= after_10 + 4
            assert after_10 <= before + 6
            # Once the client is gone, everything it opened is closed again (the server may
            # need a moment to see the EOFs).
            await wait_until(lambda: open_fds() <= before + 1)
            assert server.gateway.live == []


# --------------------------------------------------------------------------- handlers


async def test_slow_async_handler_does_not_delay_heartbeats():
    # Only an *async* handler that awaits is tested. A synchronous handler that blocks (say
    # time.sleep for two intervals) blocks the event loop itself, protocol task included:
    # no driver on that loop can beat, and the remedy is not to do it (issue 7 adds stall
    # detection, which reports such a stall after the fact).
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)
            # Handlers consume the event queue, so the test taps the events on their way in
            # (the driver is created on entry and reports to this attribute).
            tap = Recorder()
            enqueuer = client._enqueuer

            def tapped(shard_id: int):
                deliver = enqueuer(shard_id)

                def observe(event) -> None:
                    tap.add(event)
                    deliver(event)

                return observe

            client._enqueuer = tapped
            handled: list[str | None] = []
            window: list[float] = []
            slow_started = anyio.Event()
            both_handled = anyio.Event()

            @client.on("C2C_MESSAGE_CREATE")
            async def on_message(dispatch: Dispatch) -> None:
                handled.append(dispatch.event_id)
                if dispatch.event_id == "C2C_MESSAGE_CREATE:fake00000001":
                    slow_started.set()
                    window.append(anyio.current_time())
                    await anyio.sleep(3 * INTERVAL)  # the slow handler under test
                    window.append(anyio.current_time())
                if len(handled) == 2:
                    both_handled.set()

            async with client:
                await tap.next(Ready)
                server.message(1)
                await slow_started.wait()
                server.message(2)
                await both_handled.wait()
                assert client.state is SessionState.READY
            start, end = window
            beats = [
                t
                for e, t in zip(tap.events, tap.times, strict=True)
                if isinstance(e, HeartbeatAcknowledged) and start <= t <= end
            ]
            assert len(beats) >= 2
            # The second message reached the client while the handler was still busy.
            second_at = next(
                t
                for e, t in zip(tap.events, tap.times, strict=True)
                if isinstance(e, Dispatch) and e.event_id == "C2C_MESSAGE_CREATE:fake00000002"
            )
            assert second_at < end
            assert not tap.of(ZombieDetected)
            assert handled == ["C2C_MESSAGE_CREATE:fake00000001", "C2C_MESSAGE_CREATE:fake00000002"]
            assert len(server.gateway.connections) == 1


# ------------------------------------------------------------------------------- HTTP


async def test_token_endpoint_down_then_wrong_secret_stops_with_a_hint(caplog):
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-that-must-never-be-logged"
    config = fast_config(http_timeout=0.3)
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            server.http_hang = True
            async with running(server, config, client_secret=secret) as (client, rec):
                await rec.next(ReconnectScheduled, count=2)
                assert server.gateway.token_requests == []  # hung: never answered
                hung = rec.of(ReconnectScheduled)
                assert all("token" in r.reason for r in hung)
                server.http_hang = False
                # Now the endpoint answers, but the secret is not the console's (100016):
                # a configuration error, which no retry can fix.
                await rec.stopped()
                (fatal,) = rec.of(FatalStop)
                assert "QQBOT_CLIENT_SECRET" in fatal.hint
                assert len(server.gateway.token_requests) == 1
                assert client.state is SessionState.STOPPED
                assert not rec.of(Disconnected)  # no socket was opened before the token came
    seen = [repr(e) for e in rec.events] + [str(e) for e in rec.events]
    seen += [r.getMessage() for r in caplog.records] + [caplog.text]
    seen += [repr(client._credentials), repr(client.connection)]
    assert caplog.records  # the test does see the logs it checks
    assert not [text for text in seen if secret in text]


# ------------------------------------------------------------------ resource hygiene


async def test_client_closes_its_memory_streams():
    # Regression: the driver's inbox and the client's event stream were left open (a
    # ResourceWarning when collected, an error under this project's filterwarnings).
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)
            async with client:
                async for event in client:
                    if isinstance(event, Ready):
                        break
            driver = client.drivers[0]
            leftovers = {
                "client._events": client._events,
                "client._events_send": client._events_send,
                "driver._inbox": driver._inbox,
                "driver._inbox_receive": driver._inbox_receive,
            }
            assert [name for name, s in leftovers.items() if not s._closed] == []


async def open_until_hello(url, inbox_send, inbox, tg) -> Transport:
    """A bare Transport to ``url``, started, once it reported its opening and a Hello."""
    transport = Transport(
        1, url, inbox_send, limits=TransportLimits(), proxy=None, ssl_context=None
    )
    transport.start(tg)
    assert await inbox.receive() == TransportOpened(1)
    with anyio.fail_after(5):  # not held back until the next packet arrives
        hello = await inbox.receive()
    assert isinstance(hello, TransportMessages)
    assert json.loads(hello.texts[0])["op"] == 10
    return transport


async def test_aborted_transport_closes_its_socket_and_streams():
    # Regression: Transport._run's finally awaited aclose_forcefully(stream) first; in the
    # aborted (cancelled) scope that re-raises the cancellation and skipped the rest of the
    # finally, leaving _outgoing open.
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            inbox_send, inbox = anyio.create_memory_object_stream[object](100)
            with inbox_send, inbox:
                async with anyio.create_task_group() as tg:
                    transport = await open_until_hello(server.ws_url, inbox_send, inbox, tg)
                    transport.abort()
                # The task group waited for the transport's task: it has ended.
                with pytest.raises(anyio.WouldBlock):
                    inbox.receive_nowait()  # nothing is reported after an abort
                assert transport._outgoing_receive._closed
                assert transport._outgoing._closed
            # The socket was closed without a close frame: the server sees the link end.
            await wait_until(lambda: not server.gateway.live)


async def test_a_message_in_the_same_read_as_the_handshake_is_not_held_back():
    # Regression: _open returned at AcceptConnection with the rest of that read (a Hello the
    # server wrote together with its 101) parsed by nobody until the next packet, which a
    # quiet server never sends: the client waited for hello_timeout.
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    async def serve(stream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        async with stream:
            while True:
                ws.receive_data(await stream.receive())
                if any(isinstance(e, Request) for e in ws.events()):
                    break
            hello = '{"op":10,"d":{"heartbeat_interval":41250}}'
            await stream.send(ws.send(AcceptConnection()) + ws.send(TextMessage(data=hello)))
            await anyio.sleep_forever()  # and then nothing, ever

    with anyio.fail_after(BOUND):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        inbox_send, inbox = anyio.create_memory_object_stream[object](100)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            with inbox_send, inbox:
                url = f"ws://127.0.0.1:{port}/websocket"
                transport = await open_until_hello(url, inbox_send, inbox, tg)
                transport.abort()
            tg.cancel_scope.cancel()


async def test_client_request_calls_the_openapi_with_the_sessions_token():
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server) as (client, rec),
        ):
            await rec.next(Ready)
            assert server.message(1) == 1  # a message to reply to: the fake checks msg_id
            body = {"content": "hi", "msg_type": 0, "msg_id": "ROBOT1.0_fake00000001"}
            reply = await client.request("POST", "/v2/users/FAKEOPENID0001/messages", body)
            assert isinstance(reply, dict)
            assert reply["id"] == "FAKEMSG00000001"
            assert server.gateway.rest_posts == [
                ("POST", "/v2/users/FAKEOPENID0001/messages", body)
            ]
            assert len(server.gateway.tokens) == 1  # the session's token, not a new one
            # A refusal is an ApiError that says what it means (was: a bare HttpFailure).
            with pytest.raises(ApiError) as failure:
                await client.request("GET", "/v2/nowhere")
            assert failure.value.kind is ApiErrorKind.NOT_FOUND
            assert (failure.value.status, failure.value.path) == (404, "/v2/nowhere")
            message = str(failure.value)
            assert message.startswith("GET /v2/nowhere: HTTP 404")
            assert server.gateway.tokens[0].value not in message


async def test_client_request_outside_the_block_is_a_clear_error():
    client = GatewayClient(app_id="1", client_secret="s")
    with pytest.raises(RuntimeError, match="outside 'async with'"):
        await client.request("GET", "/users/@me")


async def test_a_busy_reader_takes_queued_events_at_once_but_still_lets_others_run():
    from qqproto_io._client import _YIELD_EVERY, _ShardEvents

    send, receive = anyio.create_memory_object_stream[tuple[int, object]](1000)
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    with send, receive:
        for i in range(10 * _YIELD_EVERY):
            send.send_nowait((0, i))
        send.close()
        reader = _ShardEvents(receive, None)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            await anyio.lowlevel.checkpoint()
            before = turns
            got = [event async for _, event in reader]
            during = turns - before
            tg.cancel_scope.cancel()
    assert got == list(range(10 * _YIELD_EVERY))  # all of them, in order, then the end
    # The other task ran about once per _YIELD_EVERY events: not once per event, not never.
    assert 9 <= during <= 12


async def test_a_full_application_queue_drops_the_newest_and_says_so_in_the_stream():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server, max_queued_events=8)
            async with client:
                # Nobody reads: the queue fills with the session's first events.
                await wait_until(lambda: client.state is SessionState.READY)
                for n in range(1, 21):
                    server.message(n)
                await wait_until(lambda: client.dropped_events >= 10)
                dropped_before_reading = client.dropped_events
                events = []
                async for event in client:
                    events.append(event)
                    if isinstance(event, Dispatch) and event.event_id.endswith("00000021"):
                        break
                    if len(events) == 8:  # the queue drained: make more arrive
                        server.message(21)
            notices = [e for e in events if isinstance(e, EventsDropped)]
            assert len(notices) == 1
            # The notice stands where the gap is: after the queued ones, before the new one.
            assert events.index(notices[0]) == 8
            assert isinstance(events[-1], Dispatch)
            assert notices[0].count == dropped_before_reading == client.dropped_events
            numbers = [int(e.event_id[-8:]) for e in events if isinstance(e, Dispatch)]
            assert numbers == sorted(numbers)
            assert numbers[-1] == 21
            # Every message the application did not get is within the announced count.
            assert len(set(range(1, 21)) - set(numbers)) <= notices[0].count


# ------------------------------------------------------------------ proxy configuration


def test_proxy_from_url_parses_credentials_and_hides_them():
    config = ProxyConfig.from_url("http://bot:p%40ss%3Aword@proxy.example:3128")
    assert (config.host, config.port) == ("proxy.example", 3128)
    assert config.authorization == "Basic " + base64.b64encode(b"bot:p@ss:word").decode()
    assert "p@ss" not in repr(config)
    assert "Basic" not in repr(config)
    assert config.authorization[6:] not in repr(config)
    bare = ProxyConfig.from_url("127.0.0.1:7890")  # Clash's usual address, scheme implied
    assert (bare.host, bare.port, bare.authorization) == ("127.0.0.1", 7890, None)
    assert ProxyConfig.from_url("http://proxy.example").port == 8080
    for bad in ("socks4://127.0.0.1:7891", "https://proxy.example:443"):
        with pytest.raises(ValueError, match="http://"):
            ProxyConfig.from_url(bad)
    with pytest.raises(ValueError, match="no host"):
        ProxyConfig.from_url("http://:8080")


def test_proxy_applies_to_follows_no_proxy_and_skips_loopback():
    config = ProxyConfig("proxy.example", 3128, no_proxy=(".corp.example", "qq.com", " API.X "))
    assert not config.applies_to("qq.com")
    assert not config.applies_to("bots.qq.com")  # a bare domain covers its subdomains...
    assert config.applies_to("notqq.com")  # ...on a dot boundary only
    assert not config.applies_to("BOTS.QQ.COM.")  # case and a trailing dot do not matter
    assert not config.applies_to("corp.example")  # a leading dot covers the domain itself
    assert not config.applies_to("gw.corp.example")
    assert not config.applies_to("api.x")
    assert config.applies_to("sandbox.api.sgroup.qq.co")
    for loopback in ("localhost", "127.0.0.1", "127.0.0.2", "::1"):
        assert not config.applies_to(loopback)
    assert ProxyConfig("p", 1).applies_to("10.0.0.1")
    assert not ProxyConfig("p", 1, no_proxy=("*",)).applies_to("api.sgroup.qq.com")


def test_proxy_from_env_precedence_and_no_proxy():
    assert proxy_from_env({}) is None
    assert proxy_from_env({"HTTP_PROXY": "http://p:1"}) is None  # wss:// is not http://
    env = {
        "ALL_PROXY": "http://all.example:1",
        "https_proxy": "http://lower.example:2",
        "HTTPS_PROXY": "http://upper.example:3",
        "NO_PROXY": " a.example , ,.b.example ",
    }
    config = proxy_from_env(env)
    assert (config.host, config.port) == ("upper.example", 3)
    assert config.no_proxy == ("a.example", ".b.example")
    del env["HTTPS_PROXY"]
    assert proxy_from_env(env).host == "lower.example"
    env["https_proxy"] = ""  # empty means unset
    assert proxy_from_env(env).host == "all.example"
    only = proxy_from_env({"all_proxy": "http://u:pw@x.example:4", "no_proxy": "c.example"})
    assert only.authorization == "Basic " + base64.b64encode(b"u:pw").decode()
    assert only.no_proxy == ("c.example",)
    assert "pw" not in repr(only)


# ----------------------------------------------------------------------- token source


class FakeTokenApi:
    """Stands in for RestApi: each fetch waits for ``release`` and hands out a new token."""

    def __init__(self, expires_in: float = 7200.0) -> None:
        self.calls = 0
        self.expires_in = expires_in
        self.release = anyio.Event()

    async def fetch_token(self) -> TokenGrant:
        self.calls += 1
        number = self.calls
        await self.release.wait()
        return TokenGrant(token=f"token-{number}", expires_in=self.expires_in)


async def test_token_source_makes_one_fetch_for_concurrent_callers():
    api = FakeTokenApi()
    tokens = TokenSource(api, refresh_margin=60.0)
    grants: list[TokenGrant] = []

    async def get(force: bool = False) -> None:
        grants.append(await tokens.get(force=force))

    with anyio.fail_after(BOUND):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(get)
            # All three are in flight: one fetching, two waiting for it.
            await wait_until(
                lambda: api.calls == 1 and tokens._lock.statistics().tasks_waiting == 2
            )
            api.release.set()
        assert [g.token for g in grants] == ["token-1"] * 3
        assert api.calls == 1
        # A cached token with life left is handed out without a request.
        assert (await tokens.get()).token == "token-1"
        assert api.calls == 1
        # Forced (the server rejected it): a new fetch, and concurrent forced callers that
        # asked before it finished share it.
        api.release = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(get, force=True))
            tg.start_soon(partial(get, force=True))
            await wait_until(lambda: api.calls == 2 and tokens._lock.statistics().tasks_waiting)
            api.release.set()
        assert [g.token for g in grants[3:]] == ["token-2", "token-2"]
        assert api.calls == 2


async def test_token_source_refetches_a_token_inside_the_margin():
    api = FakeTokenApi(expires_in=30.0)  # less life than the 60 s margin
    api.release.set()
    tokens = TokenSource(api, refresh_margin=60.0)
    with anyio.fail_after(BOUND):
        assert (await tokens.get()).token == "token-1"
        assert (await tokens.get()).token == "token-2"
    assert api.calls == 2


# ------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for localhost (made with the openssl command)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
    ]
    try:
        subprocess.run(command, capture_output=True, check=True, timeout=30)  # noqa: S603
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot make a test certificate with openssl: {exc}")
    return cert, key


class _Gate:
    def __init__(self) -> None:
        self.open = True
        self._opened = anyio.Event()

    def close(self) -> None:
        self.open = False

    async def wait_open(self) -> None:
        if not self.open:
            await self._opened.wait()


class TlsFront:
    """TLS termination on loopback in front of the fake server (as the real gateway is wss).

    ``freeze()`` turns every connection open at the time into a half-open link: nothing is
    read from or written to either side any more, and no FIN is sent. ``hang_up()`` closes
    every connection. With ``close_notify`` the front ends a connection with a TLS
    close_notify alert; without it, it just closes the socket (as a crashing server, a load
    balancer's reset or an idle cutoff does).
    """

    def __init__(self, upstream_port: int, cert, key, *, close_notify: bool = False) -> None:
        self.upstream_port = upstream_port
        self.close_notify = close_notify
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.port = 0
        self.accepted = 0
        self._links: list[tuple[_Gate, anyio.CancelScope]] = []

    @asynccontextmanager
    async def serve(self):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._handle)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    def freeze(self) -> None:
        for gate, _ in self._links:
            gate.close()

    def hang_up(self) -> None:
        for _, scope in self._links:
            scope.cancel()

    async def _handle(self, stream) -> None:
        self.accepted += 1
        gate, scope = _Gate(), anyio.CancelScope()
        self._links.append((gate, scope))
        with scope:
            try:
                tls = await TLSStream.wrap(
                    stream,
                    server_side=True,
                    ssl_context=self.context,
                    standard_compatible=self.close_notify,
                )
            except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                await anyio.aclose_forcefully(stream)
                return
            upstream = await anyio.connect_tcp("127.0.0.1", self.upstream_port)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_gated_pipe, gate, tls, upstream)
                    # TLS has no half-close: the TLS side is closed below instead.
                    tg.start_soon(partial(_gated_pipe, gate, upstream, tls, half_close=False))
            finally:
                # Shielded: under cancellation a second unshielded await would never run.
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(upstream)
                    if self.close_notify and not scope.cancel_called:
                        # Send close_notify and wait (briefly) for the client's.
                        with anyio.move_on_after(1.0), contextlib.suppress(Exception):
                            await tls.aclose()
                    await anyio.aclose_forcefully(tls)


async def _gated_pipe(gate: _Gate, source, sink, *, half_close: bool = True) -> None:
    with contextlib.suppress(
        anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
    ):
        while True:
            await gate.wait_open()
            chunk = await source.receive()
            await gate.wait_open()
            await sink.send(chunk)
    if half_close:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await sink.send_eof()


@asynccontextmanager
async def driving(server: FakeGatewayServer, ssl_context: ssl.SSLContext, rec: Recorder, hang_up):
    """A ShardDriver (GatewayClient takes no SSL context) running until the block ends.

    ``hang_up`` runs before the driver is waited for, even when the block fails: a transport
    stuck in a shielded TLS close on a frozen link would otherwise hang the test for good.
    """
    gw = server.gateway.config
    api = RestApi(
        Credentials(gw.app_id, gw.client_secret),
        api_base=server.http_base,
        token_url=server.token_url,
        timeout=3.0,
    )
    driver = ShardDriver(
        GatewayConnection(fast_config(), rng=random.Random(7)),
        api=api,
        tokens=TokenSource(api),
        limiter=LocalIdentifyLimiter(),
        store=None,
        on_event=rec.add,
        ssl_context=ssl_context,
    )
    done = anyio.Event()

    async def run() -> None:
        try:
            await driver.run()
        finally:
            done.set()
            rec.end()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                yield driver, done
                if not done.is_set():
                    driver.request_close()
            finally:
                hang_up()
    finally:
        await api.aclose()


@pytest.mark.parametrize("close_notify", [True, False])
async def test_wss_server_close_resumes(tls_files, close_notify):
    # Regression: Transport._run used to close the stream with a shielded aclose(); for TLS
    # that is a close_notify exchange, and a peer that closes TCP without its close_notify
    # made it raise BrokenResourceError out of the finally, crashing the driver.
    cert, key = tls_files
    rec = Recorder()
    context = ssl.create_default_context(cafile=str(cert))
    with anyio.fail_after(BOUND):
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(FakeGatewayServer(gateway_config()))
            front = TlsFront(server.port, cert, key, close_notify=close_notify)
            await stack.enter_async_context(front.serve())
            server.gateway.config.url = f"wss://localhost:{front.port}/websocket"
            # No link is frozen here: nothing to hang up.
            async with driving(server, context, rec, lambda: None) as (driver, _):
                ready = rec.events[await rec.next(Ready)]
                await rec.next(HeartbeatAcknowledged)
                server.close_all(4009)
                d = await rec.next(Disconnected)
                assert rec.events[d].code == 4009
                await rec.next(Resumed, d)
                conns = server.gateway.connections
                assert conns[1].received[0][2]["session_id"] == ready.session_id
                assert front.accepted == 2
            assert driver.conn.state is SessionState.STOPPED


async def test_half_open_wss_link_is_aborted_and_the_driver_still_stops(tls_files):
    # Regression: the shielded TLS close of an aborted transport waited forever for the
    # close_notify of a half-open link, so the driver (and GatewayClient) could never stop.
    cert, key = tls_files
    rec = Recorder()
    context = ssl.create_default_context(cafile=str(cert))
    with anyio.fail_after(BOUND):
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(FakeGatewayServer(gateway_config()))
            front = TlsFront(server.port, cert, key, close_notify=True)
            await stack.enter_async_context(front.serve())
            server.gateway.config.url = f"wss://localhost:{front.port}/websocket"
            async with driving(server, context, rec, front.hang_up) as (driver, done):
                await rec.next(Ready)
                acked = await rec.next(HeartbeatAcknowledged)
                front.freeze()
                z = await rec.next(ZombieDetected, acked)
                await rec.next(Resumed, z)  # on a new TLS connection through the front
                assert front.accepted == 2
                driver.request_close()
                with anyio.move_on_after(driver.conn.config.close_timeout + 1.0):
                    await done.wait()
                assert done.is_set(), "the driver did not stop within close_timeout + 1 s"
            assert driver.conn.state is SessionState.STOPPED
