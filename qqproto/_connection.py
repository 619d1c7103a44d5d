# The gateway session: one object per shard, fed inputs, producing outputs.
#
# Theory of operation (aioquic / h11 style). The caller owns the socket, the clock and the
# timers. It calls a verb for every input (`receive` for a payload, `connection_closed` for a
# close, `handle_timer` when `get_timer()` falls due, ...), always passing `now`, the time on
# its monotonic clock. Each verb may queue outputs, which the caller pulls with `drain()`:
# commands to execute (open, send, close, abort, fetch a token, ...) and events to report.
# Nothing here blocks, sleeps, reads a clock or draws from the global random generator.
#
# This module holds the verbs: each checks its arguments and routes the input. The rest is
# layered under it, each piece small enough to read alone:
#
#   _states.py        the lifecycle: states, their groups, triggers, guards, transitions
#   _lifecycle.py     the connection's state, firing triggers, the entry action of each state
#   _payloads.py      what each payload from the server means in the current state
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

import functools
from dataclasses import replace
from typing import TYPE_CHECKING, Concatenate, Literal, ParamSpec, TypeVar, cast

import orjson

from qqproto._checks import check_attempt, check_start_limit, is_int, is_number, is_text, seconds
from qqproto._close_codes import (
    APPLICATION_CLOSE,
    CLOSE_CODE_POLICY,
    CREDENTIALS_REJECTED,
    REQUEST_FAILED,
    REQUEST_UNAUTHORIZED,
    NextStep,
    policy_for_close,
)
from qqproto._codec import decode_object, decode_payload
from qqproto._errors import (
    FailureKind,
    InvalidResponse,
    LocalProtocolError,
    PayloadTooLarge,
    QQProtoError,
    RemoteProtocolError,
)
from qqproto._heartbeat import Health, Latency
from qqproto._outputs import Dispatch, DuplicateDropped, Output, _DispatchDraft
from qqproto._payloads import PayloadHandlers
from qqproto._reconnect import Exit
from qqproto._rest import SessionStartLimit, check_gateway_url, parse_expires_in
from qqproto._snapshot import SessionSnapshot
from qqproto._states import LINKED, RECEIVING, WINDING_DOWN, SessionState

if TYPE_CHECKING:
    import random
    from collections.abc import Callable

    from qqproto._config import SessionConfig

__all__ = ["GatewayConnection"]

_S = SessionState
_LINKED = frozenset(LINKED)
_WINDING_DOWN = frozenset(WINDING_DOWN)
_TIMER_LOOP_BOUND = 16
# receive()'s default for a missing `attempt`: a misuse, reported as one (not a TypeError).
_NO_ATTEMPT: int = cast("int", object())
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError
_READY = _S.READY

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _api(
    method: Callable[Concatenate[GatewayConnection, _P], _R],
) -> Callable[Concatenate[GatewayConnection, _P], _R]:
    """Fail fast after an internal error; turn an escaping bug into the ERROR state."""

    @functools.wraps(method)
    def wrapper(self: GatewayConnection, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._broken is not None:
            raise LocalProtocolError(
                "the connection is unusable after an internal error"
            ) from self._broken
        try:
            return method(self, *args, **kwargs)
        except QQProtoError:
            raise
        except TypeError as exc:
            tb = exc.__traceback__
            if tb is not None and tb.tb_next is None:
                # Raised by the call itself (a missing or unknown argument), before the
                # method ran: a misuse, and nothing changed.
                raise LocalProtocolError(str(exc)) from None
            self._break(exc)
            raise
        except Exception as exc:
            self._break(exc)
            raise

    return wrapper


class GatewayConnection(PayloadHandlers):
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

    @_api
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

    @_api
    def provide_token(self, token: str, expires_in: float | str, now: float) -> None:
        """Hand over an access token after a :class:`FetchToken` (or any time: it is cached).

        Args:
            token: the access token, without the ``QQBot`` prefix.
            expires_in: its remaining life in seconds, as the API sent it (int or numeric
                string). A malformed value is reported as a ProtocolViolation and the token
                is used once.

        Raises:
            LocalProtocolError: ``token`` is empty or not a ``str``, or ``expires_in`` is not
                an int, a float or a ``str``.
        """
        if not is_text(token) or not token:
            raise LocalProtocolError("token must be a non-empty str")
        if not is_number(expires_in) and not is_text(expires_in):
            raise LocalProtocolError("expires_in must be an int, a float or a numeric str")
        now = self._clock(now)
        try:
            ttl = parse_expires_in(expires_in)
        except RemoteProtocolError as err:
            self._violation(err)
            ttl = 0.0
        self._token.provide(token, ttl, now)
        if self._awaiting == "token" and self._model.state is _S.PREPARING:
            self._token.fresh = True
            self._awaiting = None
            self._advance_preparing(now)

    @_api
    def provide_gateway(
        self, url: str, now: float, *, session_start_limit: SessionStartLimit | None = None
    ) -> None:
        """Hand over the gateway URL (and, from ``/gateway/bot``, the session start limit).

        Raises:
            LocalProtocolError: ``url`` is not a ``ws://`` or ``wss://`` URL with a host and a
                valid port (:func:`~qqproto.check_gateway_url`; drivers that parse the answer
                with :func:`~qqproto.parse_gateway_response` never pass one), or
                ``session_start_limit`` is not a :class:`SessionStartLimit`.
        """
        try:
            check_gateway_url(url)
        except InvalidResponse as err:
            raise LocalProtocolError(str(err)) from None
        if session_start_limit is not None:
            check_start_limit(session_start_limit)
        now = self._clock(now)
        self._gateway_url = url
        if session_start_limit is not None:
            self._budget.update(session_start_limit, now)
        if self._awaiting == "gateway" and self._model.state is _S.PREPARING:
            self._awaiting = None
            self._advance_preparing(now)

    @_api
    def grant_identify(self, now: float) -> None:
        """The identify limiter granted the permit asked for by :class:`RequestIdentifyPermit`.

        A permit that arrives when none is awaited (the attempt was abandoned) is ignored.
        """
        now = self._clock(now)
        if self._awaiting == "permit" and self._model.state is _S.PREPARING:
            self._budget.permit = True
            self._awaiting = None
            self._advance_preparing(now)

    @_api
    def refuse_identify(self, reason: str, now: float, *, retry_after: float | None) -> None:
        """The identify limiter refused or failed the permit asked for.

        Args:
            reason: why, for events and logs (it must not hold a secret).
            now: the caller's clock.
            retry_after: seconds until a permit can be had (the daily budget resets then), or
                ``None`` when the limiter failed (its store is down, say). ``0`` backs off
                like a failure: "retry at once" must not become a tight loop.

        With ``retry_after`` the attempt waits exactly that long, a planned wait that
        :meth:`health` calls live; without it, it backs off like any failed attempt. A
        refusal that arrives when no permit is awaited is ignored.

        Raises:
            LocalProtocolError: ``reason`` is not a ``str`` or ``retry_after`` is negative or
                not a number.
        """
        if not is_text(reason):
            raise LocalProtocolError("reason must be a str")
        if retry_after is not None:
            retry_after = seconds("retry_after", retry_after)
        now = self._clock(now)
        if self._awaiting != "permit" or self._model.state is not _S.PREPARING:
            return
        self._awaiting = None
        self._exit = self._budget.refused(reason, retry_after)
        self._fire("prepare_failed", self._exit.reason)

    @_api
    def request_failed(
        self,
        reason: str,
        now: float,
        *,
        request: Literal["token", "gateway"],
        kind: FailureKind,
    ) -> None:
        """The token or gateway request the core asked for failed (HTTP error, timeout...).

        Args:
            reason: goes into events and logs: it must not hold a secret.
            now: the caller's clock.
            request: which request failed; a late failure of a request the core no longer
                waits for (it gave up on it and said so with :class:`AbandonRequest`) is
                ignored.
            kind: what a retry can do (:func:`~qqproto.classify_status` and
                :class:`~qqproto.InvalidResponse` ``.kind`` tell): ``TRANSIENT`` backs off and
                retries, ``AUTH`` also fetches a fresh token first, ``FATAL`` (wrong app id
                or secret) stops with a :class:`FatalStop` instead of retrying forever.

        Raises:
            LocalProtocolError: an argument of the wrong type.
        """
        if not is_text(reason):
            raise LocalProtocolError("reason must be a str")
        if request not in ("token", "gateway"):
            raise LocalProtocolError("request must be 'token' or 'gateway'")
        if type(kind) is not FailureKind:
            raise LocalProtocolError("kind must be a FailureKind")
        now = self._clock(now)
        if request != self._awaiting or self._model.state is not _S.PREPARING:
            return
        self._awaiting = None
        policy = {
            FailureKind.TRANSIENT: REQUEST_FAILED,
            FailureKind.AUTH: REQUEST_UNAUTHORIZED,
            FailureKind.FATAL: CREDENTIALS_REJECTED,
        }[kind]
        self._exit = Exit(policy, None, f"{request} request failed: {reason}", by_server=True)
        self._fire("prepare_failed", self._exit.reason)

    @_api
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

    @_api
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

    @_api
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

    @_api
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

    @_api
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

    @_api
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
