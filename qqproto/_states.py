# The session lifecycle: every state, every transition, every guard, in one place.
#
# Theory of operation. A gateway session is a loop:
#
#   PREPARING -> CONNECTING -> AWAITING_HELLO -> IDENTIFYING | RESUMING -> READY
#        ^                                                                   |
#        +------------------------------- BACKOFF <- CLOSING | ZOMBIE <------+
#
# PREPARING gathers what a connection attempt needs before a socket is opened (an access
# token with enough life left, the gateway URL, and for an Identify an identify permit).
# Every way out of a connection goes through BACKOFF, whose timer is the only way back to
# PREPARING: no path reconnects without passing a scheduled timer, not even op 7 (whose
# delay is 0 s). STOPPED is terminal by policy (fatal close code, or the application closed
# the session); ERROR is terminal by accident (an internal exception escaped) and every later
# call fails fast.
#
# This module is data only. The connection (`_connection.py` and the phase layers it is
# built from: `_lifecycle`, `_preparing`, `_handshake`, `_payloads`, `_teardown`) decides
# *which* trigger an input means and does the work of entering a state; pytransitions
# checks that the trigger is allowed from the current state and picks the destination,
# evaluating the guards named here.
# The state diagram (`state_diagram.md`, made by `_diagram.py`) and the totality test read the
# very Machine that `shared_machine` returns, so the picture cannot drift from the code.
#
# Hot-path inputs (dispatches, heartbeat ACKs, the heartbeat timer) never go through a
# trigger: a pytransitions trigger costs 5-10 us, which is more than parsing the payload.
"""The session state machine: states, triggers, guards and transitions."""

from __future__ import annotations

import functools
import logging
from enum import Enum
from typing import TYPE_CHECKING, Literal, cast, get_args

from transitions import Machine

# pytransitions logs two INFO lines per state change; under `logging.basicConfig(level=INFO)`
# they drown the application's own. The state changes are events here (StateChanged), so its
# logger is quieted unless the application has set a level on it itself.
_TRANSITIONS_LOG = logging.getLogger("transitions.core")
if _TRANSITIONS_LOG.level == logging.NOTSET:
    _TRANSITIONS_LOG.setLevel(logging.WARNING)

if TYPE_CHECKING:
    from transitions.core import TransitionConfigDict

__all__ = [
    "ALLOWED",
    "CLOSABLE",
    "DEADLINES",
    "DELIVERING",
    "GUARDS",
    "HEARTBEATING",
    "LINKED",
    "NO_TRANSPORT",
    "OPENING",
    "RECEIVING",
    "STATE_DOCS",
    "TRANSITIONS",
    "TRANSPORT_PARTITION",
    "WINDING_DOWN",
    "Deadline",
    "SessionState",
    "Trigger",
    "shared_machine",
]


class SessionState(Enum):
    """The lifecycle state of one gateway connection (one shard)."""

    # Members are singletons compared by identity; Enum's own __hash__ is Python code that
    # hashes the name, and the per-dispatch path tests state-set membership.
    __hash__ = object.__hash__

    IDLE = "idle"
    PREPARING = "preparing"
    CONNECTING = "connecting"
    AWAITING_HELLO = "awaiting_hello"
    IDENTIFYING = "identifying"
    RESUMING = "resuming"
    READY = "ready"
    ZOMBIE = "zombie"
    CLOSING = "closing"
    BACKOFF = "backoff"
    STOPPED = "stopped"
    ERROR = "error"


STATE_DOCS: dict[SessionState, str] = {
    SessionState.IDLE: "Created; nothing happens until `start()`.",
    SessionState.PREPARING: (
        "Gathering what an attempt needs before opening a socket: a token with enough life "
        "left, the gateway URL, and (to Identify) an identify permit."
    ),
    SessionState.CONNECTING: "The driver is opening the WebSocket (bounded by `connect_timeout`).",
    SessionState.AWAITING_HELLO: (
        "Socket open; waiting for Hello (op 10), bounded by `hello_timeout`. Nothing is sent."
    ),
    SessionState.IDENTIFYING: (
        "Identify (op 2) sent; waiting for READY, bounded by `auth_timeout`. Heartbeating."
    ),
    SessionState.RESUMING: (
        "Resume (op 6) sent; replayed dispatches are delivered until RESUMED, bounded by "
        "`auth_timeout`. Heartbeating."
    ),
    SessionState.READY: "Session live: dispatches are delivered, beats are ACKed.",
    SessionState.ZOMBIE: (
        "A beat fell due while the previous one was unacknowledged: the link is dead. A "
        "session-keeping close was sent; the transport is aborted after `close_timeout`."
    ),
    SessionState.CLOSING: (
        "We are closing this connection (op 7, op 9, a phase deadline, a second Hello, or the "
        "application); the transport is aborted after `close_timeout`."
    ),
    SessionState.BACKOFF: "No connection; the reconnect timer is running.",
    SessionState.STOPPED: "Terminal: a fatal close code, or the application closed the session.",
    SessionState.ERROR: "Terminal: an internal error escaped; every later call fails fast.",
}

Trigger = Literal[
    "start",
    "prepared",
    "prepare_failed",
    "transport_opened",
    "transport_closed",
    "recv_hello",
    "recv_ready",
    "recv_resumed",
    "recv_reconnect",
    "recv_invalid_session",
    "ack_missed",
    "timer_expired",
    "user_close",
    "fail",
]
"""Every input that can change the lifecycle state, named after where it comes from."""

GUARDS: dict[str, str] = {
    "can_resume": "a session id and sequence are held (from READY, or from a snapshot)",
    "stopping": "the planned next step is to stop (fatal close code, or the application closed)",
}
"""Every guard a transition may name, with its meaning (shown in the state diagram)."""

_S = SessionState

# The groups of states, declared once: the transitions below, the connection's gating (the
# connection, its phase layers and its policy modules) and the diagram's boxes are all made
# from them.
# A new state must join exactly one group of each partition (tests/test_lifecycle_groups.py).
#
# What the state says about the transport: a partition of every state.
NO_TRANSPORT = (_S.IDLE, _S.PREPARING, _S.BACKOFF, _S.STOPPED, _S.ERROR)
OPENING = (_S.CONNECTING,)
# A transport is open and the session is being set up or used (torn down on exit).
LINKED = (_S.AWAITING_HELLO, _S.IDENTIFYING, _S.RESUMING, _S.READY)
# Our close is in flight: only data and a late ACK still matter.
WINDING_DOWN = (_S.ZOMBIE, _S.CLOSING)
TRANSPORT_PARTITION = (NO_TRANSPORT, OPENING, LINKED, WINDING_DOWN)

HEARTBEATING = LINKED[1:]  # after Hello: IDENTIFYING, RESUMING, READY
CLOSABLE = (*OPENING, *LINKED, *WINDING_DOWN)
# `receive()` is allowed: some transport is open.
RECEIVING = frozenset(LINKED) | frozenset(WINDING_DOWN)
# Dispatches are delivered: a session is being resumed, is live, or its link is ending.
DELIVERING = RECEIVING - {_S.AWAITING_HELLO, _S.IDENTIFYING}


class Deadline(Enum):
    """What the one phase deadline of a state bounds (``None`` of them: no deadline)."""

    REQUEST = "request"  # a token or gateway request: http_timeout
    CONNECT = "connect"  # the WebSocket opening: connect_timeout
    HELLO = "hello"  # Hello after the socket opened: hello_timeout
    AUTH = "auth"  # READY or RESUMED after Identify or Resume: auth_timeout
    CLOSE = "close"  # the close handshake: close_timeout
    BACKOFF = "backoff"  # the reconnect delay
    NONE = "none"  # no phase deadline (the heartbeat timers are apart)


DEADLINES: dict[SessionState, Deadline] = {
    _S.IDLE: Deadline.NONE,
    _S.PREPARING: Deadline.REQUEST,
    _S.CONNECTING: Deadline.CONNECT,
    _S.AWAITING_HELLO: Deadline.HELLO,
    _S.IDENTIFYING: Deadline.AUTH,
    _S.RESUMING: Deadline.AUTH,
    _S.READY: Deadline.NONE,
    _S.ZOMBIE: Deadline.CLOSE,
    _S.CLOSING: Deadline.CLOSE,
    _S.BACKOFF: Deadline.BACKOFF,
    _S.STOPPED: Deadline.NONE,
    _S.ERROR: Deadline.NONE,
}
"""The deadline each state runs under; every state is in it exactly once."""


def _t(
    trigger: Trigger,
    source: SessionState | tuple[SessionState, ...] | list[SessionState],
    dest: SessionState | None,
    guard: str | None = None,
) -> TransitionConfigDict:
    spec: TransitionConfigDict = {
        "trigger": trigger,
        "source": list(source) if isinstance(source, tuple | list) else [source],
        "dest": dest,
    }
    if guard is not None:
        spec["conditions"] = [guard]
    return spec


# Order matters: for one trigger and source, the first spec whose guard passes wins, so each
# guarded spec is followed by its unconditional fallback (pytransitions fails silently when no
# spec matches).
TRANSITIONS: list[TransitionConfigDict] = [
    _t("start", _S.IDLE, _S.PREPARING),
    _t("prepared", _S.PREPARING, _S.CONNECTING),
    # A request that failed for good (wrong credentials) stops; any other failure backs off.
    _t("prepare_failed", _S.PREPARING, _S.STOPPED, "stopping"),
    _t("prepare_failed", _S.PREPARING, _S.BACKOFF),
    _t("transport_opened", _S.CONNECTING, _S.AWAITING_HELLO),
    _t("recv_hello", _S.AWAITING_HELLO, _S.RESUMING, "can_resume"),
    _t("recv_hello", _S.AWAITING_HELLO, _S.IDENTIFYING),
    # A second Hello on a live connection means the server reset it: reconnect and resume,
    # never run two heartbeat schedules (S23 in docs/design.md#failure-scenarios).
    _t("recv_hello", HEARTBEATING, _S.CLOSING),
    _t("recv_ready", _S.IDENTIFYING, _S.READY),
    _t("recv_resumed", _S.RESUMING, _S.READY),
    # op 7 may even be the first frame (a node restarting): back off and retry, keep session.
    _t("recv_reconnect", LINKED, _S.CLOSING),
    _t("recv_invalid_session", HEARTBEATING, _S.CLOSING),
    _t("ack_missed", HEARTBEATING, _S.ZOMBIE),
    _t("timer_expired", _S.PREPARING, _S.BACKOFF),
    _t("timer_expired", _S.CONNECTING, _S.BACKOFF),
    _t("timer_expired", [s for s in LINKED if DEADLINES[s] is not Deadline.NONE], _S.CLOSING),
    _t("timer_expired", WINDING_DOWN, _S.STOPPED, "stopping"),
    _t("timer_expired", WINDING_DOWN, _S.BACKOFF),
    _t("timer_expired", _S.BACKOFF, _S.PREPARING),
    _t("transport_closed", CLOSABLE, _S.STOPPED, "stopping"),
    _t("transport_closed", CLOSABLE, _S.BACKOFF),
    # A late report about a transport the core already gave up on (aborted, or never
    # opened) changes nothing.
    _t("transport_closed", [_S.PREPARING, _S.BACKOFF, _S.STOPPED], None),
    _t("user_close", [_S.IDLE, _S.PREPARING, _S.CONNECTING, _S.BACKOFF], _S.STOPPED),
    _t("user_close", LINKED, _S.CLOSING),
    # Already closing: the close in flight ends in STOPPED instead of BACKOFF.
    _t("user_close", [*WINDING_DOWN, _S.STOPPED], None),
    _t("fail", [s for s in SessionState if s is not _S.ERROR], _S.ERROR),
]


def _sources(trigger: Trigger) -> frozenset[SessionState]:
    found: set[object] = set()
    for spec in TRANSITIONS:
        if spec["trigger"] == trigger:
            found.update(cast("list[SessionState]", spec["source"]))
    return frozenset(s for s in SessionState if s in found)


ALLOWED: dict[Trigger, frozenset[SessionState]] = {t: _sources(t) for t in get_args(Trigger)}
"""The states each trigger may be fired from, computed from :data:`TRANSITIONS`."""


@functools.cache
def shared_machine() -> Machine:
    """The lifecycle Machine every connection fires its triggers on: built once, no model.

    A Machine of its own cost each connection about 50 KB. This one holds no model (none
    is added: the machine keeps no reference to any connection, so none leaks), and
    ``Event.trigger(model)`` takes the model to move as an argument; the model then carries
    its own ``state`` (start it at ``SessionState.IDLE``) and the guard methods of
    :data:`GUARDS`. Unqueued (``queued=False``), a trigger mutates nothing on the machine,
    so connections in different threads may share it.
    """
    return Machine(
        model=None,
        states=SessionState,
        transitions=TRANSITIONS,
        initial=SessionState.IDLE,
        auto_transitions=False,
        send_event=False,
        queued=False,
    )
