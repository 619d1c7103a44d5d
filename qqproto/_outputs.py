# What the core produces: commands for the driver and events for the application.
#
# Both are small frozen slotted dataclasses (h11/wsproto style), pulled by the caller with
# `GatewayConnection.drain()`. Commands are orders: the driver executes each one, in order.
# Events are facts: the application reads them; the driver may log them.
#
# Secrets never appear in a repr: `SendPayload.text` holds the token for Identify/Resume, so
# it is kept out of repr; dispatch data holds user messages, so it is kept out too (and a
# 1000-deep `d` would otherwise break repr, see _codec.py).
"""Commands (for the driver) and events (for the application) emitted by the core."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias, cast

if TYPE_CHECKING:
    from qqproto._close_codes import NextStep
    from qqproto._codec import JSONValue, Opcode
    from qqproto._errors import RemoteProtocolError
    from qqproto._snapshot import SessionSnapshot
    from qqproto._states import SessionState

__all__ = [
    "AbandonRequest",
    "AbortTransport",
    "CloseConnection",
    "Command",
    "DisconnectStorm",
    "Disconnected",
    "Dispatch",
    "DuplicateDropped",
    "Event",
    "EventsDropped",
    "FatalStop",
    "FetchGateway",
    "FetchToken",
    "HeartbeatAcknowledged",
    "HelloReceived",
    "OpenConnection",
    "Output",
    "PersistSnapshot",
    "ProtocolViolation",
    "Ready",
    "ReconnectScheduled",
    "RequestIdentifyPermit",
    "Resumed",
    "SendPayload",
    "SessionInvalidated",
    "StateChanged",
    "ZombieDetected",
]


class Command:
    """Base class of everything the driver must execute. Don't subclass."""

    __slots__ = ()


class Event:
    """Base class of everything reported to the application. Don't subclass."""

    __slots__ = ()


# ------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchToken(Command):
    """Get an access token (``POST getAppAccessToken``), then call ``provide_token``.

    Attributes:
        force: bypass any cached token (the server rejected the current one with 4004).
    """

    force: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchGateway(Command):
    """Get the gateway URL (``GET /gateway/bot``, falling back to ``/gateway``), then call
    ``provide_gateway``; on failure call ``request_failed``.

    Attributes:
        token: the access token to authorise the request with (``Authorization: QQBot
            <token>``); never in the repr.
    """

    token: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestIdentifyPermit(Command):
    """Ask the identify limiter for a permit, then call ``grant_identify``.

    Attributes:
        shard_id: this connection's shard.
        max_concurrency: identifies allowed per 5 s, from ``session_start_limit``, if known.
    """

    shard_id: int
    max_concurrency: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AbandonRequest(Command):
    """Cancel the token request, gateway request or identify permit the core stopped waiting
    for (its deadline passed, or the application closed), and the work behind it.

    Its report, should one still come, is ignored; cancelling keeps a stalled request from
    holding a connection, a lock or a queue slot for the ones that follow.

    Attributes:
        request: ``"token"``, ``"gateway"`` or ``"permit"``.
    """

    request: Literal["token", "gateway", "permit"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenConnection(Command):
    """Open a WebSocket to ``url``, then call ``connection_opened`` (or ``connection_closed``).

    Attributes:
        url: the gateway URL.
        attempt: this transport's number (1, 2, ...). Pass it back with every report about
            the transport (``connection_opened``, ``receive``, ``connection_closed``) and the
            core drops the reports of transports it has given up on, however late they come.
    """

    url: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendPayload(Command):
    """Send ``text`` as one WebSocket text message.

    ``text`` may hold the access token (Identify, Resume): it is not in the repr; never log it.
    """

    op: Opcode
    text: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseConnection(Command):
    """Send a WebSocket close frame and keep reading until the peer's close or EOF; report it
    with ``connection_closed``. The core aborts after its own close timeout."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortTransport(Command):
    """Drop the transport now without a close handshake; do not report its closing."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistSnapshot(Command):
    """Save ``snapshot`` (or delete the saved one when ``None``) for a restart to Resume."""

    snapshot: SessionSnapshot | None


# --------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class StateChanged(Event):
    """The lifecycle state changed."""

    old: SessionState
    new: SessionState
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloReceived(Event):
    """Hello arrived; ``heartbeat_interval`` (seconds) is the one in force, after the floor."""

    heartbeat_interval: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(Event):
    """A new session started (READY). ``data`` is READY's ``d`` (user, shard, version)."""

    session_id: str
    seq: int | None
    data: JSONValue = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumed(Event):
    """The session resumed (RESUMED); ``replayed`` dispatches were delivered before it."""

    replayed: int
    seq: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch(Event):
    """A gateway event for the application (op 0).

    Attributes:
        type: the event type ``t`` (``"C2C_MESSAGE_CREATE"``, ...).
        seq: the sequence number ``s``, or ``None`` when the server sent none.
        event_id: the envelope ``id`` (use it as ``event_id`` in replies), or ``None``.
        data: the body ``d``; not in the repr (user content).
    """

    type: str
    seq: int | None
    event_id: str | None
    data: JSONValue = field(repr=False)


class _DispatchDraft(Event):
    """Dispatch's mutable twin: the same base and slots, so the same object layout."""

    __slots__ = ("data", "event_id", "seq", "type")
    type: str
    seq: int | None
    event_id: str | None
    data: JSONValue


def make_dispatch(t: str, seq: int | None, event_id: str | None, data: JSONValue) -> Dispatch:
    """Build a :class:`Dispatch` fast (equal to ``Dispatch(type=t, seq=seq, ...)``)."""
    # A frozen dataclass's __init__ goes through object.__setattr__ per field (about 1 us a
    # dispatch). The twin's plain attribute stores, then a __class__ assignment (allowed
    # between classes of the same layout), build the very same object in a fifth of that;
    # once it is a Dispatch it is as immutable as any other.
    out = _DispatchDraft()
    out.type = t
    out.seq = seq
    out.event_id = event_id
    out.data = data
    out.__class__ = Dispatch  # type: ignore[assignment]
    return cast("Dispatch", out)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAcknowledged(Event):
    """A beat was ACKed (op 11). Times in seconds, on the caller's monotonic clock."""

    latency: float
    mean_latency: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ZombieDetected(Event):
    """A beat fell due while the previous one was unacknowledged: the link is dead.

    Attributes:
        since_last_ack: seconds since the last ACK (or since Hello if none came).
        interval: the heartbeat interval in force.
    """

    since_last_ack: float
    interval: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnected(Event):
    """A connection ended.

    Attributes:
        code: the code of the close frame that ended the connection - the server's, or ours
            when we closed it (4000 after op 7, for instance) - or ``None`` when there was no
            close frame (EOF, abort, a connection that never opened).
        reason: why, in words (never a secret, never payload content).
        by_server: the server (or the network) ended it: its close frame, EOF or a reset, op
            7, op 9, a second Hello; ``False`` when we did: the application, the ACK
            watchdog, or a phase deadline (no Hello, READY or RESUMED in time).
        next_step: resume, identify or stop.
        reconnect_at: when the next attempt starts (caller's clock), ``None`` when stopping.
    """

    code: int | None
    reason: str
    by_server: bool
    next_step: NextStep
    reconnect_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconnectScheduled(Event):
    """The next connection attempt is scheduled.

    Attributes:
        delay: seconds from now.
        reconnect_at: when, on the caller's clock (``Disconnected.reconnect_at`` too).
        failures: consecutive failures so far (0 after a routine rotation); not the
            ``OpenConnection.attempt`` of any transport.
        reason: why we are reconnecting.
    """

    delay: float
    reconnect_at: float
    failures: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInvalidated(Event):
    """The session was dropped: events after ``last_seq`` may have been lost.

    The next connection Identifies and starts a new session; the server cannot replay what
    the old one missed. Fetch history through the REST API if it matters.
    """

    session_id: str
    last_seq: int | None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FatalStop(Event):
    """The connection stopped for good because of the server; retrying cannot help.

    Attributes:
        code: the close code, or ``None``.
        reason: what the code means.
        hint: what to check or change.
    """

    code: int | None
    reason: str
    hint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DisconnectStorm(Event):
    """Several connections in a row ended within seconds of opening.

    Usually a configuration problem; ``hint`` says what to check for ``code``.
    """

    code: int | None
    count: int
    hint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DuplicateDropped(Event):
    """A dispatch was not delivered because it was delivered before.

    Attributes:
        type: the event type.
        seq: its sequence number.
        key: what identified it as a duplicate: ``"seq"``, ``"event_id"`` or ``"message_id"``.
    """

    type: str
    seq: int | None
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsDropped(Event):
    """The application fell behind: ``count`` events before this one were not delivered.

    Emitted by a driver whose queue to the application was full (``qqproto_io``'s
    ``GatewayClient`` drops the newest events rather than stall the protocol), never by the
    core. It takes the place of the missing events in the stream, so the application knows
    where dispatches may be missing.

    Attributes:
        count: how many events were dropped since the last one delivered.
    """

    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolViolation(Event):
    """The server sent something we could not accept; it was skipped, state is intact.

    Attributes:
        error: the typed error (its text never holds payload content); ``error.reason`` is
            a stable tag for metrics (``"malformed_json"``, ``"too_large"``, ...).
    """

    error: RemoteProtocolError


Output: TypeAlias = Command | Event
"""Anything :meth:`GatewayConnection.drain` returns."""
