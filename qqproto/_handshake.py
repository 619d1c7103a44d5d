# CONNECTING to READY: from asking for a socket to a live session.
#
# The driver opens the WebSocket (CONNECTING, bounded by `connect_timeout`) and reports it
# with `connection_opened`; the server's Hello (AWAITING_HELLO, `hello_timeout`) starts the
# keepalive (`_payloads.py`), and the session is then either resumed, when one is held, or
# identified anew (IDENTIFYING or RESUMING, `auth_timeout`) until READY or RESUMED lands in
# READY. Each state's deadline, when it falls due, closes the attempt and backs off.
"""The handshake phase: opening the socket, Hello, Identify or Resume, READY."""

from __future__ import annotations

from qqproto._checks import check_attempt
from qqproto._close_codes import DEADLINE
from qqproto._codec import Opcode, encode_identify, encode_resume
from qqproto._lifecycle import Lifecycle, api
from qqproto._outputs import OpenConnection, SendPayload
from qqproto._reconnect import Exit
from qqproto._states import SessionState

__all__ = ["Handshake"]

_S = SessionState


class Handshake(Lifecycle):
    """The verb that reports the socket open, the handshake's entry actions and deadlines."""

    @api
    def connection_opened(self, now: float, *, attempt: int) -> None:
        """The WebSocket asked for by :class:`OpenConnection` is open.

        Args:
            now: the caller's clock.
            attempt: the ``OpenConnection.attempt`` this report is about: a report about a
                transport the core has given up on is ignored, however late it comes.

        Raises:
            LocalProtocolError: no connection is being opened, or a wrong argument type.
        """
        self._clock(now)
        if check_attempt(attempt) != self._live_attempt:
            return
        self._fire_or_raise("transport_opened", "transport open")

    # ---------------------------------------------------------------- entry actions

    def _enter_connecting(self, now: float) -> None:
        url = self._gateway_url
        if url is None:
            raise RuntimeError("CONNECTING without a gateway URL")
        self._had_transport = True
        self._deadline = now + self._config.connect_timeout
        self._attempts += 1
        self._live_attempt = self._attempts
        self._emit(OpenConnection(url=url, attempt=self._attempts))

    def _enter_awaiting_hello(self, now: float) -> None:
        self._opened_at = now
        self._deadline = now + self._config.hello_timeout

    def _enter_identifying(self, now: float) -> None:
        cfg = self._config
        self._session = None
        self._sent_resume = False
        self._budget.spend()
        text = encode_identify(
            self._token.require(),
            intents=int(cfg.intents),
            shard=cfg.shard,
            properties=cfg.properties,
        )
        self._emit(SendPayload(op=Opcode.IDENTIFY, text=text))
        self._deadline = now + cfg.auth_timeout

    def _enter_resuming(self, now: float) -> None:
        session = self._session
        if session is None:
            raise RuntimeError("RESUMING without a session")
        self._sent_resume = True
        self._replayed = 0
        text = encode_resume(self._token.require(), session_id=session.id, seq=session.seq)
        self._emit(SendPayload(op=Opcode.RESUME, text=text))
        self._deadline = now + self._config.auth_timeout

    def _enter_ready(self, now: float) -> None:
        self._deadline = None
        self._up_since = now
        self._liveness.live_at = now

    # -------------------------------------------------------------------- deadlines

    def _connect_overdue(self) -> None:
        reason = f"connection not open within {self._config.connect_timeout:g} s"
        self._exit = Exit(DEADLINE, None, reason, by_server=False)
        self._gateway_url = None  # as for a failed connect: ask for the URL again
        self._abort(reason)
        self._fire("timer_expired", reason)

    def _answer_overdue(self) -> None:
        cfg = self._config
        state = self._model.state
        if state is _S.AWAITING_HELLO:
            reason = f"no Hello within {cfg.hello_timeout:g} s"
        else:
            answer = "RESUMED" if state is _S.RESUMING else "READY"
            reason = f"no {answer} within {cfg.auth_timeout:g} s"
        self._exit = Exit(DEADLINE, cfg.keep_session_close_code, reason, by_server=False)
        self._fire("timer_expired", reason)
