# What a webhook receiver answers, and the checks of a request's head that every receiver
# and router share. Data and small functions only; the verification is in _webhook.py.
"""The webhook receiver's results, responses and refusals."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Final, Protocol

import orjson

from qqproto._errors import RemoteProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from qqproto._outputs import Event

__all__ = [
    "ACK_BODY",
    "RETRY_BODY",
    "WEBHOOK_MAX_BODY",
    "DeliveryMemory",
    "WebhookOutcome",
    "WebhookRejected",
    "WebhookResponse",
    "WebhookResult",
]

WEBHOOK_MAX_BODY: Final = 1 << 20
"""Largest request body accepted by default: 1 MiB (a callback is a few KB)."""

ACK_BODY: Final = b'{"op":12,"d":0}'
"""The documented acknowledgement: op 12, ``d`` 0 ("received")."""

RETRY_BODY: Final = b'{"op":12,"d":1}'
"""op 12 with ``d`` 1: "failed, send it again"."""

_JSON: Final = ((b"content-type", b"application/json"),)


class DeliveryMemory(Protocol):
    """What a receiver needs of its dedup memory; :class:`~qqproto.SeenIds` is one."""

    def check_and_add(self, key: str, now: float) -> bool:
        """Return True if ``key`` was seen recently; otherwise remember it (at ``now``)."""
        ...


class WebhookOutcome(Enum):
    """What a receiver made of one request (a stable tag for metrics and logs)."""

    DELIVERED = "delivered"
    """A verified, new dispatch: acknowledged, and its event is to be delivered."""
    DUPLICATE = "duplicate"
    """A verified dispatch delivered before (a platform retry): acknowledged, not delivered."""
    VALIDATED = "validated"
    """The console's op 13 callback validation, answered."""
    HEARTBEAT = "heartbeat"
    """A signed op 1, answered with op 11 (only old platform modes send it)."""
    IGNORED = "ignored"
    """A verified payload that carries no event (another or an unknown opcode): acknowledged."""
    QUEUE_FULL = "queue_full"
    """A verified, new dispatch with no room in the application's queue: 503, retry later."""
    REJECTED = "rejected"
    """Refused with a 4xx; :attr:`WebhookResult.error` says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookResponse:
    """The HTTP answer to send: ``status``, ``headers`` (lower-case names) and ``body``.

    ``Content-Length`` is not included; the server frames the body.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = _JSON
    body: bytes = b""


class WebhookRejected(RemoteProtocolError):
    """A webhook request the receiver refused; it maps to one HTTP status.

    Never raised out of :meth:`WebhookReceiver.receive`: it is returned in
    :attr:`WebhookResult.error`. Its text never holds a secret or the body.

    Attributes:
        status: the HTTP status answered (400, 401, 403, 404, 405, 413).
        reason: a short stable tag (``"bad_signature"``, ``"too_large"``, ...).
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookResult:
    """What to answer one request with and what, once answered, to deliver.

    Attributes:
        response: send this to the platform first.
        outcome: what the request was.
        events: then deliver these to the application (a :class:`~qqproto.Dispatch`, or a
            :class:`~qqproto.DuplicateDropped` for a retry), in order.
        app_id: the bot the request was for, when known.
        event_id: the envelope ``id``, when there was one.
        error: why the request was refused (``outcome`` REJECTED), else ``None``.
    """

    response: WebhookResponse
    outcome: WebhookOutcome
    events: tuple[Event, ...] = ()
    app_id: str | None = None
    event_id: str | None = None
    error: WebhookRejected | None = field(default=None, repr=False)


def _reject(status: int, reason: str, message: str, app_id: str | None = None) -> WebhookResult:
    error = WebhookRejected(status, reason, message)
    body = orjson.dumps({"error": reason})
    headers = (*_JSON, (b"allow", b"POST")) if status == 405 else _JSON
    return WebhookResult(
        response=WebhookResponse(status=status, headers=headers, body=body),
        outcome=WebhookOutcome.REJECTED,
        app_id=app_id,
        error=error,
    )


def _text(value: bytes | str) -> str:
    # Header bytes are Latin-1 on the wire (h11 and ASGI hand them over undecoded); decoding
    # that way never fails, and anything non-ASCII then fails the format checks.
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _header_map(headers: Iterable[tuple[bytes | str, bytes | str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in headers:
        out.setdefault(_text(name).lower(), []).append(_text(value))
    return out


def _one(headers: Mapping[str, list[str]], name: str) -> str | None:
    """The header's value, ``None`` when absent; ``""`` when repeated (never valid)."""
    values = headers.get(name)
    if values is None:
        return None
    return values[0].strip() if len(values) == 1 else ""


def _path_only(target: bytes | str) -> str:
    return _text(target).split("?", 1)[0]


def _check_endpoint(
    method: bytes | str,
    path: bytes | str,
    content_length: int | None,
    served: str | None,
    max_body: int,
) -> WebhookResult | None:
    """What a request line and its declared size alone refuse, before any bot is named."""
    if _text(method).upper() != "POST":
        return _reject(405, "method_not_allowed", "only POST is served")
    if served is not None and _path_only(path) != served:
        return _reject(404, "not_found", "not the callback path")
    if content_length is not None and content_length > max_body:
        return _reject(413, "too_large", f"body over {max_body} bytes")
    return None


_ACK: Final = WebhookResponse(status=200, body=ACK_BODY)
_RETRY: Final = WebhookResponse(status=503, body=RETRY_BODY)
