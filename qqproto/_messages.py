# Typed message events, read from a Dispatch only when the application asks.
#
# The receive path never calls this module: the core hands out `Dispatch(type, seq, event_id,
# data)` with `data` untouched, so a bot that ignores messages pays nothing for them. The
# application calls `parse_message` (or `parse_interaction`) on the dispatches it cares about.
#
# The shapes follow the platform's documentation (bot.q.qq.com/wiki, source repository
# tencent-connect/bot-docs: server-inter/message/send-receive/event.md, message/template/
# model.md, message/trans/msg-btn.md) and payloads seen in the wild (tests/fixtures/payloads/
# README.md names each one). Three rules:
#
# * Unknown fields are ignored and unknown event types give None: the platform adds both
#   without notice (GROUP_MESSAGE_CREATE and msg_elements came years after the first docs).
# * A field we read is either absent/null or of its documented type. Anything else raises
#   InvalidMessage naming the field, never its value: `d` holds user content, and exception
#   text reaches logs. The ids a reply needs (the message id and the conversation's id) are
#   required; everything else is optional.
# * Nothing here recurses into unknown parts of `d` (a 1000-deep `d` is legal JSON for orjson).
"""Typed message and interaction events parsed from a :class:`~qqproto.Dispatch`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias

from qqproto._errors import LocalProtocolError, RemoteProtocolError
from qqproto._outputs import Dispatch

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qqproto._bodies import InteractionResult, MediaType, MessageBody, UploadedMedia
    from qqproto._codec import JSONValue
    from qqproto._outbox import SendDelivered

__all__ = [
    "MESSAGE_EVENT_TYPES",
    "Attachment",
    "Author",
    "C2CMessage",
    "ChannelMessage",
    "DirectMessage",
    "GroupMessage",
    "Interaction",
    "InvalidMessage",
    "Mention",
    "Message",
    "Responder",
    "Scene",
    "parse_interaction",
    "parse_message",
]

# Every documented example carries +08:00; a timestamp without an offset is read in the
# platform's own zone (China Standard Time) rather than in the local one.
_PLATFORM_TZ = timezone(timedelta(hours=8))


class Scene(Enum):
    """Where a conversation happens; it decides the endpoint and the rules of a reply."""

    C2C = "c2c"
    """A one-to-one chat with a QQ user (``/v2/users/{openid}``)."""
    GROUP = "group"
    """A QQ group (``/v2/groups/{group_openid}``)."""
    CHANNEL = "channel"
    """A text channel of a guild (``/channels/{channel_id}``)."""
    DIRECT = "direct"
    """A guild direct-message session (``/dms/{guild_id}``)."""


class InvalidMessage(RemoteProtocolError):
    """A message or interaction event whose ``d`` does not have the documented shape.

    Raised by :func:`parse_message` and :func:`parse_interaction`, and only for the event
    types they know: a required id is missing or empty, or a known field has the wrong type.
    The message names the field, never its value.

    Attributes:
        event_type: the dispatch type (``"C2C_MESSAGE_CREATE"``, ...).
        field: the field at fault, dotted (``"author.user_openid"``), or ``None`` when ``d``
            is not an object at all.
    """

    reason = "invalid_message"

    def __init__(self, event_type: str, field: str | None, problem: str) -> None:
        self.event_type = event_type
        self.field = field
        where = f"'{field}'" if field is not None else "d"
        super().__init__(f"{event_type}: {where} {problem}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """A file attached to a message.

    Attributes:
        content_type: ``"image/jpeg"``, ``"image/png"``, ``"image/gif"``, ``"video/mp4"``,
            ``"voice"``, ``"file"``, ... (older payloads used Chinese words), or ``None``.
        url: where to download it. Some payloads send it without a scheme
            (``gchat.qpic.cn/...`` or ``//...``); it is given here with ``https:``.
        filename: the file name, if sent.
        width: image width in pixels, if sent.
        height: image height in pixels, if sent.
        size: size in bytes, if sent.
        voice_wav_url: for voice messages, a WAV rendering of the (SILK) recording, if sent.
        asr_refer_text: for voice messages, the platform's transcription, if sent.
    """

    content_type: str | None
    url: str | None = field(repr=False)
    filename: str | None = field(repr=False)
    width: int | None
    height: int | None
    size: int | None
    voice_wav_url: str | None = field(repr=False)
    asr_refer_text: str | None = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Author:
    """Who sent a message.

    Attributes:
        id: the platform's user id (in guilds, the user id; in C2C and groups, an opaque id
            that the examples show equal to the openid), or ``None``.
        openid: the sender's openid in this scene: ``user_openid`` in C2C, ``member_openid``
            in a group, ``None`` in guilds.
        union_openid: the same user across the developer's bots, if sent.
        username: the display name, if sent; not in the repr.
        bot: whether the sender is a bot, if sent.
        role: ``member_role`` in a group (``"member"``, ``"admin"``, ``"owner"``), if sent.
    """

    id: str | None
    openid: str | None
    union_openid: str | None
    username: str | None = field(repr=False)
    bot: bool | None
    role: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Mention:
    """Someone mentioned in a group or guild message.

    Attributes:
        id: the mentioned user's id (a group mention's ``member_openid`` when it has no
            ``id``), or ``None`` for an @everyone.
        username: the display name, if sent; not in the repr.
        bot: whether the mentioned user is a bot, if sent.
        is_you: whether it mentions this bot (group mentions say so; guild mentions do not,
            so it is ``None`` there).
        everyone: an @everyone (a group mention with ``scope`` ``"all"``).
    """

    id: str | None
    username: str | None = field(repr=False)
    bot: bool | None
    is_you: bool | None
    everyone: bool


class Responder(Protocol):
    """Who sends what :meth:`Message.reply` and its kin ask for: the IO layer.

    ``qqproto_io.GatewayClient`` binds one to every message it hands its handlers (and to
    what :meth:`~qqproto_io.GatewayClient.message` returns); ``parse_message`` alone binds
    none. Implement it to give messages parsed in your own IO framework the same verbs.
    """

    async def reply(
        self, target: Message | Interaction, body: str | MessageBody
    ) -> SendDelivered:  # pragma: no cover - a protocol
        """Send ``body`` as a passive reply to ``target``; return once it is delivered."""
        ...

    async def upload(
        self, target: Message | Interaction, url: str, file_type: MediaType
    ) -> UploadedMedia:  # pragma: no cover - a protocol
        """Upload the file at ``url`` for a rich-media reply in ``target``'s conversation."""
        ...

    async def acknowledge(
        self, interaction: Interaction, result: InteractionResult | None
    ) -> None:  # pragma: no cover - a protocol
        """Acknowledge ``interaction`` with ``result`` (``None``: success)."""
        ...


# Guild messages carry mentions as markup in the text: <@!user_id> (and <@user_id>).
_MENTION_MARKUP = re.compile(r"<@!?[^<>\s]*>")


def _unbound(what: str) -> LocalProtocolError:
    return LocalProtocolError(
        f"this {what} has no responder: parse_message() alone gives plain values; take it "
        "from a GatewayClient handler or GatewayClient.message(), or pass responder="
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """What every message event has; the subclasses add where it was sent.

    Attributes:
        type: the dispatch type, e.g. ``"C2C_MESSAGE_CREATE"``.
        id: the message id (``d.id``): the ``msg_id`` of a reply.
        event_id: the envelope ``id``, or ``None``.
        content: the text; empty for a message that is only attachments. Group messages keep
            the leading space where the @ was; guild messages keep ``<@!id>`` markup. Not in
            the repr (user content).
        timestamp: when the platform says it was sent (timezone-aware), or ``None``.
        author: the sender.
        attachments: the files attached, possibly none; not in the repr.
        raw: the ``d`` object itself, for fields not typed here; not in the repr.
        responder: who sends its replies (see :class:`Responder`), or ``None``.
        scene: where it was sent (a class attribute of each subclass).
    """

    scene: ClassVar[Scene]
    type: str
    id: str
    event_id: str | None
    content: str = field(repr=False)
    timestamp: datetime | None
    author: Author
    attachments: tuple[Attachment, ...] = field(repr=False)
    raw: Mapping[str, JSONValue] = field(repr=False, compare=False)
    responder: Responder | None = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        """:attr:`content` as a person reads it: the mention markup of guild messages
        (``<@!id>``) removed and the whitespace around it stripped (the space a group @
        leaves, too). ``"<@!123> ping "`` is ``"ping"``."""
        return _MENTION_MARKUP.sub("", self.content).strip()

    async def reply(self, body: str | MessageBody) -> SendDelivered:
        """Answer this message: text, or any :class:`~qqproto.MessageBody`.

        The reply names this message (``msg_id``) and the next ``msg_seq``; it is retried
        safely and delivered at most once. ``await`` returns once the platform has it.

        Raises:
            ReplyRefused: the platform would refuse it (the window closed, the replies to
                this message are used up, the scene has no such body); nothing was sent.
            LocalProtocolError: the message has no :attr:`responder`.
            Exception: what the responder raises when the send fails (for the
                ``GatewayClient``: ``qqproto.ApiError`` or ``qqproto_io.HttpFailure``).
        """
        if self.responder is None:
            raise _unbound("message")
        return await self.responder.reply(self, body)

    async def upload(self, url: str, file_type: MediaType) -> UploadedMedia:
        """Upload the file at ``url`` (the platform fetches it) for a rich-media reply:
        ``await message.reply(MessageBody.media(uploaded))``. C2C and groups only.

        Raises:
            ReplyRefused: a guild scene (no uploads there).
            LocalProtocolError: the message has no :attr:`responder`.
        """
        if self.responder is None:
            raise _unbound("message")
        return await self.responder.upload(self, url, file_type)


@dataclass(frozen=True, slots=True, kw_only=True)
class C2CMessage(Message):
    """A message to the bot in a one-to-one chat (``C2C_MESSAGE_CREATE``).

    Attributes:
        user_openid: the user's openid (``author.user_openid``): where replies go.
    """

    scene: ClassVar[Scene] = Scene.C2C
    user_openid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupMessage(Message):
    """A group message: one that @-mentions the bot (``GROUP_AT_MESSAGE_CREATE``), or any
    group message for bots allowed to receive them all (``GROUP_MESSAGE_CREATE``).

    Attributes:
        group_openid: the group's openid: where replies go.
        member_openid: the sender's openid in this group, if sent.
        mentions: who was mentioned, possibly nobody.
    """

    scene: ClassVar[Scene] = Scene.GROUP
    group_openid: str
    member_openid: str | None
    mentions: tuple[Mention, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelMessage(Message):
    """A guild text-channel message: one that @-mentions the bot (``AT_MESSAGE_CREATE``), or
    any message for private-domain bots (``MESSAGE_CREATE``).

    Attributes:
        channel_id: the channel: where replies go.
        guild_id: the guild, if sent.
        mentions: who was mentioned, possibly nobody.
        mention_everyone: whether it is an @everyone, if sent.
        seq_in_channel: the order of the message in its channel (delivery order is only
            "as ordered as possible"; sort by this when it matters), if sent.
    """

    scene: ClassVar[Scene] = Scene.CHANNEL
    channel_id: str
    guild_id: str | None
    mentions: tuple[Mention, ...]
    mention_everyone: bool | None
    seq_in_channel: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectMessage(Message):
    """A guild direct message to the bot (``DIRECT_MESSAGE_CREATE``).

    Attributes:
        guild_id: the direct-message session's guild id: where replies go.
        channel_id: the session's channel, if sent.
        src_guild_id: the guild the conversation was started from, if sent.
    """

    scene: ClassVar[Scene] = Scene.DIRECT
    guild_id: str
    channel_id: str | None
    src_guild_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Interaction:
    """A button or menu callback (``INTERACTION_CREATE``), which must be acknowledged.

    Until it is acknowledged (``PUT /interactions/{id}``, see
    :func:`~qqproto.acknowledge_interaction`), the user's client shows the button loading.

    Attributes:
        id: the interaction id (``d.id``): what the acknowledgement names.
        event_id: the envelope ``id``: a reply to the interaction names it as ``event_id``;
            ``None`` when the envelope had none.
        interaction_type: ``d.type``: 11 a message button, 12 a C2C quick menu, 13 a feedback
            button (seen in the wild), ... or ``None``.
        scene: from ``chat_type`` (0 guild channel, 1 group, 2 C2C) or else ``scene``, or
            ``None`` when neither is known.
        timestamp: when it happened, or ``None``.
        guild_id: the guild (guild scene), if sent.
        channel_id: the channel (guild scene), if sent.
        user_openid: the user (C2C scene), if sent.
        group_openid: the group (group scene), if sent.
        group_member_openid: the member who clicked (group scene), if sent.
        button_id: ``data.resolved.button_id``, the ``id`` the bot gave the button, if sent.
        button_data: ``data.resolved.button_data``, the ``data`` the bot gave it; not in the
            repr.
        resolved_user_id: ``data.resolved.user_id``, if sent.
        resolved_message_id: ``data.resolved.message_id`` (guilds only), if sent.
        feature_id: ``data.resolved.feature_id`` (custom menus), if sent.
        raw: the ``d`` object itself; not in the repr.
        responder: who sends its acknowledgement and replies (see :class:`Responder`), or
            ``None``.
    """

    id: str
    event_id: str | None
    interaction_type: int | None
    scene: Scene | None
    timestamp: datetime | None
    guild_id: str | None
    channel_id: str | None
    user_openid: str | None
    group_openid: str | None
    group_member_openid: str | None
    button_id: str | None
    button_data: str | None = field(repr=False)
    resolved_user_id: str | None
    resolved_message_id: str | None
    feature_id: str | None
    raw: Mapping[str, JSONValue] = field(repr=False, compare=False)
    responder: Responder | None = field(default=None, repr=False, compare=False)

    async def acknowledge(self, result: InteractionResult | None = None) -> None:
        """Tell the platform the click was handled (``PUT /interactions/{id}``); until then
        the user's button shows loading. ``None`` is ``InteractionResult.SUCCESS``.

        Raises:
            LocalProtocolError: the interaction has no :attr:`responder`.
        """
        if self.responder is None:
            raise _unbound("interaction")
        await self.responder.acknowledge(self, result)

    async def reply(self, body: str | MessageBody) -> SendDelivered:
        """Answer the interaction in its conversation (by ``event_id``), like
        :meth:`Message.reply`."""
        if self.responder is None:
            raise _unbound("interaction")
        return await self.responder.reply(self, body)


# ------------------------------------------------------------------------------ reading


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
