# Driving the fake gateway by hand, and the fake's REST side as the platform's: the control
# door (`/_fake/...` on the loopback server), the `qqproto fake-gateway` commands on stdin
# (a real child process with pipes), the REST log, and every rule a message send is checked
# against, with the platform's refusal codes.
#
# Over loopback on asyncio and trio, with the raw clients of test_fake_server.py. Ordering
# comes from the protocol (a reply proves its request was handled), never from sleeping: the
# only sleeps let a reply window run out (time passing is the point there), and the exact
# window boundaries are checked on the sans-IO core with explicit times.
"""Tests for the fake gateway's control door, stdin commands, REST log and REST rules."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import sys
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from wsproto.events import CloseConnection

from qqproto.testing import MESSAGE_KINDS, FakeGateway, FakeGatewayConfig
from qqproto_io import _cli
from tests.test_fake_server import (  # noqa: F401 - the fixtures are used by name
    EOF,
    QUIET,
    HttpClient,
    WsClient,
    _close_client_streams,
    anyio_backend,
    connect,
    get_token,
    http_once,
    identify,
    ready_client,
    serve,
)

pytestmark = pytest.mark.anyio

BOUND = 20  # seconds: a bound on every test, never reached when all is well
CLEAN = {
    k: v for k, v in os.environ.items() if not k.startswith("QQBOT_") and "proxy" not in k.lower()
}


async def control(server_or_port, method, name, body=None):
    """A control request: no Authorization header."""
    port = server_or_port if isinstance(server_or_port, int) else server_or_port.port
    return await http_once(port, method, f"/_fake/{name}", body=body)


async def send(server, path, body, token):
    return await http_once(server, "POST", path, body=body, authorization=f"QQBot {token}")


async def port_token(port: int) -> str:
    """A token from a fake of the default configuration on ``port``."""
    cfg = FakeGatewayConfig()
    body = {"appId": cfg.app_id, "clientSecret": cfg.client_secret}
    status, reply = await http_once(port, "POST", "/app/getAppAccessToken", body=body)
    assert status == 200
    return reply["access_token"]


async def port_client(port: int) -> WsClient:
    """A client past READY on the fake on ``port``."""
    token = await port_token(port)
    client = await WsClient.connect(port)
    assert (await client.recv_json())["op"] == 10
    await client.send_json(identify(token))
    assert (await client.recv_json())["t"] == "READY"
    return client


async def raw_request(server, data: bytes) -> tuple[int, dict]:
    """Send one request as bytes (a body that is not JSON) and parse the answer."""
    stream = await connect(server)
    await stream.send(data)
    reply = b""
    with anyio.fail_after(5):
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            reply += await stream.receive()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --------------------------------------------------------------------- control door


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
async def test_a_control_message_reaches_the_bot_with_the_platforms_shape(kind):
    async with serve() as server:
        client = await ready_client(server)
        status, sent = await control(server, "POST", "messages", {"kind": kind, "content": "hi"})
        assert status == 200
        got = await client.recv_json()
        assert (got["op"], got["s"], got["id"], got["t"]) == (0, 2, sent["event_id"], sent["t"])
        assert (sent["seq"], sent["seqs"], sent["delivered"]) == (2, [2], 1)
        d = got["d"]
        assert d["id"] == sent["msg_id"]
        assert isinstance(d["timestamp"], str)
        assert d["timestamp"].endswith("+08:00")  # the platform's time zone
        if kind == "c2c":
            assert got["t"] == "C2C_MESSAGE_CREATE"
            assert d["content"] == "hi"
            openid = d["author"]["user_openid"]
            assert sent["reply_path"] == f"/v2/users/{openid}/messages"
        elif kind == "group":
            assert got["t"] == "GROUP_AT_MESSAGE_CREATE"
            assert d["content"] == " hi"  # a space where the @ of the bot was
            assert d["author"]["member_openid"]
            assert sent["reply_path"] == f"/v2/groups/{d['group_openid']}/messages"
        elif kind == "guild":
            assert got["t"] == "AT_MESSAGE_CREATE"
            bot_id = "1000000000000000001"  # the READY user
            assert d["content"] == f"<@!{bot_id}> hi"
            assert d["mentions"][0]["id"] == bot_id
            assert d["author"]["id"]
            assert d["guild_id"]
            assert sent["reply_path"] == f"/channels/{d['channel_id']}/messages"
        else:
            assert got["t"] == "DIRECT_MESSAGE_CREATE"
            assert d["direct_message"] is True
            assert d["content"] == "hi"
            assert sent["reply_path"] == f"/dms/{d['guild_id']}/messages"


async def test_a_control_message_takes_the_chat_ids_and_the_platforms_names():
    async with serve() as server:
        client = await ready_client(server)
        body = {"kind": "group", "content": "yo", "group_openid": "G9", "user": "M9"}
        status, sent = await control(server, "POST", "messages", body)
        assert status == 200
        d = (await client.recv_json())["d"]
        assert (d["group_openid"], d["author"]["member_openid"]) == ("G9", "M9")
        assert sent["reply_path"] == "/v2/groups/G9/messages"
        body = {"kind": "guild", "content": "x", "channel": "C9", "guild_id": "S9"}
        status, sent = await control(server, "POST", "messages", body)
        d = (await client.recv_json())["d"]
        assert (status, d["channel_id"], d["guild_id"]) == (200, "C9", "S9")


async def test_a_control_message_without_a_session_is_kept_for_nobody():
    async with serve() as server:
        status, sent = await control(server, "POST", "messages", {"kind": "c2c"})
        assert status == 200
        assert (sent["seq"], sent["seqs"], sent["delivered"]) == (None, [], 0)


@pytest.mark.parametrize(
    ("method", "name", "body", "status", "error"),
    [
        ("POST", "messages", {"kind": "email", "content": "x"}, 400, "kind must be one of"),
        ("POST", "messages", {"kind": "c2c", "content": 7}, 400, "content must be a string"),
        ("POST", "messages", {"kind": "c2c", "openid": "x"}, 400, "unknown field 'openid'"),
        ("POST", "messages", {"kind": "c2c", "user": "a/b"}, 400, "without '/'"),
        ("POST", "messages", {"kind": "c2c", "shard": -1}, 400, "shard must be"),
        ("GET", "messages", None, 405, "takes POST"),
        ("POST", "rest", None, 405, "takes GET"),
        ("POST", "close", {"code": 1006}, 400, "code must be a close code"),
        ("POST", "close", {}, 400, "code must be a close code"),
        ("POST", "close", {"code": 4009, "reason": "x" * 124}, 400, "at most 123 bytes"),
        ("POST", "faults", {"no_ack": 1}, 400, "no_ack takes true or false"),
        ("POST", "faults", {"nope": True}, 400, "unknown fault 'nope'"),
        ("GET", "nope", None, 404, "no control endpoint /_fake/nope"),
    ],
)
async def test_control_mistakes_are_answered_with_the_reason(method, name, body, status, error):
    async with serve() as server:
        got_status, reply = await control(server, method, name, body)
        assert got_status == status
        assert error in reply["error"]
        assert server.gateway.faults.no_ack is False  # a refused request changed nothing


async def test_the_control_door_needs_no_token_and_is_not_under_a_bots_paths():
    async with serve() as server:
        status, reply = await control(server, "GET", "")
        assert status == 200
        assert any(e.startswith("POST /_fake/messages") for e in reply["endpoints"])
        # A body that is not JSON, a path that only starts like the door: the platform's 404.
        req = b"POST /_fake/close HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{x}"
        assert (await raw_request(server, req))[0] == 400
        for path in ("/_fakes/messages", "/v2/_fake/messages", "/gateway/_fake/rest"):
            status, reply = await http_once(server, "POST", path, body={"kind": "c2c"})
            assert (status, reply["code"]) == (404, 404)
        # The REST log holds only what a bot called, not the door's own requests.
        assert [c.path for c in server.gateway.rest_calls] == [
            "/_fakes/messages",
            "/v2/_fake/messages",
            "/gateway/_fake/rest",
        ]


async def test_control_close_reconnect_and_drop_act_on_every_connection():
    async with serve() as server:
        first, second = await ready_client(server), await ready_client(server)
        status, reply = await control(server, "POST", "close", {"code": 4900, "reason": "bye"})
        assert (status, reply) == (200, {"closed": 2})
        for client in (first, second):
            close = await client.recv()
            assert isinstance(close, CloseConnection)
            assert (close.code, close.reason) == (4900, "bye")
        client = await ready_client(server)
        assert await control(server, "POST", "reconnect") == (200, {"reconnecting": 1})
        assert await client.recv_json() == {"op": 7}
        assert await control(server, "POST", "drop") == (200, {"dropped": 1})
        assert await client.recv() == EOF


async def test_control_faults_are_read_and_set():
    async with serve() as server:
        status, reply = await control(server, "GET", "faults")
        assert status == 200
        assert reply["faults"]["no_ack"] is False
        assert reply["faults"]["identify_close"] is None
        body = {"no_ack": True, "identify_close": None, "replay_overlap": 2}
        status, reply = await control(server, "POST", "faults", body)
        assert (status, reply["faults"]["no_ack"], reply["faults"]["replay_overlap"]) == (
            200,
            True,
            2,
        )
        client = await ready_client(server)
        await client.send_json({"op": 1, "d": 1})
        await client.recv_nothing()  # no ACK: the switch is on
        # A request with one bad value changes nothing, not even the good ones.
        status, _ = await control(server, "POST", "faults", {"silent": True, "no_ack": "off"})
        assert status == 400
        assert (server.gateway.faults.silent, server.gateway.faults.no_ack) == (False, True)


async def test_the_control_door_stays_open_while_rest_hangs():
    async with serve() as server:
        server.http_hang = True
        status, reply = await control(server, "GET", "rest")
        assert (status, reply) == (200, {"calls": []})


# ------------------------------------------------------------------------ REST log


async def test_every_rest_call_is_logged_and_listed_without_secrets(caplog):
    caplog.set_level(logging.INFO, logger="qqproto_io.fake_server")
    async with serve() as server:
        client = await ready_client(server)
        token = await get_token(server)
        _, sent = await control(server, "POST", "messages", {"kind": "c2c", "content": "hi"})
        await client.recv_json()
        reply = {"content": "private words", "msg_type": 0, "msg_id": sent["msg_id"]}
        assert (await send(server, sent["reply_path"], reply, token))[0] == 200
        refused = await send(server, sent["reply_path"], {**reply, "msg_seq": 1}, token)
        assert refused[0] == 400
        await http_once(server, "GET", "/gateway/bot", authorization=f"QQBot {token}")
        await http_once(server, "GET", "/nowhere")
        status, listed = await control(server, "GET", "rest")
    assert status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "qqproto_io.fake_server"]
    rest = [line for line in lines if " -> " in line and "control" not in line]
    path = sent["reply_path"]
    msg_id = sent["msg_id"]
    assert rest == [
        "fake gateway: POST /app/getAppAccessToken -> 200",
        "fake gateway: POST /app/getAppAccessToken -> 200",
        f"fake gateway: POST {path} -> 200 msg_type=0 msg_id={msg_id} msg_seq=-",
        (
            f"fake gateway: POST {path} -> 400 40054005 msg_type=0 msg_id={msg_id} msg_seq=1 "
            "(msg_seq 1 was already used for msg_id)"
        ),
        "fake gateway: GET /gateway/bot -> 200",
        "fake gateway: GET /nowhere -> 404 404",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if " -> " in r.getMessage())
    calls = listed["calls"]
    assert [(c["method"], c["path"], c["status"], c["code"]) for c in calls] == [
        ("POST", "/app/getAppAccessToken", 200, None),
        ("POST", "/app/getAppAccessToken", 200, None),
        ("POST", path, 200, None),
        ("POST", path, 400, 40054005),
        ("GET", "/gateway/bot", 200, None),
        ("GET", "/nowhere", 404, 404),
    ]
    assert calls[0]["body"] is None  # the token request's body holds the secret
    assert calls[2]["body"] == reply
    assert (calls[2]["msg_type"], calls[2]["msg_id"], calls[2]["msg_seq"]) == (0, msg_id, None)
    everything = "\n".join(lines) + json.dumps(calls)
    for secret in [t.value for t in server.gateway.tokens] + [server.gateway.config.client_secret]:
        assert secret not in everything
    assert "private words" not in "\n".join(lines)  # message content is never logged


async def test_a_log_line_stays_one_line_whatever_the_body_holds(caplog):
    caplog.set_level(logging.INFO, logger="qqproto_io.fake_server")
    async with serve() as server:
        token = await get_token(server)
        body = {"msg_type": "0\nFORGED 200", "content": "x", "msg_id": "a b\r\nc"}
        status, _ = await send(server, "/v2/users/U/messages", body, token)
    assert status == 400
    (line,) = [r.getMessage() for r in caplog.records if "/v2/users/U/messages" in r.getMessage()]
    assert "\n" not in line
    assert "\r" not in line
    assert 'msg_type="0\\nFORGED 200"' in line


# ------------------------------------------------------------------ REST rules


async def reply_target(server, kind="c2c", **ids):
    """A message of ``kind`` from a user, for the bot to reply to: (token, path, msg_id)."""
    token = await get_token(server)
    _, sent = await control(server, "POST", "messages", {"kind": kind, "content": "hi", **ids})
    return token, sent["reply_path"], sent["msg_id"]


def refusal(reply, code):
    """The platform's refusal body: its code twice, a message and a trace id."""
    status, body = reply
    assert status == 400, body
    assert (body["code"], body["err_code"]) == (code, code)
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["trace_id"], str)
    return body["message"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"content": "hi"}, 12002),  # msg_type is required
        ({"content": "hi", "msg_type": None}, 12002),
        ({"content": "hi", "msg_type": "0"}, 12002),
        ({"content": "hi", "msg_type": True}, 12002),
        ({"content": "hi", "msg_type": 5}, 12002),
        ({"msg_type": 0}, 50006),  # text needs content
        ({"msg_type": 0, "content": ""}, 50006),
        ({"msg_type": 2, "content": "x"}, 50006),  # markdown needs markdown
        ({"msg_type": 3}, 50006),  # ark
        ({"msg_type": 4}, 50006),  # embed
        ({"msg_type": 7, "content": " "}, 50006),  # media needs media
        ({"msg_type": 7, "content": " ", "media": {}}, 50006),  # with its file_info
        ({"msg_type": 0, "content": "x", "msg_seq": "2"}, 12002),
    ],
)
async def test_a_send_is_checked_like_the_platform_checks_it(body, code):
    async with serve() as server:
        token, path, msg_id = await reply_target(server)
        refusal(await send(server, path, {**body, "msg_id": msg_id}, token), code)
        assert server.gateway.rest_posts == []  # refused sends are not recorded


async def test_every_msg_type_with_its_field_is_accepted_and_nulls_count_as_absent():
    async with serve() as server:
        token, path, msg_id = await reply_target(server)
        status, upload = await send(
            server,
            path.replace("/messages", "/files"),
            {"file_type": 1, "url": "https://example.invalid/a.png", "srv_send_msg": False},
            token,
        )
        assert status == 200
        assert set(upload) == {"file_uuid", "file_info", "ttl"}
        bodies = [
            # botpy sends every field, the unused ones as null.
            {"msg_type": 0, "content": "hi", "markdown": None, "msg_seq": None},
            {"msg_type": 2, "markdown": {"content": "# hi"}},
            {"msg_type": 3, "ark": {"template_id": 23}},
            {"msg_type": 4, "embed": {"title": "t"}},
            {"msg_type": 7, "content": " ", "media": {"file_info": upload["file_info"]}},
        ]
        for seq, body in enumerate(bodies, start=1):
            if body.get("msg_seq", 0) is not None:
                body["msg_seq"] = seq
            status, reply = await send(server, path, {**body, "msg_id": msg_id}, token)
            assert status == 200, reply
            assert reply["id"].startswith("FAKEMSG")
        assert len(server.gateway.rest_posts) == 5


async def test_a_proactive_send_is_accepted_without_msg_id():
    async with serve() as server:
        token = await get_token(server)
        body = {"msg_type": 0, "content": "news"}
        assert (await send(server, "/v2/groups/ANYGROUP/messages", body, token))[0] == 200


@pytest.mark.parametrize("kind", ["c2c", "group"])
async def test_a_reply_to_an_unknown_or_foreign_message_is_refused(kind):
    async with serve() as server:
        token, path, msg_id = await reply_target(server, kind)
        body = {"msg_type": 0, "content": "x", "msg_seq": 1}
        refusal(await send(server, path, {**body, "msg_id": "ROBOT1.0_never"}, token), 40034024)
        refusal(await send(server, path, {**body, "msg_id": 12}, token), 40034024)
        other = path.replace("FAKE", "OTHER")  # the same scene, another chat
        message = refusal(await send(server, other, {**body, "msg_id": msg_id}, token), 40034024)
        assert message == "请求参数msg_id无效或越权"
        scene = "/v2/groups/X/messages" if kind == "c2c" else "/v2/users/X/messages"
        refusal(await send(server, scene, {**body, "msg_id": msg_id}, token), 40034024)
        assert (await send(server, path, {**body, "msg_id": msg_id}, token))[0] == 200


async def test_a_repeated_msg_seq_is_refused_as_a_duplicate():
    async with serve() as server:
        token, path, msg_id = await reply_target(server)
        body = {"msg_type": 0, "content": "x", "msg_id": msg_id}
        assert (await send(server, path, body, token))[0] == 200  # msg_seq absent: 1
        message = refusal(await send(server, path, {**body, "msg_seq": 1}, token), 40054005)
        assert message == "消息被去重\uff0c请检查请求msgseq"
        assert (await send(server, path, {**body, "msg_seq": 2}, token))[0] == 200
        refusal(await send(server, path, {**body, "msg_seq": 2}, token), 40054005)


@pytest.mark.parametrize("kind", ["c2c", "group"])
async def test_a_message_takes_five_replies(kind):
    async with serve() as server:
        token, path, msg_id = await reply_target(server, kind)
        body = {"msg_type": 0, "content": "x", "msg_id": msg_id}
        for seq in range(1, 6):
            assert (await send(server, path, {**body, "msg_seq": seq}, token))[0] == 200
        message = refusal(await send(server, path, {**body, "msg_seq": 6}, token), 22009)
        assert message == "msg limit exceed"
        # Another message of the same chat has its own five.
        _, _, fresh = await reply_target(server, kind)
        assert (await send(server, path, {**body, "msg_id": fresh}, token))[0] == 200


@pytest.mark.parametrize(
    ("kind", "window", "code"),
    [
        ("c2c", "reply_window_c2c", 40034005),
        ("group", "reply_window_group", 40034005),
        ("guild", "reply_window_guild", 304027),
        ("direct", "reply_window_guild", 304027),
    ],
)
async def test_a_late_reply_is_refused_as_expired(kind, window, code):
    async with serve(FakeGatewayConfig(**{window: 0.05})) as server:
        token, path, msg_id = await reply_target(server, kind)
        await anyio.sleep(0.1)  # the reply window runs out: time passing is the point
        body = {"msg_type": 0, "content": "x", "msg_id": msg_id}
        message = refusal(await send(server, path, body, token), code)
        assert message == ("回复消息msg_id已过期" if code == 40034005 else "回复的消息过期")


async def test_guild_and_direct_sends_follow_the_guild_rules():
    async with serve() as server:
        for kind in ("guild", "direct"):
            token, path, msg_id = await reply_target(server, kind)
            refusal(await send(server, path, {"msg_id": msg_id}, token), 50006)
            message = refusal(
                await send(server, path, {"content": "x", "msg_id": "nope"}, token), 304026
            )
            assert message == "回复的消息 id 错误"
            # No msg_type needed, no reply count, no msg_seq rule: six replies, one body.
            for _ in range(6):
                status, reply = await send(server, path, {"content": "x", "msg_id": msg_id}, token)
                assert status == 200, reply
            status, reply = await send(server, path, {"image": "https://x.invalid/a"}, token)
            assert status == 200  # proactive, with an image only


async def test_a_reply_to_a_message_the_test_dispatched_itself_is_accepted():
    async with serve() as server:
        token = await get_token(server)
        d = {"id": "MYMSG1", "group_openid": "G1", "author": {"member_openid": "M"}}
        server.dispatch("GROUP_AT_MESSAGE_CREATE", d, event_id="E1")
        body = {"msg_type": 0, "content": "x", "msg_id": "MYMSG1"}
        assert (await send(server, "/v2/groups/G1/messages", body, token))[0] == 200
        # Not a message event: nothing to reply to.
        server.dispatch("GROUP_ADD_ROBOT", {"id": "MYMSG2", "group_openid": "G1"})
        refusal(
            await send(server, "/v2/groups/G1/messages", {**body, "msg_id": "MYMSG2"}, token),
            40034024,
        )


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"file_type": 1, "url": "https://x.invalid/a.png"}, 200),
        ({"file_type": 2, "file_data": "AAAA", "srv_send_msg": True}, 200),
        ({"url": "https://x.invalid/a.png"}, 400),
        ({"file_type": 9, "url": "https://x.invalid/a.png"}, 400),
        ({"file_type": 1}, 400),
        ({"file_type": 1, "url": "https://x.invalid/a", "srv_send_msg": "yes"}, 400),
    ],
)
async def test_media_uploads_are_checked(body, status):
    async with serve() as server:
        token = await get_token(server)
        for path in ("/v2/users/U/files", "/v2/groups/G/files"):
            reply = await send(server, path, body, token)
            if status == 200:
                assert reply[0] == 200
            else:
                refusal(reply, 12002)
        assert (await http_once(server, "POST", path, body=body))[0] == 401
        call = server.gateway.rest_calls[1]  # after the token request
        assert call.endpoint == "upload"
        if "file_data" in body:
            assert call.body["file_data"] == "<4 characters>"  # not the bytes


# ------------------------------------------------ the rules on the core, exact times
#
# (The sync checks below are async only to share the module's autouse stream fixture.)


def core(**config) -> tuple[FakeGateway, str]:
    gw = FakeGateway(FakeGatewayConfig(**config), rng=random.Random(0))
    body = {"appId": gw.config.app_id, "clientSecret": gw.config.client_secret}
    token = gw.token_request(body, 0.0).body["access_token"]
    return gw, f"QQBot {token}"


@pytest.mark.parametrize(
    ("kind", "window", "code"),
    [("c2c", 3600.0, 40034005), ("group", 300.0, 40034005), ("guild", 300.0, 304027)],
)
async def test_the_reply_windows_are_the_platforms_and_exact(kind, window, code):
    gw, auth = core()
    sent = gw.user_message(kind, "hi", 10.0)
    body = {"msg_type": 0, "content": "x", "msg_id": sent.msg_id, "msg_seq": 1}
    assert gw.post_message(sent.reply_path, auth, body, 10.0 + window).status == 200
    late = gw.post_message(sent.reply_path, auth, {**body, "msg_seq": 2}, 10.0 + window + 0.01)
    assert (late.status, late.body["code"]) == (400, code)
    assert late.note is not None
    assert "window" in late.note  # the reason, for the log; not in the answer
    assert "window" not in json.dumps(late.body)


async def test_the_core_answers_like_the_server_and_remembers_anchors_boundedly():
    gw, auth = core(replies_per_message=2)
    sent = gw.user_message("c2c", "hi", 0.0)
    body = json.dumps({"msg_type": 0, "content": "x", "msg_id": sent.msg_id}).encode()
    assert gw.rest_request("POST", sent.reply_path, auth, body, 1.0).status == 200
    again = gw.rest_request("post", sent.reply_path, auth, body, 1.0)
    assert again.body["code"] == 40054005
    assert [c.status for c in gw.rest_calls] == [200, 400]
    for n in range(10_001):
        gw.message(n, 2.0)
    assert len(gw._anchors) == 10_000  # the oldest ones are forgotten
    assert sent.msg_id not in gw._anchors


# ------------------------------------------------- `qqproto fake-gateway` with a pipe


class Child:
    """``qqproto fake-gateway`` as a child process: stdin, stdout and stderr are pipes."""

    def __init__(self, process, port, lines):
        self.process = process
        self.port = port
        self.lines = lines  # what it printed on stdout
        self.err = BufferedByteReceiveStream(process.stderr)
        self.seen: list[str] = []  # every stderr line read so far

    async def say(self, line: str) -> None:
        await self.process.stdin.send(line.encode() + b"\n")

    async def err_until(self, needle: str) -> str:
        """Read stderr up to the first line that holds ``needle``; return that line."""
        while True:
            line = (await self.err.receive_until(b"\n", 1 << 20)).decode()  # no newline
            self.seen.append(line)
            if needle in line:
                return line

    async def stop(self) -> int:
        """SIGTERM, then the rest of stderr to its end; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead):
            while True:
                self.seen.append((await self.err.receive_until(b"\n", 1 << 20)).decode())
        return await self.process.wait()


@asynccontextmanager
async def fake_gateway(*args):
    code = "import sys; from qqproto_io._cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "fake-gateway", "--no-messages", *args]
    process = await anyio.open_process(command, env=CLEAN)
    try:
        out = BufferedByteReceiveStream(process.stdout)
        lines = [(await out.receive_until(b"\n", 65536)).decode() for _ in range(6)]
        base = lines[0].strip().removeprefix("export QQBOT_API_BASE=")
        yield Child(process, int(base.rpartition(":")[2]), lines)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            await process.wait()
            await process.aclose()


async def test_fake_gateway_commands_on_stdin_send_messages_and_rest_calls_are_printed():
    with anyio.fail_after(BOUND):
        async with fake_gateway() as child:
            assert child.lines[5].startswith("# drive it (no token): POST http://127.0.0.1:")
            client = await port_client(child.port)
            token = await port_token(child.port)
            await child.say("c2c hello there")
            got = await client.recv_json()
            assert (got["s"], got["t"], got["d"]["content"]) == (
                2,
                "C2C_MESSAGE_CREATE",
                "hello there",
            )
            answer = await child.err_until("C2C_MESSAGE_CREATE event_id")
            assert f"msg_id {got['d']['id']} seq 2" in answer
            assert "hello there" not in answer  # no content on the console
            path = f"/v2/users/{got['d']['author']['user_openid']}/messages"
            assert f"reply: POST {path}" in answer
            for line, t, content in [
                ("group hi", "GROUP_AT_MESSAGE_CREATE", " hi"),
                ("guild ping", "AT_MESSAGE_CREATE", "<@!1000000000000000001> ping"),
                ("dm psst", "DIRECT_MESSAGE_CREATE", "psst"),
            ]:
                await child.say(line)
                got_next = await client.recv_json()
                assert (got_next["t"], got_next["d"]["content"]) == (t, content)
            body = {"msg_type": 0, "content": "private words", "msg_id": got["d"]["id"]}
            for status in (200, 400):  # the second time: the same msg_seq (1)
                reply = await http_once(
                    child.port, "POST", path, body=body, authorization=f"QQBot {token}"
                )
                assert reply[0] == status
            ok = await child.err_until(f"POST {path} -> 200")
            assert ok.endswith(f"msg_type=0 msg_id={got['d']['id']} msg_seq=-")
            assert "INFO" in ok
            await child.err_until(f"POST {path} -> 400 40054005")
            await child.say("bogus words")
            assert "error: unknown command 'bogus'" in await child.err_until("error:")
            await child.say("rest")
            await child.err_until(f"POST {path} -> 400 40054005 msg_type=0")
            await child.say("fault no_ack on")
            assert "fault no_ack = True" in await child.err_until("fault no_ack")
            assert await child.stop() == 0
        printed = "\n".join(child.seen)
        assert "fake gateway on http://127.0.0.1:" in printed  # its last line: stopped
        assert token not in printed
        assert "fake-client-secret" not in printed
        assert "private words" not in printed
        assert "Traceback" not in printed


async def test_fake_gateway_commands_close_rotate_drop_and_stdin_eof_is_not_the_end():
    with anyio.fail_after(BOUND):
        async with fake_gateway() as child:
            client = await port_client(child.port)
            await child.say("close 4009 going away")
            close = await client.recv()
            assert isinstance(close, CloseConnection)
            assert (close.code, close.reason) == (4009, "going away")
            assert "closed 1 connection(s) with 4009" in await child.err_until("closed ")
            await child.say("close 1006")
            assert "code must be a close code" in await child.err_until("error:")
            client = await port_client(child.port)
            await child.say("rotate")
            assert await client.recv_json() == {"op": 7}
            await child.say("drop")
            assert await client.recv() == EOF
            # The end of stdin ends the commands, not the fake: the door still answers.
            await child.process.stdin.aclose()
            status, sent = await control(child.port, "POST", "messages", {"kind": "c2c"})
            assert (status, sent["t"]) == (200, "C2C_MESSAGE_CREATE")
            with anyio.move_on_after(QUIET):
                await child.process.wait()
            assert child.process.returncode is None  # still serving
            assert await child.stop() == 0  # SIGTERM: a clean stop
        assert "Traceback" not in "\n".join(child.seen)


async def test_message_every_zero_or_no_messages_means_none():
    args = _cli._parse(["fake-gateway", "--message-every", "0"])
    assert args.message_every == 0.0
    assert _cli._parse(["fake-gateway", "--no-messages"]).no_messages is True
    assert _cli._parse(["fake-gateway"]).message_every == 5.0  # the demo's default stays


async def test_a_negative_message_interval_is_a_usage_error(capsys):
    assert _cli.main(["fake-gateway", "--message-every", "-1"]) == _cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("qqproto: --message-every -1: must be a number")


async def test_fake_gateway_help_documents_the_commands_and_the_door(capsys):
    with pytest.raises(SystemExit):
        _cli.main(["fake-gateway", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("c2c TEXT", "group TEXT", "guild TEXT", "close CODE", "rotate", "drop"):
        assert needle in text
    assert "POST /_fake/messages" in text
    assert "--message-every" in text
    assert "--no-messages" in text


async def test_an_unknown_fault_is_refused_before_anything_is_printed():
    code = "import sys; from qqproto_io._cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "fake-gateway", "--fault", "identify_close"]
    with anyio.fail_after(BOUND):
        proc = await anyio.run_process(command, env=CLEAN, check=False)
    assert proc.returncode == _cli.EXIT_USAGE
    assert proc.stdout == b""
    assert proc.stderr == b"qqproto: --fault identify_close: not an on/off switch (see: fault)\n"
