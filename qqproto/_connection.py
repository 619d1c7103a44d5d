# The gateway session: one object per shard, fed inputs, producing outputs.
#
# Theory of operation (aioquic / h11 style). The caller owns the socket, the clock and the
# timers. It calls a verb for every input (`receive` for a payload, `connection_closed` for a
# close, `handle_timer` when `get_timer()` falls due, ...), always passing `now`, the time on
# its monotonic clock. Each verb may queue outputs, which the caller pulls with `drain()`:
# commands to execute (open, send, close, abort, fetch a token, ...) and events to report.
# Nothing here blocks, sleeps, reads a clock or draws from the global random generator.
#
# Every verb checks its arguments and routes the input. This module holds what the
# application sees of the whole (read-only state, the outputs, start, the timer, close); the
# rest is layered under it, each piece small enough to read alone:
#
#   _states.py        the lifecycle: states, their groups, triggers, guards, transitions
#   _lifecycle.py     the connection's state, firing triggers, the fail-fast guard (`api`)
#   _preparing.py     PREPARING: the token, gateway and permit verbs, and their requests
#   _handshake.py     CONNECTING to READY: `connection_opened`, Hello, Identify or Resume
#   _teardown.py      ZOMBIE to STOPPED: `connection_closed`, settling a disconnect
#   _payloads.py      `receive` and what each payload means in the current state
#   _reconnect.py     the disconnect-and-backoff decision (failures, resume budget, storms)
#   _start_budget.py  the session start limit and the identify permit
#   _token.py         when to fetch an access token
#   _delivery.py      the sequence and the duplicate filters
#   _liveness.py      the health verdict for supervisors
#   _heartbeat.py     the beat schedule and the ACK watchdog of one connection
#
# The hot path - a dispatch in READY - is plain code in `receive`, not a trigger.
#
# Errors: misuse raises LocalProtocolError and changes nothing. Anything the server does
# wrong becomes a ProtocolViolation event and the payload is skipped. Any other exception is
# a bug: the connection moves to ERROR and every later call raises LocalProtocolError.
"""The sans-IO gateway connection."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from qqproto._close_codes import APPLICATION_CLOSE, NextStep
from qqproto._errors import LocalProtocolError
from qqproto._handshake import Handshake
from qqproto._heartbeat import Health, Latency
from qqproto._lifecycle import api
from qqproto._payloads import PayloadHandlers
from qqproto._preparing import Preparing
from qqproto._reconnect import Exit
from qqproto._snapshot import SessionSnapshot
from qqproto._states import LINKED, WINDING_DOWN, Deadline, SessionState
from qqproto._teardown import Teardown

if TYPE_CHECKING:
    import random

    from qqproto._config import SessionConfig
    from qqproto._outputs import Output

__all__ = ["GatewayConnection"]

_S = SessionState
_LINKED = frozenset(LINKED)
_WINDING_DOWN = frozenset(WINDING_DOWN)
_TIMER_LOOP_BOUND = 16


# The API reference (docs/reference/qqproto.md) lists the verbs inherited from the phases
# by the bases' order read backwards: in the order a connection goes through its phases.
class GatewayConnection(PayloadHandlers, Teardown, Handshake, Preparing):
    """One QQ gateway session (one shard), sans-IO.

    Args:
        config: the settings; defaults to ``SessionConfig()``.
        rng: the random source for heartbeat and backoff jitter. Seed it for reproducible
            runs; the core never uses the global ``random`` module.
        snapshot: a saved session to Resume first (see :class:`SessionSnapshot`).

    Raises:
        LocalProtocolError: ``snapshot`` belongs to another shard.

    Typical use: ``start(now)``, then execute every command from ``drain()`` and feed each
    result back through the matching verb, and call ``handle_timer(now)`` whenever
    ``get_timer()`` falls due.
    """

    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        rng: random.Random,
        snapshot: SessionSnapshot | None = None,
    ) -> None:
        super().__init__(config, rng, snapshot)
        self._entry = {
            _S.PREPARING: self._enter_preparing,
            _S.CONNECTING: self._enter_connecting,
            _S.AWAITING_HELLO: self._enter_awaiting_hello,
            _S.IDENTIFYING: self._enter_identifying,
            _S.RESUMING: self._enter_resuming,
            _S.READY: self._enter_ready,
            _S.ZOMBIE: self._enter_closing,
            _S.CLOSING: self._enter_closing,
            _S.BACKOFF: self._enter_backoff,
            _S.STOPPED: self._enter_stopped,
        }
        self._on_due = {
            Deadline.REQUEST: self._request_overdue,
            Deadline.CONNECT: self._connect_overdue,
            Deadline.HELLO: self._answer_overdue,
            Deadline.AUTH: self._answer_overdue,
            Deadline.CLOSE: self._close_overdue,
            Deadline.BACKOFF: self._backoff_elapsed,
        }

    # ------------------------------------------------------------------ read-only state

    @property
    def config(self) -> SessionConfig:
        """The settings this connection runs with."""
        return self._config

    @property
    def state(self) -> SessionState:
        """The lifecycle state."""
        return self._model.state

    @property
    def session_id(self) -> str | None:
        """The session id held (from READY or a snapshot), or ``None``."""
        return self._session.id if self._session is not None else None

    @property
    def seq(self) -> int | None:
        """The last sequence number delivered in the current session, or ``None``."""
        return self._session.seq if self._session is not None else None

    @property
    def latency(self) -> Latency:
        """Heartbeat latency of the current connection (empty between connections)."""
        if self._ka is None:
            return Latency((), None)
        return self._ka.latency()

    @property
    def heartbeat_interval(self) -> float | None:
        """The heartbeat interval of the current connection, or ``None`` before Hello."""
        return self._ka.interval if self._ka is not None else None

    @property
    def last_ack_at(self) -> float | None:
        """When the current connection's last heartbeat ACK arrived, or ``None``."""
        return self._ka.last_ack_at if self._ka is not None else None

    @property
    def consecutive_failures(self) -> int:
        """Failed attempts since the session last stayed up; drives the backoff window."""
        return self._reconnects.failures

    def health(self, now: float) -> Health:
        """Is this connection doing its job? A pure verdict for supervisors.

        Ready means READY with an ACK (or the Hello) no older than two heartbeat intervals
        plus the close bound: the ACK watchdog's own worst case. Live means ready, or not
        ready for less than ``liveness_budget`` (a bounded reconnect in progress), or waiting
        on purpose for the daily identify budget to reset (the budget of liveness starts
        again when that wait ends). STOPPED and ERROR are never live.
        """
        return self._liveness.verdict(self._model.state, self._ka, now, self._config)

    def snapshot(self) -> SessionSnapshot | None:
        """The session as a snapshot stamped with the last ``now`` seen, or ``None``."""
        s = self._session
        if s is None:
            return None
        return SessionSnapshot(
            session_id=s.id, seq=s.seq, shard=self._config.shard, saved_at=self._now
        )

    # --------------------------------------------------------------------------- outputs

    def drain(self) -> list[Output]:
        """Return and forget every output queued so far, oldest first."""
        out = self._outputs
        self._outputs = []
        return out

    def get_timer(self) -> float | None:
        """The earliest time at which :meth:`handle_timer` must be called, or ``None``.

        An absolute time on the caller's clock. Call ``handle_timer(max(deadline, now))``
        when it falls due, after feeding every payload already received (invariant 3).
        """
        ka = self._ka
        deadline = self._deadline
        if ka is None:
            return deadline
        due = ka.next_beat_at
        answer_at = ka.answer_at
        if answer_at is not None and answer_at < due:
            due = answer_at
        if deadline is None or due < deadline:
            return due
        return deadline

    # ----------------------------------------------------------------------------- verbs

    @api
    def start(self, now: float) -> None:
        """Begin the first connection attempt.

        Raises:
            LocalProtocolError: not in IDLE, or ``now`` is not a number.
        """
        now = self._clock(now)
        if self._model.state is not _S.IDLE:
            raise LocalProtocolError(f"start() in state {self._model.state.name}: started already")
        self._liveness.started_at = self._liveness.budget_from = now
        self._fire_or_raise("start", "started by the application")

    @api
    def handle_timer(self, now: float) -> None:
        """Run whatever fell due by ``now``: a beat, the ACK watchdog, a phase deadline.

        Calling it early does nothing; calling it late catches up once (beats are not sent
        twice to make up for a stall).
        """
        now = self._clock(now)
        for _ in range(_TIMER_LOOP_BOUND):
            ka = self._ka
            if ka is not None:
                if now >= ka.next_beat_at:
                    if ka.ack_pending:
                        self._on_zombie(ka, now)
                    else:
                        self._send_beat()
                        ka.beat_sent(now)
                    continue
                answer_at = ka.answer_at
                if answer_at is not None and now >= answer_at:
                    self._send_beat()
                    ka.answered(now)
                    continue
            deadline = self._deadline
            if deadline is not None and now >= deadline:
                self._on_deadline()
                continue
            return
        raise RuntimeError("handle_timer did not settle: a deadline is not moving forward")

    @api
    def close(self, now: float, *, end_session: bool = False) -> None:
        """Close for good; the connection ends in STOPPED. Idempotent once STOPPED.

        Args:
            now: the caller's clock.
            end_session: also end the gateway session (close code 1000, snapshot deleted).
                By default the session is kept (close code 4000) and a snapshot is emitted,
                so that a restarted process can Resume.

        Raises:
            LocalProtocolError: ``end_session`` is not a bool.
        """
        if type(end_session) is not bool:
            raise LocalProtocolError("end_session must be a bool")
        now = self._clock(now)
        state = self._model.state
        if state is _S.STOPPED:
            return
        self._end_session = end_session
        reason = APPLICATION_CLOSE.meaning
        if state in _WINDING_DOWN and self._exit is not None:
            # A close is already in flight: let it finish, then stop instead of reconnecting.
            # If it ends the session (op 9, say), a restart must not Resume it.
            if self._exit.policy.step is NextStep.IDENTIFY:
                self._drop_session(self._exit.policy.meaning, now)
            self._exit = replace(self._exit, policy=APPLICATION_CLOSE)
        else:
            code = None
            if state in _LINKED:
                code = 1000 if end_session else self._config.keep_session_close_code
            self._exit = Exit(APPLICATION_CLOSE, code, reason, by_server=False)
            if state is _S.CONNECTING:
                self._abort(reason)
        self._fire_or_raise("user_close", reason)
