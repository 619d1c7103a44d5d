# Reading a message event's `d` into the typed events of _messages.py, on demand: the
# receive path never calls this module (see there for the rules). Each field is read through
# `_Reader`, which names the field at fault, never its value.
"""parse_message and parse_interaction: a Dispatch as a typed event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeAlias

from qqproto._errors import LocalProtocolError
from qqproto._messages import (
    Attachment,
    Author,
    C2CMessage,
    ChannelMessage,
    DirectMessage,
    GroupMessage,
    Interaction,
    InvalidMessage,
    Mention,
    Message,
    Responder,
    Scene,
)
from qqproto._outputs import Dispatch

if TYPE_CHECKING:
    from collections.abc import Mapping


__all__ = ["MESSAGE_EVENT_TYPES", "parse_interaction", "parse_message"]

# Every documented example carries +08:00; a timestamp without an offset is read in the
# platform's own zone (China Standard Time) rather than in the local one.
_PLATFORM_TZ = timezone(timedelta(hours=8))


class _Reader:
    """Typed access to one object of ``d``, naming fields by their dotted path."""

    __slots__ = ("_event", "_obj", "_prefix")

    def __init__(self, event: str, obj: Mapping[str, object], prefix: str = "") -> None:
        self._event = event
        self._obj = obj
        self._prefix = prefix

    def _fail(self, name: str, problem: str) -> InvalidMessage:
        return InvalidMessage(self._event, self._prefix + name, problem)

    def text(self, name: str) -> str | None:
        value = self._obj.get(name)
        if value is None or type(value) is str:
            return value
        raise self._fail(name, "is not a string")

    def required_id(self, name: str) -> str:
        value = self.text(name)
        if not value:
            raise self._fail(name, "is missing or empty")
        return value

    def integer(self, name: str) -> int | None:
        value = self._obj.get(name)
        if value is None or type(value) is int:
            return value
        raise self._fail(name, "is not an integer")

    def boolean(self, name: str) -> bool | None:
        value = self._obj.get(name)
        if value is None or type(value) is bool:
            return value
        raise self._fail(name, "is not a boolean")

    def child(self, name: str) -> _Reader | None:
        value = self._obj.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail(name, "is not an object")
        return _Reader(self._event, value, f"{self._prefix}{name}.")

    def required_child(self, name: str) -> _Reader:
        found = self.child(name)
        if found is None:
            raise self._fail(name, "is missing")
        return found

    def children(self, name: str) -> list[_Reader]:
        value = self._obj.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._fail(name, "is not a list")
        out = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self._fail(f"{name}[{index}]", "is not an object")
            out.append(_Reader(self._event, item, f"{self._prefix}{name}[{index}]."))
        return out

    def timestamp(self, name: str) -> datetime | None:
        value = self._obj.get(name)
        if value is None:
            return None
        try:
            if type(value) is str:
                # RFC 3339 ("2023-11-06T13:37:18+08:00"), which fromisoformat reads since 3.11.
                parsed = datetime.fromisoformat(value)
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=_PLATFORM_TZ)
            if isinstance(value, int | float) and not isinstance(value, bool):
                # Some events (GROUP_ADD_ROBOT, FRIEND_ADD) send Unix seconds instead.
                return datetime.fromtimestamp(value, UTC)
        except (ValueError, OverflowError, OSError):
            raise self._fail(name, "is not a valid time") from None
        raise self._fail(name, "is not a time string or number")


def _url(value: str | None) -> str | None:
    # Seen in the wild: "gchat.qpic.cn/..." and "//multimedia.nt.qq.com/...", both https.
    if not value or "://" in value:
        return value
    return "https:" + value if value.startswith("//") else "https://" + value


def _attachments(d: _Reader) -> tuple[Attachment, ...]:
    return tuple(
        Attachment(
            content_type=a.text("content_type"),
            url=_url(a.text("url")),
            filename=a.text("filename"),
            width=a.integer("width"),
            height=a.integer("height"),
            size=a.integer("size"),
            voice_wav_url=_url(a.text("voice_wav_url")),
            asr_refer_text=a.text("asr_refer_text"),
        )
        for a in d.children("attachments")
    )


def _mentions(d: _Reader) -> tuple[Mention, ...]:
    out = []
    for m in d.children("mentions"):
        everyone = m.text("scope") == "all"
        out.append(
            Mention(
                id=m.text("id") or m.text("member_openid"),
                username=m.text("username"),
                bot=m.boolean("bot"),
                is_you=m.boolean("is_you"),
                everyone=everyone,
            )
        )
    return tuple(out)


def _author(author: _Reader | None, openid_field: str | None) -> Author:
    if author is None:
        return Author(id=None, openid=None, union_openid=None, username=None, bot=None, role=None)
    return Author(
        id=author.text("id"),
        openid=author.text(openid_field) if openid_field else None,
        union_openid=author.text("union_openid"),
        username=author.text("username"),
        bot=author.boolean("bot"),
        role=author.text("member_role"),
    )


# Each scene reads what only it has: its class, its author (whose openid field differs by
# scene) and its own fields; parse_message reads the rest, the same for all four.
_Scene: TypeAlias = tuple[type[Message], Author, dict[str, Any]]


def _c2c(d: _Reader) -> _Scene:
    author = d.required_child("author")
    own = {"user_openid": author.required_id("user_openid")}
    return C2CMessage, _author(author, "user_openid"), own


def _group(d: _Reader) -> _Scene:
    author = _author(d.child("author"), "member_openid")
    own = {
        "group_openid": d.required_id("group_openid"),
        "member_openid": author.openid,
        "mentions": _mentions(d),
    }
    return GroupMessage, author, own


def _channel(d: _Reader) -> _Scene:
    own = {
        "channel_id": d.required_id("channel_id"),
        "guild_id": d.text("guild_id"),
        "mentions": _mentions(d),
        "mention_everyone": d.boolean("mention_everyone"),
        "seq_in_channel": d.text("seq_in_channel"),
    }
    return ChannelMessage, _author(d.child("author"), None), own


def _direct(d: _Reader) -> _Scene:
    own = {
        "guild_id": d.required_id("guild_id"),
        "channel_id": d.text("channel_id"),
        "src_guild_id": d.text("src_guild_id"),
    }
    return DirectMessage, _author(d.child("author"), None), own


_PARSERS = {
    "C2C_MESSAGE_CREATE": _c2c,
    "GROUP_AT_MESSAGE_CREATE": _group,
    "GROUP_MESSAGE_CREATE": _group,
    "AT_MESSAGE_CREATE": _channel,
    "MESSAGE_CREATE": _channel,
    "DIRECT_MESSAGE_CREATE": _direct,
}

MESSAGE_EVENT_TYPES = frozenset(_PARSERS)
"""The dispatch types :func:`parse_message` reads; any other type gives ``None``."""

_CHAT_TYPES = {0: Scene.CHANNEL, 1: Scene.GROUP, 2: Scene.C2C}
_SCENE_NAMES = {"guild": Scene.CHANNEL, "group": Scene.GROUP, "c2c": Scene.C2C}


def _check(dispatch: object, responder: object) -> Dispatch:
    # A Dispatch from the core always passes; one built by hand (from a webhook) may not.
    if responder is not None and not all(
        callable(getattr(responder, verb, None)) for verb in ("reply", "upload", "acknowledge")
    ):
        raise LocalProtocolError("responder must have reply, upload and acknowledge methods")
    if not isinstance(dispatch, Dispatch):
        raise LocalProtocolError("pass a qqproto.Dispatch (from GatewayConnection.drain())")
    if type(dispatch.type) is not str or not (
        dispatch.event_id is None or type(dispatch.event_id) is str
    ):
        raise LocalProtocolError("Dispatch.type must be a str and event_id a str or None")
    return dispatch


def parse_message(dispatch: Dispatch, *, responder: Responder | None = None) -> Message | None:
    """Read a message event, or return ``None`` for any other dispatch.

    Nothing is parsed until this is called, and nothing is cached: call it once per
    dispatch you handle.

    Args:
        dispatch: a :class:`~qqproto.Dispatch` from the core, or one built from a webhook.
        responder: what :meth:`Message.reply` uses; ``None`` for a plain value.

    Returns:
        A :class:`C2CMessage`, :class:`GroupMessage`, :class:`ChannelMessage` or
        :class:`DirectMessage` for the types in :data:`MESSAGE_EVENT_TYPES`; ``None`` for
        every other type (unknown ones included).

    Raises:
        InvalidMessage: a known type whose ``d`` lacks a required id (the message id, and
            the user, group, channel or guild to reply to) or has a known field of the wrong
            type. Only this: any other exception would be a bug.
        LocalProtocolError: ``dispatch`` is not a ``Dispatch``.
    """
    dispatch = _check(dispatch, responder)
    parser = _PARSERS.get(dispatch.type)
    if parser is None:
        return None
    data = dispatch.data
    if not isinstance(data, dict):
        raise InvalidMessage(dispatch.type, None, "is not an object")
    d = _Reader(dispatch.type, data)
    message_id = d.required_id("id")  # first: the id a reply needs above all
    cls, author, own = parser(d)
    return cls(
        type=dispatch.type,
        id=message_id,
        event_id=dispatch.event_id,
        content=d.text("content") or "",
        timestamp=d.timestamp("timestamp"),
        attachments=_attachments(d),
        author=author,
        raw=data,
        responder=responder,
        **own,
    )


def parse_interaction(
    dispatch: Dispatch, *, responder: Responder | None = None
) -> Interaction | None:
    """Read an ``INTERACTION_CREATE`` event, or return ``None`` for any other dispatch.

    Args:
        dispatch: a :class:`~qqproto.Dispatch` from the core, or one built from a webhook.
        responder: what :meth:`Interaction.acknowledge` and ``reply`` use.

    Returns:
        The :class:`Interaction`, or ``None`` when ``dispatch`` is of another type.

    Raises:
        InvalidMessage: ``d`` has no ``id`` or a known field of the wrong type.
        LocalProtocolError: ``dispatch`` is not a ``Dispatch``.
    """
    dispatch = _check(dispatch, responder)
    t = dispatch.type
    if t != "INTERACTION_CREATE":
        return None
    data = dispatch.data
    if not isinstance(data, dict):
        raise InvalidMessage(t, None, "is not an object")
    d = _Reader(t, data)
    chat_type = d.integer("chat_type")
    scene = _CHAT_TYPES.get(chat_type) if chat_type is not None else None
    if scene is None:
        scene = _SCENE_NAMES.get(d.text("scene") or "")
    payload = d.child("data")
    resolved = payload.child("resolved") if payload is not None else None
    r = resolved if resolved is not None else _Reader(t, {}, "data.resolved.")
    return Interaction(
        id=d.required_id("id"),
        event_id=dispatch.event_id,
        interaction_type=d.integer("type"),
        scene=scene,
        timestamp=d.timestamp("timestamp"),
        guild_id=d.text("guild_id"),
        channel_id=d.text("channel_id"),
        user_openid=d.text("user_openid"),
        group_openid=d.text("group_openid"),
        group_member_openid=d.text("group_member_openid"),
        button_id=r.text("button_id"),
        button_data=r.text("button_data"),
        resolved_user_id=r.text("user_id"),
        resolved_message_id=r.text("message_id"),
        feature_id=r.text("feature_id"),
        raw=data,
        responder=responder,
    )
