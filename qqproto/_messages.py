# Typed message events, read from a Dispatch only when the application asks (the reading is
# in _message_parsing.py).
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
"""Typed message and interaction events: what a bot answers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Protocol

from qqproto._errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from qqproto._bodies import InteractionResult, MediaType, MessageBody, UploadedMedia
    from qqproto._codec import JSONValue
    from qqproto._outbox import SendDelivered

__all__ = [
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
]


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
