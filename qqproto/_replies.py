# Replying to messages, and sending the replies safely: sans-IO, like the gateway core.
#
# Three parts, each usable alone:
#
# * Replies: the platform's passive-reply rules. Given a message (or an interaction) and
#   `now`, it says where the reply goes, which msg_id/event_id and msg_seq it carries, or why
#   the platform would refuse it (the reply window closed, the message's replies used up).
#   State: per replied-to id, the replies used and the next msg_seq; bounded.
# * Outbox: the send policy. It paces sends per guild channel (5 a second is documented),
#   retries 429, 5xx and connection failures with full-jitter backoff honouring Retry-After,
#   and never makes a retry that could deliver a message twice.
# * classify_api_error: an HTTP answer as a typed ApiError.
#
# Exactly once. A reply in C2C or a group carries msg_id + msg_seq, and the platform refuses
# a second send of the same pair (code 40054005). A retry re-sends the very same request, so
# after an answer that never came it is either the first delivery or a refused duplicate;
# the Outbox counts the latter as delivered. Guild channels and DMs document no msg_seq: there
# a retry is only made when the first try surely did not reach the platform (a 429, or a
# connection that failed before the request was written).
#
# Two clocks, never mixed. The reply window is the platform's, counted from the message's own
# timestamp, so Replies takes `now` as Unix time (time.time()). The Outbox paces and waits, so
# it takes `now` on the caller's monotonic clock, like GatewayConnection. What one hands the
# other is a duration: Send.window_left.
#
# Errors, as in the core: misuse raises LocalProtocolError; a reply the platform would refuse
# raises ReplyRefused; a platform answer becomes an ApiError, whose text never holds the
# token (we never see it) nor message content.
"""Passive replies, message bodies, REST error classification and a safe send policy."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, cast
from urllib.parse import quote

import orjson

from qqproto._backoff import full_jitter_delay
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
    import random
    from collections.abc import Sequence

    from qqproto._codec import JSONValue

__all__ = [
    "ApiError",
    "ApiErrorKind",
    "ApiRequest",
    "InteractionResult",
    "Keyboard",
    "MediaType",
    "MessageBody",
    "Outbox",
    "RefusalReason",
    "Replies",
    "ReplyLimits",
    "ReplyRefused",
    "Send",
    "SendConfig",
    "SendDelivered",
    "SendFailed",
    "Transmit",
    "UploadedMedia",
    "acknowledge_interaction",
    "classify_api_error",
    "read_upload",
    "upload_media",
]

_ALL_SCENES = frozenset(Scene)
_V2 = frozenset({Scene.C2C, Scene.GROUP})  # the /v2 endpoints: msg_type and msg_seq
_GUILD = frozenset({Scene.CHANNEL, Scene.DIRECT})
_MAX_JSON_DEPTH = 32
# A `now` below this (September 2001) is a monotonic clock, not Unix time.
_UNIX_TIME_FLOOR = 1e9
_MAX_TIME = float(2**40)


def _number(name: str, value: object, *, low: float = 0.0) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise LocalProtocolError(f"{name} must be a finite number")
    if not low <= value <= _MAX_TIME:
        raise LocalProtocolError(f"{name} must be between {low:g} and 2**40")
    return float(value)


def _text(name: str, value: object) -> str:
    # Takes `object`, so that checking an argument annotated `str` is not "always true".
    if type(value) is not str or not value:
        raise LocalProtocolError(f"{name} must be a non-empty string")
    return value


def _member(enum: type[IntEnum], value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return int(enum(value))
        except ValueError:
            pass
    raise LocalProtocolError(f"not a {enum.__name__}: {value!r}")


def _json(value: object, depth: int = 0) -> JSONValue:
    # Copy what the caller gave, checking that it is JSON: a body is built once and may be
    # sent again on a retry, so it must not change under us, and must encode.
    if depth > _MAX_JSON_DEPTH:
        raise LocalProtocolError("body nests too deep")
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:  # what orjson can encode
            raise LocalProtocolError("body holds an integer beyond 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LocalProtocolError("body holds a NaN or infinite number")
        return value
    if isinstance(value, Mapping):
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise LocalProtocolError("body object keys must be strings")
            out[key] = _json(item, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_json(item, depth + 1) for item in value]
    raise LocalProtocolError(f"body holds a {type(value).__name__}, which is not JSON")


# ------------------------------------------------------------------------- requests, bodies


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiRequest:
    """One REST call for the driver to make, against the API base URL
    (``https://api.sgroup.qq.com``, or the sandbox), with ``Authorization: QQBot <token>``.

    Attributes:
        method: ``"POST"`` or ``"PUT"``.
        path: the path, ids percent-encoded, e.g. ``"/v2/groups/ABC/messages"``.
        body: the JSON body; not in the repr (message content).
    """

    method: str
    path: str
    body: Mapping[str, JSONValue] = field(repr=False)

    def encode(self) -> bytes:
        """The body as UTF-8 JSON, ready to send with ``Content-Type: application/json``."""
        return orjson.dumps(self.body)


@dataclass(frozen=True, slots=True, kw_only=True)
class Keyboard:
    """Buttons under a markdown message (``keyboard`` of the send API).

    Build one with :meth:`template` or :meth:`rows`.

    Attributes:
        payload: the ``keyboard`` object sent.
    """

    payload: Mapping[str, JSONValue] = field(repr=False)

    @classmethod
    def template(cls, template_id: str) -> Keyboard:
        """A keyboard template approved on the platform.

        Args:
            template_id: the template's id.
        """
        return cls(payload={"id": _text("template_id", template_id)})

    @classmethod
    def rows(cls, rows: Sequence[Sequence[Mapping[str, JSONValue]]]) -> Keyboard:
        """A custom keyboard: at most 5 rows of at most 5 buttons (the documented limits).

        Args:
            rows: the rows, each a sequence of button objects as documented
                (``{"id", "render_data": {...}, "action": {...}}``).

        Raises:
            LocalProtocolError: no rows, too many, or a button that is not a JSON object.
        """
        if (
            isinstance(rows, str | Mapping)
            or not rows
            or len(rows) > 5
            or any(isinstance(row, str | Mapping) or not row or len(row) > 5 for row in rows)
        ):
            raise LocalProtocolError("a keyboard has 1 to 5 rows of 1 to 5 buttons")
        out: list[JSONValue] = []
        for row in rows:
            buttons = [_json(button) for button in row]
            if not all(isinstance(button, dict) for button in buttons):
                raise LocalProtocolError("each button must be an object")
            out.append({"buttons": buttons})
        return cls(payload={"content": {"rows": out}})


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadedMedia:
    """A file uploaded for a rich-media message, from the answer to :func:`upload_media`.

    Attributes:
        file_info: what :meth:`MessageBody.media` sends; usable in the scene it was uploaded
            for (C2C or group) only, and only until ``ttl`` runs out.
        file_uuid: the file's id, if sent.
        ttl: seconds until ``file_info`` expires; 0 means it does not.
    """

    file_info: str = field(repr=False)
    file_uuid: str | None
    ttl: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageBody:
    """What a message says, before it is addressed. Build one with a class method.

    Attributes:
        msg_type: the ``msg_type`` of the send API: 0 text, 2 markdown, 3 ark, 4 embed,
            7 media.
        fields: the body fields; not in the repr (message content).
        scenes: where the platform accepts this kind of body.
    """

    msg_type: int
    fields: Mapping[str, JSONValue] = field(repr=False)
    scenes: frozenset[Scene]

    @classmethod
    def text(cls, content: str) -> MessageBody:
        """Plain text, in every scene.

        Args:
            content: the text; not empty (the platform refuses an empty message).
        """
        return cls(msg_type=0, fields={"content": _text("content", content)}, scenes=_ALL_SCENES)

    @classmethod
    def markdown(cls, content: str, *, keyboard: Keyboard | None = None) -> MessageBody:
        """Markdown, optionally with buttons, in every scene (the bot needs the permission).

        Args:
            content: the markdown text.
            keyboard: buttons to show under it.
        """
        fields: dict[str, JSONValue] = {"markdown": {"content": _text("content", content)}}
        if keyboard is not None:
            if not isinstance(keyboard, Keyboard):
                raise LocalProtocolError("keyboard must be a Keyboard")
            fields["keyboard"] = dict(keyboard.payload)
        return cls(msg_type=2, fields=fields, scenes=_ALL_SCENES)

    @classmethod
    def ark(
        cls, template_id: int, kv: Mapping[str, str | Sequence[Mapping[str, str]]]
    ) -> MessageBody:
        """An ark (template card) message, in every scene.

        Args:
            template_id: the ark template's id.
            kv: the template's variables: a string value, or a list of objects for a list
                variable (sent as ``obj`` of ``obj_kv`` pairs).
        """
        if type(template_id) is not int or not isinstance(kv, Mapping):
            raise LocalProtocolError("template_id must be an int and kv a mapping")
        pairs: list[JSONValue] = []
        for key, value in kv.items():
            if not isinstance(key, str):
                raise LocalProtocolError("kv keys must be strings")
            if isinstance(value, str):
                pairs.append({"key": key, "value": value})
                continue
            if isinstance(value, Mapping) or not all(isinstance(i, Mapping) for i in value):
                raise LocalProtocolError("a list variable must be a sequence of mappings")
            objs: list[JSONValue] = [
                {"obj_kv": [{"key": k, "value": v} for k, v in item.items()]} for item in value
            ]
            pairs.append({"key": key, "obj": objs})
        ark = _json({"template_id": template_id, "kv": pairs})
        return cls(msg_type=3, fields={"ark": ark}, scenes=_ALL_SCENES)

    @classmethod
    def embed(
        cls,
        title: str,
        *,
        prompt: str | None = None,
        lines: Sequence[str] = (),
        thumbnail_url: str | None = None,
    ) -> MessageBody:
        """An embed, in guild channels and guild DMs only (C2C and groups have none).

        Args:
            title: the title.
            prompt: the text of the notification and of the message list.
            lines: the embed's fields, one line each.
            thumbnail_url: a thumbnail image.
        """
        if isinstance(lines, str) or not all(type(n) is str for n in lines):
            raise LocalProtocolError("lines must be a sequence of strings")
        embed: dict[str, JSONValue] = {
            "title": _text("title", title),
            "fields": [{"name": n} for n in lines],
        }
        if prompt is not None:
            embed["prompt"] = prompt
        if thumbnail_url is not None:
            embed["thumbnail"] = {"url": thumbnail_url}
        return cls(msg_type=4, fields={"embed": _json(embed)}, scenes=_GUILD)

    @classmethod
    def media(cls, file_info: str | UploadedMedia, *, content: str = " ") -> MessageBody:
        """An image, video or voice uploaded with :func:`upload_media`; C2C and groups only.

        Args:
            file_info: the upload's ``file_info`` (or the :class:`UploadedMedia`).
            content: text sent along; the docs ask for a value here, a space by default.
        """
        info = file_info.file_info if isinstance(file_info, UploadedMedia) else file_info
        fields: dict[str, JSONValue] = {
            "media": {"file_info": _text("file_info", info)},
            "content": _text("content", content),
        }
        return cls(msg_type=7, fields=fields, scenes=_V2)


class MediaType(IntEnum):
    """``file_type`` of an upload."""

    IMAGE = 1
    """png or jpg."""
    VIDEO = 2
    """mp4."""
    VOICE = 3
    """silk."""
    FILE = 4
    """Documented as not open yet."""


class InteractionResult(IntEnum):
    """The ``code`` that acknowledges an interaction; the user's client shows it."""

    SUCCESS = 0
    """The action succeeded."""
    FAILED = 1
    """The action failed."""
    TOO_FREQUENT = 2
    """Clicked too often."""
    DUPLICATE = 3
    """Done already."""
    NO_PERMISSION = 4
    """The user may not do this."""
    ADMIN_ONLY = 5
    """Only an admin may do this."""


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


# ------------------------------------------------------------------------------ errors


class ApiErrorKind(Enum):
    """What a failed REST call means, and so what can be done about it."""

    RATE_LIMITED = "rate_limited"
    """Too fast (HTTP 429, or a rate-limit code): retry later."""
    AUTH = "auth"
    """The access token was refused (HTTP 401, or a token code): fetch a fresh one."""
    FORBIDDEN = "forbidden"
    """No permission: the bot lacks it, is muted or banned, is not in the group, or the user
    refuses its messages. Retrying cannot help."""
    NOT_FOUND = "not_found"
    """No such endpoint, channel, guild or DM session (HTTP 404/405, or a code)."""
    DUPLICATE = "duplicate"
    """The same ``msg_id`` + ``msg_seq`` was sent before (code 40054005)."""
    REPLY_EXPIRED = "reply_expired"
    """The replied-to message or event is past its window, or out of replies."""
    INVALID_REQUEST = "invalid_request"
    """Anything else the platform refused (other 4xx): retrying cannot help."""
    SERVER = "server"
    """The platform failed (5xx, or a code that asks for a retry)."""


_K = ApiErrorKind
# Platform codes, from the docs' error table (openapi/error/error.md), the send page
# (send.md: 22009, 304082/3), botgo's errs/err.go (11244), the v2 send API pages of 2026
# (autogen/api/v2_*_messages.post.html: the 4003xxxx/4005xxxx codes, 304103, 5005500x) and
# issue threads quoting live answers (40054005: langbot-app/LangBot#2290; 40034024:
# AstrBotDevs/AstrBot#6931; 40034102: tencent-connect/openclaw-qqbot#52).
_CODES: dict[int, tuple[ApiErrorKind, str]] = {
    10003: (_K.NOT_FOUND, "unknown channel"),
    10004: (_K.NOT_FOUND, "unknown guild"),
    11241: (_K.AUTH, "no access token"),
    11242: (_K.SERVER, "token check failed (retry once)"),
    11243: (_K.AUTH, "access token refused"),
    11244: (_K.AUTH, "access token expired or unknown"),
    11252: (_K.SERVER, "permission check failed (retry once)"),
    11253: (_K.FORBIDDEN, "the bot may not call this API"),
    11254: (_K.FORBIDDEN, "this API is blocked for the bot"),
    11263: (_K.SERVER, "guild permission check failed (retry once)"),
    11264: (_K.FORBIDDEN, "the guild has not granted this API"),
    11265: (_K.FORBIDDEN, "the bot is banned"),
    11281: (_K.SERVER, "admin check failed (retry once)"),
    11282: (_K.FORBIDDEN, "this API needs admin rights"),
    20028: (_K.RATE_LIMITED, "channel message rate limit"),
    22009: (_K.RATE_LIMITED, "message rate limit"),
    304027: (_K.REPLY_EXPIRED, "the replied-to message has expired"),
    304031: (_K.FORBIDDEN, "direct messages are closed"),
    304032: (_K.NOT_FOUND, "no such direct-message session"),
    304034: (_K.FORBIDDEN, "not a member of the direct-message session"),
    304082: (_K.SERVER, "fetching the rich media failed"),
    304083: (_K.SERVER, "converting the rich media failed"),
    304103: (_K.REPLY_EXPIRED, "the message id has expired"),
    1100308: (_K.RATE_LIMITED, "channel rate limit"),
    40034005: (_K.REPLY_EXPIRED, "the replied-to msg_id has expired"),
    40034024: (_K.INVALID_REQUEST, "msg_id invalid or not the bot's to reply to"),
    40034025: (_K.INVALID_REQUEST, "event_id invalid"),
    40034026: (_K.REPLY_EXPIRED, "the replied-to event_id has expired"),
    40034101: (_K.FORBIDDEN, "the bot is not a member of the group"),
    40034102: (_K.FORBIDDEN, "proactive messages not permitted"),
    40034105: (_K.FORBIDDEN, "proactive messages not permitted"),
    40034128: (_K.REPLY_EXPIRED, "passive reply window or count exceeded"),
    40054002: (_K.FORBIDDEN, "the bot is muted"),
    40054003: (_K.FORBIDDEN, "the bot is not a member of the group"),
    40054005: (_K.DUPLICATE, "msg_id + msg_seq already sent"),
    40054013: (_K.FORBIDDEN, "the user refuses the bot's messages"),
    50055001: (_K.SERVER, "sending failed, retry later"),
    50055002: (_K.SERVER, "sending failed, retry later"),
}
# "A system error; one retry usually fixes it; retry at most once" (the docs' error table).
_RETRY_ONCE = frozenset({11242, 11252, 11263, 11281})
# 2xx with these codes: accepted, held for a human review (post_messages.md).
_AUDIT_CODES = frozenset({304023, 304024})
_MAX_RETRY_AFTER = 86_400.0


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is None:  # a plain dict: look case-insensitively
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value if isinstance(value, str) else None


def _body_code(body: object) -> int | None:
    if not isinstance(body, dict):
        return None
    for name in ("code", "err_code"):  # answers carry one or both
        code = body.get(name)
        if type(code) is int:
            return code
    return None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    # Seconds only: an HTTP date would need the wall clock (and QQ was not seen sending one).
    value = _header(headers, "retry-after")
    try:
        seconds = float(value.strip()) if value is not None else math.nan
    except ValueError:
        return None
    return min(seconds, _MAX_RETRY_AFTER) if seconds >= 0 else None


class ApiError(QQProtoError):
    """A REST call the platform answered with an error.

    Its text names the method, path, status, code and what the code means, and the trace id
    to quote to the platform's support; never the token, never the body. The platform's own
    ``message`` is kept apart: the platform says not to judge errors by it.

    Attributes:
        kind: what it means, as an :class:`ApiErrorKind`.
        status: the HTTP status.
        code: the platform's ``code`` (or ``err_code``), or ``None``.
        message: the platform's ``message``, or ``None``.
        trace_id: the ``X-Tps-trace-ID`` header (or the body's ``trace_id``), or ``None``.
        method: the request's method.
        path: the request's path.
        retry_after: the ``Retry-After`` header in seconds, or ``None``.
        maybe_delivered: set by the :class:`Outbox` when it gives up: an earlier try of
            the send may have reached the user all the same (a 5xx to a send that cannot
            be retried). ``False`` otherwise.
    """

    def __init__(
        self,
        *,
        kind: ApiErrorKind,
        status: int,
        code: int | None,
        message: str | None,
        trace_id: str | None,
        method: str,
        path: str,
        retry_after: float | None = None,
    ) -> None:
        self.kind = kind
        self.status = status
        self.code = code
        self.message = message
        self.trace_id = trace_id
        self.method = method
        self.path = path
        self.retry_after = retry_after
        self.maybe_delivered = False
        meaning = _CODES[code][1] if code in _CODES else kind.value.replace("_", " ")
        text = f"{method} {path}: HTTP {status}, code {code} ({meaning})"
        super().__init__(text + (f", trace id {trace_id}" if trace_id else ""))

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (rate limits, platform failures)."""
        return self.kind in (ApiErrorKind.RATE_LIMITED, ApiErrorKind.SERVER)


def classify_api_error(
    status: int,
    body: object,
    headers: Mapping[str, str] | None = None,
    *,
    method: str,
    path: str,
) -> ApiError:
    """Classify a failed REST answer.

    A known platform code decides; otherwise the status does: 401 auth, 403 forbidden,
    404/405 not found, 429 rate limited, 5xx server, anything else an invalid request.

    Args:
        status: the HTTP status.
        body: the body parsed as JSON, or ``None`` when it was empty or not JSON.
        headers: the response headers (any mapping; looked up case-insensitively).
        method: the request's method, for the error's text.
        path: the request's path, for the error's text.
    """
    if type(status) is not int:
        raise LocalProtocolError("status must be an int")
    code = _body_code(body)
    message = body.get("message") if isinstance(body, dict) else None
    trace = _header(headers, "x-tps-trace-id")
    if trace is None and isinstance(body, dict):
        found = body.get("trace_id")
        trace = found if isinstance(found, str) else None
    if code in _CODES:
        kind = _CODES[code][0]
    elif status == 401:
        kind = ApiErrorKind.AUTH
    elif status == 403:
        kind = ApiErrorKind.FORBIDDEN
    elif status in (404, 405):
        kind = ApiErrorKind.NOT_FOUND
    elif status == 429:
        kind = ApiErrorKind.RATE_LIMITED
    elif status >= 500:
        kind = ApiErrorKind.SERVER
    else:
        kind = ApiErrorKind.INVALID_REQUEST
    return ApiError(
        kind=kind,
        status=status,
        code=code,
        message=message if isinstance(message, str) else None,
        trace_id=trace,
        method=method,
        path=path,
        retry_after=_retry_after(headers),
    )


# ------------------------------------------------------------------------------ outbox


@dataclass(frozen=True, slots=True, kw_only=True)
class SendConfig:
    """How the :class:`Outbox` retries and paces.

    Attributes:
        max_attempts: tries per send, the first included.
        backoff_base: the first retry's backoff window, in seconds (full jitter).
        backoff_cap: the largest backoff window.
        max_elapsed: seconds after ``start`` past which no retry is made.
        channel_limit: sends per ``channel_period`` to one guild channel (the documented 5 a
            second), or ``None`` for no pacing.
        channel_period: the pacing window, in seconds.
    """

    max_attempts: int = 4
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    max_elapsed: float = 120.0
    channel_limit: int | None = 5
    channel_period: float = 1.0

    def __post_init__(self) -> None:
        if type(self.max_attempts) is not int or self.max_attempts < 1:
            raise LocalProtocolError("max_attempts must be a positive int")
        if self.channel_limit is not None and (
            type(self.channel_limit) is not int or self.channel_limit < 1
        ):
            raise LocalProtocolError("channel_limit must be a positive int or None")
        for name in ("backoff_base", "backoff_cap", "max_elapsed", "channel_period"):
            _number(name, getattr(self, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class Transmit:
    """Make ``request`` at time ``at``, then report with ``answered`` or ``unanswered``.

    Attributes:
        ticket: the send this attempt belongs to.
        attempt: 1 for the first try, 2 for the first retry, ...
        request: the call; a retry repeats it byte for byte (same ``msg_seq``).
        at: when to make it, on the caller's monotonic clock (now, or later when paced or
            backing off).
        refresh_token: fetch a fresh access token first (the last one was refused).
    """

    ticket: int
    attempt: int
    request: ApiRequest
    at: float
    refresh_token: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SendDelivered:
    """The platform has the message.

    Attributes:
        ticket: the send.
        attempts: tries made.
        response: the answer's body (the message id, ...); ``None`` when known only from a
            refused duplicate. Not in the repr.
        duplicate: a retry was refused as a duplicate: an earlier try had got through.
        under_review: the platform holds the message for a human review before showing it
            (codes 304023/304024); the ``MESSAGE_AUDIT_*`` events tell the verdict.
        audit_id: the review's id, when ``under_review`` and the answer named one.
    """

    ticket: int
    attempts: int
    response: JSONValue = field(repr=False)
    duplicate: bool = False
    under_review: bool = False
    audit_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SendFailed:
    """The Outbox gave up on a send.

    Attributes:
        ticket: the send.
        attempts: tries made.
        reason: why, in words.
        error: the platform's last answer, or ``None`` (no answer came).
        maybe_delivered: a try may have reached the user (an answer that never came, or a
            5xx): do not :meth:`Replies.cancel` it, and expect that the user may have it.
    """

    ticket: int
    attempts: int
    reason: str
    error: ApiError | None
    maybe_delivered: bool


@dataclass(slots=True)
class _Ticket:
    send: Send
    deadline: float
    attempt: int = 0  # Transmits handed out so far
    failures: int = 0
    maybe_delivered: bool = False
    refreshed: bool = False
    retried_codes: set[int] = field(default_factory=set)


class _Pacer:
    """At most `limit` sends in any `period` seconds per key, as a sorted list of slots."""

    def __init__(self, limit: int, period: float, max_keys: int = 10_000) -> None:
        self._limit = limit
        self._period = period
        self._max_keys = max_keys
        self._slots: dict[str, list[float]] = {}

    def reserve(self, key: str, earliest: float, now: float) -> float:
        if len(self._slots) >= self._max_keys:
            for k in list(self._slots):
                self._prune(k, now)
        elif key in self._slots:
            self._prune(key, now)
        times = self._slots.setdefault(key, [])
        # The first slot that fits is `earliest`, or where a reserved slot's period ends, or
        # at a reserved slot (passing one changes which others share a period with it).
        later = (c for s in times for c in (s, s + self._period) if c > earliest)
        for at in sorted({earliest, *later}):
            if self._fits(times, at):
                insort(times, at)
                return at
        raise AssertionError("unreachable: a period after the last slot always fits")

    def release(self, key: str, at: float) -> None:
        times = self._slots.get(key)
        if times:
            i = bisect_left(times, at)
            if i < len(times) and times[i] == at:
                del times[i]

    def _fits(self, times: list[float], at: float) -> bool:
        # Any `limit + 1` consecutive slots must span at least a period; only the spans that
        # hold the new one can break.
        n = self._limit
        i = bisect_right(times, at)
        near = [*times[max(0, i - n) : i], at, *times[i : i + n]]
        # Added, not subtracted: a candidate is `slot + period`, computed the same way.
        return all(near[j + n] >= near[j] + self._period for j in range(len(near) - n))

    def _prune(self, key: str, now: float) -> None:
        # Slots a period before `now` cannot share a period with any slot from `now` on.
        times = self._slots[key]
        del times[: bisect_right(times, now - self._period)]
        if not times:
            del self._slots[key]


class Outbox:
    """The send policy: pacing, retries and outcomes, for any number of sends at once.

    Verbs: :meth:`start` a :class:`Send`; make each :class:`Transmit` at its ``at`` and
    report it with :meth:`answered` (any HTTP answer) or :meth:`unanswered` (no answer);
    each report gives the next ``Transmit`` or the outcome, :class:`SendDelivered` or
    :class:`SendFailed`. Times are on the caller's monotonic clock.

    Retried: HTTP 429 and rate-limit codes (after ``Retry-After`` when sent, and the
    backoff), 5xx and codes asking for a retry, connection failures; an auth failure once,
    with ``refresh_token``. Not retried: other 4xx, and anything that could deliver twice.

    Args:
        config: retries and pacing; defaults to ``SendConfig()``.
        rng: the random source for the backoff jitter.
    """

    def __init__(self, config: SendConfig | None = None, *, rng: random.Random) -> None:
        if config is not None and not isinstance(config, SendConfig):
            raise LocalProtocolError("config must be a SendConfig")
        self._config = config or SendConfig()
        self._rng = rng
        self._tickets: dict[int, _Ticket] = {}
        self._next_ticket = 1
        limit = self._config.channel_limit
        self._pacer = _Pacer(limit, self._config.channel_period) if limit is not None else None

    @property
    def in_flight(self) -> int:
        """How many sends are started and not yet delivered, failed or abandoned."""
        return len(self._tickets)

    def start(self, send: Send, now: float) -> Transmit | SendFailed:
        """Begin a send.

        Args:
            send: from :meth:`Replies.prepare`, :func:`upload_media` or
                :func:`acknowledge_interaction`.
            now: the caller's monotonic clock.

        Returns:
            Its first :class:`Transmit`; a :class:`SendFailed` (0 attempts) when pacing would
            push it past its reply window.
        """
        if not isinstance(send, Send):
            raise LocalProtocolError("start a Send")
        now = _number("now", now)
        deadline = now + self._config.max_elapsed
        if send.window_left is not None:
            deadline = min(deadline, now + max(0.0, send.window_left))
        ticket = self._next_ticket
        self._next_ticket += 1
        t = self._tickets[ticket] = _Ticket(send=send, deadline=deadline, attempt=0)
        return self._schedule(ticket, t, now, now, refresh=False, error=None)

    def answered(
        self,
        transmit: Transmit,
        now: float,
        *,
        status: int,
        body: object,
        headers: Mapping[str, str] | None = None,
    ) -> Transmit | SendDelivered | SendFailed:
        """Report the answer to a :class:`Transmit`.

        Args:
            transmit: the attempt that was made.
            now: the caller's monotonic clock.
            status: the HTTP status.
            body: the body parsed as JSON, or ``None`` when empty or not JSON.
            headers: the response headers.
        """
        t = self._current(transmit)
        now = _number("now", now)
        if type(status) is not int or not 100 <= status <= 599:
            raise LocalProtocolError("status must be an int HTTP status")
        code = _body_code(body)
        if 200 <= status < 300 and code in (None, 0):
            # The body came from a JSON parser, by contract.
            return self._delivered(transmit.ticket, t, cast("JSONValue", body))
        if 200 <= status < 300 and code in _AUDIT_CODES and isinstance(body, dict):
            data = body.get("data")
            review = data.get("message_audit") if isinstance(data, dict) else None
            found = review.get("audit_id") if isinstance(review, dict) else None
            audit = found if isinstance(found, str) else None
            review_body = cast("JSONValue", body)
            return self._delivered(
                transmit.ticket, t, review_body, under_review=True, audit_id=audit
            )
        request = t.send.request
        error = classify_api_error(status, body, headers, method=request.method, path=request.path)
        return self._after_error(transmit.ticket, t, error, now)

    def unanswered(self, transmit: Transmit, now: float, *, sent: bool) -> Transmit | SendFailed:
        """Report a :class:`Transmit` that got no answer (refused connection, reset, timeout).

        Args:
            transmit: the attempt.
            now: the caller's monotonic clock.
            sent: whether the request may have been written out. ``False`` only when it
                surely was not (the connection failed before): then any send may retry.
        """
        t = self._current(transmit)
        now = _number("now", now)
        if type(sent) is not bool:
            raise LocalProtocolError("sent must be a bool")
        if sent:
            t.maybe_delivered = True
            if not t.send.retry_safe:
                reason = "no answer came, and a retry could deliver it twice"
                return self._fail(transmit.ticket, t, reason, None)
        t.failures += 1
        return self._retry(transmit.ticket, t, now, self._backoff(t), error=None)

    def abandon(self, transmit: Transmit) -> None:
        """Forget a send (the caller gave it up); later reports about it are refused."""
        self._current(transmit)
        del self._tickets[transmit.ticket]

    # ------------------------------------------------------------------------ internals

    def _current(self, transmit: object) -> _Ticket:
        if not isinstance(transmit, Transmit):
            raise LocalProtocolError("report a Transmit from this Outbox")
        t = self._tickets.get(transmit.ticket)
        if t is None:
            raise LocalProtocolError("this send is finished, abandoned or not from here")
        if transmit.attempt != t.attempt:
            raise LocalProtocolError("this attempt was reported already")
        return t

    def _after_error(
        self, ticket: int, t: _Ticket, error: ApiError, now: float
    ) -> Transmit | SendDelivered | SendFailed:
        kind = error.kind
        if kind is ApiErrorKind.DUPLICATE:
            # Only a duplicate of a try that may have got through is that try's delivery;
            # otherwise the pair was used before (a replayed message, a restart).
            if t.maybe_delivered:
                return self._delivered(ticket, t, None, duplicate=True)
            return self._fail(ticket, t, "the platform has a message with this msg_seq", error)
        if kind is ApiErrorKind.AUTH and not t.refreshed:
            t.refreshed = True
            return self._retry(ticket, t, now, 0.0, error=error, refresh=True)
        if kind is ApiErrorKind.RATE_LIMITED:
            # Refused before it was processed: a retry is safe whatever the send.
            t.failures += 1
            delay = max(error.retry_after or 0.0, self._backoff(t))
            return self._retry(ticket, t, now, delay, error=error)
        if kind is ApiErrorKind.SERVER:
            if error.code is not None and error.code in _RETRY_ONCE:
                # A check that failed before the send was processed.
                if error.code in t.retried_codes:
                    return self._fail(ticket, t, "retried once, as the docs allow", error)
                t.retried_codes.add(error.code)
            else:
                t.maybe_delivered = True
                if not t.send.retry_safe:
                    return self._fail(ticket, t, "a retry could deliver it twice", error)
            t.failures += 1
            return self._retry(ticket, t, now, self._backoff(t), error=error)
        return self._fail(ticket, t, f"the platform refused it ({kind.value})", error)

    def _backoff(self, t: _Ticket) -> float:
        c = self._config
        return full_jitter_delay(t.failures, self._rng, base=c.backoff_base, cap=c.backoff_cap)

    def _retry(
        self,
        ticket: int,
        t: _Ticket,
        now: float,
        delay: float,
        *,
        error: ApiError | None,
        refresh: bool = False,
    ) -> Transmit | SendFailed:
        if t.attempt >= self._config.max_attempts:
            return self._fail(ticket, t, f"gave up after {t.attempt} attempts", error)
        return self._schedule(ticket, t, now, now + delay, refresh=refresh, error=error)

    def _schedule(
        self,
        ticket: int,
        t: _Ticket,
        now: float,
        earliest: float,
        *,
        refresh: bool,
        error: ApiError | None,
    ) -> Transmit | SendFailed:
        key, pacer = t.send.pace_key, self._pacer
        at = pacer.reserve(key, earliest, now) if key and pacer else earliest
        if at > t.deadline:
            if key and pacer:
                pacer.release(key, at)
            return self._fail(ticket, t, "no time left before the deadline or reply window", error)
        t.attempt += 1
        return Transmit(
            ticket=ticket, attempt=t.attempt, request=t.send.request, at=at, refresh_token=refresh
        )

    def _delivered(
        self,
        ticket: int,
        t: _Ticket,
        body: JSONValue,
        *,
        duplicate: bool = False,
        under_review: bool = False,
        audit_id: str | None = None,
    ) -> SendDelivered:
        del self._tickets[ticket]
        return SendDelivered(
            ticket=ticket,
            attempts=t.attempt,
            response=body,
            duplicate=duplicate,
            under_review=under_review,
            audit_id=audit_id,
        )

    def _fail(self, ticket: int, t: _Ticket, reason: str, error: ApiError | None) -> SendFailed:
        del self._tickets[ticket]
        if error is not None:
            error.maybe_delivered = t.maybe_delivered
        return SendFailed(
            ticket=ticket,
            attempts=t.attempt,
            reason=reason,
            error=error,
            maybe_delivered=t.maybe_delivered,
        )
