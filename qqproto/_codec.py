# The gateway payload codec: one WebSocket text message <-> one typed envelope.
#
# Theory of operation. The gateway speaks JSON objects `{"op", "d", "s", "t", "id"}`
# (docs/protocol.md#envelope). Decoding is the library's hottest path (one call per dispatch), so it
# is a straight line: a size check, one orjson call, a handful of type checks, one tuple.
#
# Why orjson and not json.loads: it is about 3x faster on a 1 KB dispatch and it already
# rejects, as one exception type, everything that must not get through: NaN/Infinity, lone
# surrogates, invalid UTF-8 and nesting deeper than 1024. The stdlib parser accepts NaN and
# lone surrogates and raises RecursionError (not a ValueError) on deep nesting.
#
# Two orjson behaviours callers should know:
# * It accepts nesting up to 1024 levels (and rejects deeper), a little above CPython's
#   default recursion limit of 1000, so repr() of a pathological `d` can fail in the
#   application. We do not walk every payload to bound it tighter: that walk (or even counting
#   brackets) costs as much as the parse itself, and qqproto never recurses into `d` (the
#   Dispatch event keeps `data` out of its repr).
# * Integers beyond 64 bits become floats. No envelope field can be that large legitimately,
#   so `s` then fails its int check; inside `d` the loss is documented (QQ sends ids as
#   strings).
#
# Errors never carry the payload: it contains user messages, and exception text reaches logs.
"""Decode gateway payloads into typed envelopes and encode the client's payloads."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import orjson

from qqproto._errors import (
    InvalidEnvelope,
    InvalidUTF8,
    MalformedJSON,
    PayloadTooLarge,
    RemoteProtocolError,
    UnknownOpcode,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "JSONValue",
    "Opcode",
    "Payload",
    "decode_object",
    "decode_payload",
    "encode_heartbeat",
    "encode_identify",
    "encode_resume",
]

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
"""Any value a JSON document can hold, as orjson returns it."""

DEFAULT_MAX_PAYLOAD_SIZE = 1 << 20
"""Largest payload :func:`decode_payload` parses by default: 1 MiB."""


class Opcode(IntEnum):
    """Every opcode of the QQ gateway and of its webhook channel.

    3, 4, 5 and 8 are Discord placeholders that QQ never uses (botgo keeps them as blanks);
    12 and 13 belong to the webhook channel. They are named so that a server sending one is
    reported as "unexpected opcode" rather than "unknown opcode".
    """

    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    PRESENCE_UPDATE = 3
    VOICE_STATE_UPDATE = 4
    RESERVED_5 = 5
    RESUME = 6
    RECONNECT = 7
    REQUEST_GUILD_MEMBERS = 8
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11
    HTTP_CALLBACK_ACK = 12
    CALLBACK_URL_VALIDATION = 13


# tuple.__new__ skips the Python-level __new__ that NamedTuple generates: 0.15 us per dispatch.
_new_payload = tuple.__new__

# A dict lookup is about 4x cheaper than calling Opcode(op) on the hot path.
_OPCODES: dict[int, Opcode] = {int(op): op for op in Opcode}


class Payload(NamedTuple):
    """One decoded gateway payload: the envelope ``{"op", "d", "s", "t", "id"}``.

    A ``NamedTuple``, so it is immutable and costs one tuple allocation per dispatch.

    Attributes:
        op: the opcode.
        d: the body; any JSON value (an object for most ops, ``""`` for RESUMED, ``None`` when
            absent).
        s: the sequence number of a dispatch, or ``None`` when absent or null.
        t: the event type of a dispatch (``"READY"``, ``"C2C_MESSAGE_CREATE"``, ...), or ``None``.
        id: the event id, an opaque string, or ``None`` when absent.
    """

    op: Opcode
    d: JSONValue = None
    s: int | None = None
    t: str | None = None
    id: str | None = None

    def __repr__(self) -> str:
        # `d` is user content (and may nest too deep for repr): keep it out of logs.
        return f"Payload(op={self.op!r}, s={self.s!r}, t={self.t!r}, id={self.id!r}, d=...)"


def decode_payload(
    data: str | bytes,
    *,
    max_size: int = DEFAULT_MAX_PAYLOAD_SIZE,
) -> Payload:
    """Decode one gateway payload.

    Args:
        data: one complete WebSocket text message, as ``str`` or as UTF-8 ``bytes``.
        max_size: the largest payload accepted, checked before parsing. For ``bytes`` it
            counts bytes; for ``str`` it counts code points (cheap to know, and never more
            than the UTF-8 size).

    Returns:
        The envelope.

    Raises:
        PayloadTooLarge: ``data`` is longer than ``max_size``.
        InvalidUTF8: ``bytes`` that are not UTF-8, or a ``str`` holding lone surrogates.
        MalformedJSON: not exactly one JSON document, NaN/Infinity, a lone surrogate escape,
            or nesting deeper than 1024 levels.
        InvalidEnvelope: not an object; ``op`` missing or not an int; ``s`` not a
            non-negative int or null; ``t`` or ``id`` not a string or null.
        UnknownOpcode: ``op`` is an int this library does not know.

    Every error is a :class:`~qqproto.RemoteProtocolError`; no other exception escapes.
    """
    size = len(data)
    if size > max_size:
        raise PayloadTooLarge(size, max_size)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        error: RemoteProtocolError | None
        # Raised outside the except block: orjson's error keeps the whole document in `.doc`,
        # and `from None` would still leave it reachable as `__context__`.
        error = _classify_parse_error(data, exc)
    else:
        error = None
    if error is not None:
        raise error
    return decode_object(obj)


def decode_object(obj: JSONValue) -> Payload:
    """Check the envelope of a payload already parsed by ``orjson.loads``.

    Raises:
        InvalidEnvelope, UnknownOpcode: as :func:`decode_payload`.
    """
    if type(obj) is not dict:
        raise InvalidEnvelope(f"payload is a JSON {_json_type(obj)}, not an object", field=None)
    return _envelope(obj)


def _envelope(obj: Mapping[str, JSONValue]) -> Payload:
    raw_op = obj.get("op")
    if type(raw_op) is not int:
        if raw_op is None and "op" not in obj:
            raise InvalidEnvelope("payload has no 'op' field", field="op")
        raise InvalidEnvelope(f"'op' is a JSON {_json_type(raw_op)}, not an int", field="op")
    op = _OPCODES.get(raw_op)
    if op is None:
        raise UnknownOpcode(raw_op)
    s = obj.get("s")
    if s is not None and (type(s) is not int or s < 0):
        raise InvalidEnvelope(
            f"'s' is a JSON {_json_type(s)}, not a non-negative int or null", field="s"
        )
    t = obj.get("t")
    if t is not None and type(t) is not str:
        raise InvalidEnvelope(f"'t' is a JSON {_json_type(t)}, not a string", field="t")
    event_id = obj.get("id")
    if event_id is not None and type(event_id) is not str:
        raise InvalidEnvelope(f"'id' is a JSON {_json_type(event_id)}, not a string", field="id")
    return _new_payload(Payload, (op, obj.get("d"), s, t, event_id))


def _classify_parse_error(data: str | bytes, exc: orjson.JSONDecodeError) -> RemoteProtocolError:
    # Only the error path pays for classification. The message of orjson names a position,
    # never the content, so it is safe to pass on.
    message = str(exc)
    if isinstance(data, bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            return InvalidUTF8(f"payload is not valid UTF-8 (byte {err.start})")
    elif "surrogates not allowed" in message:
        return InvalidUTF8("payload text holds lone surrogates")
    return MalformedJSON(f"payload is not valid JSON: {message}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _encode(op: Opcode, d: JSONValue) -> str:
    return orjson.dumps({"op": int(op), "d": d}).decode()


def encode_heartbeat(seq: int | None) -> str:
    """Encode a Heartbeat (op 1): ``{"op":1,"d":<last seq or null>}``."""
    return _encode(Opcode.HEARTBEAT, seq)


def encode_identify(
    token: str,
    *,
    intents: int,
    shard: tuple[int, int],
    properties: Mapping[str, str],
) -> str:
    """Encode an Identify (op 2).

    Args:
        token: the access token, without the ``QQBot`` prefix (added here).
        intents: the intent bitmask.
        shard: ``(shard_id, shard_count)``.
        properties: the ``$os``/``$browser``/``$device`` map (the server ignores it).

    The result holds the token: never log it.
    """
    body: JSONValue = {
        "token": f"QQBot {token}",
        "intents": intents,
        "shard": [shard[0], shard[1]],
        "properties": dict(properties),
    }
    return _encode(Opcode.IDENTIFY, body)


def encode_resume(token: str, *, session_id: str, seq: int | None) -> str:
    """Encode a Resume (op 6) with the ``QQBot`` token prefix, as in Identify.

    The result holds the token: never log it.
    """
    body: JSONValue = {"token": f"QQBot {token}", "session_id": session_id, "seq": seq}
    return _encode(Opcode.RESUME, body)
