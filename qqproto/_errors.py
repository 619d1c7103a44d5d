# The error hierarchy, in the h11 style.
#
# Two kinds of thing go wrong around a protocol core, and callers must treat them differently:
#
# * LocalProtocolError: the caller misused the API (fed data before a transport was open,
#   started a connection twice, ...). It is *raised*; it is a bug in the caller.
# * RemoteProtocolError: the server (or the network) sent something we cannot accept. The
#   codec raises it; the session layer catches it and turns it into a ProtocolViolation
#   *event* with a documented recovery, so that it never kills the caller's loop.
#
# Neither kind ever carries a secret (client secret, access token) or a raw payload: a
# payload holds user messages, and exception text ends up in logs at any level.
"""Typed errors raised by qqproto."""

from __future__ import annotations

from enum import Enum

__all__ = [
    "FailureKind",
    "InvalidEnvelope",
    "InvalidResponse",
    "InvalidUTF8",
    "LocalProtocolError",
    "MalformedJSON",
    "PayloadTooLarge",
    "ProtocolError",
    "QQProtoError",
    "RemoteProtocolError",
    "UnexpectedPayload",
    "UnknownOpcode",
]


class FailureKind(Enum):
    """What a retry can do about a failed token or gateway request.

    Drivers pass it to :meth:`~qqproto.GatewayConnection.request_failed`; the core decides
    what follows, so every driver reacts to the same failure in the same way.
    """

    TRANSIENT = "transient"
    """Network trouble, a timeout, 429 or 5xx: retry after the backoff."""
    AUTH = "auth"
    """The access token was refused (HTTP 401): fetch a fresh token, then retry."""
    FATAL = "fatal"
    """The credentials are wrong or the bot is gone: stop; retrying cannot help."""


class QQProtoError(Exception):
    """Base class of every exception qqproto raises on purpose.

    Any other exception escaping from qqproto is a bug.
    """


class ProtocolError(QQProtoError):
    """A violation of the gateway protocol, by us or by the peer.

    Not instantiable: raise :class:`LocalProtocolError` or a :class:`RemoteProtocolError`.
    """

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; use LocalProtocolError or a remote error")
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """The caller used the API in a way the protocol or the current state does not allow."""


class RemoteProtocolError(ProtocolError):
    """The server sent something we cannot accept.

    Attributes:
        reason: a short machine-readable tag (``"malformed_json"``, ``"too_large"``, ...),
            stable across versions, for metrics and tests.
    """

    reason = "remote_protocol_error"


class PayloadTooLarge(RemoteProtocolError):
    """A payload was larger than the configured maximum; it was not parsed."""

    reason = "too_large"

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")


class InvalidUTF8(RemoteProtocolError):
    """A ``bytes`` payload (or a ``str`` holding lone surrogates) was not valid UTF-8."""

    reason = "invalid_utf8"


class MalformedJSON(RemoteProtocolError):
    """The payload is not one JSON document (syntax error, NaN/Infinity, nesting too deep)."""

    reason = "malformed_json"


class InvalidEnvelope(RemoteProtocolError):
    """The JSON is valid but not a gateway envelope: not an object, or a field has a wrong type.

    Attributes:
        field: the envelope field at fault (``"op"``, ``"s"``, ``"t"``, ``"id"``), or ``None``
            when the document is not an object at all.
    """

    reason = "invalid_envelope"

    def __init__(self, message: str, *, field: str | None) -> None:
        self.field = field
        super().__init__(message)


class UnknownOpcode(RemoteProtocolError):
    """The envelope names an opcode this library does not know.

    Not fatal: the session layer reports it and skips the payload, because a server may add
    opcodes before we learn about them.
    """

    reason = "unknown_opcode"

    def __init__(self, op: int) -> None:
        self.op = op
        super().__init__(f"unknown opcode {op}")


class UnexpectedPayload(RemoteProtocolError):
    """A well-formed payload that the protocol does not allow in the current state.

    Examples: a dispatch before READY, op 9 before Hello, an opcode only clients send.
    The session layer reports it and skips the payload.
    """

    reason = "unexpected_payload"


class InvalidResponse(RemoteProtocolError):
    """An HTTP API answer (token, gateway URL) did not have the documented shape, or said no.

    Attributes:
        kind: what a retry can do about it.
    """

    reason = "invalid_response"

    def __init__(self, message: str, *, kind: FailureKind = FailureKind.TRANSIENT) -> None:
        self.kind = kind
        super().__init__(message)
