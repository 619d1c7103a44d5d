# Replying to messages, sans-IO like the gateway core. Four modules, each usable alone:
#
# * here, Replies: the platform's passive-reply rules. Given a message (or an interaction)
#   and `now`, it says where the reply goes, which msg_id/event_id and msg_seq it carries, or
#   why the platform would refuse it (the reply window closed, the message's replies used
#   up). State: per replied-to id, the replies used and the next msg_seq; bounded.
# * _bodies.py: what a message says (MessageBody, Keyboard, media) and the ApiRequest.
# * _outbox.py: the send policy (pacing, retries, outcomes).
# * _api_errors.py: an HTTP answer as a typed ApiError.
#
# Two clocks, never mixed. The reply window is the platform's, counted from the message's own
# timestamp, so Replies takes `now` as Unix time (time.time()). The Outbox paces and waits, so
# it takes `now` on the caller's monotonic clock, like GatewayConnection. What one hands the
# other is a duration: Send.window_left.
#
# Errors, as in the core: misuse raises LocalProtocolError; a reply the platform would refuse
# raises ReplyRefused; a platform answer becomes an ApiError.
"""The passive-reply rules: where a reply goes, what it names, and when it is refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING
from urllib.parse import quote

from qqproto._bodies import (
    _V2,
    ApiRequest,
    InteractionResult,
    MediaType,
    MessageBody,
    UploadedMedia,
    _member,
    _number,
    _text,
)
from qqproto._errors import InvalidResponse, LocalProtocolError, QQProtoError
from qqproto._messages import (
    C2CMessage,
    ChannelMessage,
    DirectMessage,
    GroupMessage,
    Interaction,
    Message,
    Scene,
)

if TYPE_CHECKING:
    from qqproto._codec import JSONValue

__all__ = [
    "RefusalReason",
    "Replies",
    "ReplyLimits",
    "ReplyRefused",
    "Send",
    "acknowledge_interaction",
    "read_upload",
    "upload_media",
]

# A `now` below this (September 2001) is a monotonic clock, not Unix time.
_UNIX_TIME_FLOOR = 1e9


@dataclass(frozen=True, slots=True, kw_only=True)
class Send:
    """A request ready for the :class:`Outbox`, with what it needs to retry it safely.

    Attributes:
        request: the REST call.
        scene: where it goes, if it is a message.
        source_id: the ``msg_id`` or ``event_id`` it replies to, or ``None``.
        msg_seq: its ``msg_seq``, or ``None`` (guild scenes have none).
        retry_safe: a retry cannot deliver it twice: the platform drops a repeated
            ``msg_id``/``event_id`` + ``msg_seq``, or the request changes nothing visible
            when repeated (an acknowledgement, an upload).
        pace_key: the pacing group (``"channel:<id>"``), or ``None`` when unpaced.
        window_left: seconds the reply stays valid, if known; the Outbox does not retry
            past it.
    """

    request: ApiRequest
    scene: Scene | None
    source_id: str | None
    msg_seq: int | None
    retry_safe: bool
    pace_key: str | None
    window_left: float | None


_PREFIX = {
    Scene.C2C: "/v2/users/",
    Scene.GROUP: "/v2/groups/",
    Scene.CHANNEL: "/channels/",
    Scene.DIRECT: "/dms/",
}


def _target(target: object) -> tuple[Scene, str]:
    """The scene of `target` and the path of its conversation (without the suffix)."""
    conversation: str | None
    if isinstance(target, C2CMessage):
        scene, conversation = Scene.C2C, target.user_openid
    elif isinstance(target, GroupMessage):
        scene, conversation = Scene.GROUP, target.group_openid
    elif isinstance(target, ChannelMessage):
        scene, conversation = Scene.CHANNEL, target.channel_id
    elif isinstance(target, DirectMessage):
        scene, conversation = Scene.DIRECT, target.guild_id
    elif isinstance(target, Interaction):
        if target.scene is None:
            raise ReplyRefused(RefusalReason.NO_TARGET, "the interaction names no scene")
        scene = target.scene
        conversation = {
            Scene.C2C: target.user_openid,
            Scene.GROUP: target.group_openid,
            Scene.CHANNEL: target.channel_id,
        }.get(scene)
    else:
        raise LocalProtocolError("reply to a Message or an Interaction")
    if not conversation:
        raise ReplyRefused(RefusalReason.NO_TARGET, f"the {scene.value} event names no target")
    return scene, _PREFIX[scene] + quote(conversation, safe="")


def upload_media(target: Message | Interaction, *, url: str, file_type: MediaType) -> Send:
    """Upload a file by URL for a rich-media reply (``POST .../files``, C2C and groups).

    The platform fetches ``url``; read its answer with :func:`read_upload`, then send
    :meth:`MessageBody.media`. ``srv_send_msg`` is always false: sending directly would
    spend the bot's proactive-message quota.

    Args:
        target: the message (or interaction) whose conversation the file is for.
        url: where the platform downloads the file from.
        file_type: what it is.

    Raises:
        ReplyRefused: the scene has no uploads (guilds), or the event names no user/group.
    """
    scene, base = _target(target)
    if scene not in _V2:
        raise ReplyRefused(RefusalReason.UNSUPPORTED, "uploads exist in C2C and groups only")
    url = _text("url", url)
    body: dict[str, JSONValue] = {
        "file_type": _member(MediaType, file_type),
        "url": url,
        "srv_send_msg": False,
    }
    return Send(
        request=ApiRequest(method="POST", path=base + "/files", body=body),
        scene=scene,
        source_id=None,
        msg_seq=None,
        retry_safe=True,
        pace_key=None,
        window_left=None,
    )


def read_upload(response: object) -> UploadedMedia:
    """Read the answer to :func:`upload_media` (``SendDelivered.response``).

    Raises:
        InvalidResponse: no ``file_info``, or a field of the wrong type.
    """
    if not isinstance(response, dict):
        raise InvalidResponse("upload answer is not a JSON object")
    info, uuid, ttl = response.get("file_info"), response.get("file_uuid"), response.get("ttl", 0)
    if not isinstance(info, str) or not info:
        raise InvalidResponse("upload answer has no 'file_info'")
    if uuid is not None and not isinstance(uuid, str):
        raise InvalidResponse("'file_uuid' is not a string")
    if type(ttl) is not int or ttl < 0:
        raise InvalidResponse("'ttl' is not a non-negative int")
    return UploadedMedia(file_info=info, file_uuid=uuid, ttl=ttl)


def acknowledge_interaction(
    interaction: Interaction, result: InteractionResult = InteractionResult.SUCCESS
) -> Send:
    """The acknowledgement of an interaction (``PUT /interactions/{id}``).

    Send it soon: until then the user's client shows the button loading. It is not a reply
    and uses no reply budget; a reply to the interaction is :meth:`Replies.prepare`.

    Args:
        interaction: the interaction.
        result: what the client shows.
    """
    if not isinstance(interaction, Interaction):
        raise LocalProtocolError("acknowledge an Interaction")
    body: dict[str, JSONValue] = {"code": _member(InteractionResult, result)}
    return Send(
        request=ApiRequest(
            method="PUT", path="/interactions/" + quote(interaction.id, safe=""), body=body
        ),
        scene=interaction.scene,
        source_id=None,
        msg_seq=None,
        retry_safe=True,
        pace_key=None,
        window_left=None,
    )


# ----------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyLimits:
    """How long a message can be replied to, and how often.

    The defaults are the documented ones (``server-inter/message/send-receive/send.md`` and
    the newer ``message/overview.html``): C2C 60 minutes, groups, guild channels and guild
    DMs 5 minutes; at most 4 replies per C2C message (the 2025 send page said 5) and 5 per
    group message; no documented count in guilds (DMs: "no limit").

    Attributes:
        c2c_window: seconds a C2C message can be replied to.
        group_window: seconds a group message can be replied to.
        channel_window: seconds a guild channel message can be replied to.
        direct_window: seconds a guild DM can be replied to.
        c2c_max_replies: replies per C2C message, or ``None`` for no check.
        group_max_replies: replies per group message, or ``None`` for no check.
        margin: seconds taken off every window, for the request's own travel time.
    """

    c2c_window: float = 3600.0
    group_window: float = 300.0
    channel_window: float = 300.0
    direct_window: float = 300.0
    c2c_max_replies: int | None = 4
    group_max_replies: int | None = 5
    margin: float = 0.0

    def __post_init__(self) -> None:
        for name in ("c2c_window", "group_window", "channel_window", "direct_window", "margin"):
            _number(name, getattr(self, name))
        for name in ("c2c_max_replies", "group_max_replies"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise LocalProtocolError(f"{name} must be a positive int or None")

    def window(self, scene: Scene) -> float:
        """The reply window of ``scene``, in seconds."""
        return {
            Scene.C2C: self.c2c_window,
            Scene.GROUP: self.group_window,
            Scene.CHANNEL: self.channel_window,
            Scene.DIRECT: self.direct_window,
        }[scene]

    def max_replies(self, scene: Scene) -> int | None:
        """The replies one message of ``scene`` allows, or ``None`` when unchecked."""
        return {Scene.C2C: self.c2c_max_replies, Scene.GROUP: self.group_max_replies}.get(scene)


class RefusalReason(Enum):
    """Why :class:`Replies` will not prepare a reply."""

    WINDOW_CLOSED = "window_closed"
    """The message is older than its scene's reply window."""
    LIMIT_REACHED = "limit_reached"
    """The message has had all the replies its scene allows."""
    NO_TARGET = "no_target"
    """The event does not say where a reply would go."""
    UNSUPPORTED = "unsupported"
    """The scene has no such body (an embed in a group, media in a guild)."""


class ReplyRefused(QQProtoError):
    """A reply the platform would refuse; nothing was sent and no budget was spent.

    Attributes:
        reason: why, as a :class:`RefusalReason`.
    """

    def __init__(self, reason: RefusalReason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(slots=True)
class _Source:
    forget_at: float  # Unix time: the window has closed by then
    used: int = 0
    next_seq: int = 1
    live: set[int] = field(default_factory=set)


class Replies:
    """The passive-reply rules: endpoint, ``msg_id``/``event_id``, ``msg_seq`` and budget.

    One per bot (it remembers, per replied-to id, the replies used and the next
    ``msg_seq``; at most ``max_tracked`` ids, each until its window closes).

    ``msg_seq`` counts 1, 2, 3, ... per replied-to id, as the docs describe. After a restart
    it counts from 1 again, so a reply to a message the platform delivers twice (it may)
    repeats a pair it already has and is refused as a duplicate: the user sees one reply.

    Args:
        limits: the windows and counts; defaults to ``ReplyLimits()``.
        max_tracked: how many replied-to ids to remember.
    """

    def __init__(self, limits: ReplyLimits | None = None, *, max_tracked: int = 100_000) -> None:
        if limits is not None and not isinstance(limits, ReplyLimits):
            raise LocalProtocolError("limits must be a ReplyLimits")
        if type(max_tracked) is not int or max_tracked < 1:
            raise LocalProtocolError("max_tracked must be a positive int")
        self._limits = limits or ReplyLimits()
        self._max = max_tracked
        self._sources: dict[str, _Source] = {}

    def __len__(self) -> int:
        """How many replied-to ids are remembered."""
        return len(self._sources)

    def prepare(self, target: Message | Interaction, body: MessageBody, now: float) -> Send:
        """Address ``body`` as a reply to ``target``, spending one reply of its budget.

        Args:
            target: the message (by ``msg_id``) or interaction (by ``event_id``) to answer.
            body: what to say.
            now: the current Unix time (``time.time()``), not a monotonic clock: the window
                counts from the message's own timestamp.

        Returns:
            The :class:`Send` for the :class:`Outbox`.

        Raises:
            ReplyRefused: the window closed, the budget is spent, the scene has no such
                body, or the event names no target. Nothing is spent.
            LocalProtocolError: a wrong argument, or a ``now`` that is not Unix time.
        """
        if not isinstance(body, MessageBody):
            raise LocalProtocolError("body must be a MessageBody")
        now = _number("now", now)
        if now < _UNIX_TIME_FLOOR:
            raise LocalProtocolError("now must be Unix time (time.time()), not a monotonic clock")
        scene, base = _target(target)
        if scene not in body.scenes:
            raise ReplyRefused(
                RefusalReason.UNSUPPORTED, f"{scene.value} has no msg_type {body.msg_type}"
            )
        window = self._limits.window(scene)
        left = self._window_left(target, window, now)
        if left is not None and left <= 0:
            raise ReplyRefused(
                RefusalReason.WINDOW_CLOSED,
                f"the {scene.value} reply window ({window:g} s) has closed",
            )
        if isinstance(target, Message):
            key, limit = "msg_id", self._limits.max_replies(scene)
            source_id = target.id
        else:
            key, limit = "event_id", None
            source_id = target.event_id or target.id
        fields = dict(body.fields)
        seq = None
        if scene in _V2:
            fields["msg_type"] = body.msg_type
            forget_at = now + (left if left is not None else window)
            seq = self._spend(f"{key}:{source_id}", limit, forget_at, now)
            fields["msg_seq"] = seq
        fields[key] = source_id
        return Send(
            request=ApiRequest(method="POST", path=base + "/messages", body=fields),
            scene=scene,
            source_id=source_id,
            msg_seq=seq,
            retry_safe=seq is not None,
            pace_key=base.replace("/channels/", "channel:") if scene is Scene.CHANNEL else None,
            window_left=left,
        )

    def cancel(self, send: Send) -> None:
        """Give back the reply of a send that surely did not reach the user (a
        :class:`SendFailed` with ``maybe_delivered`` false). Its ``msg_seq`` is not reused.

        Raises:
            LocalProtocolError: ``send`` was cancelled already, or did not come from here.
        """
        if not isinstance(send, Send):
            raise LocalProtocolError("cancel a Send")
        if send.msg_seq is None or send.source_id is None:
            return  # nothing was counted
        kind = "msg_id" if "msg_id" in send.request.body else "event_id"
        source = self._sources.get(f"{kind}:{send.source_id}")
        if source is None:
            return  # forgotten: its window has closed anyway
        if send.msg_seq not in source.live:
            raise LocalProtocolError("this send was cancelled already, or is not from here")
        source.live.discard(send.msg_seq)
        source.used -= 1

    def _window_left(
        self, target: Message | Interaction, window: float, now: float
    ) -> float | None:
        if target.timestamp is None:
            return None  # the platform alone can tell
        try:
            sent_at = target.timestamp.timestamp()
        except (OverflowError, OSError, ValueError):
            return None
        # A message from the future is clock skew: count its age as zero.
        return window - self._limits.margin - max(0.0, now - sent_at)

    def _spend(self, key: str, limit: int | None, forget_at: float, now: float) -> int:
        source = self._sources.get(key)
        if source is None:
            if len(self._sources) >= self._max:
                self._evict(now)
            source = self._sources[key] = _Source(forget_at=forget_at)
        if limit is not None and source.used >= limit:
            raise ReplyRefused(
                RefusalReason.LIMIT_REACHED, f"the message has had its {limit} replies"
            )
        seq = source.next_seq
        source.next_seq += 1
        source.used += 1
        source.live.add(seq)
        return seq

    def _evict(self, now: float) -> None:
        # The windows are closed for these, so forgetting them changes no answer. If that is
        # not enough, the oldest go: their msg_seq restarts at 1 (a duplicate, at worst).
        for key in [k for k, s in self._sources.items() if s.forget_at <= now]:
            del self._sources[key]
        while len(self._sources) >= self._max:
            del self._sources[next(iter(self._sources))]
