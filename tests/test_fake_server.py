# The loopback fake gateway, exercised over real sockets on asyncio and trio.
#
# The clients here are deliberately raw (anyio + h11 + wsproto) so that these tests depend on
# nothing but the server under test. Ordering is established by the protocol itself (a reply
# proves the request before it was processed), never by sleeping; the few short
# `move_on_after` windows only assert that nothing arrives.
"""Tests for qqproto_io._fake_server.FakeGatewayServer."""

from __future__ import annotations

import contextlib
import json
from collections import deque
from contextlib import asynccontextmanager

import anyio
import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from qqproto.testing import FakeGatewayConfig
from qqproto_io._fake_server import FakeGatewayServer
from tests.loopback import anyio_backend  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

INTENTS = (1 << 30) | (1 << 25)
QUIET = 0.2  # how long "nothing arrives" is watched for


# Every client stream a test opens; closed after the test, so that no test leaks a socket
# (a ResourceWarning is an error here).
_client_streams = []


@pytest.fixture(autouse=True)
async def _close_client_streams():
    yield
    while _client_streams:
        await _client_streams.pop().aclose()


async def connect(server_or_port):
    port = server_or_port if isinstance(server_or_port, int) else server_or_port.port
    stream = await anyio.connect_tcp("127.0.0.1", port)
    _client_streams.append(stream)
    return stream


@asynccontextmanager
async def serve(config=None, **kwargs):
    with anyio.fail_after(5):
        async with FakeGatewayServer(config, **kwargs) as server:
            yield server


# ---------------------------------------------------------------------------- clients


class HttpClient:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, stream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, server):
        return cls(await connect(server))

    async def request(self, method, target, *, body=None, authorization=None):
        headers = [("host", "127.0.0.1")]
        data = json.dumps(body).encode() if body is not None else b""
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        if authorization is not None:
            headers.append(("authorization", authorization))
        out = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if data:
            out += self.h11.send(h11.Data(data=data))
        out += self.h11.send(h11.EndOfMessage())
        await self.stream.send(out)
        status, chunks = None, []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    self.h11.receive_data(await self.stream.receive())
                except anyio.EndOfStream:
                    self.h11.receive_data(b"")
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise EOFError(f"connection ended: {event!r}")
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return status, json.loads(b"".join(chunks))

    async def aclose(self):
        await self.stream.aclose()


async def http_once(server, method, target, **kwargs):
    client = await HttpClient.connect(server)
    try:
        return await client.request(method, target, **kwargs)
    finally:
        await client.aclose()


async def get_token(server):
    cfg = server.gateway.config
    body = {"appId": cfg.app_id, "clientSecret": cfg.client_secret}
    status, reply = await http_once(server, "POST", "/app/getAppAccessToken", body=body)
    assert status == 200
    return reply["access_token"]


EOF = "EOF"  # what WsClient.recv returns when the TCP stream ends


class WsClient:
    """A raw WebSocket client: returns whole text messages, close events, pongs, or EOF."""

    def __init__(self, stream, ws):
        self.stream = stream
        self.ws = ws
        self.events = deque()
        self.pieces = []

    @classmethod
    async def connect(cls, server, target="/websocket"):
        stream = await connect(server)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(ws.send(Request(host="127.0.0.1", target=target)))
        client = cls(stream, ws)
        assert isinstance(await client.recv(), AcceptConnection)
        return client

    async def recv(self):
        while True:
            while self.events:
                event = self.events.popleft()
                if isinstance(event, TextMessage):
                    self.pieces.append(event.data)
                    if event.message_finished:
                        text, self.pieces = "".join(self.pieces), []
                        return text
                else:
                    return event
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return EOF
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())

    async def recv_json(self):
        message = await self.recv()
        assert isinstance(message, str), message
        return json.loads(message)

    async def recv_nothing(self):
        """Assert that nothing arrives for a short while."""
        with anyio.move_on_after(QUIET):
            got = await self.recv()
            pytest.fail(f"expected silence, got {got!r}")

    async def send_json(self, obj):
        await self.stream.send(self.ws.send(Message(data=json.dumps(obj))))

    async def close(self, code):
        await self.stream.send(self.ws.send(CloseConnection(code=code, reason="bye")))

    async def aclose(self):
        await self.stream.aclose()


def identify(token, shard=(0, 1)):
    d = {"token": f"QQBot {token}", "intents": INTENTS, "shard": list(shard)}
    return {"op": 2, "d": d}


async def ready_client(server, target="/websocket", shard=(0, 1)):
    token = await get_token(server)
    client = await WsClient.connect(server, target)
    assert (await client.recv_json())["op"] == 10
    await client.send_json(identify(token, shard))
    ready = await client.recv_json()
    assert ready["t"] == "READY"
    return client


# ------------------------------------------------------------------------------- HTTP


async def test_token_endpoint_returns_string_expires_in_over_keep_alive():
    async with serve() as server:
        cfg = server.gateway.config
        body = {"appId": cfg.app_id, "clientSecret": cfg.client_secret}
        client = await HttpClient.connect(server)
        status, first = await client.request("POST", "/app/getAppAccessToken", body=body)
        assert status == 200
        assert isinstance(first["access_token"], str)
        # A string, as the real endpoint sends it. The core truncates a float difference, so
        # a fresh token may say 7199.
        assert first["expires_in"] in {"7200", "7199"}
        # The same connection serves a second request, and a valid token is handed out again.
        status, second = await client.request("POST", "/app/getAppAccessToken", body=body)
        assert status == 200
        assert second["access_token"] == first["access_token"]
        await client.aclose()
        assert server.token_url == f"http://127.0.0.1:{server.port}/app/getAppAccessToken"


async def test_bad_credentials_get_code_100016():
    async with serve() as server:
        body = {"appId": server.gateway.config.app_id, "clientSecret": "wrong"}
        status, reply = await http_once(server, "POST", "/app/getAppAccessToken", body=body)
        assert status == 200
        assert reply["code"] == 100016
        assert "access_token" not in reply


async def test_bad_json_body_is_400():
    async with serve() as server:
        client = await HttpClient.connect(server)
        status, reply = await client.request("POST", "/app/getAppAccessToken", body=[1, 2])
        assert status == 400
        assert reply["code"] == 400
        await client.aclose()


async def test_gateway_endpoints_shape_and_auth():
    async with serve() as server:
        token = await get_token(server)
        client = await HttpClient.connect(server)
        status, bot = await client.request("GET", "/gateway/bot", authorization=f"QQBot {token}")
        assert status == 200
        assert bot["url"] == server.ws_url == f"ws://127.0.0.1:{server.port}/websocket"
        assert bot["shards"] == 1
        limit = bot["session_start_limit"]
        assert set(limit) == {"total", "remaining", "reset_after", "max_concurrency"}
        assert limit["remaining"] == limit["total"] == 1000
        status, plain = await client.request("GET", "/gateway", authorization=f"QQBot {token}")
        assert (status, plain) == (200, {"url": server.ws_url})
        status, denied = await client.request("GET", "/gateway/bot")
        assert status == 401
        assert denied["code"] == 11244
        await client.aclose()


async def test_message_sends_are_recorded_and_answered_with_a_message_id():
    async with serve() as server:
        token = await get_token(server)
        client = await HttpClient.connect(server)
        auth = f"QQBot {token}"
        # The messages the replies answer (a passive reply's msg_id must be one the fake sent).
        c2c_message = {"id": "ROBOT1.0_a", "author": {"user_openid": "OPENID1"}, "content": "x"}
        server.dispatch("C2C_MESSAGE_CREATE", c2c_message)
        server.dispatch("GROUP_AT_MESSAGE_CREATE", {"id": "ROBOT1.0_b", "group_openid": "GROUP1"})
        c2c = {"content": "echo", "msg_type": 0, "msg_id": "ROBOT1.0_a", "msg_seq": 1}
        group = {"content": "echo", "msg_type": 0, "msg_id": "ROBOT1.0_b", "msg_seq": 1}
        status, reply = await client.request(
            "POST", "/v2/users/OPENID1/messages", body=c2c, authorization=auth
        )
        assert (status, reply["id"]) == (200, "FAKEMSG00000001")
        status, reply = await client.request(
            "POST", "/v2/groups/GROUP1/messages", body=group, authorization=auth
        )
        assert (status, reply["id"]) == (200, "FAKEMSG00000002")
        # Refused requests are not recorded: no token, a body that is no object, a GET.
        status, denied = await client.request("POST", "/v2/users/OPENID1/messages", body=c2c)
        assert (status, denied["code"]) == (401, 11244)
        status, _ = await client.request(
            "POST", "/v2/groups/GROUP1/messages", body=[1], authorization=auth
        )
        assert status == 400
        status, _ = await client.request("GET", "/v2/users/OPENID1/messages", authorization=auth)
        assert status == 404
        await client.aclose()
        assert server.gateway.rest_posts == [
            ("POST", "/v2/users/OPENID1/messages", c2c),
            ("POST", "/v2/groups/GROUP1/messages", group),
        ]


async def test_configured_gateway_url_is_kept():
    async with serve(FakeGatewayConfig(url="wss://elsewhere.invalid/ws")) as server:
        token = await get_token(server)
        status, reply = await http_once(server, "GET", "/gateway", authorization=f"QQBot {token}")
        assert (status, reply["url"]) == (200, "wss://elsewhere.invalid/ws")


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/nope"), ("POST", "/gateway"), ("GET", "/app/getAppAccessToken"), ("GET", "/")],
)
async def test_unknown_routes_are_404(method, target):
    async with serve() as server:
        status, reply = await http_once(server, method, target)
        assert status == 404
        assert reply["code"] == 404


async def test_websocket_upgrade_elsewhere_is_404():
    async with serve() as server:
        stream = await connect(server)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(ws.send(Request(host="127.0.0.1", target="/other")))
        ws.receive_data(await stream.receive())
        event = next(iter(ws.events()))
        assert event.status_code == 404
        await stream.aclose()
        assert server.gateway.connections == []


async def test_bad_websocket_handshake_is_rejected():
    async with serve() as server:
        stream = await connect(server)
        await stream.send(
            b"GET /websocket HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        reply = b""
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                reply += await stream.receive()
        assert reply.startswith(b"HTTP/1.1 400 ")  # no Sec-WebSocket-Key
        assert server.gateway.connections == []


# -------------------------------------------------------------------------- WebSocket


@pytest.mark.parametrize("target", ["/websocket", "/websocket/"])
async def test_hello_identify_ready_heartbeat_ack(target):
    async with serve() as server:
        token = await get_token(server)
        client = await WsClient.connect(server, target)
        hello = await client.recv_json()
        assert hello == {"op": 10, "d": {"heartbeat_interval": 41250}}
        await client.send_json(identify(token))
        ready = await client.recv_json()
        assert (ready["op"], ready["s"], ready["t"]) == (0, 1, "READY")
        assert ready["d"]["session_id"]
        await client.send_json({"op": 1, "d": 1})
        assert await client.recv_json() == {"op": 11}
        await client.aclose()


async def test_frames_sent_with_the_handshake_are_not_lost():
    async with serve() as server:
        stream = await connect(server)
        ws = WSConnection(ConnectionType.CLIENT)
        handshake = ws.send(Request(host="127.0.0.1", target="/websocket"))
        # A masked ping written together with the upgrade request: h11 reads it along with
        # the request, and the server must hand it on to wsproto.
        ping = FrameProtocol(client=True, extensions=[]).ping(b"early")
        await stream.send(handshake + bytes(ping))
        client = WsClient(stream, ws)
        assert isinstance(await client.recv(), AcceptConnection)
        first, second = await client.recv(), await client.recv()
        assert json.loads(first)["op"] == 10
        assert isinstance(second, Pong)
        assert second.payload == b"early"


async def test_identify_with_a_wrong_token_closes_4004():
    async with serve() as server:
        client = await WsClient.connect(server)
        await client.recv_json()
        await client.send_json(identify("not-a-token"))
        close = await client.recv()
        assert isinstance(close, CloseConnection)
        assert close.code == 4004


async def test_no_ack_stops_heartbeat_acks():
    async with serve() as server:
        token = await get_token(server)
        client = await WsClient.connect(server)
        await client.recv_json()
        server.gateway.faults.no_ack = True
        await client.send_json({"op": 1, "d": None})
        # The server handles one connection's messages in order: READY coming next proves the
        # heartbeat before it was processed and left unanswered.
        await client.send_json(identify(token))
        assert (await client.recv_json())["t"] == "READY"
        server.gateway.faults.no_ack = False
        await client.send_json({"op": 1, "d": 1})
        assert await client.recv_json() == {"op": 11}
        assert [op for _, op, _ in server.gateway.connections[0].received] == [1, 2, 1]


async def test_fragmented_message_ping_and_dispatch():
    async with serve() as server:
        token = await get_token(server)
        client = await WsClient.connect(server)
        await client.recv_json()
        text = json.dumps(identify(token))
        half = len(text) // 2
        await client.stream.send(
            client.ws.send(Message(data=text[:half], message_finished=False))
            + client.ws.send(Message(data=text[half:], message_finished=True))
        )
        assert (await client.recv_json())["t"] == "READY"
        await client.stream.send(client.ws.send(Ping(b"p1")))
        pong = await client.recv()
        assert isinstance(pong, Pong)
        assert pong.payload == b"p1"
        assert server.message(7) == 1
        dispatch = await client.recv_json()
        assert (dispatch["s"], dispatch["t"]) == (2, "C2C_MESSAGE_CREATE")
        assert dispatch["id"] == "C2C_MESSAGE_CREATE:fake00000007"


async def test_server_close_reaches_the_client_with_its_code():
    async with serve() as server:
        client = await ready_client(server)
        server.close_all(4009)
        close = await client.recv()
        assert isinstance(close, CloseConnection)
        assert close.code == 4009
        await client.stream.send(client.ws.send(close.response()))
        assert await client.recv() == EOF
        assert server.gateway.live == []


async def assert_close_echoed(client, server, code: int) -> None:
    """The client closes with ``code``: the fake answers with the same code, then hangs up."""
    await client.close(code)
    answer = await client.recv()
    assert isinstance(answer, CloseConnection)
    assert answer.code == code
    assert await client.recv() == EOF
    assert server.gateway.live == []


async def test_client_close_is_answered_with_its_code():
    async with serve() as server:
        client = await ready_client(server)
        await assert_close_echoed(client, server, 4000)


async def test_resume_on_a_new_connection_closes_the_old_one_4009():
    async with serve() as server:
        token = await get_token(server)
        old = await WsClient.connect(server)
        await old.recv_json()
        await old.send_json(identify(token))
        ready = await old.recv_json()
        new = await WsClient.connect(server)
        await new.recv_json()
        resume = {"token": f"QQBot {token}", "session_id": ready["d"]["session_id"], "seq": 1}
        await new.send_json({"op": 6, "d": resume})
        assert (await new.recv_json())["t"] == "RESUMED"
        close = await old.recv()
        assert isinstance(close, CloseConnection)
        assert close.code == 4009


async def test_drop_all_gives_eof_without_a_close_frame():
    async with serve() as server:
        client = await ready_client(server)
        server.drop_all()
        assert await client.recv() == EOF


async def test_ignore_close_never_answers_the_close():
    # The connection's only way out is then the heartbeat timeout, which drops it without a
    # close frame: a close answer, had there been one, would arrive before that.
    config = FakeGatewayConfig(heartbeat_timeout=0.5)
    async with serve(config) as server:
        server.gateway.faults.ignore_close = True
        client = await WsClient.connect(server)
        opened = anyio.current_time()
        await client.recv_json()
        await client.close(4000)
        assert await client.recv() == EOF
        assert anyio.current_time() - opened >= 0.45
        assert server.gateway.connections[0].closed


async def test_rotation_timer_sends_op7_then_closes_4009():
    async with serve(FakeGatewayConfig(rotate_every=0.1)) as server:
        client = await ready_client(server)
        assert await client.recv_json() == {"op": 7}
        close = await client.recv()
        assert isinstance(close, CloseConnection)
        assert close.code == 4009


async def test_reconnect_all_sends_op7_and_the_client_may_close_first():
    async with serve() as server:
        client = await ready_client(server)
        server.reconnect_all()
        assert await client.recv_json() == {"op": 7}
        await assert_close_echoed(client, server, 4000)


async def test_dispatch_sends_any_event_to_live_sessions():
    async with serve() as server:
        client = await ready_client(server)
        d = {"id": "ROBOT1.0_g", "group_openid": "GROUP1", "content": "hi"}
        assert server.dispatch("GROUP_AT_MESSAGE_CREATE", d, event_id="E1") == 1
        got = await client.recv_json()
        assert (got["s"], got["t"], got["id"], got["d"]) == (2, "GROUP_AT_MESSAGE_CREATE", "E1", d)
        assert server.dispatch("GROUP_AT_MESSAGE_CREATE", d, shard=1) == 0


async def test_heartbeats_push_the_heartbeat_timeout_back():
    config = FakeGatewayConfig(heartbeat_timeout=0.4)
    async with serve(config) as server:
        client = await WsClient.connect(server)
        opened = anyio.current_time()
        await client.recv_json()
        for _ in range(3):
            await anyio.sleep(0.1)  # the client's own beat cadence, not a synchronisation
            await client.send_json({"op": 1, "d": None})
            assert await client.recv_json() == {"op": 11}
        assert await client.recv() == EOF
        assert anyio.current_time() - opened >= 3 * 0.1 + 0.4 - 0.05


async def test_silent_connection_reads_but_sends_nothing():
    async with serve() as server:
        server.gateway.faults.silent = True
        client = await WsClient.connect(server)
        await client.send_json({"op": 1, "d": 1})
        await client.recv_nothing()
        server.gateway.faults.silent = False
        await client.send_json({"op": 1, "d": 2})
        assert await client.recv_json() == {"op": 11}  # only the second beat's ACK
        assert [d for _, _, d in server.gateway.connections[0].received] == [1, 2]
        server.drop_all()
        assert await client.recv() == EOF


async def test_stop_reading_freezes_existing_connections_only():
    async with serve() as server:
        client = await ready_client(server)
        server.stop_reading = True
        await client.send_json({"op": 1, "d": 1})
        server.message(1)
        await client.recv_nothing()
        assert [op for _, op, _ in server.gateway.connections[0].received] == [2]
        newcomer = await WsClient.connect(server)  # a new flow is not half-open
        assert (await newcomer.recv_json())["op"] == 10
        server.stop_reading = False
        got = [await client.recv_json(), await client.recv_json()]
        assert [m["op"] for m in got] == [0, 11]
        assert got[0]["t"] == "C2C_MESSAGE_CREATE"


async def test_message_interval_produces_numbered_messages():
    async with serve(message_interval=0.05) as server:
        client = await ready_client(server)
        first, second = await client.recv_json(), await client.recv_json()
        assert first["t"] == second["t"] == "C2C_MESSAGE_CREATE"
        assert second["s"] == first["s"] + 1
        n = int(first["id"].removeprefix("C2C_MESSAGE_CREATE:fake"))
        assert second["id"] == f"C2C_MESSAGE_CREATE:fake{n + 1:08d}"


# --------------------------------------------------------------------------- shutdown


async def test_http_hang_never_answers_and_shutdown_still_ends_it():
    outcome = []

    async def ask(client):
        try:
            outcome.append(await client.request("GET", "/gateway"))
        except (EOFError, h11.ProtocolError) as err:
            outcome.append(type(err))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, FakeGatewayServer() as server:
            server.http_hang = True
            hung = await HttpClient.connect(server)
            tg.start_soon(ask, hung)
            with anyio.move_on_after(QUIET):
                await anyio.sleep_forever()
            assert outcome == []
            server.http_hang = False
            status, _ = await http_once(server, "GET", "/nope")
            assert status == 404
            # Leaving the server, with the hung request still open, ends it without an answer.
        assert len(outcome) == 1
        assert not isinstance(outcome[0], tuple)
        await hung.aclose()


async def test_shutdown_with_clients_connected_is_quick():
    config = FakeGatewayConfig(heartbeat_timeout=None)
    with anyio.fail_after(5):
        async with FakeGatewayServer(config) as server:
            port = server.port
            frozen = await ready_client(server)
            server.stop_reading = True
            ready = await ready_client(server)
            # A client that never reads, sent more than the socket buffers hold (on a shard
            # of its own, so that the others are not sent the same).
            slow = await ready_client(server, shard=(1, 2))
            big = "x" * 65536
            for n in range(200):
                assert server.message(n, content=big, shard=1) == 1
            idle_http = await connect(port)
            half_request = await connect(port)
            await half_request.send(b"GET /gateway HTTP/1.1\r\nHost: x\r\n")
        assert server.gateway.live == []
        for client in (ready, frozen):
            while (got := await client.recv()) != EOF:
                assert isinstance(got, str)
        for stream in (idle_http, half_request):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
        for closable in (ready, frozen, slow, idle_http, half_request):
            await closable.aclose()
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", port)
