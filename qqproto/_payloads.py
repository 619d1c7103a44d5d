# What each payload from the server means, in the state it arrives in.
#
# A handler either changes nothing but the outputs (a dispatch, an ACK, a violation) or fires
# the one trigger the payload stands for; which states a trigger may come from is the
# machine's business (`_states.ALLOWED`), so a payload that is out of place here is the one
# whose trigger the current state does not take. Bad input from the server is a
# ProtocolViolation and is skipped with state and sequence intact (docs/design.md#inv-11).
"""The payload handlers of the connection."""

from __future__ import annotations

from qqproto._close_codes import (
    INVALID_SESSION,
    INVALID_SESSION_RESUMABLE,
    RECONNECT_REQUEST,
    SERVER_RESET,
    ZOMBIE,
)
from qqproto._codec import Opcode, Payload
from qqproto._delivery import Session
from qqproto._errors import InvalidEnvelope, UnexpectedPayload
from qqproto._heartbeat import Keepalive
from qqproto._lifecycle import Lifecycle
from qqproto._outputs import (
    DuplicateDropped,
    HeartbeatAcknowledged,
    HelloReceived,
    Ready,
    Resumed,
    ZombieDetected,
    make_dispatch,
)
from qqproto._reconnect import Exit
from qqproto._states import ALLOWED, DELIVERING, WINDING_DOWN, SessionState

__all__ = ["PayloadHandlers"]

_S = SessionState
# A Hello interval above an hour is a broken server, not a schedule (QQ sends ~41-45 s).
_MAX_HELLO_INTERVAL_MS = 3_600_000
_WINDING = frozenset(WINDING_DOWN)
_READY_FROM = ALLOWED["recv_ready"]
_RESUMED_FROM = ALLOWED["recv_resumed"]
_INVALIDATED_FROM = ALLOWED["recv_invalid_session"]


class PayloadHandlers(Lifecycle):
    """Route a decoded payload to what it means."""

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
