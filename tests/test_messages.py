"""Typed message events: the fixtures parse to the documented fields, unknown fields and
types never fail, and a malformed ``d`` only ever raises InvalidMessage, naming the field.

Fixtures are real payloads (tests/fixtures/payloads/README.md says where each came from),
decoded by the core's own codec, as the gateway would deliver them.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qqproto import (
    MESSAGE_EVENT_TYPES,
    C2CMessage,
    ChannelMessage,
    DirectMessage,
    Dispatch,
    GroupMessage,
    Interaction,
    InvalidMessage,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Scene,
    decode_payload,
    parse_interaction,
    parse_message,
)

FIXTURES = Path(__file__).parent / "fixtures" / "payloads"
EVENT_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.json") if not p.name.startswith("api_"))
CST = timezone(timedelta(hours=8))


def envelope(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def as_dispatch(payload: dict[str, Any]) -> Dispatch:
    """What the core hands out for this envelope: decoded by its codec."""
    p = decode_payload(json.dumps(payload, ensure_ascii=False))
    assert p.t is not None
    return Dispatch(type=p.t, seq=p.s, event_id=p.id, data=p.d)


def fixture(name: str) -> Dispatch:
    return as_dispatch(envelope(name))


def with_d(name: str, d: Any, t: str | None = None) -> Dispatch:
    payload = envelope(name)
    payload["d"] = d
    if t is not None:
        payload["t"] = t
    return as_dispatch(payload)


# ---------------------------------------------------------------------- the fixtures


def test_c2c_docs_example() -> None:
    msg = parse_message(fixture("c2c_message_create.docs.json"))
    assert isinstance(msg, C2CMessage)
    assert msg.scene is Scene.C2C
    assert msg.type == "C2C_MESSAGE_CREATE"
    assert msg.id == "ROBOT1.0_.b6nx.CVryAO0nR58RXuU6SC.m92gc19j02qKqdm8ek!"
    assert msg.event_id == "C2C_MESSAGE_CREATE:docs-example"
    assert msg.user_openid == "E4F4AEA33253A2797FB897C50B81D7ED"
    assert msg.author.openid == msg.user_openid
    assert msg.content == "123"
    assert msg.timestamp == datetime(2023, 11, 6, 13, 37, 18, tzinfo=CST)
    assert msg.attachments == ()


def test_c2c_botgo_webhook_body() -> None:
    msg = parse_message(fixture("c2c_message_create.botgo.json"))
    assert isinstance(msg, C2CMessage)
    assert msg.author.id == "675860273"
    assert msg.user_openid == "675860273"
    assert msg.content == "哦一下"
    assert msg.timestamp == datetime(2024, 10, 15, 8, 33, 15, tzinfo=UTC)


def test_group_docs_example_keeps_the_space_where_the_at_was() -> None:
    msg = parse_message(fixture("group_at_message_create.docs.json"))
    assert isinstance(msg, GroupMessage)
    assert msg.scene is Scene.GROUP
    assert msg.group_openid == "C9F778FE6ADF9D1D1DBE395BF744A33A"
    assert msg.member_openid == "E4F4AEA33253A2797FB897C50B81D7ED"
    assert msg.content == " 123"
    assert msg.mentions == ()


def test_group_message_with_an_image_from_the_field() -> None:
    msg = parse_message(fixture("group_at_message_create.attachment.json"))
    assert isinstance(msg, GroupMessage)
    assert msg.event_id is not None
    assert msg.event_id.startswith("GROUP_AT_MESSAGE_CREATE:")
    (image,) = msg.attachments
    assert image.content_type == "image/jpeg"
    assert (image.width, image.height, image.size) == (138, 168, 3512)
    assert image.filename == "0A1B2C3D4E5F60718293A4B5C6D7E8F9.jpg"
    assert image.url is not None
    assert image.url.startswith("https://gchat.qpic.cn/gchatpic_new/")
    assert image.voice_wav_url is None


def test_group_message_create_with_mentions_and_new_fields() -> None:
    msg = parse_message(fixture("group_message_create.nonebot.json"))
    assert isinstance(msg, GroupMessage)
    assert msg.type == "GROUP_MESSAGE_CREATE"
    assert msg.author.role == "admin"
    assert msg.author.username == "sender"
    assert msg.author.bot is False
    (mention,) = msg.mentions
    assert (mention.id, mention.is_you, mention.everyone, mention.bot) == (
        "REPLIED_USER",
        False,
        False,
        False,
    )
    # Untyped fields stay reachable.
    assert msg.raw["message_type"] == 103
    assert isinstance(msg.raw["msg_elements"], list)


@pytest.mark.parametrize("name", ["at_message_create.docs.json", "message_create.docs.json"])
def test_guild_channel_examples(name: str) -> None:
    msg = parse_message(fixture(name))
    assert isinstance(msg, ChannelMessage)
    assert msg.scene is Scene.CHANNEL
    assert msg.type == envelope(name)["t"]
    assert (msg.channel_id, msg.guild_id) == ("100010", "18700000000001")
    assert (msg.author.id, msg.author.bot, msg.author.openid) == ("1234", False, None)
    assert msg.content == "ndnnd"
    assert msg.mention_everyone is None


def test_guild_direct_message_example() -> None:
    msg = parse_message(fixture("direct_message_create.docs.json"))
    assert isinstance(msg, DirectMessage)
    assert msg.scene is Scene.DIRECT
    assert (msg.guild_id, msg.channel_id, msg.src_guild_id) == ("18700000000001", "100010", None)


def test_interaction_docs_example() -> None:
    dispatch = fixture("interaction_create.docs.json")
    assert parse_message(dispatch) is None
    act = parse_interaction(dispatch)
    assert isinstance(act, Interaction)
    assert act.id == "30540ff7-9d8f-4737-83f1-e116ce6afa8b"
    assert act.event_id == "INTERACTION_CREATE:docs-example"
    assert act.scene is Scene.C2C  # chat_type 2
    assert act.interaction_type == 11
    assert (act.button_id, act.button_data) == ("21", "回调按钮")
    assert act.resolved_user_id == "E4F4AEA33253A2797FB897C50B81D7ED"
    assert act.user_openid is None  # the example has none
    assert act.timestamp is None


def test_feedback_interaction_from_the_field() -> None:
    act = parse_interaction(fixture("interaction_create.feedback.json"))
    assert act is not None
    assert act.interaction_type == 13
    assert act.scene is Scene.C2C
    assert act.button_id is None
    assert act.timestamp == datetime(2024, 9, 3, 17, 27, 4, tzinfo=CST)


def test_interaction_scene_comes_from_chat_type_else_scene() -> None:
    def scene(**fields: Any) -> Scene | None:
        act = parse_interaction(with_d("interaction_create.docs.json", {"id": "i", **fields}))
        assert act is not None
        return act.scene

    assert scene(chat_type=0) is Scene.CHANNEL
    assert scene(chat_type=1, scene="c2c") is Scene.GROUP  # chat_type wins
    assert scene(scene="group") is Scene.GROUP
    assert scene(chat_type=9, scene="guild") is Scene.CHANNEL
    assert scene(scene="elsewhere") is None
    assert scene() is None


@pytest.mark.parametrize("name", EVENT_FIXTURES)
def test_every_fixture_is_a_message_or_an_interaction_and_d_is_untouched(name: str) -> None:
    dispatch = fixture(name)
    before = copy.deepcopy(dispatch.data)
    msg, act = parse_message(dispatch), parse_interaction(dispatch)
    assert (msg is None) != (act is None)
    parsed = msg or act
    assert parsed is not None
    assert parsed.raw is dispatch.data
    assert dispatch.data == before


# ------------------------------------------------------------------ what never fails


@pytest.mark.parametrize("name", EVENT_FIXTURES)
def test_unknown_fields_are_ignored(name: str) -> None:
    payload = envelope(name)
    plain = parse_message(as_dispatch(payload)) or parse_interaction(as_dispatch(payload))
    d = payload["d"]
    d["brand_new"] = {"deep": [[{"x": 1}]] * 3}
    for value in d.values():
        if isinstance(value, dict):
            value["also_new"] = [1, "two", None]
    extended = parse_message(as_dispatch(payload)) or parse_interaction(as_dispatch(payload))
    assert extended == plain  # `raw` is left out of the comparison


@pytest.mark.parametrize(
    "t", ["READY", "RESUMED", "GROUP_ADD_ROBOT", "FRIEND_ADD", "MESSAGE_DELETE", "BRAND_NEW_EVENT"]
)
@pytest.mark.parametrize("d", [{"id": "x"}, "", None, 5, [1, 2]])
def test_other_event_types_give_none_whatever_their_d(t: str, d: Any) -> None:
    dispatch = Dispatch(type=t, seq=3, event_id=None, data=d)
    assert parse_message(dispatch) is None
    assert parse_interaction(dispatch) is None


def test_message_event_types_are_the_documented_ones() -> None:
    assert {
        "C2C_MESSAGE_CREATE",
        "GROUP_AT_MESSAGE_CREATE",
        "GROUP_MESSAGE_CREATE",
        "AT_MESSAGE_CREATE",
        "MESSAGE_CREATE",
        "DIRECT_MESSAGE_CREATE",
    } == MESSAGE_EVENT_TYPES


# ------------------------------------------------------------------ typed field rules


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("//multimedia.nt.qq.com/a?b=1", "https://multimedia.nt.qq.com/a?b=1"),
        ("gchat.qpic.cn/gchatpic_new/1/2/0", "https://gchat.qpic.cn/gchatpic_new/1/2/0"),
        ("http://example.com/x", "http://example.com/x"),
        ("https://example.com/x", "https://example.com/x"),
        ("", ""),
    ],
)
def test_attachment_urls_get_a_scheme(raw: str, expected: str) -> None:
    d = envelope("c2c_message_create.docs.json")["d"]
    d["attachments"] = [{"content_type": "voice", "url": raw, "voice_wav_url": raw}]
    msg = parse_message(with_d("c2c_message_create.docs.json", d))
    assert msg is not None
    (voice,) = msg.attachments
    assert voice.url == expected
    assert voice.voice_wav_url == expected


def test_voice_transcription_is_typed() -> None:
    d = envelope("c2c_message_create.docs.json")["d"]
    d["attachments"] = [
        {"content_type": "voice", "url": "https://x/v.silk", "asr_refer_text": "你好"}
    ]
    msg = parse_message(with_d("c2c_message_create.docs.json", d))
    assert msg is not None
    assert msg.attachments[0].asr_refer_text == "你好"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-02-26T18:15:35+08:00", datetime(2024, 2, 26, 10, 15, 35, tzinfo=UTC)),
        ("2024-02-26T10:15:35Z", datetime(2024, 2, 26, 10, 15, 35, tzinfo=UTC)),
        ("2024-02-26T18:15:35", datetime(2024, 2, 26, 18, 15, 35, tzinfo=CST)),  # no offset
        (1708942535, datetime(2024, 2, 26, 10, 15, 35, tzinfo=UTC)),  # Unix seconds
        (None, None),
    ],
)
def test_timestamps_are_timezone_aware(value: Any, expected: datetime | None) -> None:
    d = envelope("group_at_message_create.docs.json")["d"]
    d["timestamp"] = value
    msg = parse_message(with_d("group_at_message_create.docs.json", d))
    assert msg is not None
    assert msg.timestamp == expected
    assert msg.timestamp is None or msg.timestamp.tzinfo is not None


def test_a_message_without_content_has_empty_content() -> None:
    d = envelope("group_at_message_create.docs.json")["d"]
    del d["content"]
    msg = parse_message(with_d("group_at_message_create.docs.json", d))
    assert msg is not None
    assert msg.content == ""


def test_group_everyone_mention() -> None:
    d = envelope("group_at_message_create.docs.json")["d"]
    d["mentions"] = [{"scope": "all", "is_you": True, "username": "全体成员"}]
    msg = parse_message(with_d("group_at_message_create.docs.json", d))
    assert isinstance(msg, GroupMessage)
    (everyone,) = msg.mentions
    assert (everyone.everyone, everyone.is_you, everyone.id) == (True, True, None)


def test_group_mention_without_id_falls_back_to_member_openid() -> None:
    d = envelope("group_at_message_create.docs.json")["d"]
    d["mentions"] = [{"scope": "single", "member_openid": "M1", "is_you": True, "bot": True}]
    msg = parse_message(with_d("group_at_message_create.docs.json", d))
    assert isinstance(msg, GroupMessage)
    assert msg.mentions[0].id == "M1"


def test_repr_shows_ids_but_no_user_content() -> None:
    d = envelope("group_at_message_create.attachment.json")["d"]
    d["content"] = "my secret words"
    d["author"]["username"] = "Real Name"
    msg = parse_message(with_d("group_at_message_create.attachment.json", d))
    assert msg is not None
    shown = repr(msg)
    assert msg.id in shown
    assert msg.group_openid in shown  # type: ignore[attr-defined]
    for hidden in ("my secret words", "Real Name", "gchat.qpic.cn", "raw="):
        assert hidden not in shown


# ------------------------------------------------------------------------ malformed d


MALFORMED = [
    ("c2c_message_create.docs.json", lambda d: d.pop("id"), "id"),
    ("c2c_message_create.docs.json", lambda d: d.update(id=""), "id"),
    ("c2c_message_create.docs.json", lambda d: d.update(id=123), "id"),
    ("c2c_message_create.docs.json", lambda d: d.pop("author"), "author"),
    ("c2c_message_create.docs.json", lambda d: d.update(author="someone"), "author"),
    (
        "c2c_message_create.docs.json",
        lambda d: d["author"].pop("user_openid"),
        "author.user_openid",
    ),
    ("c2c_message_create.docs.json", lambda d: d.update(content=["a"]), "content"),
    ("c2c_message_create.docs.json", lambda d: d.update(timestamp="yesterday"), "timestamp"),
    ("c2c_message_create.docs.json", lambda d: d.update(timestamp=True), "timestamp"),
    ("c2c_message_create.docs.json", lambda d: d.update(timestamp=1e300), "timestamp"),
    ("group_at_message_create.docs.json", lambda d: d.pop("group_openid"), "group_openid"),
    ("group_at_message_create.docs.json", lambda d: d.update(group_openid=7), "group_openid"),
    ("group_at_message_create.docs.json", lambda d: d.update(mentions={}), "mentions"),
    ("group_at_message_create.docs.json", lambda d: d.update(mentions=["x"]), "mentions[0]"),
    (
        "group_at_message_create.attachment.json",
        lambda d: d["attachments"][0].update(width="138"),
        "attachments[0].width",
    ),
    (
        "group_at_message_create.attachment.json",
        lambda d: d["attachments"][0].update(width=True),
        "attachments[0].width",
    ),
    ("group_at_message_create.attachment.json", lambda d: d.update(attachments="x"), "attachments"),
    (
        "group_at_message_create.attachment.json",
        lambda d: d.update(attachments=[5]),
        "attachments[0]",
    ),
    ("at_message_create.docs.json", lambda d: d.pop("channel_id"), "channel_id"),
    ("at_message_create.docs.json", lambda d: d["author"].update(bot="no"), "author.bot"),
    ("direct_message_create.docs.json", lambda d: d.pop("guild_id"), "guild_id"),
    ("interaction_create.docs.json", lambda d: d.pop("id"), "id"),
    ("interaction_create.docs.json", lambda d: d.update(chat_type="2"), "chat_type"),
    ("interaction_create.docs.json", lambda d: d.update(data=[]), "data"),
    (
        "interaction_create.docs.json",
        lambda d: d["data"]["resolved"].update(button_id=21),
        "data.resolved.button_id",
    ),
]


def _parse(dispatch: Dispatch) -> Message | Interaction | None:
    return parse_message(dispatch) or parse_interaction(dispatch)


@pytest.mark.parametrize(("name", "mutate", "field"), MALFORMED)
def test_malformed_d_raises_invalid_message_naming_the_field(name, mutate, field) -> None:
    d = envelope(name)["d"]
    mutate(d)
    with pytest.raises(InvalidMessage) as caught:
        _parse(with_d(name, d))
    assert caught.value.field == field
    assert caught.value.event_type == envelope(name)["t"]
    assert caught.value.reason == "invalid_message"
    assert isinstance(caught.value, RemoteProtocolError)


@pytest.mark.parametrize("name", EVENT_FIXTURES)
@pytest.mark.parametrize("d", ["", 0, None, [1], True])
def test_a_d_that_is_not_an_object_is_invalid(name: str, d: Any) -> None:
    with pytest.raises(InvalidMessage) as caught:
        _parse(with_d(name, d))
    assert caught.value.field is None


def test_the_error_never_repeats_the_value() -> None:
    d = envelope("c2c_message_create.docs.json")["d"]
    d["content"] = {"secret": "hunter2"}
    with pytest.raises(InvalidMessage) as caught:
        parse_message(with_d("c2c_message_create.docs.json", d))
    assert "hunter2" not in str(caught.value)
    assert "'content'" in str(caught.value)


@pytest.mark.parametrize(
    "bad",
    [
        "C2C_MESSAGE_CREATE",
        {"t": "C2C_MESSAGE_CREATE"},
        Dispatch(type=None, seq=1, event_id=None, data={}),  # type: ignore[arg-type]
        Dispatch(type=["x"], seq=1, event_id=None, data={}),  # type: ignore[arg-type]
        Dispatch(type="C2C_MESSAGE_CREATE", seq=1, event_id=5, data={}),  # type: ignore[arg-type]
    ],
)
def test_a_wrong_argument_is_a_local_protocol_error(bad: Any) -> None:
    with pytest.raises(LocalProtocolError):
        parse_message(bad)
    with pytest.raises(LocalProtocolError):
        parse_interaction(bad)


# ------------------------------------------------------------------------- properties

_TEXT = st.text(max_size=8)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_TEXT, children, max_size=3),
    max_leaves=10,
)
_KNOWN_TYPES = st.sampled_from(sorted(MESSAGE_EVENT_TYPES | {"INTERACTION_CREATE"}))


def _check_outcome(dispatch: Dispatch) -> Message | Interaction | None:
    """Parse; the only exception allowed is InvalidMessage."""
    try:
        parsed = _parse(dispatch)
    except InvalidMessage as exc:
        failed = exc
    else:
        failed = None
    if failed is not None:
        assert failed.event_type == dispatch.type
        return None
    if parsed is not None:
        assert type(parsed.id) is str
        assert parsed.id
    if isinstance(parsed, C2CMessage):
        assert parsed.user_openid
    if isinstance(parsed, GroupMessage):
        assert parsed.group_openid
    if isinstance(parsed, ChannelMessage):
        assert parsed.channel_id
    if isinstance(parsed, DirectMessage):
        assert parsed.guild_id
    return parsed


@settings(max_examples=1500, deadline=None, database=None)
@given(t=_KNOWN_TYPES, d=_JSON | st.dictionaries(_TEXT, _JSON, max_size=6))
def test_any_d_parses_or_raises_invalid_message(t: str, d: Any) -> None:
    _check_outcome(Dispatch(type=t, seq=1, event_id=None, data=d))


# Where a field can be: top level, or one level into the objects the parser reads.
_PATHS = [
    (),
    ("author",),
    ("attachments", 0),
    ("mentions", 0),
    ("data",),
    ("data", "resolved"),
]


@st.composite
def _mutated(draw: st.DrawFn) -> Dispatch:
    name = draw(st.sampled_from(EVENT_FIXTURES))
    payload = envelope(name)
    d = payload["d"]
    d.setdefault("attachments", [{"content_type": "image/png", "url": "https://x/y.png"}])
    d.setdefault("mentions", [{"id": "u", "username": "n", "bot": False}])
    for _ in range(draw(st.integers(1, 3))):
        node: Any = d
        for step in draw(st.sampled_from(_PATHS)):
            if isinstance(node, dict) and isinstance(step, str):
                node = node.get(step)
            elif isinstance(node, list) and isinstance(step, int) and node:
                node = node[0]
            else:
                node = None
        if not isinstance(node, dict):
            continue
        keys = [*node, "id", "content", "timestamp", "author", "user_openid", "url", "width"]
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            node.pop(key, None)
        else:
            node[key] = draw(_JSON)
    return as_dispatch(payload)


@settings(max_examples=1500, deadline=None, database=None)
@given(_mutated())
def test_a_mutated_fixture_parses_or_raises_invalid_message(dispatch: Dispatch) -> None:
    _check_outcome(dispatch)


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("<@!1000000000000000001> ping ", "ping"),
        (" ping", "ping"),  # a group @ leaves a space
        ("<@1> hello <@!2>", "hello"),
        ("a < b > c", "a < b > c"),  # not markup
        ("", ""),
    ],
)
def test_text_drops_the_mention_markup_and_the_spaces_around(content, text):
    d = {"id": "M1", "channel_id": "C1", "content": content}
    message = parse_message(Dispatch(type="AT_MESSAGE_CREATE", seq=1, event_id=None, data=d))
    assert message is not None
    assert message.text == text
    assert message.content == content  # kept as sent
