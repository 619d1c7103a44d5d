# A failed REST answer as a typed error that says what happened and what can be done about
# it. The platform's own `code` decides where it is known (the docs' error table and live
# answers quoted in issue threads); otherwise the HTTP status. The text names the method,
# path, status, code and trace id; never the token (we never see it) nor message content.
"""ApiError and the classification of failed REST answers."""

from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING

from qqproto._errors import LocalProtocolError, QQProtoError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ApiError", "ApiErrorKind", "classify_api_error"]


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
