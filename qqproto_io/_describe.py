# How events read to a human and to a log pipeline: one place, used by the CLI and the logs.
#
# Every event becomes a name, a one-line message and a flat dict of JSON-able fields (the
# schema documented in docs/cli.md), each named and measured as the event's own field
# (`error.reason` is `reason`). Session ids are masked (first 8 characters): they are not
# secrets, but they do not belong in shared logs either (hermes logged them at INFO). Tokens
# cannot appear: no event carries one.
"""Turn core events into log lines and structured fields."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qqproto import (
    Disconnected,
    DisconnectStorm,
    Dispatch,
    DuplicateDropped,
    EventsDropped,
    FatalStop,
    HeartbeatAcknowledged,
    HelloReceived,
    ProtocolViolation,
    Ready,
    ReconnectScheduled,
    Resumed,
    SessionInvalidated,
    StateChanged,
    ZombieDetected,
)

if TYPE_CHECKING:
    from qqproto import Event

__all__ = ["Description", "describe_event", "mask"]

Field = str | int | float | bool | None


class Description:
    """An event as a log line: ``name``, ``level``, ``message`` and flat ``fields``."""

    __slots__ = ("fields", "level", "message", "name")

    def __init__(self, name: str, level: int, message: str, fields: dict[str, Field]) -> None:
        self.name = name
        self.level = level
        self.message = message
        self.fields = fields


def mask(session_id: str | None) -> str | None:
    """Keep the first 8 characters of a session id."""
    if session_id is None:
        return None
    return session_id[:8] + "…" if len(session_id) > 8 else session_id


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def _s(seconds: float) -> float:
    # The event's own unit, to the 0.1 ms the log showed before it used the event's names.
    return round(seconds, 4)


def describe_event(event: Event) -> Description:
    """Describe one event (see docs/cli.md for the field schema)."""
    info, debug, warning, error = logging.INFO, logging.DEBUG, logging.WARNING, logging.ERROR
    if isinstance(event, Dispatch):
        return Description(
            "dispatch",
            debug,
            f"dispatch {event.type} seq={event.seq}",
            {"type": event.type, "seq": event.seq, "event_id": event.event_id},
        )
    if isinstance(event, HeartbeatAcknowledged):
        return Description(
            "heartbeat_ack",
            debug,
            f"heartbeat acknowledged in {_ms(event.latency)} ms",
            {"latency": _s(event.latency), "mean_latency": _s(event.mean_latency)},
        )
    if isinstance(event, StateChanged):
        return Description(
            "state",
            debug,
            f"{event.old.name} -> {event.new.name}: {event.reason}",
            {"old": event.old.name, "new": event.new.name, "reason": event.reason},
        )
    if isinstance(event, HelloReceived):
        return Description(
            "hello",
            info,
            f"connected; heartbeat every {event.heartbeat_interval:g} s",
            {"heartbeat_interval": event.heartbeat_interval},
        )
    if isinstance(event, Ready):
        sid = mask(event.session_id)
        return Description(
            "ready", info, f"ready: new session {sid}", {"session_id": sid, "seq": event.seq}
        )
    if isinstance(event, Resumed):
        return Description(
            "resumed",
            info,
            f"resumed; {event.replayed} missed events replayed",
            {"replayed": event.replayed, "seq": event.seq},
        )
    if isinstance(event, ZombieDetected):
        return Description(
            "zombie",
            warning,
            f"no heartbeat ACK for {event.since_last_ack:.1f} s: connection is dead, reconnecting",
            {"since_last_ack": round(event.since_last_ack, 3), "interval": event.interval},
        )
    if isinstance(event, Disconnected):
        return Description(
            "disconnected",
            warning if event.next_step.value == "stop" and event.by_server else info,
            f"disconnected ({event.code}): {event.reason}; next: {event.next_step.value}",
            {
                "code": event.code,
                "reason": event.reason,
                "by_server": event.by_server,
                "next_step": event.next_step.value,
            },
        )
    if isinstance(event, ReconnectScheduled):
        return Description(
            "reconnect",
            info,
            f"reconnecting in {event.delay:.1f} s because {event.reason}",
            {"delay": round(event.delay, 3), "failures": event.failures, "reason": event.reason},
        )
    if isinstance(event, SessionInvalidated):
        return Description(
            "session_invalidated",
            warning,
            f"session {mask(event.session_id)} lost ({event.reason}); "
            f"events after seq {event.last_seq} may have been lost",
            {
                "session_id": mask(event.session_id),
                "last_seq": event.last_seq,
                "reason": event.reason,
            },
        )
    if isinstance(event, FatalStop):
        return Description(
            "fatal",
            error,
            f"stopped: {event.code} {event.reason}. {event.hint}",
            {"code": event.code, "reason": event.reason, "hint": event.hint},
        )
    if isinstance(event, DisconnectStorm):
        return Description(
            "disconnect_storm",
            warning,
            f"{event.count} quick disconnects in a row (last code {event.code}): {event.hint}",
            {"code": event.code, "count": event.count, "hint": event.hint},
        )
    if isinstance(event, DuplicateDropped):
        return Description(
            "duplicate",
            debug,
            f"duplicate {event.type} seq={event.seq} dropped (same {event.key})",
            {"type": event.type, "seq": event.seq, "key": event.key},
        )
    if isinstance(event, EventsDropped):
        return Description(
            "events_dropped",
            warning,
            f"the application fell behind: {event.count} events were dropped here",
            {"count": event.count},
        )
    if isinstance(event, ProtocolViolation):
        return Description(
            "protocol_violation",
            warning,
            f"server sent something invalid ({event.error.reason}): {event.error}",
            {"reason": event.error.reason, "error": str(event.error)},
        )
    return Description(type(event).__name__, debug, repr(event), {})
