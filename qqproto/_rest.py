# The two HTTP answers a gateway session depends on, parsed once, here, for every driver.
#
# The shapes are in docs/protocol.md#endpoints-and-authentication. Two traps: `expires_in`
# arrives as a string ("7200"), and REST errors may come with HTTP 200 and a body `code`.
# Parsing lives in the core so that no driver grows its own slightly different rules.
"""Parsers for the token and gateway-URL HTTP answers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from qqproto._errors import FailureKind, InvalidResponse

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "GatewayInfo",
    "SessionStartLimit",
    "TokenGrant",
    "check_gateway_url",
    "classify_status",
    "parse_expires_in",
    "parse_gateway_response",
    "parse_token_response",
    "read_gateway_answer",
    "read_token_answer",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStartLimit:
    """``session_start_limit`` of ``GET /gateway/bot``.

    Attributes:
        total: sessions that may start per 24 h.
        remaining: sessions that may still start before the reset.
        reset_after: seconds until ``remaining`` resets (the API sends milliseconds).
        max_concurrency: sessions that may start per 5 s window.
    """

    total: int
    remaining: int
    reset_after: float
    max_concurrency: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayInfo:
    """The answer of ``GET /gateway`` (url only) or ``GET /gateway/bot`` (all fields)."""

    url: str
    shards: int | None = None
    session_start_limit: SessionStartLimit | None = None


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """An access token and its remaining life in seconds. The token is never in the repr."""

    token: str = field(repr=False)
    expires_in: float


# Token endpoint error codes (docs/protocol.md#access-token; from a 2026 issue quoting newer docs).
_TOKEN_ERRORS = {
    100001: "too many requests",
    100007: "app id invalid, or the bot is banned or deleted",
    100016: "wrong app id or client secret",
    10004: "the bot does not exist",
}
# Codes no retry can fix: the app id, the secret or the bot itself is wrong.
_FATAL_TOKEN_ERRORS = frozenset({100007, 100016, 10004})


def classify_status(status: int) -> FailureKind:
    """What an HTTP status outside 2xx from the token or gateway endpoint means for a retry.

    401 means the access token was refused (fetch a fresh one); everything else, 429 and
    5xx included, may pass with time. A token endpoint answer that names an error code in
    its body is classified by :func:`parse_token_response` instead, whatever its status.
    """
    return FailureKind.AUTH if status == 401 else FailureKind.TRANSIENT


def check_gateway_url(url: object) -> str:
    """Return ``url`` if a WebSocket can be opened to it: ``ws://`` or ``wss://``, a host,
    a valid port.

    Raises:
        InvalidResponse: anything else (the message never repeats the URL).
    """
    if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
        raise InvalidResponse("gateway url is not a ws:// or wss:// URL")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0-65535
    except ValueError:
        raise InvalidResponse("gateway url has an invalid host or port") from None
    if not parts.hostname or port == 0:
        raise InvalidResponse("gateway url has no host, or port 0")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise InvalidResponse("gateway url holds whitespace or control characters")
    return url


def parse_expires_in(value: object) -> float:
    """Read ``expires_in`` given as an int, a float or a numeric string (``"7200"``).

    Raises:
        InvalidResponse: anything else, or a negative or non-finite number.
    """
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InvalidResponse("'expires_in' is not a number") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond a float's range (10**400)
            raise InvalidResponse("'expires_in' is out of range") from None
    else:
        raise InvalidResponse("'expires_in' is not a number")
    if not math.isfinite(number) or number < 0:
        raise InvalidResponse("'expires_in' is negative or not finite")
    return number


def _int_field(obj: Mapping[str, object], name: str) -> int:
    value = obj.get(name)
    if type(value) is not int:
        raise InvalidResponse(f"'{name}' is missing or not an int")
    return value


def parse_token_response(obj: object) -> TokenGrant:
    """Parse the JSON body of ``POST /app/getAppAccessToken``.

    Raises:
        InvalidResponse: an error ``code``, or no usable ``access_token``/``expires_in``. The
            message names the fields, never their values.
    """
    if not isinstance(obj, dict):
        raise InvalidResponse("token response is not a JSON object")
    code = obj.get("code")
    if code not in (None, 0, "0"):
        # Name the code, never echo the body: its text is the server's, not ours to log.
        meaning = _TOKEN_ERRORS.get(code, "unknown error") if type(code) is int else "error"
        shown = code if type(code) is int else "non-numeric"
        fatal = type(code) is int and code in _FATAL_TOKEN_ERRORS
        kind = FailureKind.FATAL if fatal else FailureKind.TRANSIENT
        raise InvalidResponse(f"token endpoint answered error code {shown} ({meaning})", kind=kind)
    token = obj.get("access_token")
    if not isinstance(token, str) or not token:
        raise InvalidResponse("token response has no 'access_token'")
    return TokenGrant(token, parse_expires_in(obj.get("expires_in")))


def parse_gateway_response(obj: object) -> GatewayInfo:
    """Parse the JSON body of ``GET /gateway`` or ``GET /gateway/bot``.

    Raises:
        InvalidResponse: no ``url``, or a ``session_start_limit`` of the wrong shape.
    """
    if not isinstance(obj, dict):
        raise InvalidResponse("gateway response is not a JSON object")
    url = check_gateway_url(obj.get("url"))
    shards = obj.get("shards")
    if shards is not None and (type(shards) is not int or shards < 1):
        raise InvalidResponse("'shards' is not a positive int")
    raw_limit = obj.get("session_start_limit")
    limit = None
    if raw_limit is not None:
        if not isinstance(raw_limit, dict):
            raise InvalidResponse("'session_start_limit' is not an object")
        limit = SessionStartLimit(
            total=_int_field(raw_limit, "total"),
            remaining=_int_field(raw_limit, "remaining"),
            reset_after=_int_field(raw_limit, "reset_after") / 1000.0,
            max_concurrency=max(1, _int_field(raw_limit, "max_concurrency")),
        )
    return GatewayInfo(url=url, shards=shards, session_start_limit=limit)


def read_token_answer(status: int, body: object) -> TokenGrant:
    """The token endpoint's whole answer: its HTTP status and its body parsed as JSON.

    Args:
        status: the HTTP status.
        body: the body parsed as JSON, or ``None`` when it was empty or not JSON.

    Raises:
        InvalidResponse: the endpoint said no, or said it in the wrong shape. Its ``kind``
            tells :meth:`~qqproto.GatewayConnection.request_failed` what follows. An error
            ``code`` in the body decides, whatever the status (a wrong secret comes with 401
            and with 200 alike): 100016 and its kin are ``FATAL``. Otherwise a status
            outside 2xx is :func:`classify_status`'s, and a bad body ``TRANSIENT``.
    """
    if not 200 <= status < 300:
        if isinstance(body, dict) and body.get("code") is not None:
            parse_token_response(body)  # raises, with the code's kind
        raise InvalidResponse(f"HTTP {status}", kind=classify_status(status))
    return parse_token_response(body)


def read_gateway_answer(status: int, body: object) -> GatewayInfo:
    """``/gateway/bot``'s (or ``/gateway``'s) whole answer, as :func:`read_token_answer`.

    Raises:
        InvalidResponse: a status outside 2xx (401 is ``AUTH``: fetch a fresh token), or a
            body without a usable ``url``.
    """
    if not 200 <= status < 300:
        raise InvalidResponse(f"HTTP {status}", kind=classify_status(status))
    return parse_gateway_response(body)
