# ZOMBIE, CLOSING, BACKOFF, STOPPED: how a connection ends, and what its end costs.
#
# A connection starts ending when something records an `Exit` (a close from the server, a
# deadline, a missed ACK, the application) and fires the trigger; ZOMBIE and CLOSING send
# our close and wait for the transport to go (`close_timeout`, then an abort). The end is
# settled once, when the transport is really gone (BACKOFF or STOPPED): the reconnect policy
# (`_reconnect.py`) decides the failures, the resume budget, a storm and the delay, and this
# layer carries the verdict out: Disconnected first, then what it causes (SessionInvalidated,
# DisconnectStorm, PersistSnapshot), then ReconnectScheduled or FatalStop.
"""The teardown phase: closing, settling a disconnect, backing off or stopping."""

from __future__ import annotations

from qqproto._checks import check_attempt, is_int, is_text
from qqproto._close_codes import APPLICATION_CLOSE, CLOSE_CODE_POLICY, NextStep, policy_for_close
from qqproto._errors import LocalProtocolError
from qqproto._lifecycle import Lifecycle, api
from qqproto._outputs import (
    CloseConnection,
    Disconnected,
    FatalStop,
    ReconnectScheduled,
    SessionInvalidated,
)
from qqproto._reconnect import Exit
from qqproto._states import LINKED, WINDING_DOWN, SessionState

__all__ = ["Teardown"]

_S = SessionState
_LINKED = frozenset(LINKED)
_WINDING_DOWN = frozenset(WINDING_DOWN)


class Teardown(Lifecycle):
    """The verb that reports a transport gone, the entry actions and deadlines of an end."""

    @api
    def connection_closed(self, code: int | None, reason: str, now: float, *, attempt: int) -> None:
        """The transport closed or failed: a close frame (``code``), EOF or an error (``None``).

        Also the way to report that :class:`OpenConnection` failed.

        Args:
            code: the close code received, or ``None`` (EOF, a failure; also 1006).
            reason: the close reason or the failure; it must not hold a secret.
            now: the caller's clock.
            attempt: the ``OpenConnection.attempt`` this report is about: reports about a
                transport that was aborted, or has already closed, are ignored, however late
                they come.

        Raises:
            LocalProtocolError: a wrong argument type (``code`` outside 0-65535 included).
        """
        # Any 16-bit code can arrive in a close frame; one outside the registered ranges is
        # the peer's business (an unknown close), not a misuse of this verb.
        if code is not None:
            # An int subclass is fine (wsproto reports known codes as its CloseReason enum).
            if not is_int(code) or not 0 <= code <= 0xFFFF:
                raise LocalProtocolError("code must be None or an int in 0-65535")
            code = int(code)
        if not is_text(reason):
            raise LocalProtocolError("reason must be a str")
        now = self._clock(now)
        if check_attempt(attempt) != self._live_attempt:
            return
        self._live_attempt = None
        # A close frame is no sign of life of the *session*: a server that echoes our
        # closes while never acknowledging a beat must not look like a session that stayed up.
        state = self._model.state
        ex = self._exit
        if state is _S.CONNECTING:
            # The URL may be what fails (a node gone, a stale answer): ask /gateway/bot again
            # on the next attempt rather than dialling the same address forever.
            self._gateway_url = None
        if state in _LINKED or state is _S.CONNECTING:
            policy = policy_for_close(code)
            self._exit = Exit(policy, code, reason or policy.meaning, by_server=True)
        elif (
            state in _WINDING_DOWN
            and ex is not None
            and ex.policy is not APPLICATION_CLOSE
            and code is not None
            and code != ex.code
            and code in CLOSE_CODE_POLICY
        ):
            # The server answered our close with a documented QQ code of its own (4914,
            # 4004, ...): its verdict is better informed than our reason for closing.
            policy = CLOSE_CODE_POLICY[code]
            self._exit = Exit(policy, code, reason or policy.meaning, by_server=True)
        self._fire_or_raise("transport_closed", f"transport closed ({code})")

    # ---------------------------------------------------------------- entry actions

    def _enter_closing(self, now: float) -> None:
        # ZOMBIE and CLOSING: the keepalive dies with the connection; no beat can follow.
        ex = self._exit
        if ex is None:
            raise RuntimeError("closing without a recorded reason")
        self._ka = None
        code = ex.code if ex.code is not None else self._config.keep_session_close_code
        self._emit(CloseConnection(code=code, reason=ex.policy.meaning))
        self._deadline = now + self._config.close_timeout

    def _enter_backoff(self, now: float) -> None:
        ex = self._exit
        if ex is None:
            raise RuntimeError("BACKOFF without a recorded reason")
        # The Disconnected goes before what settling it causes (SessionInvalidated, a storm).
        mark = len(self._outputs)
        step, delay, failures = self._settle(ex, now)
        at = now + delay
        self._deadline = at
        if ex.delay is not None:
            self._liveness.planned_until = at
        self._disconnected(mark, ex, step, at)
        scheduled = ReconnectScheduled(
            delay=delay, reconnect_at=at, failures=failures, reason=ex.reason
        )
        self._emit(scheduled)

    def _enter_stopped(self, now: float) -> None:
        ex = self._exit
        if ex is None:
            raise RuntimeError("STOPPED without a recorded reason")
        mark = len(self._outputs)
        self._settle(ex, now)
        self._deadline = None
        self._disconnected(mark, ex, NextStep.STOP, None)
        if ex.policy is APPLICATION_CLOSE and not self._end_session:
            self._persist(now)  # keep the session for a restart to Resume
            return
        if self._session is not None:
            self._session = None
            self._persist(now)
        if ex.policy is not APPLICATION_CLOSE:
            self._emit(FatalStop(code=ex.code, reason=ex.policy.meaning, hint=ex.policy.hint))

    def _disconnected(self, mark: int, ex: Exit, step: NextStep, at: float | None) -> None:
        if self._had_transport:
            self._had_transport = False
            event = Disconnected(
                code=ex.code,
                reason=ex.reason,
                by_server=ex.by_server,
                next_step=step,
                reconnect_at=at,
            )
            self._outputs.insert(mark, event)

    def _settle(self, ex: Exit, now: float) -> tuple[NextStep, float, int]:
        """Carry out the reconnect policy's verdict on the connection that just ended."""
        self._ka = None
        verdict = self._reconnects.settle(
            ex,
            now,
            had_transport=self._had_transport,
            opened_at=self._opened_at,
            up_since=self._up_since,
            alive_at=self._alive_at,
            sent_resume=self._sent_resume,
            has_session=self._session is not None,
        )
        self._opened_at = self._up_since = self._alive_at = None
        self._sent_resume = False
        if verdict.storm is not None:
            self._emit(verdict.storm)
        if ex.policy.refresh_token:
            self._token.force = True
        if verdict.drop is not None:
            self._drop_session(verdict.drop, now)
        return verdict.step, verdict.delay, verdict.failures

    def _drop_session(self, reason: str, now: float) -> None:
        session = self._session
        if session is None:
            return
        self._session = None
        self._reconnects.failed_resumes = 0  # the resume budget belongs to the session
        self._emit(SessionInvalidated(session_id=session.id, last_seq=session.seq, reason=reason))
        self._persist(now)

    # -------------------------------------------------------------------- deadlines

    def _backoff_elapsed(self) -> None:
        self._fire("timer_expired", "backoff elapsed")

    def _close_overdue(self) -> None:
        reason = f"close handshake did not complete within {self._config.close_timeout:g} s"
        self._abort(reason)
        self._fire("timer_expired", reason)
