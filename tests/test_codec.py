"""Tests of the gateway payload codec (qqproto/_codec.py) and the error hierarchy it raises."""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qqproto._codec
from qqproto import (
    DEFAULT_MAX_PAYLOAD_SIZE,
    InvalidEnvelope,
    InvalidUTF8,
    LocalProtocolError,
    MalformedJSON,
    Opcode,
    PayloadTooLarge,
    ProtocolError,
    QQProtoError,
    RemoteProtocolError,
    UnknownOpcode,
    decode_payload,
    encode_heartbeat,
    encode_identify,
    encode_resume,
)
from qqproto._codec import Payload

# The five errors decode_payload documents; nothing else may come out of it.
DOCUMENTED_ERRORS = (PayloadTooLarge, InvalidUTF8, MalformedJSON, InvalidEnvelope, UnknownOpcode)
ENVELOPE_FIELDS = (None, "op", "s", "t", "id")
MARKER = "SECRET-MARKER-123"


def _both(text: str) -> list[str | bytes]:
    """The same payload as a WebSocket text message (str) and as raw UTF-8 (bytes)."""
    return [text, text.encode()]


def _compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _nested_dispatch(depth: int) -> str:
    """A dispatch whose ``d`` is ``depth`` nested arrays (total JSON depth: depth + 1)."""
    return '{"op":0,"d":' + "[" * depth + "]" * depth + "}"


# ---------------------------------------------------------------------------- valid payloads

READY = {
    "op": 0,
    "s": 1,
    "t": "READY",
    "d": {
        "version": 1,
        "session_id": "082ee18c-0be3-491b-9d8b-fbd95c51673a",
        "user": {"id": "6158788878435714165", "username": "群pro测试机器人", "bot": True},
        "shard": [0, 1],
    },
}

C2C_MESSAGE_CREATE = {
    "op": 0,
    "s": 7,
    "t": "C2C_MESSAGE_CREATE",
    "id": "C2C_MESSAGE_CREATE:e4c8c3a0-5b0e-4f6c-9a0b-7d6a4f1e2c3b",
    "d": {
        "author": {"user_openid": "E4F4AEA33253A2797FB897C50B81D7ED"},
        "content": "你好 bot, 今天 weather 怎么样?",
        "id": "ROBOT1.0_veoihSeuhEEnh0kq1xA2tbgzkd8tGHBY9mTIVwG.4O4",
        "timestamp": "2024-05-20T14:30:00+08:00",
    },
}


@pytest.mark.parametrize("data", _both('{"op":10,"d":{"heartbeat_interval":45000}}'))
def test_decode_hello(data: str | bytes) -> None:
    payload = decode_payload(data)
    assert payload == Payload(Opcode.HELLO, {"heartbeat_interval": 45000}, None, None, None)
    assert type(payload) is Payload
    assert type(payload.op) is Opcode


@pytest.mark.parametrize("data", _both(_compact(READY)))
def test_decode_ready(data: str | bytes) -> None:
    payload = decode_payload(data)
    assert payload.op is Opcode.DISPATCH
    assert payload.s == 1
    assert payload.t == "READY"
    assert payload.id is None
    assert payload.d == READY["d"]


@pytest.mark.parametrize("data", _both(_compact(C2C_MESSAGE_CREATE)))
def test_decode_c2c_message_create_with_top_level_id(data: str | bytes) -> None:
    payload = decode_payload(data)
    assert payload.op is Opcode.DISPATCH
    assert payload.s == 7
    assert payload.t == "C2C_MESSAGE_CREATE"
    assert payload.id == "C2C_MESSAGE_CREATE:e4c8c3a0-5b0e-4f6c-9a0b-7d6a4f1e2c3b"
    assert payload.d == C2C_MESSAGE_CREATE["d"]


@pytest.mark.parametrize("data", _both('{"op":0,"s":3,"t":"RESUMED","d":""}'))
def test_decode_resumed_with_empty_string_body(data: str | bytes) -> None:
    payload = decode_payload(data)
    assert payload == Payload(Opcode.DISPATCH, "", 3, "RESUMED", None)


@pytest.mark.parametrize("data", _both('{"op":11,"d":{},"extra":[1,2],"s":null,"x-trace":"abc"}'))
def test_decode_heartbeat_ack_ignores_extra_fields(data: str | bytes) -> None:
    assert decode_payload(data) == Payload(Opcode.HEARTBEAT_ACK, {}, None, None, None)


@pytest.mark.parametrize("data", _both('{"op":0,"t":"GROUP_ADD_ROBOT","d":{"group_openid":"G1"}}'))
def test_decode_dispatch_without_s(data: str | bytes) -> None:
    payload = decode_payload(data)
    assert payload.op is Opcode.DISPATCH
    assert payload.s is None
    assert payload.t == "GROUP_ADD_ROBOT"
    assert payload.d == {"group_openid": "G1"}


def test_decode_bare_op_defaults_every_other_field_to_none() -> None:
    assert decode_payload('{"op":7}') == Payload(Opcode.RECONNECT, None, None, None, None)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_mixed_chinese_english_content_round_trips(as_bytes: bool) -> None:
    content = '大家好 hello 世界 🎉 emoji, tab\t, quote " and 反斜杠 \\ ok'
    text = _compact({"op": 0, "s": 2, "t": "AT_MESSAGE_CREATE", "d": {"content": content}})
    payload = decode_payload(text.encode() if as_bytes else text)
    assert payload.d == {"content": content}
    # ensure_ascii escapes decode to the same text, including a surrogate *pair* escape.
    escaped = json.dumps({"op": 0, "d": {"content": content}}, ensure_ascii=True)
    assert "\\ud83c\\udf89" in escaped
    assert decode_payload(escaped).d == {"content": content}


@pytest.mark.parametrize("op", list(Opcode), ids=lambda op: op.name)
def test_every_opcode_decodes(op: Opcode) -> None:
    for data in _both(f'{{"op":{int(op)}}}'):
        payload = decode_payload(data)
        assert payload.op is op
        assert type(payload.op) is Opcode


def test_duplicate_keys_last_one_wins() -> None:
    # Documented parser behaviour (same as json.loads): not an error.
    assert decode_payload('{"op":1,"op":11}').op is Opcode.HEARTBEAT_ACK


# ---------------------------------------------------------------------------- not JSON


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "{op:10}",
        "{'op':10}",
        '{"op":10,}',
        '{"op":10',
        '{"op":10,"d":"unterminated}',
        '{"op":10,"d":"bad \\x escape"}',
        "\ufeff" + '{"op":10}',  # a byte order mark is not JSON
    ],
)
def test_not_json_is_malformed(text: str) -> None:
    for data in _both(text):
        with pytest.raises(MalformedJSON) as info:
            decode_payload(data)
        assert info.value.reason == "malformed_json"
        assert "not valid JSON" in str(info.value)


@pytest.mark.parametrize(
    "text", ['{"op":11} x', '{"op":11}{"op":11}', '{"op":11}\x00', '{"op":11}]', "[] []"]
)
def test_trailing_garbage_is_malformed(text: str) -> None:
    for data in _both(text):
        with pytest.raises(MalformedJSON) as info:
            decode_payload(data)
        assert info.value.reason == "malformed_json"
        assert "after document" in str(info.value)


@pytest.mark.parametrize("data", ["", b"", "   ", b"\n"])
def test_empty_payload_is_malformed(data: str | bytes) -> None:
    with pytest.raises(MalformedJSON) as info:
        decode_payload(data)
    assert info.value.reason == "malformed_json"


def test_trailing_whitespace_is_fine() -> None:
    assert decode_payload(' \n{"op":11}\r\n\t ').op is Opcode.HEARTBEAT_ACK


# ---------------------------------------------------------------------------- envelope


@pytest.mark.parametrize(
    ("text", "json_type"),
    [
        ("[]", "array"),
        ('[{"op":10}]', "array"),
        ('"op"', "string"),
        ("10", "number"),
        ("1.5", "number"),
        ("null", "null"),
        ("true", "boolean"),
        ("false", "boolean"),
    ],
)
def test_json_that_is_not_an_object_is_an_invalid_envelope(text: str, json_type: str) -> None:
    for data in _both(text):
        with pytest.raises(InvalidEnvelope) as info:
            decode_payload(data)
        assert info.value.field is None
        assert info.value.reason == "invalid_envelope"
        assert f"JSON {json_type}, not an object" in str(info.value)


@pytest.mark.parametrize("text", ["{}", '{"d":{"heartbeat_interval":45000}}', '{"OP":10}'])
def test_missing_op(text: str) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        decode_payload(text)
    assert info.value.field == "op"
    assert "no 'op' field" in str(info.value)


@pytest.mark.parametrize(
    ("raw_op", "json_type"),
    [
        ('"10"', "string"),
        ('"HELLO"', "string"),
        ("10.0", "number"),
        ("0.0", "number"),
        ("1e1", "number"),
        # bool is an int subclass in Python, and False == 0 / True == 1 would silently map to
        # DISPATCH / HEARTBEAT through a dict lookup: both must be rejected.
        ("true", "boolean"),
        ("false", "boolean"),
        ("null", "null"),
        ("[10]", "array"),
        ('{"op":10}', "object"),
        # Beyond u64, orjson yields a float: rejected as a number that is not an int.
        (str(2**64), "number"),
        (str(-(2**63) - 1), "number"),
    ],
)
def test_op_of_the_wrong_type(raw_op: str, json_type: str) -> None:
    for data in _both(f'{{"op":{raw_op},"d":null}}'):
        with pytest.raises(InvalidEnvelope) as info:
            decode_payload(data)
        assert info.value.field == "op"
        assert f"'op' is a JSON {json_type}, not an int" in str(info.value)


@pytest.mark.parametrize("op", [99, -1, 14, 1000, 2**63, 2**64 - 1, -(2**63)])
def test_unknown_opcode(op: int) -> None:
    for data in _both(f'{{"op":{op},"d":{{}}}}'):
        with pytest.raises(UnknownOpcode) as info:
            decode_payload(data)
        assert info.value.op == op
        assert type(info.value.op) is int
        assert info.value.reason == "unknown_opcode"
        assert str(info.value) == f"unknown opcode {op}"


@pytest.mark.parametrize(
    ("raw_s", "json_type"),
    [
        ('"1"', "string"),
        ("1.0", "number"),
        ("1.5", "number"),
        ("true", "boolean"),
        ("false", "boolean"),
        ("-1", "number"),
        ("[1]", "array"),
        ("{}", "object"),
    ],
)
def test_s_of_the_wrong_type(raw_s: str, json_type: str) -> None:
    for data in _both(f'{{"op":0,"s":{raw_s},"t":"READY","d":{{}}}}'):
        with pytest.raises(InvalidEnvelope) as info:
            decode_payload(data)
        assert info.value.field == "s"
        assert f"'s' is a JSON {json_type}" in str(info.value)


@pytest.mark.parametrize("raw_s", ["null", "0", str(2**63), str(2**64 - 1)])
def test_s_null_zero_and_u64_accepted(raw_s: str) -> None:
    payload = decode_payload(f'{{"op":0,"s":{raw_s},"t":"READY","d":{{}}}}')
    assert payload.s == json.loads(raw_s)
    assert payload.s is None or type(payload.s) is int


def test_s_beyond_64_bits_is_rejected() -> None:
    # orjson parses 2**70 as a float (see test_big_int_in_d_becomes_a_float), so it fails the
    # int check rather than being accepted as a huge sequence number.
    assert type(orjson.loads(str(2**70))) is float
    with pytest.raises(InvalidEnvelope) as info:
        decode_payload(f'{{"op":0,"s":{2**70},"t":"READY","d":{{}}}}')
    assert info.value.field == "s"
    assert "'s' is a JSON number, not a non-negative int or null" in str(info.value)


@pytest.mark.parametrize(
    ("raw_t", "json_type"),
    [("1", "number"), ("true", "boolean"), ('["READY"]', "array"), ('{"t":"READY"}', "object")],
)
def test_t_not_a_string(raw_t: str, json_type: str) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        decode_payload(f'{{"op":0,"s":1,"t":{raw_t},"d":{{}}}}')
    assert info.value.field == "t"
    assert f"'t' is a JSON {json_type}, not a string" in str(info.value)


@pytest.mark.parametrize(
    ("raw_id", "json_type"),
    [("123", "number"), ("false", "boolean"), ('["x"]', "array"), ('{"id":"x"}', "object")],
)
def test_id_not_a_string(raw_id: str, json_type: str) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        decode_payload(f'{{"op":0,"s":1,"t":"READY","id":{raw_id},"d":{{}}}}')
    assert info.value.field == "id"
    assert f"'id' is a JSON {json_type}, not a string" in str(info.value)


def test_t_and_id_null_accepted() -> None:
    assert decode_payload('{"op":0,"s":1,"t":null,"id":null,"d":null}') == Payload(
        Opcode.DISPATCH, None, 1, None, None
    )


def test_fields_are_checked_in_order_op_s_t_id() -> None:
    # A payload wrong everywhere names the first field: op, then s, t, id.
    fields = {"op": '"x"', "s": '"x"', "t": "1", "id": "1"}
    for expected in ("op", "s", "t", "id"):
        body = ",".join(f'"{key}":{value}' for key, value in fields.items())
        with pytest.raises(InvalidEnvelope) as info:
            decode_payload("{" + body + "}")
        assert info.value.field == expected
        fields[expected] = {"op": "0", "s": "1", "t": '"T"', "id": '"I"'}[expected]


# ---------------------------------------------------------------------------- hostile JSON


@pytest.mark.parametrize(
    "text",
    [
        '{"op":0,"d":NaN}',
        '{"op":0,"d":Infinity}',
        '{"op":0,"d":-Infinity}',
        '{"op":0,"d":[1,NaN]}',
        '{"op":0,"s":NaN}',
        "NaN",
        "Infinity",
        "-Infinity",
        '{"op":0,"d":1e400}',  # overflows to infinity: orjson rejects it too
    ],
)
def test_nan_and_infinity_are_malformed(text: str) -> None:
    # json.loads accepts every one of these (1e400 silently becomes inf).
    json.loads(text)
    for data in _both(text):
        with pytest.raises(MalformedJSON) as info:
            decode_payload(data)
        assert info.value.reason == "malformed_json"


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\ud83d", "\\ud83d x", "\\ude00\\ud83d"])
def test_lone_surrogate_escape_is_malformed_json(escape: str) -> None:
    # A *lone* surrogate escape is valid JSON grammar that json.loads accepts (and that breaks a
    # later UTF-8 encode). The codec reports it as MalformedJSON (not InvalidUTF8: the
    # payload's bytes are valid UTF-8, only the escape it spells is not a character).
    text = '{"op":0,"t":"C2C_MESSAGE_CREATE","d":{"content":"hi ' + escape + '"}}'
    assert "hi" in json.loads(text)["d"]["content"]
    for data in _both(text):
        with pytest.raises(MalformedJSON) as info:
            decode_payload(data)
        assert isinstance(info.value, RemoteProtocolError)
        assert "surrogate" in str(info.value)


def test_str_holding_a_real_lone_surrogate_is_invalid_utf8() -> None:
    text = '{"op":0,"d":{"content":"hi \ud800 there"}}'
    with pytest.raises(InvalidUTF8) as info:
        decode_payload(text)
    assert info.value.reason == "invalid_utf8"
    assert "lone surrogates" in str(info.value)


@pytest.mark.parametrize(
    ("data", "bad_byte"),
    [
        (b"\xff", 0),
        (b"\x80", 0),  # a lone continuation byte
        (b'{"op":0,"d":"\xff"}', 13),
        (b'{"op":0,"d":"\xc0\xaf"}', 13),  # overlong "/"
        (b'{"op":0,"d":"\xe0\x80\xaf"}', 13),  # overlong "/" in three bytes
        (b'{"op":0,"d":"\xf0\x80\x80\xaf"}', 13),  # overlong "/" in four bytes
        (b'{"op":0,"d":"\xe4\xb8"}', 13),  # truncated "中"
        (b'{"op":0,"d":"\xe4\xb8', 13),  # truncated at the very end
        (b'{"op":0,"d":"\xed\xa0\x80"}', 13),  # an encoded surrogate (CESU-8)
        (b'{"op":0,"d":"\xf4\x90\x80\x80"}', 13),  # above U+10FFFF
        (b'{"op":0,"d":"ok"}\xfe', 17),  # after an otherwise complete document
    ],
)
def test_invalid_utf8_bytes(data: bytes, bad_byte: int) -> None:
    with pytest.raises(InvalidUTF8) as info:
        decode_payload(data)
    assert info.value.reason == "invalid_utf8"
    assert str(info.value) == f"payload is not valid UTF-8 (byte {bad_byte})"


def test_nesting_1000_deep_decodes_without_recursing_in_python() -> None:
    # What qqproto guarantees: a payload within the 1024-level bound decodes, and neither the
    # parser nor the envelope checks recurse into `d` in Python, so the depth of a 2 KB frame
    # can never raise RecursionError (not a ValueError) in the caller's loop. The stdlib
    # parser is no yardstick: json.loads raises RecursionError at this depth on 3.11 and not
    # on 3.12+ (a separate C recursion limit).
    text = _nested_dispatch(1000)
    assert len(text) < 2100
    limit = sys.getrecursionlimit()
    # Far below 1000 levels: any Python-level walk of `d` (repr, a copy, a check) would fail.
    sys.setrecursionlimit(len(inspect.stack(0)) + 50)
    try:
        payloads = [decode_payload(data) for data in _both(text)]
    finally:
        sys.setrecursionlimit(limit)
    for payload in payloads:
        assert payload.op is Opcode.DISPATCH
        depth, node = 0, payload.d
        while isinstance(node, list) and node:
            assert len(node) == 1
            depth, node = depth + 1, node[0]
        assert node == []
        assert depth + 1 == 1000


def test_nesting_limit_is_1024_levels() -> None:
    # The object is level 1, so d may hold 1023 nested arrays and not 1024.
    assert decode_payload(_nested_dispatch(1023)).op is Opcode.DISPATCH
    with pytest.raises(MalformedJSON) as info:
        decode_payload(_nested_dispatch(1024))
    assert "depth limit exceeded" in str(info.value)


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_nesting_2000_deep_is_malformed(opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = '{"op":0,"d":' + opener * 2000 + "1" + closer * 2000 + "}"
    for data in _both(text):
        with pytest.raises(MalformedJSON) as info:
            decode_payload(data)
        assert "depth limit exceeded" in str(info.value)
    # Unbalanced and far deeper: still a parse error, not a RecursionError.
    with pytest.raises(MalformedJSON):
        decode_payload("[" * 100_000)


def test_big_int_in_d_becomes_a_float() -> None:
    # Documented lossy behaviour of orjson: integers beyond 64 bits become floats. QQ sends
    # ids as strings, so no real payload is affected; json.loads would keep the exact int.
    big = 2**70 + 1
    payload = decode_payload(f'{{"op":0,"s":1,"t":"X","d":{{"n":{big},"m":{-big}}}}}')
    assert isinstance(payload.d, dict)
    assert type(payload.d["n"]) is float
    assert payload.d["n"] == float(big)
    assert payload.d["n"] != big  # the low bits are gone
    assert payload.d["m"] == -float(big)
    assert json.loads(str(big)) == big
    # The boundary: u64 max and i64 min stay exact ints.
    assert decode_payload(f'{{"op":0,"d":{2**64 - 1}}}').d == 2**64 - 1
    assert decode_payload(f'{{"op":0,"d":{-(2**63)}}}').d == -(2**63)
    assert type(decode_payload(f'{{"op":0,"d":{2**64}}}').d) is float


# ---------------------------------------------------------------------------- size limit


def test_payload_over_the_default_limit_is_too_large() -> None:
    text = '{"op":11,"d":"' + "x" * (DEFAULT_MAX_PAYLOAD_SIZE - 16) + '"}'
    text += " " * (DEFAULT_MAX_PAYLOAD_SIZE + 1 - len(text))
    assert len(text) == DEFAULT_MAX_PAYLOAD_SIZE + 1
    for data in _both(text):
        with pytest.raises(PayloadTooLarge) as info:
            decode_payload(data)
        assert info.value.size == DEFAULT_MAX_PAYLOAD_SIZE + 1
        assert info.value.limit == DEFAULT_MAX_PAYLOAD_SIZE
        assert info.value.reason == "too_large"
        assert str(info.value) == (
            f"payload of {DEFAULT_MAX_PAYLOAD_SIZE + 1} bytes exceeds the limit of "
            f"{DEFAULT_MAX_PAYLOAD_SIZE} bytes"
        )


def test_payload_of_exactly_the_default_limit_is_accepted() -> None:
    text = '{"op":11,"d":"' + "x" * (DEFAULT_MAX_PAYLOAD_SIZE - 16) + '"}'
    text += " " * (DEFAULT_MAX_PAYLOAD_SIZE - len(text))
    assert len(text) == DEFAULT_MAX_PAYLOAD_SIZE
    for data in _both(text):
        assert decode_payload(data).op is Opcode.HEARTBEAT_ACK


def test_size_is_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Invalid JSON (and invalid UTF-8) that is too large reports its size, not its syntax.
    for data in ("{" * 101, b"\xff" * 101, '{"op":0,"d":NaN}'.ljust(101)):
        with pytest.raises(PayloadTooLarge) as info:
            decode_payload(data, max_size=100)
        assert (info.value.size, info.value.limit) == (101, 100)

    # And the parser is not even called.
    class _NoParser:
        JSONDecodeError = orjson.JSONDecodeError

        @staticmethod
        def loads(data: object) -> object:
            raise AssertionError("the parser ran on an oversized payload")

    monkeypatch.setattr(qqproto._codec, "orjson", _NoParser)
    with pytest.raises(PayloadTooLarge):
        decode_payload('{"op":11}', max_size=8)


def test_custom_max_size() -> None:
    text = '{"op":11}'
    assert decode_payload(text, max_size=len(text)).op is Opcode.HEARTBEAT_ACK
    with pytest.raises(PayloadTooLarge) as info:
        decode_payload(text, max_size=len(text) - 1)
    assert (info.value.size, info.value.limit) == (9, 8)
    # A larger limit accepts more than the default.
    big = '{"op":11,"d":"' + "x" * DEFAULT_MAX_PAYLOAD_SIZE + '"}'
    with pytest.raises(PayloadTooLarge):
        decode_payload(big)
    assert decode_payload(big, max_size=2 * DEFAULT_MAX_PAYLOAD_SIZE).op is Opcode.HEARTBEAT_ACK
    with pytest.raises(PayloadTooLarge):
        decode_payload(text, max_size=0)


def test_str_limit_counts_code_points_bytes_limit_counts_bytes() -> None:
    # Documented: for str the limit counts code points, which never exceeds the UTF-8 size.
    text = '{"op":0,"d":"' + "中" * 30 + '"}'
    assert (len(text), len(text.encode())) == (45, 105)
    assert decode_payload(text, max_size=45).d == "中" * 30
    with pytest.raises(PayloadTooLarge) as info:
        decode_payload(text.encode(), max_size=45)
    assert info.value.size == 105


# ---------------------------------------------------------------------------- no leaks


def _holds_marker(value: object) -> bool:
    return MARKER in str(value) or MARKER in repr(value)


# (payload, expected error). The marker sits where the payload becomes invalid.
LEAK_CASES: list[tuple[str | bytes, type[RemoteProtocolError]]] = [
    ('{"op":0,"d":"' + MARKER + '" x}', MalformedJSON),
    (MARKER, MalformedJSON),
    ('{"op":0,"d":' + MARKER + "}", MalformedJSON),
    ('{"' + MARKER + '"}', MalformedJSON),
    ('{"op":0,"d":"\\x' + MARKER + '"}', MalformedJSON),
    ('{"op":0,"d":"' + MARKER + '\\ud800"}', MalformedJSON),
    ('{"op":0,"d":"' + MARKER + '",NaN}', MalformedJSON),
    (('{"op":0,"d":"' + MARKER + '"} trailing').encode(), MalformedJSON),
    (b'{"op":0,"d":"' + MARKER.encode() + b'\xff"}', InvalidUTF8),
    ('{"op":0,"d":"' + MARKER + '\ud800"}', InvalidUTF8),
    ('{"op":"' + MARKER + '"}', InvalidEnvelope),
    ('{"op":0,"s":"' + MARKER + '"}', InvalidEnvelope),
    ('{"op":0,"t":["' + MARKER + '"]}', InvalidEnvelope),
    ('{"op":0,"id":{"' + MARKER + '":1}}', InvalidEnvelope),
    ('["' + MARKER + '"]', InvalidEnvelope),
    ('"' + MARKER + '"', InvalidEnvelope),
    ('{"op":99,"d":"' + MARKER + '"}', UnknownOpcode),
    ('{"op":0,"d":"' + MARKER * 10 + '"}', PayloadTooLarge),
]


@pytest.mark.parametrize(("data", "error"), LEAK_CASES)
def test_errors_do_not_carry_the_payload(
    data: str | bytes, error: type[RemoteProtocolError]
) -> None:
    with pytest.raises(error) as info:
        decode_payload(data, max_size=100)
    err = info.value
    assert type(err) is error
    assert not _holds_marker(err)
    assert not any(_holds_marker(arg) for arg in err.args)
    assert not any(_holds_marker(value) for value in vars(err).values())
    assert err.__cause__ is None
    # `raise ... from None` hides any context from tracebacks.
    assert err.__context__ is None or err.__suppress_context__


@pytest.mark.parametrize(("data", "error"), LEAK_CASES)
def test_error_context_does_not_hold_the_payload(
    data: str | bytes, error: type[RemoteProtocolError]
) -> None:
    with pytest.raises(error) as info:
        decode_payload(data, max_size=100)
    # orjson's error keeps the whole document in `.doc`; the codec must not chain it.
    assert info.value.__context__ is None
    assert info.value.__cause__ is None


# ---------------------------------------------------------------------------- error hierarchy


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        ProtocolError("x")


def test_local_and_remote_protocol_errors_instantiate() -> None:
    local = LocalProtocolError("fed data before open")
    remote = RemoteProtocolError("server sent junk")
    assert str(local) == "fed data before open"
    assert str(remote) == "server sent junk"
    assert isinstance(local, ProtocolError)
    assert isinstance(remote, ProtocolError)
    assert isinstance(local, QQProtoError)
    assert not isinstance(local, RemoteProtocolError)
    assert not isinstance(remote, LocalProtocolError)
    assert remote.reason == "remote_protocol_error"


def test_remote_errors_have_distinct_stable_reasons() -> None:
    reasons = {cls: cls.reason for cls in DOCUMENTED_ERRORS}
    assert reasons == {
        PayloadTooLarge: "too_large",
        InvalidUTF8: "invalid_utf8",
        MalformedJSON: "malformed_json",
        InvalidEnvelope: "invalid_envelope",
        UnknownOpcode: "unknown_opcode",
    }
    for cls in DOCUMENTED_ERRORS:
        assert issubclass(cls, RemoteProtocolError)
        assert issubclass(cls, QQProtoError)
        assert not issubclass(cls, LocalProtocolError)


# ---------------------------------------------------------------------------- encoders


@pytest.mark.parametrize(("seq", "expected"), [(None, "null"), (0, "0"), (42, "42")])
def test_encode_heartbeat(seq: int | None, expected: str) -> None:
    encoded = encode_heartbeat(seq)
    assert type(encoded) is str
    assert encoded == f'{{"op":1,"d":{expected}}}'
    assert decode_payload(encoded) == Payload(Opcode.HEARTBEAT, seq, None, None, None)


def test_encode_heartbeat_u64_seq_round_trips() -> None:
    # Any s the decoder accepts can be echoed back.
    assert decode_payload(encode_heartbeat(2**64 - 1)).d == 2**64 - 1


def test_encode_identify() -> None:
    properties = {"$os": "linux", "$browser": "qqproto", "$device": "服务器"}
    encoded = encode_identify(
        "abc.DEF-123", intents=(1 << 30) | (1 << 25), shard=(2, 4), properties=properties
    )
    assert type(encoded) is str
    assert ": " not in encoded
    assert ", " not in encoded
    assert '"token":"QQBot abc.DEF-123"' in encoded
    assert encoded.startswith('{"op":2,"d":')
    payload = decode_payload(encoded)
    assert payload.op is Opcode.IDENTIFY
    assert payload.d == {
        "token": "QQBot abc.DEF-123",
        "intents": (1 << 30) | (1 << 25),
        "shard": [2, 4],
        "properties": properties,
    }
    assert json.loads(encoded) == {"op": 2, "d": payload.d}


def test_encode_resume() -> None:
    encoded = encode_resume("tok", session_id="082ee18c-0be3-491b-9d8b-fbd95c51673a", seq=1337)
    assert type(encoded) is str
    assert encoded == (
        '{"op":6,"d":{"token":"QQBot tok",'
        '"session_id":"082ee18c-0be3-491b-9d8b-fbd95c51673a","seq":1337}}'
    )
    payload = decode_payload(encoded)
    assert payload.op is Opcode.RESUME
    assert payload.d == {
        "token": "QQBot tok",
        "session_id": "082ee18c-0be3-491b-9d8b-fbd95c51673a",
        "seq": 1337,
    }


def test_encode_resume_without_seq() -> None:
    encoded = encode_resume("tok", session_id="sid", seq=None)
    assert encoded == '{"op":6,"d":{"token":"QQBot tok","session_id":"sid","seq":null}}'
    assert decode_payload(encoded).op is Opcode.RESUME


# ---------------------------------------------------------------------------- properties


def _check_outcome(data: str | bytes) -> Payload | None:
    """Decode ``data``; only a Payload or one of the documented errors may come out."""
    error: RemoteProtocolError | None = None
    try:
        payload = decode_payload(data)
    except RemoteProtocolError as err:  # anything else fails the test as it propagates
        error = err
    if error is not None:
        assert type(error) in DOCUMENTED_ERRORS
        assert isinstance(error.reason, str)
        if isinstance(error, InvalidEnvelope):
            assert error.field in ENVELOPE_FIELDS
        if isinstance(error, UnknownOpcode):
            assert type(error.op) is int
            assert error.op not in set(Opcode)
        return None
    assert type(payload) is Payload
    assert type(payload.op) is Opcode
    assert payload.s is None or (type(payload.s) is int and payload.s >= 0)
    assert payload.t is None or type(payload.t) is str
    assert payload.id is None or type(payload.id) is str
    return payload


# st.text() never draws surrogates (and a surrogate alphabet is drawn very rarely): splice a
# lone one into some of the strings so the str path meets them too.
_ANY_TEXT = st.text() | st.builds(
    "{}{}{}".format, st.text(), st.characters(categories=["Cs"]), st.text()
)


@settings(max_examples=2000, deadline=None, database=None)
@given(_ANY_TEXT)
def test_any_text_decodes_or_raises_a_documented_error(data: str) -> None:
    _check_outcome(data)


@settings(max_examples=2000, deadline=None, database=None)
@given(st.binary())
def test_any_bytes_decode_or_raise_a_documented_error(data: bytes) -> None:
    _check_outcome(data)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()  # includes NaN and +-inf, which json.dumps writes as NaN/Infinity
    | _ANY_TEXT
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_ANY_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)
_ENVELOPE = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from([int(op) for op in Opcode]) | st.integers(-2, 20) | _JSON,
        "d": _JSON,
        "s": st.integers(min_value=-3, max_value=2**70) | _JSON,
        "t": st.sampled_from(["READY", "RESUMED", "C2C_MESSAGE_CREATE"]) | _JSON,
        "id": st.text(max_size=8) | _JSON,
        "extra": _JSON,
    },
)


@st.composite
def _jsonish(draw: st.DrawFn) -> str | bytes:
    value = draw(_ENVELOPE | _JSON)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    mutation = draw(st.sampled_from(["none", "none", "none", "truncate", "append"]))
    if mutation == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif mutation == "append":
        text += draw(st.sampled_from([" ", "\n", "x", "}", ",", "{}", "\x00"]))
    if draw(st.booleans()):
        # surrogatepass turns a lone surrogate into CESU-8 bytes, which are not UTF-8.
        return text.encode("utf-8", "surrogatepass")
    return text


@settings(max_examples=2000, deadline=None, database=None)
@given(_jsonish())
def test_jsonish_text_decodes_to_typed_fields_or_a_documented_error(data: str | bytes) -> None:
    payload = _check_outcome(data)
    if payload is None:
        return
    # Whatever got through agrees with what the stdlib parser sees for the envelope fields.
    source = json.loads(data)
    assert type(source) is dict
    assert payload.op == source["op"]
    assert payload.s == source.get("s")
    assert payload.t == source.get("t")
    assert payload.id == source.get("id")


_CLEAN_TEXT = st.text(max_size=20)
_CLEAN_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _CLEAN_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_CLEAN_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)


_VALID_FIELDS = st.fixed_dictionaries(
    {
        "op": st.sampled_from(Opcode),
        "d": _CLEAN_JSON,
        "s": st.none() | st.integers(min_value=0, max_value=2**64 - 1),
        "t": st.none() | _CLEAN_TEXT,
        "id": st.none() | _CLEAN_TEXT,
    }
)


@settings(max_examples=300, deadline=None, database=None)
@given(fields=_VALID_FIELDS, ensure_ascii=st.booleans(), as_bytes=st.booleans())
def test_valid_envelopes_round_trip(
    fields: dict[str, Any], ensure_ascii: bool, as_bytes: bool
) -> None:
    text = json.dumps({**fields, "op": int(fields["op"])}, ensure_ascii=ensure_ascii)
    payload = decode_payload(text.encode() if as_bytes else text)
    assert payload == Payload(fields["op"], fields["d"], fields["s"], fields["t"], fields["id"])
    assert payload.op is fields["op"]
