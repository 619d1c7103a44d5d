# What a message says, before it is addressed: the request and body types of the send API,
# built and checked once, so that a retry sends exactly what was prepared. Misuse raises
# LocalProtocolError; nothing here knows who the message is for (see _replies.py).
"""Message bodies and the REST request they go out in."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import orjson

from qqproto._errors import LocalProtocolError
from qqproto._messages import Scene

if TYPE_CHECKING:
    from collections.abc import Sequence

    from qqproto._codec import JSONValue

__all__ = [
    "ApiRequest",
    "InteractionResult",
    "Keyboard",
    "MediaType",
    "MessageBody",
    "UploadedMedia",
]

_ALL_SCENES = frozenset(Scene)
_V2 = frozenset({Scene.C2C, Scene.GROUP})  # the /v2 endpoints: msg_type and msg_seq
_GUILD = frozenset({Scene.CHANNEL, Scene.DIRECT})
_MAX_JSON_DEPTH = 32
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
