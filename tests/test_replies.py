"""Replies, bodies, error classification and the Outbox, on virtual clocks.

Replies takes Unix time (the reply window counts from the message's timestamp); the Outbox
takes a monotonic clock. Both are plain numbers here. Backoff delays are recomputed from a
``random.Random`` replica making the same draws as the Outbox: one ``rng.random()`` per
backoff, with the full-jitter formula.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qqproto import (
    ApiError,
    ApiErrorKind,
    ApiRequest,
    Dispatch,
    Interaction,
    InteractionResult,
    InvalidResponse,
    Keyboard,
    LocalProtocolError,
    MediaType,
    Message,
    MessageBody,
    Outbox,
    RefusalReason,
    Replies,
    ReplyLimits,
    ReplyRefused,
    Send,
    SendConfig,
    SendDelivered,
    SendFailed,
    Transmit,
    UploadedMedia,
    acknowledge_interaction,
    classify_api_error,
    decode_payload,
    parse_interaction,
    parse_message,
    read_upload,
    upload_media,
)
from qqproto._backoff import backoff_window
from qqproto._outbox import _Pacer

FIXTURES = Path(__file__).parent / "fixtures" / "payloads"
HI = MessageBody.text("hi")


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def event(name: str, **changes: Any) -> Message | Interaction:
    payload = load(name)
    payload["d"].update(changes)
    p = decode_payload(json.dumps(payload, ensure_ascii=False))
    assert p.t is not None
    dispatch = Dispatch(type=p.t, seq=p.s, event_id=p.id, data=p.d)
    parsed = parse_message(dispatch) or parse_interaction(dispatch)
    assert parsed is not None
    return parsed


def sent_at(target: Message | Interaction) -> float:
    assert target.timestamp is not None
    return target.timestamp.timestamp()


C2C = event("c2c_message_create.docs.json")
GROUP = event("group_at_message_create.docs.json")
CHANNEL = event("at_message_create.docs.json")
DIRECT = event("direct_message_create.docs.json")
GROUP_CLICK = event(
    "interaction_create.docs.json",
    chat_type=1,
    group_openid="G/1",
    group_member_openid="M1",
    timestamp="2024-09-03T17:27:04+08:00",
)


def answer(name: str) -> dict[str, Any]:
    return load(name)


# ------------------------------------------------------------------------ addressing


def test_c2c_reply_by_msg_id_with_msg_seq() -> None:
    send = Replies().prepare(C2C, HI, sent_at(C2C) + 10)
    assert send.request.method == "POST"
    assert send.request.path == "/v2/users/E4F4AEA33253A2797FB897C50B81D7ED/messages"
    assert send.request.body == {"content": "hi", "msg_type": 0, "msg_id": C2C.id, "msg_seq": 1}
    assert (send.msg_seq, send.source_id, send.retry_safe, send.pace_key) == (1, C2C.id, True, None)
    assert send.window_left == pytest.approx(3600 - 10)


def test_group_reply_path_and_sequence_per_message() -> None:
    replies = Replies()
    now = sent_at(GROUP) + 1
    seqs = [replies.prepare(GROUP, HI, now).msg_seq for _ in range(3)]
    assert seqs == [1, 2, 3]
    other = event("group_at_message_create.docs.json", id="ROBOT1.0_other")
    assert replies.prepare(other, HI, now).msg_seq == 1  # its own count
    send = replies.prepare(GROUP, HI, now)
    assert send.request.path == "/v2/groups/C9F778FE6ADF9D1D1DBE395BF744A33A/messages"
    assert send.request.body["msg_seq"] == 4
    assert len(replies) == 2


def test_guild_channel_reply_has_no_msg_type_nor_msg_seq_and_is_paced() -> None:
    send = Replies().prepare(CHANNEL, HI, sent_at(CHANNEL) + 1)
    assert send.request.path == "/channels/100010/messages"
    assert send.request.body == {"content": "hi", "msg_id": CHANNEL.id}
    assert (send.msg_seq, send.retry_safe, send.pace_key) == (None, False, "channel:100010")


def test_guild_dm_reply_goes_to_the_session_guild() -> None:
    send = Replies().prepare(DIRECT, HI, sent_at(DIRECT) + 1)
    assert send.request.path == "/dms/18700000000001/messages"
    assert send.request.body == {"content": "hi", "msg_id": DIRECT.id}
    assert send.pace_key is None


def test_interaction_reply_goes_by_event_id() -> None:
    replies = Replies()
    send = replies.prepare(GROUP_CLICK, HI, sent_at(GROUP_CLICK) + 1)
    assert send.request.path == "/v2/groups/G%2F1/messages"  # ids are percent-encoded
    assert send.request.body == {
        "content": "hi",
        "msg_type": 0,
        "msg_seq": 1,
        "event_id": "INTERACTION_CREATE:docs-example",
    }
    assert replies.prepare(GROUP_CLICK, HI, sent_at(GROUP_CLICK) + 1).msg_seq == 2
    assert isinstance(GROUP_CLICK, Interaction)
    no_envelope_id = replace(GROUP_CLICK, event_id=None)
    assert (
        replies.prepare(no_envelope_id, HI, sent_at(GROUP_CLICK) + 1).request.body["event_id"]
        == GROUP_CLICK.id
    )


def test_guild_interaction_reply_goes_to_its_channel() -> None:
    click = event("interaction_create.docs.json", chat_type=0, channel_id="C9", guild_id="G9")
    send = Replies().prepare(click, HI, 2e9)
    assert send.request.path == "/channels/C9/messages"
    assert send.request.body == {"content": "hi", "event_id": "INTERACTION_CREATE:docs-example"}
    assert send.pace_key == "channel:C9"


def test_an_interaction_without_its_conversation_id_has_no_target() -> None:
    # The documented example is C2C but carries no user_openid.
    docs_click = event("interaction_create.docs.json")
    with pytest.raises(ReplyRefused) as caught:
        Replies().prepare(docs_click, HI, 2e9)
    assert caught.value.reason is RefusalReason.NO_TARGET
    no_scene = event("interaction_create.docs.json", chat_type=None)
    with pytest.raises(ReplyRefused) as caught:
        Replies().prepare(no_scene, HI, 2e9)
    assert caught.value.reason is RefusalReason.NO_TARGET


# -------------------------------------------------------------------- windows, counts


@pytest.mark.parametrize(
    ("target", "window"), [(C2C, 3600), (GROUP, 300), (CHANNEL, 300), (DIRECT, 300)]
)
def test_the_reply_window_closes_on_time(target: Message, window: float) -> None:
    replies = Replies()
    t0 = sent_at(target)
    assert replies.prepare(target, HI, t0 + window - 0.001).window_left == pytest.approx(
        0.001, abs=1e-6
    )
    with pytest.raises(ReplyRefused) as caught:
        replies.prepare(target, HI, t0 + window)
    assert caught.value.reason is RefusalReason.WINDOW_CLOSED


def test_the_margin_closes_the_window_earlier() -> None:
    replies = Replies(ReplyLimits(margin=10))
    t0 = sent_at(GROUP)
    assert replies.prepare(GROUP, HI, t0 + 289).window_left == pytest.approx(1)
    with pytest.raises(ReplyRefused):
        replies.prepare(GROUP, HI, t0 + 290)


def test_a_message_from_the_future_is_clock_skew() -> None:
    send = Replies().prepare(GROUP, HI, sent_at(GROUP) - 30)
    assert send.window_left == pytest.approx(300)


def test_without_a_timestamp_the_platform_decides() -> None:
    undated = event("group_at_message_create.docs.json", timestamp=None)
    send = Replies().prepare(undated, HI, 4e9)  # a century later: still not refused
    assert send.window_left is None
    assert send.msg_seq == 1


@pytest.mark.parametrize(("target", "limit"), [(C2C, 4), (GROUP, 5)])
def test_the_reply_count_is_capped_and_a_refusal_spends_nothing(
    target: Message, limit: int
) -> None:
    replies = Replies()
    now = sent_at(target) + 1
    sends = [replies.prepare(target, HI, now) for _ in range(limit)]
    assert [s.msg_seq for s in sends] == list(range(1, limit + 1))
    for _ in range(2):
        with pytest.raises(ReplyRefused) as caught:
            replies.prepare(target, HI, now)
        assert caught.value.reason is RefusalReason.LIMIT_REACHED
    replies.cancel(sends[0])  # it surely failed: its reply comes back, its seq does not
    assert replies.prepare(target, HI, now).msg_seq == limit + 1
    with pytest.raises(ReplyRefused):
        replies.prepare(target, HI, now)


def test_limits_are_configurable() -> None:
    replies = Replies(ReplyLimits(c2c_max_replies=5, group_max_replies=None, group_window=10))
    now = sent_at(C2C) + 1
    assert [replies.prepare(C2C, HI, now).msg_seq for _ in range(5)] == [1, 2, 3, 4, 5]
    assert len([replies.prepare(GROUP, HI, sent_at(GROUP) + 9) for _ in range(50)]) == 50
    with pytest.raises(ReplyRefused):
        replies.prepare(GROUP, HI, sent_at(GROUP) + 10)


def test_guild_replies_and_interaction_replies_have_no_count() -> None:
    replies = Replies()
    for target in (CHANNEL, DIRECT, GROUP_CLICK):
        for _ in range(20):
            replies.prepare(target, HI, sent_at(target) + 1)


def test_cancel_twice_or_a_foreign_send_is_misuse() -> None:
    replies = Replies()
    send = replies.prepare(GROUP, HI, sent_at(GROUP) + 1)
    replies.cancel(send)
    with pytest.raises(LocalProtocolError):
        replies.cancel(send)
    replies.cancel(Replies().prepare(CHANNEL, HI, sent_at(CHANNEL) + 1))  # uncounted: no-op
    with pytest.raises(LocalProtocolError):
        replies.cancel("send")  # type: ignore[arg-type]


def test_memory_is_bounded_and_closed_windows_go_first() -> None:
    replies = Replies(max_tracked=2)
    t0 = sent_at(GROUP)
    replies.prepare(GROUP, HI, t0 + 1)  # closes at t0 + 300
    c2c = event("c2c_message_create.docs.json", timestamp=GROUP.timestamp.isoformat())  # type: ignore[union-attr]
    replies.prepare(c2c, HI, t0 + 1)  # closes at t0 + 3600
    newer = event("group_at_message_create.docs.json", id="m3", timestamp=None)
    replies.prepare(newer, HI, t0 + 400)  # the full book lets the closed group one go
    assert len(replies) == 2
    assert replies.prepare(c2c, HI, t0 + 401).msg_seq == 2  # still remembered
    latest = event("group_at_message_create.docs.json", id="m4", timestamp=None)
    replies.prepare(latest, HI, t0 + 402)  # nothing closed: the oldest goes
    assert len(replies) == 2
    assert replies.prepare(c2c, HI, t0 + 403).msg_seq == 1  # forgotten: counts afresh


@pytest.mark.parametrize(
    ("target", "body"),
    [
        (GROUP, MessageBody.embed("t")),
        (C2C, MessageBody.embed("t")),
        (CHANNEL, MessageBody.media("FILEINFO")),
        (DIRECT, MessageBody.media("FILEINFO")),
    ],
)
def test_a_body_the_scene_lacks_is_refused(target: Message, body: MessageBody) -> None:
    replies = Replies()
    with pytest.raises(ReplyRefused) as caught:
        replies.prepare(target, body, sent_at(target) + 1)
    assert caught.value.reason is RefusalReason.UNSUPPORTED
    assert len(replies) == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.prepare(GROUP, HI, 5000.0),  # a monotonic clock
        lambda r: r.prepare(GROUP, HI, float("nan")),
        lambda r: r.prepare(GROUP, HI, "now"),
        lambda r: r.prepare(GROUP, "hi", 2e9),
        lambda r: r.prepare({"id": "x"}, HI, 2e9),
    ],
)
def test_prepare_misuse_is_a_local_protocol_error(call: Any) -> None:
    replies = Replies()
    with pytest.raises(LocalProtocolError):
        call(replies)
    assert len(replies) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: ReplyLimits(c2c_window=-1),
        lambda: ReplyLimits(group_max_replies=0),
        lambda: ReplyLimits(c2c_max_replies=2.5),
        lambda: Replies(max_tracked=0),
        lambda: Replies(limits={}),  # type: ignore[arg-type]
    ],
)
def test_bad_settings_are_refused(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make()


# ----------------------------------------------------------------------------- bodies


def test_bodies_have_the_documented_shapes() -> None:
    assert MessageBody.text("x").fields == {"content": "x"}
    md = MessageBody.markdown("# hi", keyboard=Keyboard.template("102_3"))
    assert (md.msg_type, md.fields) == (
        2,
        {"markdown": {"content": "# hi"}, "keyboard": {"id": "102_3"}},
    )
    ark = MessageBody.ark(23, {"#DESC#": "d", "#LIST#": [{"desc": "a"}, {"desc": "b"}]})
    assert ark.msg_type == 3
    assert ark.fields == {
        "ark": {
            "template_id": 23,
            "kv": [
                {"key": "#DESC#", "value": "d"},
                {
                    "key": "#LIST#",
                    "obj": [
                        {"obj_kv": [{"key": "desc", "value": "a"}]},
                        {"obj_kv": [{"key": "desc", "value": "b"}]},
                    ],
                },
            ],
        }
    }
    embed = MessageBody.embed("标题", prompt="通知", lines=["a", "b"], thumbnail_url="https://x")
    assert embed.fields == {
        "embed": {
            "title": "标题",
            "fields": [{"name": "a"}, {"name": "b"}],
            "prompt": "通知",
            "thumbnail": {"url": "https://x"},
        }
    }
    media = MessageBody.media(UploadedMedia(file_info="FI", file_uuid=None, ttl=0))
    assert (media.msg_type, media.fields) == (7, {"media": {"file_info": "FI"}, "content": " "})


def test_a_media_reply_to_a_group() -> None:
    send = Replies().prepare(GROUP, MessageBody.media("FI"), sent_at(GROUP) + 1)
    assert send.request.body == {
        "media": {"file_info": "FI"},
        "content": " ",
        "msg_type": 7,
        "msg_seq": 1,
        "msg_id": GROUP.id,
    }


def test_a_keyboard_is_copied_and_bounded() -> None:
    button: dict[str, Any] = {"id": "1", "render_data": {"label": "ok"}, "action": {"type": 1}}
    keyboard = Keyboard.rows([[button] * 5] * 5)
    button["render_data"]["label"] = "changed later"
    rows = keyboard.payload["content"]["rows"]  # type: ignore[index]
    assert rows[0]["buttons"][0]["render_data"]["label"] == "ok"  # type: ignore[index]
    for bad in ([[button]] * 6, [[button] * 6], [], [[]], [["button"]], [[{"n": float("nan")}]]):
        with pytest.raises(LocalProtocolError):
            Keyboard.rows(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: MessageBody.text(""),
        lambda: MessageBody.text(5),
        lambda: MessageBody.markdown("x", keyboard={"id": "1"}),
        lambda: MessageBody.ark("23", {}),
        lambda: MessageBody.ark(23, {"k": [1]}),
        lambda: MessageBody.ark(23, {1: "v"}),
        lambda: MessageBody.embed("t", lines="abc"),
        lambda: MessageBody.embed("t", prompt=object()),
        lambda: MessageBody.media(""),
        lambda: Keyboard.template(""),
    ],
)
def test_bad_bodies_are_refused(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_request_encodes_as_json() -> None:
    send = Replies().prepare(C2C, MessageBody.text("你好"), sent_at(C2C) + 1)
    assert orjson.loads(send.request.encode()) == send.request.body
    assert "你好" not in repr(send)  # content stays out of the repr


# --------------------------------------------------------------- uploads, acknowledgements


def test_upload_for_c2c_and_groups() -> None:
    send = upload_media(C2C, url="https://x/a.png", file_type=MediaType.IMAGE)
    assert (send.request.method, send.request.path) == (
        "POST",
        "/v2/users/E4F4AEA33253A2797FB897C50B81D7ED/files",
    )
    assert send.request.body == {"file_type": 1, "url": "https://x/a.png", "srv_send_msg": False}
    assert send.retry_safe
    group = upload_media(GROUP, url="https://x/a.mp4", file_type=MediaType.VIDEO)
    assert group.request.path == "/v2/groups/C9F778FE6ADF9D1D1DBE395BF744A33A/files"
    assert group.request.body["file_type"] == 2
    with pytest.raises(ReplyRefused):
        upload_media(CHANNEL, url="https://x/a.png", file_type=MediaType.IMAGE)
    with pytest.raises(LocalProtocolError):
        upload_media(C2C, url="https://x/a.png", file_type=9)  # type: ignore[arg-type]


def test_read_upload() -> None:
    media = read_upload({"file_uuid": "u", "file_info": "FI", "ttl": 3600, "new": 1})
    assert media == UploadedMedia(file_info="FI", file_uuid="u", ttl=3600)
    assert read_upload({"file_info": "FI"}).ttl == 0
    for bad in (None, [], {"ttl": 1}, {"file_info": ""}, {"file_info": "x", "ttl": "1"}):
        with pytest.raises(InvalidResponse):
            read_upload(bad)  # type: ignore[arg-type]


def test_acknowledge_an_interaction() -> None:
    click = event("interaction_create.docs.json")
    assert isinstance(click, Interaction)
    send = acknowledge_interaction(click)
    assert (send.request.method, send.request.path) == (
        "PUT",
        "/interactions/30540ff7-9d8f-4737-83f1-e116ce6afa8b",
    )
    assert send.request.body == {"code": 0}
    assert send.retry_safe
    assert acknowledge_interaction(click, InteractionResult.ADMIN_ONLY).request.body == {"code": 5}
    with pytest.raises(LocalProtocolError):
        acknowledge_interaction(click, 7)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        acknowledge_interaction(C2C)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ ApiError


def classify(name: str) -> ApiError:
    a = answer(name)
    return classify_api_error(a["status"], a["body"], a["headers"], method="POST", path="/p")


def test_the_duplicate_msg_seq_answer() -> None:
    error = classify("api_error_duplicate_msg_seq.json")
    assert error.kind is ApiErrorKind.DUPLICATE
    assert (error.status, error.code) == (400, 40054005)
    assert error.trace_id == "00000000000000000000000000000001"
    assert error.message == answer("api_error_duplicate_msg_seq.json")["body"]["message"]
    text = str(error)
    assert "POST /p" in text
    assert "40054005" in text
    assert error.trace_id in text
    assert "消息被去重" not in text  # the platform's words are kept apart


def test_the_field_answers_classify() -> None:
    invalid = classify("api_error_msg_id_invalid.json")
    assert (invalid.kind, invalid.code) == (ApiErrorKind.INVALID_REQUEST, 40034024)
    assert invalid.trace_id == "8cbfe05773d4402496e605e19336e396"  # from the body
    expired = classify("api_error_msg_id_expired.json")  # err_code only
    assert (expired.kind, expired.code) == (ApiErrorKind.REPLY_EXPIRED, 40034005)
    assert not expired.retryable


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ApiErrorKind.INVALID_REQUEST),
        (401, ApiErrorKind.AUTH),
        (403, ApiErrorKind.FORBIDDEN),
        (404, ApiErrorKind.NOT_FOUND),
        (405, ApiErrorKind.NOT_FOUND),
        (413, ApiErrorKind.INVALID_REQUEST),
        (429, ApiErrorKind.RATE_LIMITED),
        (500, ApiErrorKind.SERVER),
        (504, ApiErrorKind.SERVER),
    ],
)
def test_without_a_known_code_the_status_decides(status: int, kind: ApiErrorKind) -> None:
    for body in (None, "<html>", {"code": 99999999}, {"code": "40054005"}):
        error = classify_api_error(status, body, method="GET", path="/x")
        assert error.kind is kind
        assert error.retryable is (kind in (ApiErrorKind.RATE_LIMITED, ApiErrorKind.SERVER))


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (22009, ApiErrorKind.RATE_LIMITED),
        (20028, ApiErrorKind.RATE_LIMITED),
        (11244, ApiErrorKind.AUTH),
        (11265, ApiErrorKind.FORBIDDEN),
        (40054002, ApiErrorKind.FORBIDDEN),
        (10003, ApiErrorKind.NOT_FOUND),
        (304027, ApiErrorKind.REPLY_EXPIRED),
        (40034128, ApiErrorKind.REPLY_EXPIRED),
        (40054005, ApiErrorKind.DUPLICATE),
        (304082, ApiErrorKind.SERVER),
    ],
)
def test_a_known_code_beats_the_status(code: int, kind: ApiErrorKind) -> None:
    assert classify_api_error(500, {"code": code}, method="POST", path="/x").kind is kind
    assert classify_api_error(400, {"err_code": code}, method="POST", path="/x").kind is kind


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("999999", 86400.0),
        ("-1", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("", None),
    ],
)
def test_retry_after_in_seconds(value: str, seconds: float | None) -> None:
    error = classify_api_error(429, None, {"Retry-After": value}, method="POST", path="/x")
    assert error.retry_after == seconds


def test_headers_are_read_case_insensitively() -> None:
    headers = {"x-tps-trace-id": "T1", "retry-after": "2"}
    error = classify_api_error(429, None, headers, method="POST", path="/x")
    assert (error.trace_id, error.retry_after) == ("T1", 2.0)


def test_the_error_never_shows_the_token_or_the_body() -> None:
    body = {"code": 11243, "message": "token QQBot SECRET-TOKEN is wrong", "echo": "my words"}
    error = classify_api_error(401, body, method="POST", path="/v2/users/U/messages")
    assert error.kind is ApiErrorKind.AUTH
    for secret in ("SECRET-TOKEN", "my words"):
        assert secret not in str(error)
        assert secret not in repr(error)


# ------------------------------------------------------------------------- Outbox


def outbox(seed: int = 7, **config: Any) -> Outbox:
    return Outbox(SendConfig(**config), rng=random.Random(seed))


def reply(target: Message | Interaction = GROUP, at: float | None = None) -> Send:
    now = at if at is not None else sent_at(target) + 1
    return Replies().prepare(target, HI, now)


def first(box: Outbox, send: Send, now: float) -> Transmit:
    t = box.start(send, now)
    assert isinstance(t, Transmit)
    return t


OK = {"id": "ROBOT1.0_sent", "timestamp": "2026-03-25T15:03:20+08:00"}


def test_a_send_that_succeeds_at_once() -> None:
    box = outbox()
    send = reply()
    t = first(box, send, 100.0)
    assert (t.attempt, t.at, t.request, t.refresh_token) == (1, 100.0, send.request, False)
    assert box.in_flight == 1
    done = box.answered(t, 100.2, status=200, body=OK)
    assert done == SendDelivered(ticket=t.ticket, attempts=1, response=OK)
    assert box.in_flight == 0


def test_a_429_waits_retry_after_and_resends_the_same_request() -> None:
    box = outbox(backoff_base=0.01)
    send = reply()
    t1 = first(box, send, 100.0)
    t2 = box.answered(t1, 100.1, status=429, body=None, headers={"Retry-After": "5"})
    assert isinstance(t2, Transmit)
    assert t2.at == pytest.approx(105.1)
    assert t2.attempt == 2
    assert t2.request is t1.request  # same msg_seq: the platform can spot a duplicate
    done = box.answered(t2, 105.3, status=200, body=OK)
    assert isinstance(done, SendDelivered)
    assert done.attempts == 2


def test_backoff_is_full_jitter_from_the_injected_random() -> None:
    box = outbox(seed=3, backoff_base=1.0, backoff_cap=30.0, max_attempts=5)
    replica = random.Random(3)
    t = first(box, reply(), 0.0)
    now = 0.0
    for failures in (1, 2, 3):
        nxt = box.answered(t, now, status=502, body=None)
        assert isinstance(nxt, Transmit)
        expected = replica.random() * backoff_window(failures, base=1.0, cap=30.0)
        assert nxt.at == pytest.approx(now + expected)
        t, now = nxt, nxt.at


def test_retry_after_wins_over_a_shorter_backoff_and_backoff_over_a_shorter_retry_after() -> None:
    box = outbox(seed=1, backoff_base=100.0, backoff_cap=100.0, max_elapsed=1000.0)
    replica = random.Random(1)
    t = first(box, reply(), 0.0)
    nxt = box.answered(t, 0.0, status=429, body=None, headers={"Retry-After": "1"})
    assert isinstance(nxt, Transmit)
    assert nxt.at == pytest.approx(max(1.0, replica.random() * 100.0))


def test_exactly_once_a_retry_refused_as_duplicate_is_a_delivery() -> None:
    box = outbox()
    t1 = first(box, reply(), 0.0)
    t2 = box.unanswered(t1, 5.0, sent=True)  # a timeout: it may have got through
    assert isinstance(t2, Transmit)
    body = answer("api_error_duplicate_msg_seq.json")["body"]
    done = box.answered(t2, 9.0, status=400, body=body)
    assert done == SendDelivered(ticket=t1.ticket, attempts=2, response=None, duplicate=True)


def test_exactly_once_after_a_5xx() -> None:
    box = outbox()
    t2 = box.answered(first(box, reply(), 0.0), 1.0, status=500, body=None)
    assert isinstance(t2, Transmit)
    done = box.answered(t2, t2.at, status=400, body={"code": 40054005})
    assert isinstance(done, SendDelivered)
    assert done.duplicate


def test_a_duplicate_of_a_try_that_cannot_have_landed_is_a_failure() -> None:
    box = outbox()
    t1 = first(box, reply(), 0.0)
    failed = box.answered(t1, 0.1, status=400, body={"code": 40054005})
    assert isinstance(failed, SendFailed)
    assert failed.error is not None
    assert failed.error.kind is ApiErrorKind.DUPLICATE
    assert not failed.maybe_delivered
    # After a 429 (refused unprocessed) or a connect failure, the same holds.
    for first_failure in ({"status": 429, "body": None}, None):
        t = first(box, reply(), 0.0)
        if first_failure is None:
            t2 = box.unanswered(t, 0.1, sent=False)
        else:
            t2 = box.answered(t, 0.1, **first_failure)
        assert isinstance(t2, Transmit)
        out = box.answered(t2, t2.at, status=400, body={"code": 40054005})
        assert isinstance(out, SendFailed)
        assert not out.maybe_delivered


@pytest.mark.parametrize("name", ["api_error_msg_id_invalid.json", "api_error_msg_id_expired.json"])
def test_a_4xx_that_cannot_succeed_is_not_retried(name: str) -> None:
    box = outbox()
    a = answer(name)
    out = box.answered(first(box, reply(), 0.0), 0.1, status=a["status"], body=a["body"])
    assert isinstance(out, SendFailed)
    assert out.attempts == 1
    assert out.error is not None
    assert out.error.code == a["body"].get("code", a["body"].get("err_code"))
    assert box.in_flight == 0


def test_an_auth_failure_retries_once_with_a_fresh_token() -> None:
    box = outbox()
    t1 = first(box, reply(), 0.0)
    t2 = box.answered(t1, 0.5, status=401, body={"code": 11244})
    assert isinstance(t2, Transmit)
    assert (t2.refresh_token, t2.at) == (True, 0.5)
    out = box.answered(t2, 1.0, status=401, body=None)
    assert isinstance(out, SendFailed)
    assert out.error is not None
    assert out.error.kind is ApiErrorKind.AUTH


def test_a_guild_send_is_never_retried_when_it_may_have_landed() -> None:
    send = reply(CHANNEL)
    assert not send.retry_safe
    box = outbox()
    out = box.answered(first(box, send, 0.0), 0.1, status=503, body=None)
    assert isinstance(out, SendFailed)
    assert out.maybe_delivered
    out = box.unanswered(first(box, send, 0.0), 0.1, sent=True)
    assert isinstance(out, SendFailed)
    assert out.maybe_delivered
    # But when it surely did not: a 429, or a connection that never opened.
    t = box.answered(first(box, send, 10.0), 10.1, status=429, body=None)
    assert isinstance(t, Transmit)
    t = box.unanswered(t, t.at, sent=False)
    assert isinstance(t, Transmit)
    assert isinstance(box.answered(t, t.at, status=200, body=OK), SendDelivered)


def test_a_check_the_docs_say_to_retry_once_is_retried_once() -> None:
    send = reply(CHANNEL)  # even a send that is not retry-safe: nothing was processed
    box = outbox()
    t2 = box.answered(first(box, send, 0.0), 0.1, status=500, body={"code": 11242})
    assert isinstance(t2, Transmit)
    out = box.answered(t2, t2.at, status=500, body={"code": 11242})
    assert isinstance(out, SendFailed)
    assert not out.maybe_delivered
    assert "once" in out.reason


def test_attempts_are_capped() -> None:
    box = outbox(max_attempts=3, max_elapsed=1000.0)
    t: Transmit | SendDelivered | SendFailed = first(box, reply(), 0.0)
    seen = 0
    while isinstance(t, Transmit):
        seen += 1
        t = box.answered(t, t.at, status=502, body=None)
    assert isinstance(t, SendFailed)
    assert (seen, t.attempts, t.maybe_delivered) == (3, 3, True)


def test_no_retry_past_max_elapsed_or_the_reply_window() -> None:
    box = outbox(max_elapsed=10.0)
    t = first(box, reply(), 0.0)
    out = box.answered(t, 1.0, status=429, body=None, headers={"Retry-After": "30"})
    assert isinstance(out, SendFailed)
    assert "no time left" in out.reason
    assert out.error is not None
    assert out.error.kind is ApiErrorKind.RATE_LIMITED
    # A group message 298 s old has 2 s left: a 5 s Retry-After is too long.
    late = reply(GROUP, at=sent_at(GROUP) + 298)
    box = outbox(max_elapsed=120.0)
    t = first(box, late, 50.0)
    out = box.answered(t, 50.5, status=429, body=None, headers={"Retry-After": "5"})
    assert isinstance(out, SendFailed)
    t = first(box, late, 50.0)
    assert isinstance(
        box.answered(t, 50.5, status=429, body=None, headers={"Retry-After": "1"}), Transmit
    )


def test_an_answer_held_for_review_is_delivered() -> None:
    box = outbox()
    a = answer("api_audit_pending.json")
    out = box.answered(first(box, reply(), 0.0), 0.1, status=a["status"], body=a["body"])
    assert isinstance(out, SendDelivered)
    assert (out.under_review, out.audit_id) == (True, "ab9bd72f-19e8-4394-b09e-66caca0d64e4")


def test_a_2xx_with_an_error_code_is_an_error() -> None:
    box = outbox()
    out = box.answered(first(box, reply(), 0.0), 0.1, status=200, body={"code": 40034024})
    assert isinstance(out, SendFailed)
    assert out.error is not None
    assert out.error.kind is ApiErrorKind.INVALID_REQUEST


def test_acknowledgements_and_uploads_retry_whatever_the_failure() -> None:
    click = event("interaction_create.docs.json")
    assert isinstance(click, Interaction)
    for send in (
        acknowledge_interaction(click),
        upload_media(C2C, url="u", file_type=MediaType.IMAGE),
    ):
        box = outbox()
        t = box.unanswered(first(box, send, 0.0), 0.1, sent=True)
        assert isinstance(t, Transmit)
        assert isinstance(box.answered(t, t.at, status=200, body={"file_info": "x"}), SendDelivered)


@pytest.mark.parametrize(
    "misuse",
    [
        lambda box, t: box.answered(t, 1.0, status=700, body=None),
        lambda box, t: box.answered(t, 1.0, status="200", body=None),
        lambda box, t: box.answered(t, float("inf"), status=200, body=None),
        lambda box, t: box.unanswered(t, 1.0, sent="yes"),
        lambda box, t: box.answered("t", 1.0, status=200, body=None),
        lambda box, t: box.start("send", 1.0),
        lambda box, t: box.answered(replace(t, ticket=999), 1.0, status=200, body=None),
    ],
)
def test_outbox_misuse_is_a_local_protocol_error_and_changes_nothing(misuse: Any) -> None:
    box = outbox()
    t = first(box, reply(), 0.0)
    with pytest.raises(LocalProtocolError):
        misuse(box, t)
    assert box.in_flight == 1
    assert isinstance(box.answered(t, 1.0, status=200, body=OK), SendDelivered)


def test_a_report_is_taken_once() -> None:
    box = outbox()
    t1 = first(box, reply(), 0.0)
    t2 = box.answered(t1, 0.1, status=502, body=None)
    assert isinstance(t2, Transmit)
    with pytest.raises(LocalProtocolError):
        box.answered(t1, 0.2, status=200, body=OK)  # superseded
    box.answered(t2, t2.at, status=200, body=OK)
    with pytest.raises(LocalProtocolError):
        box.answered(t2, 5.0, status=200, body=OK)  # finished
    t3 = first(box, reply(), 9.0)
    box.abandon(t3)
    assert box.in_flight == 0
    with pytest.raises(LocalProtocolError):
        box.unanswered(t3, 9.5, sent=False)


def test_bad_send_config_is_refused() -> None:
    for bad in (
        {"max_attempts": 0},
        {"channel_limit": 0},
        {"backoff_cap": -1},
        {"max_elapsed": "5"},
    ):
        with pytest.raises(LocalProtocolError):
            SendConfig(**bad)
    with pytest.raises(LocalProtocolError):
        Outbox({"max_attempts": 1}, rng=random.Random(0))  # type: ignore[arg-type]


# ------------------------------------------------------------------------- pacing


def test_a_guild_channel_gets_five_sends_a_second() -> None:
    box = outbox()
    replies = Replies()
    now = sent_at(CHANNEL) + 1
    ats = [first(box, replies.prepare(CHANNEL, HI, now), 10.0).at for _ in range(12)]
    assert ats == [10.0] * 5 + [11.0] * 5 + [12.0] * 2


def test_pacing_is_per_channel_and_only_for_channels() -> None:
    box = outbox()
    other = event("at_message_create.docs.json", channel_id="200020")
    for _ in range(5):
        first(box, reply(CHANNEL), 0.0)
    assert first(box, reply(other), 0.0).at == 0.0
    assert first(box, reply(CHANNEL), 0.0).at == 1.0
    assert all(first(box, reply(GROUP), 0.0).at == 0.0 for _ in range(20))


def test_a_retry_takes_a_new_slot() -> None:
    box = outbox(backoff_base=0.001)
    t = first(box, reply(CHANNEL), 0.0)
    for _ in range(4):
        first(box, reply(CHANNEL), 0.0)
    retry = box.answered(t, 0.0, status=429, body=None)
    assert isinstance(retry, Transmit)
    assert retry.at == pytest.approx(1.0)  # the five slots of [0, 1) are taken


def test_pacing_can_be_switched_off_or_changed() -> None:
    box = outbox(channel_limit=None)
    assert all(first(box, reply(CHANNEL), 0.0).at == 0.0 for _ in range(20))
    box = outbox(channel_limit=2, channel_period=10.0)
    assert [first(box, reply(CHANNEL), 0.0).at for _ in range(5)] == [0.0, 0.0, 10.0, 10.0, 20.0]


def test_pacing_that_would_miss_the_reply_window_fails_the_send_and_frees_its_slot() -> None:
    box = outbox(channel_limit=1, channel_period=5.0)
    late = reply(CHANNEL, at=sent_at(CHANNEL) + 297)  # 3 s left
    assert isinstance(box.start(late, 0.0), Transmit)
    out = box.start(late, 0.0)  # the next slot is at 5.0
    assert isinstance(out, SendFailed)
    assert out.attempts == 0
    assert first(box, reply(CHANNEL), 0.0).at == 5.0  # the failed one did not keep it


def test_old_slots_are_forgotten() -> None:
    pacer = _Pacer(5, 1.0)
    for i in range(100):
        pacer.reserve(f"channel:{i}", 0.0, 0.0)
    pacer.reserve("channel:0", 5.0, 5.0)
    assert pacer._slots["channel:0"] == [5.0]
    small = _Pacer(5, 1.0, max_keys=10)
    for i in range(10):
        small.reserve(f"k{i}", 0.0, 0.0)
    small.reserve("late", 9.0, 9.0)  # the book is full: expired keys go
    assert list(small._slots) == ["late"]


@settings(max_examples=500, deadline=None, database=None)
@given(
    limit=st.integers(1, 6),
    period=st.sampled_from([0.5, 1.0, 3.0]),
    steps=st.lists(
        st.tuples(st.floats(0, 2, allow_nan=False), st.floats(0, 10, allow_nan=False)),
        min_size=1,
        max_size=40,
    ),
)
def test_no_period_ever_holds_more_than_the_limit(limit, period, steps) -> None:
    pacer = _Pacer(limit, period)
    now = 0.0
    every: list[float] = []
    for advance, ahead in steps:
        now += advance
        earliest = now + ahead
        at = pacer.reserve("k", earliest, now)
        assert at >= earliest
        every.append(at)
    every.sort()
    for i in range(len(every) - limit):
        assert every[i + limit] - every[i] >= period - 1e-9


# --------------------------------------------------------------------- end to end


def test_a_group_reply_on_two_virtual_clocks() -> None:
    """A reply 100 s after the message: the first try times out, the retry is refused as a
    duplicate (the first had landed), so the user has exactly one reply; the next reply to
    the same message gets the next msg_seq."""
    replies, box = Replies(), outbox(seed=5)
    wall, mono = sent_at(GROUP) + 100, 5000.0
    send = replies.prepare(GROUP, MessageBody.markdown("**hi**"), wall)
    assert send.window_left == pytest.approx(200)
    t1 = first(box, send, mono)
    t2 = box.unanswered(t1, mono + 5, sent=True)
    assert isinstance(t2, Transmit)
    assert orjson.loads(t2.request.encode())["msg_seq"] == 1
    done = box.answered(t2, t2.at + 0.2, status=400, body={"code": 40054005, "message": "dup"})
    assert isinstance(done, SendDelivered)
    assert done.duplicate
    nxt = replies.prepare(GROUP, HI, wall + 10)
    assert nxt.msg_seq == 2


def test_the_transmit_repr_hides_the_body() -> None:
    box = outbox()
    t = first(box, Replies().prepare(C2C, MessageBody.text("private words"), sent_at(C2C) + 1), 0)
    assert "private words" not in repr(t)
    assert isinstance(t.request, ApiRequest)
