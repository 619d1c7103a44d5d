"""Replies over the wire: ``message.reply()`` through GatewayClient against the loopback fake.

The fake platform checks every send as the platform does (the msg_id exists, is in its
window, the msg_seq is new) and takes scripted REST faults (`RestFault`): an answer that is
lost after the send was accepted, 429 with Retry-After, 5xx. Times asserted are lower bounds
on the event loop's clock (a retry can never come before its Retry-After), never upper ones.
"""

from __future__ import annotations

import logging
import random

import anyio
import pytest

from qqproto import (
    ApiError,
    ApiErrorKind,
    C2CMessage,
    ChannelMessage,
    Dispatch,
    GroupMessage,
    Interaction,
    LocalProtocolError,
    MediaType,
    Message,
    MessageBody,
    Ready,
    RefusalReason,
    ReplyRefused,
    SendConfig,
    SendDelivered,
    parse_message,
)
from qqproto.testing import RestFault
from qqproto_io import HttpFailure, Messenger
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._http import Credentials, RestApi, TokenSource
from tests.loopback import anyio_backend  # noqa: F401 - fixtures
from tests.test_driver import BOUND, gateway_config, make_client, running, wait_until

pytestmark = pytest.mark.anyio

FAST_SENDS = SendConfig(backoff_base=0.05, backoff_cap=0.2, channel_period=0.3)


def sends(server: FakeGatewayServer, endpoint: str = "message") -> list:
    return [c for c in server.gateway.rest_calls if c.endpoint == endpoint]


def ready_flag(client) -> anyio.Event:
    """Set when the client's session is READY (a lifecycle handler: no polling)."""
    ready = anyio.Event()

    @client.on(Ready)
    async def _ready(_event: Ready) -> None:
        ready.set()

    return ready


async def first_message(client, rec, server, kind="c2c", content="ping") -> Message:
    """A user's message, as the bot reads it: typed and able to reply."""
    await rec.next(Ready)
    start = len(rec.events)
    server.user_message(kind, content)
    index = await rec.next(Dispatch, start)
    message = client.message(rec.events[index])
    assert message is not None
    return message


async def test_a_ping_bot_replies_once_with_the_next_msg_seq():
    """The bot a user writes first: a handler on typed messages and ``reply()``."""
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)
            ready = ready_flag(client)
            answered = anyio.Event()
            seen: list[Message] = []

            @client.on(Message)
            async def ping(message: Message) -> None:
                seen.append(message)
                if message.content == "ping":
                    await message.reply("pong")
                    answered.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(client.run)
                await ready.wait()
                sent = server.user_message("c2c", "ping")
                await answered.wait()
                await client.close()
            [message] = seen
            assert isinstance(message, C2CMessage)
            assert message.id == sent.msg_id
            [post] = server.gateway.rest_posts
            assert post[1] == sent.reply_path
            assert post[2] == {
                "content": "pong",
                "msg_type": 0,
                "msg_seq": 1,
                "msg_id": sent.msg_id,
            }


async def test_replies_to_one_message_count_msg_seq_and_stop_at_the_budget():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (client, rec):
            message = await first_message(client, rec, server)
            for _ in range(4):
                delivered = await message.reply("pong")
                assert isinstance(delivered, SendDelivered)
                assert delivered.attempts == 1
            assert [c.msg_seq for c in sends(server)] == [1, 2, 3, 4]
            # The fifth is refused here, before it costs a request (C2C allows 4).
            with pytest.raises(ReplyRefused) as refused:
                await message.reply("pong")
            assert refused.value.reason is RefusalReason.LIMIT_REACHED
            assert len(sends(server)) == 4


async def test_a_lost_answer_is_retried_with_the_same_msg_seq_and_delivered_once():
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, send_config=FAST_SENDS) as (client, rec),
        ):
            message = await first_message(client, rec, server)
            # The platform accepts the send, then the connection drops before the answer.
            server.gateway.rest_faults.append(RestFault(lose=True))
            delivered = await message.reply("pong")
            assert delivered.attempts == 2
            assert delivered.duplicate  # the retry was refused as a duplicate: delivered
            assert len(server.gateway.rest_posts) == 1  # the user sees one message
            first, retry = sends(server)
            assert (first.msg_seq, retry.msg_seq) == (1, 1)
            assert (first.status, retry.status, retry.code) == (200, 400, 40054005)
            # The next reply moves on to msg_seq 2.
            await message.reply("again")
            assert sends(server)[-1].msg_seq == 2
            assert len(server.gateway.rest_posts) == 2


async def test_429_is_retried_after_its_retry_after():
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, send_config=FAST_SENDS) as (client, rec),
        ):
            message = await first_message(client, rec, server)
            server.gateway.rest_faults.append(RestFault(status=429, retry_after=0.4))
            delivered = await message.reply("pong")
            assert delivered.attempts == 2
            refused, accepted = sends(server)
            assert (refused.status, accepted.status) == (429, 200)
            assert accepted.at - refused.at >= 0.4  # never before the platform allowed it
            assert refused.msg_seq == accepted.msg_seq == 1


async def test_5xx_is_retried_for_a_reply_with_msg_seq():
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, send_config=FAST_SENDS) as (client, rec),
        ):
            message = await first_message(client, rec, server, kind="group")
            assert isinstance(message, GroupMessage)
            server.gateway.rest_faults.extend([RestFault(status=500), RestFault(status=503)])
            delivered = await message.reply("pong")
            assert delivered.attempts == 3
            assert [c.status for c in sends(server)] == [500, 503, 200]
            assert len(server.gateway.rest_posts) == 1


async def test_a_guild_send_is_not_retried_after_a_5xx_and_says_it_may_have_arrived():
    # No msg_seq in guild channels: a retry after a 5xx could deliver twice.
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, send_config=FAST_SENDS) as (client, rec),
        ):
            message = await first_message(client, rec, server, kind="guild")
            assert isinstance(message, ChannelMessage)
            server.gateway.rest_faults.append(RestFault(status=502))
            with pytest.raises(ApiError) as failure:
                await message.reply("pong")
            assert failure.value.kind is ApiErrorKind.SERVER
            assert failure.value.status == 502
            assert failure.value.maybe_delivered
            assert len(sends(server)) == 1


async def test_a_guild_send_with_a_lost_answer_fails_without_a_second_try():
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, send_config=FAST_SENDS) as (client, rec),
        ):
            message = await first_message(client, rec, server, kind="guild")
            server.gateway.rest_faults.append(RestFault(lose=True))
            with pytest.raises(HttpFailure) as failure:
                await message.reply("pong")
            assert failure.value.sent  # it may have been delivered: it was
            assert len(sends(server)) == 1
            assert len(server.gateway.rest_posts) == 1


async def test_a_refused_reply_is_an_api_error_and_not_retried():
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, send_config=FAST_SENDS) as (client, rec),
        ):
            message = await first_message(client, rec, server)
            token = server.gateway.tokens[-1].value
            # A message the platform never sent: its msg_id is unknown there.
            forged = parse_message(
                Dispatch(
                    type="C2C_MESSAGE_CREATE",
                    seq=None,
                    event_id=None,
                    data={"id": "NOSUCHMSG", "author": {"user_openid": message.user_openid}},
                ),
                responder=client.messenger,
            )
            assert forged is not None
            with pytest.raises(ApiError) as failure:
                await forged.reply("pong")
            error = failure.value
            assert error.kind is ApiErrorKind.INVALID_REQUEST
            assert (error.status, error.code) == (400, 40034024)
            assert error.trace_id is not None
            assert not error.maybe_delivered
            assert token not in str(error)
            assert len(sends(server)) == 1  # not retried


async def test_group_reply_window_is_enforced_before_sending():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (client, rec):
            message = await first_message(client, rec, server, kind="group")
            assert client.messenger is not None
            assert message.timestamp is not None
            later = message.timestamp.timestamp() + 301.0  # past the 5 minutes
            messenger = Messenger(
                RestApi(
                    Credentials(server.gateway.config.app_id, server.gateway.config.client_secret),
                    api_base=server.http_base,
                    token_url=server.token_url,
                ),
                TokenSource.__new__(TokenSource),  # never asked: nothing is sent
                rng=random.Random(1),
                wall_clock=lambda: later,
            )
            try:
                with pytest.raises(ReplyRefused) as refused:
                    await messenger.reply(message, "too late")
                assert refused.value.reason is RefusalReason.WINDOW_CLOSED
            finally:
                await messenger._api.aclose()
            assert sends(server) == []


async def test_an_upload_then_a_media_reply():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server, running(server) as (client, rec):
            message = await first_message(client, rec, server, kind="group")
            media = await message.upload("https://example.invalid/cat.png", MediaType.IMAGE)
            assert media.file_info.startswith("FAKEFILEINFO")
            await message.reply(MessageBody.media(media))
            [upload] = sends(server, "upload")
            assert upload.body == {
                "file_type": 1,
                "url": "https://example.invalid/cat.png",
                "srv_send_msg": False,
            }
            [post] = server.gateway.rest_posts
            assert post[2]["msg_type"] == 7
            assert post[2]["media"] == {"file_info": media.file_info}


async def test_an_interaction_is_acknowledged_by_its_handler():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)
            ready = ready_flag(client)
            clicked = anyio.Event()

            @client.on(Interaction)
            async def click(interaction: Interaction) -> None:
                await interaction.acknowledge()
                clicked.set()

            async with client:
                await ready.wait()
                d = {
                    "id": "INTERACTION1",
                    "type": 11,
                    "chat_type": 2,
                    "user_openid": "U1",
                    "data": {"resolved": {"button_id": "b1", "button_data": "yes"}},
                }
                server.dispatch("INTERACTION_CREATE", d, event_id="INTERACTION_CREATE:1")
                await clicked.wait()
            assert server.gateway.acknowledged == [("INTERACTION1", 0)]


async def test_a_burst_to_one_guild_channel_is_paced_not_refused():
    config = SendConfig(channel_limit=5, channel_period=0.5)
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, send_config=config) as (client, rec),
        ):
            message = await first_message(client, rec, server, kind="guild")
            async with anyio.create_task_group() as tg:
                for n in range(7):
                    tg.start_soon(message.reply, f"reply {n}")
            calls = sends(server)
            assert len(calls) == 7
            assert all(c.status == 200 for c in calls)
            times = sorted(c.at for c in calls)
            # Any six consecutive sends leave at least a period apart; they arrive with a
            # travel time of their own, which varies by a little (0.05 s is generous on
            # loopback). Unpaced, all seven arrive within a few milliseconds.
            assert times[5] - times[0] >= 0.45
            assert times[6] - times[1] >= 0.45


async def test_a_cancelled_reply_makes_no_further_try():
    slow = SendConfig(backoff_base=30.0, backoff_cap=30.0)
    with anyio.fail_after(BOUND):
        async with (
            FakeGatewayServer(gateway_config()) as server,
            running(server, send_config=slow) as (client, rec),
        ):
            message = await first_message(client, rec, server)
            server.gateway.rest_faults.append(RestFault(status=503, retry_after=30.0))
            async with anyio.create_task_group() as tg:
                tg.start_soon(message.reply, "pong")
                await wait_until(lambda: len(sends(server)) == 1)  # the first try was made
                tg.cancel_scope.cancel()  # the caller gives up during the 30 s backoff
            assert client.messenger is not None
            assert client.messenger._outbox.in_flight == 0  # abandoned
            assert len(sends(server)) == 1


async def test_typed_handlers_skip_a_message_without_its_ids_and_the_session_goes_on(caplog):
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)
            ready = ready_flag(client)
            typed: list[Message] = []
            raw: list[Dispatch] = []
            done = anyio.Event()

            @client.on(Message)
            async def on_message(message: Message) -> None:
                typed.append(message)
                done.set()

            @client.on("C2C_MESSAGE_CREATE")
            async def on_raw(dispatch: Dispatch) -> None:
                raw.append(dispatch)

            caplog.set_level(logging.WARNING, logger="qqproto_io")
            async with client:
                await ready.wait()
                server.dispatch("C2C_MESSAGE_CREATE", {"content": "no ids"})
                server.user_message("c2c", "fine")
                await done.wait()
            assert [m.content for m in typed] == ["fine"]
            assert len(raw) == 2  # the raw handler saw both
            assert "skipped a C2C_MESSAGE_CREATE" in caplog.text
            assert "no ids" not in caplog.text  # content never reaches the log


def test_a_message_without_a_responder_says_how_to_get_one():
    message = parse_message(
        Dispatch(
            type="C2C_MESSAGE_CREATE",
            seq=None,
            event_id=None,
            data={"id": "M1", "author": {"user_openid": "U1"}},
        )
    )
    assert message is not None
    with pytest.raises(LocalProtocolError, match="no responder"):
        anyio.run(message.reply, "pong")


def test_a_responder_must_have_the_verbs():
    dispatch = Dispatch(type="C2C_MESSAGE_CREATE", seq=None, event_id=None, data={})
    with pytest.raises(LocalProtocolError, match="responder"):
        parse_message(dispatch, responder=object())  # type: ignore[arg-type]


def test_on_refuses_what_it_cannot_dispatch_on():
    from qqproto_io import GatewayClient

    client = GatewayClient(app_id="1", client_secret="s")
    with pytest.raises(TypeError, match="on\\(\\) takes"):
        client.on(int)  # type: ignore[call-overload]


async def test_without_typed_handlers_no_message_is_parsed(monkeypatch):
    # The receive path pays for typed messages only when a handler asks for them.
    def refuse(*_args, **_kwargs):
        raise AssertionError("parsed without a typed handler")

    monkeypatch.setattr("qqproto_io._client.parse_message", refuse)
    monkeypatch.setattr("qqproto_io._client.parse_interaction", refuse)
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)
            ready = ready_flag(client)
            got = anyio.Event()

            @client.on("C2C_MESSAGE_CREATE")
            async def on_raw(_dispatch: Dispatch) -> None:
                got.set()

            async with client:
                await ready.wait()
                server.user_message("c2c", "ping")
                await got.wait()


def test_the_typed_message_benchmark_runs(capsys):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_messages.py"
    argv = sys.argv
    sys.argv = [str(script), "--quick"]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "(b) / (a)" in out
    assert "parsing one message when asked" in out
