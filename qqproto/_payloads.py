# The payloads from the server: `receive`, and what each payload means in the state it
# arrives in.
#
# The hot path - an in-order dispatch in READY on the live transport - is plain code inline
# in `receive`, not a trigger: one call per message, and a trigger costs more than parsing
# the payload. Everything else is decoded from scratch and routed by `_on_payload`.
#
# A handler either changes nothing but the outputs (a dispatch, an ACK, a violation) or fires
# the one trigger the payload stands for; which states a trigger may come from is the
# machine's business (`_states.ALLOWED`), so a payload that is out of place here is the one
# whose trigger the current state does not take. Bad input from the server is a
# ProtocolViolation and is skipped with state and sequence intact (docs/design.md#inv-11).
"""The payload verbs and handlers of the connection."""

from __future__ import annotations

from typing import cast

import orjson

from qqproto._checks import check_attempt
from qqproto._close_codes import (
    INVALID_SESSION,
    INVALID_SESSION_RESUMABLE,
    RECONNECT_REQUEST,
    SERVER_RESET,
    ZOMBIE,
)
from qqproto._codec import Opcode, Payload, decode_object, decode_payload
from qqproto._delivery import Session
from qqproto._errors import (
    InvalidEnvelope,
    LocalProtocolError,
    PayloadTooLarge,
    QQProtoError,
    RemoteProtocolError,
    UnexpectedPayload,
)
from qqproto._heartbeat import Keepalive
from qqproto._lifecycle import Lifecycle, api
from qqproto._outputs import (
    Dispatch,
    DuplicateDropped,
    HeartbeatAcknowledged,
    HelloReceived,
    Ready,
    Resumed,
    ZombieDetected,
    _DispatchDraft,
    make_dispatch,
)
from qqproto._reconnect import Exit
from qqproto._states import ALLOWED, DELIVERING, RECEIVING, WINDING_DOWN, SessionState

__all__ = ["PayloadHandlers"]

_S = SessionState
# A Hello interval above an hour is a broken server, not a schedule (QQ sends ~41-45 s).
_MAX_HELLO_INTERVAL_MS = 3_600_000
_WINDING = frozenset(WINDING_DOWN)
_READY_FROM = ALLOWED["recv_ready"]
_RESUMED_FROM = ALLOWED["recv_resumed"]
_INVALIDATED_FROM = ALLOWED["recv_invalid_session"]
# receive()'s default for a missing `attempt`: a misuse, reported as one (not a TypeError).
_NO_ATTEMPT: int = cast("int", object())
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError
_READY = _S.READY


class PayloadHandlers(Lifecycle):
    """Take the server's payloads and route each to what it means."""

    def receive(
        self, payload: str | bytes, now: float, *, attempt: int = _NO_ATTEMPT, **unknown: object
    ) -> None:
        """Feed one complete WebSocket text message.

        Bad input never raises: it becomes a :class:`ProtocolViolation` event and is skipped
        with state and sequence intact.

        Args:
            payload: the message, ``str`` or UTF-8 ``bytes``.
            now: the caller's clock.
            attempt: the ``OpenConnection.attempt`` of the transport it came from: a message
                from a transport the core has given up on is ignored. Required.
            unknown: none is accepted; any keyword besides ``attempt`` is a misuse.

        Raises:
            LocalProtocolError: ``payload`` is neither ``str`` nor ``bytes``, ``attempt`` is
                missing or not an int, an unknown keyword, or no transport is open (nothing
                can have been received).
        """
        # The per-dispatch path: one call per message, so it is not behind _api's generic
        # (*args, **kwargs) wrapper, and the common case - an in-order dispatch in READY on
        # the live transport, with a plain float clock - is checked and handled inline.
        # Anything else takes the general path below, which checks and decodes from scratch.
        if (
            unknown
            or self._broken is not None
            or type(attempt) is not int
            or attempt != self._live_attempt
            or self._model.state is not _READY
            or (type(payload) is not str and type(payload) is not bytes)
            or len(payload) > self._config.max_payload_size
        ):
            self._receive(payload, now, attempt, unknown)
            return
        try:
            now = self._clock(now)
            try:
                obj = _loads(payload)
            except _JSONDecodeError:
                self._receive(payload, now, attempt, unknown)  # classifies the error
                return
            if type(obj) is dict:
                get = obj.get
                op = get("op")
                s = get("s")
                t = get("t")
                event_id = get("id")
                session = self._session
                # Two comparisons, not `t not in {...}`: a set would hash the new str.
                if (
                    op == 0  # noqa: PLR1714
                    and type(op) is int
                    and type(s) is int
                    and type(t) is str
                    and (event_id is None or type(event_id) is str)
                    and session is not None
                    and session.seq is not None
                    and s == session.seq + 1
                    and t != "READY"
                    and t != "RESUMED"
                ):
                    self._alive_at = now
                    session.seq = s
                    out = self._outputs
                    # Dedup.duplicate's rules, inline.
                    dedup = self._dedup
                    if event_id is not None and dedup.events.check_and_add(event_id, now):
                        out.append(DuplicateDropped(type=t, seq=s, key="event_id"))
                        return
                    d = get("d")
                    if t in dedup.types and type(d) is dict:
                        message_id = d.get("id")
                        if type(message_id) is str and dedup.messages.check_and_add(
                            message_id, now
                        ):
                            out.append(DuplicateDropped(type=t, seq=s, key="message_id"))
                            return
                    # make_dispatch's body, inline: a call less per dispatch.
                    draft = _DispatchDraft()
                    draft.type = t
                    draft.seq = s
                    draft.event_id = event_id
                    draft.data = d
                    draft.__class__ = Dispatch  # type: ignore[assignment]
                    out.append(draft)
                    return
            try:
                p = decode_object(obj)
            except RemoteProtocolError as err:
                self._violation(err)
                return
            self._alive_at = now
            self._on_payload(p, _READY, now)
        except QQProtoError:
            raise
        except Exception as exc:
            self._break(exc)
            raise

    @api
    def _receive(
        self, payload: str | bytes, now: float, attempt: int, unknown: dict[str, object]
    ) -> None:
        if unknown:
            name = next(iter(unknown))
            raise LocalProtocolError(f"receive() got an unexpected keyword argument {name!r}")
        if type(payload) is not str and type(payload) is not bytes:
            raise LocalProtocolError(f"payload must be str or bytes, not {type(payload).__name__}")
        if type(attempt) is not int:
            check_attempt(attempt)  # raises; True == 1 and 1.0 == 1 are no attempts
        now = self._clock(now)  # checked even for a stale report: a misuse is a misuse
        if attempt != self._live_attempt:
            return
        state = self._model.state
        if state not in RECEIVING:
            raise LocalProtocolError(f"receive() in state {state.name}: no transport is open")
        try:
            p = decode_payload(payload, max_size=self._config.max_payload_size)
        except RemoteProtocolError as err:
            self._violation(err)
            return
        self._alive_at = now
        self._on_payload(p, state, now)

    @api
    def message_too_large(self, size: int, now: float, *, attempt: int) -> None:
        """A message above ``max_payload_size`` arrived and was discarded unread.

        A driver that bounds its buffers (it should) reports such a message here instead of
        passing it to :meth:`receive`. It is a :class:`ProtocolViolation`
        (:class:`PayloadTooLarge`), skipped with state and sequence intact: if it was a
        dispatch, it is lost, and the violation event says so where it happened.

        Args:
            size: the message's size in bytes, as far as the driver counted.
            now: the caller's clock.
            attempt: the ``OpenConnection.attempt`` of the transport it came from.

        Raises:
            LocalProtocolError: a wrong argument type, or no transport is open.
        """
        if type(size) is not int or size < 0:
            raise LocalProtocolError("size must be a non-negative int")
        now = self._clock(now)
        if check_attempt(attempt) != self._live_attempt:
            return
        state = self._model.state
        if state not in RECEIVING:
            raise LocalProtocolError(f"a message in state {state.name}: no transport is open")
        self._violation(PayloadTooLarge(size, self._config.max_payload_size))

    # ---------------------------------------------------------------- handlers

    def _on_payload(self, p: Payload, state: SessionState, now: float) -> None:
        op = p.op
        if op is Opcode.DISPATCH:
            self._on_dispatch(p, state, now)
        elif op is Opcode.HEARTBEAT_ACK:
            self._on_ack(now)
        elif state in _WINDING:
            return  # this connection is ending; only data (and a late ACK) still matter
        elif op is Opcode.HELLO:
            self._on_hello(p, state, now)
        elif op is Opcode.HEARTBEAT:
            self._on_server_heartbeat(now)
        elif op is Opcode.RECONNECT:
            self._leave("recv_reconnect", RECONNECT_REQUEST, RECONNECT_REQUEST.meaning)
        elif op is Opcode.INVALID_SESSION:
            self._on_invalid_session(p, state)
        else:
            self._violation(UnexpectedPayload(f"servers do not send opcode {op.name}"))

    def _on_dispatch(self, p: Payload, state: SessionState, now: float) -> None:
        t = p.t
        if t is None:
            self._violation(InvalidEnvelope("dispatch without 't'", field="t"))
            return
        if t == "READY":
            self._on_ready(p, state, now)
            return
        if t == "RESUMED":
            self._on_resumed(p, state, now)
            return
        session = self._session
        if session is None or state not in DELIVERING:
            self._violation(UnexpectedPayload(f"dispatch {t} before READY or RESUMED"))
            return
        s = p.s
        if s is not None and not session.admit(s):
            self._outputs.append(DuplicateDropped(type=t, seq=s, key="seq"))
            return
        key = self._dedup.duplicate(t, p.id, p.d, now)
        if key is not None:
            self._outputs.append(DuplicateDropped(type=t, seq=s, key=key))
            return
        if state is _S.RESUMING:
            self._replayed += 1
        self._outputs.append(make_dispatch(t, s, p.id, p.d))

    def _on_ready(self, p: Payload, state: SessionState, now: float) -> None:
        if state not in _READY_FROM:
            self._violation(UnexpectedPayload("READY outside of an Identify"))
            return
        d = p.d
        session_id = d.get("session_id") if isinstance(d, dict) else None
        if not isinstance(session_id, str) or not session_id:
            # Without a session id nothing can be resumed; the auth deadline recovers.
            self._violation(InvalidEnvelope("READY without a 'session_id'", field="d"))
            return
        self._session = Session(session_id, p.s)
        self._fire("recv_ready", "READY")
        self._emit(Ready(session_id=session_id, seq=p.s, data=d))
        self._persist(now)

    def _on_resumed(self, p: Payload, state: SessionState, now: float) -> None:
        session = self._session
        if state not in _RESUMED_FROM or session is None:
            self._violation(UnexpectedPayload("RESUMED outside of a Resume"))
            return
        # RESUMED carries the next seq (docs/protocol.md#resume-and-resumed); beats carry it now.
        if p.s is not None and (session.seq is None or p.s > session.seq):
            session.seq = p.s
        self._fire("recv_resumed", "RESUMED")
        self._emit(Resumed(replayed=self._replayed, seq=session.seq))
        self._persist(now)

    def _on_ack(self, now: float) -> None:
        ka = self._ka
        if ka is None:
            return
        latency = ka.ack_received(now)
        if latency is None:
            return  # an ACK nobody asked for (answer to a server op 1, or a late duplicate)
        live = self._liveness
        live.acked_at = now
        if self._model.state is _S.READY:
            live.live_at = now  # the evidence health() judges by
        samples = ka.samples
        self._emit(HeartbeatAcknowledged(latency=latency, mean_latency=sum(samples) / len(samples)))
        self._persist(now)

    def _on_hello(self, p: Payload, state: SessionState, now: float) -> None:
        d = p.d
        raw = d.get("heartbeat_interval") if isinstance(d, dict) else None
        if (
            not isinstance(raw, int | float)
            or isinstance(raw, bool)
            or not 0 < raw <= _MAX_HELLO_INTERVAL_MS
        ):
            # The deadline for Hello then recovers (reconnect), as for a missing Hello.
            self._violation(
                InvalidEnvelope("Hello 'heartbeat_interval' missing or out of range", field="d")
            )
            return
        if state is not _S.AWAITING_HELLO:
            self._leave("recv_hello", SERVER_RESET, SERVER_RESET.meaning)
            return
        interval = max(raw / 1000.0, self._config.min_heartbeat_interval)
        self._ka = Keepalive(interval, now, self._rng, self._config.latency_samples)
        self._fire("recv_hello", "Hello")
        self._emit(HelloReceived(heartbeat_interval=interval))

    def _on_server_heartbeat(self, now: float) -> None:
        # Discord's rule, the safe reading of "Send/Receive" in the opcode table: answer at
        # once, without touching the regular schedule or the watchdog.
        ka = self._ka
        if ka is None:
            self._violation(UnexpectedPayload("heartbeat request before Hello"))
            return
        if ka.answer_requested(now):
            self._send_beat()

    def _on_invalid_session(self, p: Payload, state: SessionState) -> None:
        if state not in _INVALIDATED_FROM:
            self._violation(UnexpectedPayload("invalid session (op 9) before Hello"))
            return
        # `d: true` (Discord: "resumable") has never been seen from QQ; honour it once in a
        # row, then stop trusting it so that op 9 cannot drive a resume loop (S11).
        resumable = p.d is True and not self._reconnects.op9_resumed and self._session is not None
        policy = INVALID_SESSION_RESUMABLE if resumable else INVALID_SESSION
        self._leave("recv_invalid_session", policy, policy.meaning)

    def _on_zombie(self, ka: Keepalive, now: float) -> None:
        since = ka.since_last_ack(now)
        self._exit = Exit(
            ZOMBIE,
            self._config.keep_session_close_code,
            f"no heartbeat ACK for {since:.1f} s",
            by_server=False,
        )
        self._fire("ack_missed", self._exit.reason)
        self._emit(ZombieDetected(since_last_ack=since, interval=ka.interval))
