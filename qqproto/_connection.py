# The gateway session: one object per shard, fed inputs, producing outputs.
#
# Theory of operation (aioquic / h11 style). The caller owns the socket, the clock and the
# timers. It calls a verb for every input (`receive` for a payload, `connection_closed` for a
# close, `handle_timer` when `get_timer()` falls due, ...), always passing `now`, the time on
# its monotonic clock. Each verb may queue outputs, which the caller pulls with `drain()`:
# commands to execute (open, send, close, abort, fetch a token, ...) and events to report.
# Nothing here blocks, sleeps, reads a clock or draws from the global random generator.
#
# Lifecycle changes go through the pytransitions Machine declared in `_states.py` (one for
# all connections; each connection's `_Model` carries its own state). The connection decides
# which trigger an input means, records *why* (the `_Exit` of a connection: its close
# policy, code and reason), fires the trigger, and then
# runs the entry action of the state it landed in. All consequences of a disconnect - the
# failure counters, the resume budget, dropping the session, the delay - are settled in one
# place, `_settle`, when the connection is really gone (BACKOFF or STOPPED).
#
# The hot path - a dispatch or an ACK in READY - is plain code, not a trigger.
#
# Errors: misuse raises LocalProtocolError and changes nothing. Anything the server does
# wrong becomes a ProtocolViolation event and the payload is skipped. Any other exception is
# a bug: the connection moves to ERROR and every later call raises LocalProtocolError.
"""The sans-IO gateway connection."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Concatenate, Literal, ParamSpec, TypeVar, cast

import orjson
from transitions import MachineError

from qqproto._backoff import full_jitter_delay
from qqproto._close_codes import (
    APPLICATION_CLOSE,
    CLOSE_CODE_POLICY,
    CREDENTIALS_REJECTED,
    DEADLINE,
    INVALID_SESSION,
    INVALID_SESSION_RESUMABLE,
    RECONNECT_REQUEST,
    REQUEST_FAILED,
    REQUEST_UNAUTHORIZED,
    SERVER_RESET,
    START_LIMIT_EXHAUSTED,
    ZOMBIE,
    ClosePolicy,
    NextStep,
    policy_for_close,
)
from qqproto._codec import (
    Opcode,
    Payload,
    decode_object,
    decode_payload,
    encode_heartbeat,
    encode_identify,
    encode_resume,
)
from qqproto._config import SessionConfig
from qqproto._dedup import SeenIds
from qqproto._errors import (
    FailureKind,
    InvalidEnvelope,
    InvalidResponse,
    LocalProtocolError,
    PayloadTooLarge,
    QQProtoError,
    RemoteProtocolError,
    UnexpectedPayload,
)
from qqproto._heartbeat import Health, Keepalive, Latency
from qqproto._outputs import (
    AbandonRequest,
    AbortTransport,
    CloseConnection,
    Disconnected,
    DisconnectStorm,
    Dispatch,
    DuplicateDropped,
    FatalStop,
    FetchGateway,
    FetchToken,
    HeartbeatAcknowledged,
    HelloReceived,
    OpenConnection,
    Output,
    PersistSnapshot,
    ProtocolViolation,
    Ready,
    ReconnectScheduled,
    RequestIdentifyPermit,
    Resumed,
    SendPayload,
    SessionInvalidated,
    StateChanged,
    ZombieDetected,
    _DispatchDraft,
    make_dispatch,
)
from qqproto._rest import SessionStartLimit, check_gateway_url, parse_expires_in
from qqproto._snapshot import SessionSnapshot
from qqproto._states import SessionState, Trigger, shared_machine

if TYPE_CHECKING:
    import random
    from collections.abc import Callable

__all__ = ["GatewayConnection"]

_S = SessionState
_RECEIVING = frozenset(
    {_S.AWAITING_HELLO, _S.IDENTIFYING, _S.RESUMING, _S.READY, _S.ZOMBIE, _S.CLOSING}
)
_LINKED = frozenset({_S.AWAITING_HELLO, _S.IDENTIFYING, _S.RESUMING, _S.READY})
_WINDING_DOWN = frozenset({_S.ZOMBIE, _S.CLOSING})
_DELIVERING = frozenset({_S.RESUMING, _S.READY, _S.ZOMBIE, _S.CLOSING})
_TIMER_LOOP_BOUND = 16
# A Hello interval above an hour is a broken server, not a schedule (QQ sends ~41-45 s).
_MAX_HELLO_INTERVAL_MS = 3_600_000
_MAX_SEQ_GAPS = 1000
# Beyond 2**40 s (35,000 years) float seconds lose sub-millisecond resolution; such a `now`
# is a unit bug in the caller (nanoseconds?), not a time.
_MAX_TIME = float(2**40)


def _is_text(value: object) -> bool:
    # A function, so that checking an argument annotated `str` is not "always true" to mypy.
    return type(value) is str


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_attempt(attempt: object) -> int:
    if type(attempt) is not int:
        raise LocalProtocolError("attempt must be the int from OpenConnection.attempt")
    return attempt


def _check_start_limit(limit: object) -> None:
    if type(limit) is not SessionStartLimit:
        raise LocalProtocolError("session_start_limit must be a SessionStartLimit or None")
    counts = (limit.total, limit.remaining, limit.max_concurrency)
    if not all(_is_int(n) for n in counts):
        raise LocalProtocolError("session_start_limit counts must be ints")
    _seconds("session_start_limit.reset_after", limit.reset_after)


def _seconds(name: str, value: float) -> float:
    if not _is_number(value):
        raise LocalProtocolError(f"{name} must be a number of seconds")
    if not 0 <= value <= _MAX_TIME:  # NaN fails too
        raise LocalProtocolError(f"{name} must be between 0 and 2**40 seconds")
    return float(value)


# receive()'s default for a missing `attempt`: a misuse, reported as one (not a TypeError).
_NO_ATTEMPT: int = cast("int", object())
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError
_READY = _S.READY

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(slots=True)
class _Session:
    id: str
    seq: int | None
    # Seqs skipped over by a jump (a replay arriving out of order): only these may still be
    # delivered below `seq`. Empty in the usual, in-order case; bounded by _MAX_SEQ_GAPS.
    gaps: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Exit:
    """Why the current connection (or attempt) ends, decided when it starts ending."""

    policy: ClosePolicy
    code: int | None
    reason: str
    by_server: bool
    delay: float | None = None  # overrides the backoff (identify budget exhausted)


class _Model:
    """The object pytransitions drives; it only answers the guards of `_states.GUARDS`."""

    __slots__ = ("_conn", "state")
    state: SessionState

    def __init__(self, conn: GatewayConnection) -> None:
        self._conn = conn

    def can_resume(self) -> bool:
        return self._conn._session is not None

    def stopping(self) -> bool:
        ex = self._conn._exit
        return ex is not None and ex.policy.step is NextStep.STOP


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


class GatewayConnection:
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
        cfg = config if config is not None else SessionConfig()
        self._config = cfg
        self._rng = rng
        self._outputs: list[Output] = []
        self._now = -_MAX_TIME
        self._broken: BaseException | None = None
        self._end_session = False
        self._deadline: float | None = None
        self._ka: Keepalive | None = None
        self._session: _Session | None = None
        self._persisted: tuple[str, int | None] | None = None
        if snapshot is not None:
            if tuple(snapshot.shard) != cfg.shard:
                raise LocalProtocolError(
                    f"snapshot is for shard {snapshot.shard}, this connection is {cfg.shard}"
                )
            self._session = _Session(snapshot.session_id, snapshot.seq)
            self._persisted = (snapshot.session_id, snapshot.seq)
        # Token and gateway, kept across attempts.
        self._token: str | None = None
        self._token_expires_at = float("-inf")
        self._token_fresh = False  # provided during the current PREPARING: use it whatever its life
        self._force_token = False
        self._gateway_url: str | None = None
        self._start_limit: SessionStartLimit | None = None
        self._start_limit_reset_at = 0.0
        self._awaiting: Literal["token", "gateway", "permit"] | None = None
        self._permit = False
        # The current connection.
        self._exit: _Exit | None = None
        self._had_transport = False
        self._attempts = 0  # OpenConnection.attempt of the last transport asked for
        self._live_attempt: int | None = None  # the one whose reports are taken, if any
        self._opened_at: float | None = None
        self._up_since: float | None = None
        self._alive_at: float | None = None  # last sign of life from the server
        self._live_at: float | None = None  # last time health() found the session ready
        self._acked_at: float | None = None  # last ACK on any connection
        self._started_at = 0.0
        # The liveness budget runs from here when nothing was ready since: the start, or the
        # end of a planned wait (the daily identify budget), which is not a stuck session.
        self._budget_from = 0.0
        self._planned_until: float | None = None  # BACKOFF is a planned wait until then
        self._sent_resume = False
        self._replayed = 0
        # Across connections.
        self._failures = 0
        self._failed_resumes = 0
        self._op9_resumed = False  # the last connection ended with an op 9 d=true we honoured
        self._quick_disconnects = 0
        self._seen_events = SeenIds(max_items=cfg.dedup_max_ids, max_age=cfg.dedup_max_age)
        self._seen_messages = SeenIds(max_items=cfg.dedup_max_ids, max_age=cfg.dedup_max_age)
        self._dedup_types = cfg.dedup_event_types
        self._max_payload_size = cfg.max_payload_size

        self._model = _Model(self)
        self._model.state = _S.IDLE
        self._machine = shared_machine()
        self._entry: dict[SessionState, Callable[[float], None]] = {
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
        return self._failures

    def health(self, now: float) -> Health:
        """Is this connection doing its job? A pure verdict for supervisors.

        Ready means READY with an ACK (or the Hello) no older than two heartbeat intervals
        plus the close bound: the ACK watchdog's own worst case. Live means ready, or not
        ready for less than ``liveness_budget`` (a bounded reconnect in progress), or waiting
        on purpose for the daily identify budget to reset (the budget of liveness starts
        again when that wait ends). STOPPED and ERROR are never live.
        """
        state = self._model.state
        ka = self._ka
        ack_age = ka.since_last_ack(now) if ka is not None else None
        ready = False
        if state is _S.READY and ka is not None and ack_age is not None:
            ready = ack_age <= 2 * ka.interval + self._config.close_timeout
        since = None if self._live_at is None or ready else max(0.0, now - self._live_at)
        if state is _S.IDLE:
            return Health(
                live=True, ready=False, reason="not started", since_live=None, last_ack_age=None
            )
        acked = self._acked_at
        since_ack = max(0.0, now - (acked if acked is not None else self._started_at))
        if state in (_S.STOPPED, _S.ERROR):
            return Health(
                live=False,
                ready=False,
                reason=f"connection {state.name}",
                since_live=since,
                last_ack_age=ack_age,
                since_ack=since_ack,
            )
        if ready:
            return Health(
                live=True,
                ready=True,
                reason="",
                since_live=since,
                last_ack_age=ack_age,
                since_ack=since_ack,
            )
        planned = self._planned_until
        if state is _S.BACKOFF and planned is not None:
            return Health(
                live=True,
                ready=False,
                reason=f"waiting {max(0.0, planned - now):.0f} s for the identify budget to reset",
                since_live=since,
                last_ack_age=ack_age,
                since_ack=since_ack,
            )
        live_at = self._live_at
        waited = now - (self._budget_from if live_at is None else max(live_at, self._budget_from))
        live = waited <= self._config.liveness_budget
        reason = f"{state.name} for {waited:.0f} s" if state is not _S.READY else "ACKs late"
        return Health(
            live=live,
            ready=False,
            reason=reason,
            since_live=since,
            last_ack_age=ack_age,
            since_ack=since_ack,
        )

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
        self._started_at = self._budget_from = now
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
        if not _is_text(token) or not token:
            raise LocalProtocolError("token must be a non-empty str")
        if not _is_number(expires_in) and not _is_text(expires_in):
            raise LocalProtocolError("expires_in must be an int, a float or a numeric str")
        now = self._clock(now)
        try:
            ttl = parse_expires_in(expires_in)
        except RemoteProtocolError as err:
            self._violation(err)
            ttl = 0.0
        self._token = token
        self._token_expires_at = now + ttl
        self._force_token = False
        if self._awaiting == "token" and self._model.state is _S.PREPARING:
            self._token_fresh = True
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
            _check_start_limit(session_start_limit)
        now = self._clock(now)
        self._gateway_url = url
        if session_start_limit is not None:
            self._start_limit = session_start_limit
            # Kept as a time, not a duration: it may be acted on long after it arrived.
            self._start_limit_reset_at = now + session_start_limit.reset_after
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
            self._permit = True
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
        if not _is_text(reason):
            raise LocalProtocolError("reason must be a str")
        if retry_after is not None:
            retry_after = _seconds("retry_after", retry_after)
        now = self._clock(now)
        if self._awaiting != "permit" or self._model.state is not _S.PREPARING:
            return
        self._awaiting = None
        # "Retry at once" is no planned wait: a limiter that keeps saying it would otherwise
        # cycle PREPARING and BACKOFF as fast as it answers. Back off like a failure instead.
        if retry_after is None or retry_after <= 0:
            self._exit = _Exit(
                REQUEST_FAILED, None, f"identify permit failed: {reason}", by_server=False
            )
        else:
            self._exit = _Exit(
                START_LIMIT_EXHAUSTED,
                None,
                f"identify permit refused: {reason}",
                by_server=True,
                delay=retry_after,
            )
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
        if not _is_text(reason):
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
        self._exit = _Exit(policy, None, f"{request} request failed: {reason}", by_server=True)
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
        if _check_attempt(attempt) != self._live_attempt:
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
            if not _is_int(code) or not 0 <= code <= 0xFFFF:
                raise LocalProtocolError("code must be None or an int in 0-65535")
            code = int(code)
        if not _is_text(reason):
            raise LocalProtocolError("reason must be a str")
        now = self._clock(now)
        if _check_attempt(attempt) != self._live_attempt:
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
            self._exit = _Exit(policy, code, reason or policy.meaning, by_server=True)
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
            self._exit = _Exit(policy, code, reason or policy.meaning, by_server=True)
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
            or len(payload) > self._max_payload_size
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
                    if event_id is not None and self._seen_events.check_and_add(event_id, now):
                        out.append(DuplicateDropped(type=t, seq=s, key="event_id"))
                        return
                    d = get("d")
                    if t in self._dedup_types and type(d) is dict:
                        message_id = d.get("id")
                        if type(message_id) is str and self._seen_messages.check_and_add(
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
            _check_attempt(attempt)  # raises; True == 1 and 1.0 == 1 are no attempts
        now = self._clock(now)  # checked even for a stale report: a misuse is a misuse
        if attempt != self._live_attempt:
            return
        state = self._model.state
        if state not in _RECEIVING:
            raise LocalProtocolError(f"receive() in state {state.name}: no transport is open")
        try:
            p = decode_payload(payload, max_size=self._max_payload_size)
        except RemoteProtocolError as err:
            self._violation(err)
            return
        self._alive_at = now
        self._on_payload(p, state, now)

    def _on_payload(self, p: Payload, state: SessionState, now: float) -> None:
        op = p.op
        if op is Opcode.DISPATCH:
            self._on_dispatch(p, state, now)
        elif op is Opcode.HEARTBEAT_ACK:
            self._on_ack(now)
        elif state in _WINDING_DOWN:
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
        if _check_attempt(attempt) != self._live_attempt:
            return
        state = self._model.state
        if state not in _RECEIVING:
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
            self._exit = _Exit(APPLICATION_CLOSE, code, reason, by_server=False)
            if state is _S.CONNECTING:
                self._abort(reason)
        self._fire_or_raise("user_close", reason)

    # --------------------------------------------------------------- payload handlers

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
        if session is None or state not in _DELIVERING:
            self._violation(UnexpectedPayload(f"dispatch {t} before READY or RESUMED"))
            return
        s = p.s
        event_id = p.id
        if s is not None:
            last = session.seq
            if last is None or s > last:
                if last is not None and s > last + 1:
                    gaps = session.gaps
                    gaps.update(range(max(last + 1, s - _MAX_SEQ_GAPS), s))
                    if len(gaps) > 2 * _MAX_SEQ_GAPS:
                        # A server whose seq skips all the time: forget the old holes (no
                        # replay reaches that far back). Rebuilt rarely, so O(1) amortised.
                        session.gaps = {g for g in gaps if g > s - _MAX_SEQ_GAPS}
                session.seq = s
            elif s in session.gaps:
                session.gaps.discard(s)  # a replay out of order: late, but not lost
            else:
                self._outputs.append(DuplicateDropped(type=t, seq=s, key="seq"))
                return
        if event_id is not None and self._seen_events.check_and_add(event_id, now):
            self._outputs.append(DuplicateDropped(type=t, seq=s, key="event_id"))
            return
        d = p.d
        if t in self._dedup_types and type(d) is dict:
            message_id = d.get("id")
            if type(message_id) is str and self._seen_messages.check_and_add(message_id, now):
                self._outputs.append(DuplicateDropped(type=t, seq=s, key="message_id"))
                return
        if state is _S.RESUMING:
            self._replayed += 1
        self._outputs.append(make_dispatch(t, s, event_id, d))

    def _on_ready(self, p: Payload, state: SessionState, now: float) -> None:
        if state is not _S.IDENTIFYING:
            self._violation(UnexpectedPayload("READY outside of an Identify"))
            return
        d = p.d
        session_id = d.get("session_id") if isinstance(d, dict) else None
        if not isinstance(session_id, str) or not session_id:
            # Without a session id nothing can be resumed; the auth deadline recovers.
            self._violation(InvalidEnvelope("READY without a 'session_id'", field="d"))
            return
        self._session = _Session(session_id, p.s)
        self._fire("recv_ready", "READY")
        self._emit(Ready(session_id=session_id, seq=p.s, data=d))
        self._persist(now)

    def _on_resumed(self, p: Payload, state: SessionState, now: float) -> None:
        session = self._session
        if state is not _S.RESUMING or session is None:
            self._violation(UnexpectedPayload("RESUMED outside of a Resume"))
            return
        # RESUMED carries the next sequence number (PROTOCOL.md §2); beats carry it from now on.
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
        self._acked_at = now
        if self._model.state is _S.READY:
            self._live_at = now  # the evidence health() judges by
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
        if state is _S.AWAITING_HELLO:
            self._violation(UnexpectedPayload("invalid session (op 9) before Hello"))
            return
        # `d: true` (Discord: "resumable") has never been seen from QQ; honour it once in a
        # row, then stop trusting it so that op 9 cannot drive a resume loop (S11).
        resumable = p.d is True and not self._op9_resumed and self._session is not None
        policy = INVALID_SESSION_RESUMABLE if resumable else INVALID_SESSION
        self._leave("recv_invalid_session", policy, policy.meaning)

    def _on_zombie(self, ka: Keepalive, now: float) -> None:
        since = ka.since_last_ack(now)
        self._exit = _Exit(
            ZOMBIE,
            self._config.keep_session_close_code,
            f"no heartbeat ACK for {since:.1f} s",
            by_server=False,
        )
        self._fire("ack_missed", self._exit.reason)
        self._emit(ZombieDetected(since_last_ack=since, interval=ka.interval))

    def _on_deadline(self) -> None:
        state = self._model.state
        cfg = self._config
        if state is _S.BACKOFF:
            self._fire("timer_expired", "backoff elapsed")
            return
        if state in _WINDING_DOWN:
            reason = f"close handshake did not complete within {cfg.close_timeout:g} s"
            self._abort(reason)
            self._fire("timer_expired", reason)
            return
        if state is _S.PREPARING:
            reason = f"{self._awaiting} request took longer than {cfg.http_timeout:g} s"
            self._exit = _Exit(DEADLINE, None, reason, by_server=False)
        elif state is _S.CONNECTING:
            reason = f"connection not open within {cfg.connect_timeout:g} s"
            self._exit = _Exit(DEADLINE, None, reason, by_server=False)
            self._gateway_url = None  # as for a failed connect: ask for the URL again
            self._abort(reason)
        else:
            waited = {
                _S.AWAITING_HELLO: ("Hello", cfg.hello_timeout),
                _S.IDENTIFYING: ("READY", cfg.auth_timeout),
                _S.RESUMING: ("RESUMED", cfg.auth_timeout),
            }.get(state)
            if waited is None:
                raise RuntimeError(f"deadline set in state {state.name}, which has none")
            reason = f"no {waited[0]} within {waited[1]:g} s"
            self._exit = _Exit(DEADLINE, cfg.keep_session_close_code, reason, by_server=False)
        self._fire("timer_expired", reason)

    # ------------------------------------------------------------------ entry actions

    def _enter_preparing(self, now: float) -> None:
        if self._planned_until is not None:
            self._planned_until = None
            self._budget_from = now
        self._token_fresh = False
        self._permit = False
        self._awaiting = None
        self._exit = None
        self._advance_preparing(now)

    def _advance_preparing(self, now: float) -> None:
        cfg = self._config
        need_token = (
            self._token is None
            or self._force_token
            or (not self._token_fresh and self._token_expires_at - now < cfg.token_refresh_margin)
        )
        if need_token:
            self._await("token", now, FetchToken(force=self._force_token))
            return
        if self._gateway_url is None:
            self._await("gateway", now, FetchGateway(token=self._require_token()))
            return
        if self._session is None and not self._permit:
            limit = self._start_limit
            if limit is not None and limit.remaining <= 0:
                # Refuse to Identify: it would fail and might count against the budget.
                # Wait for the reset, then fetch the limit again.
                self._gateway_url = None
                self._start_limit = None
                left = self._start_limit_reset_at - now
                delay = left if left > 0 else None
                self._exit = _Exit(
                    START_LIMIT_EXHAUSTED,
                    None,
                    START_LIMIT_EXHAUSTED.meaning,
                    by_server=True,
                    delay=delay,
                )
                self._fire("prepare_failed", self._exit.reason)
                return
            concurrency = limit.max_concurrency if limit is not None else None
            self._await(
                "permit",
                None,
                RequestIdentifyPermit(shard_id=cfg.shard[0], max_concurrency=concurrency),
            )
            return
        self._deadline = None
        self._fire("prepared", "token, gateway URL and permit ready")

    def _await(
        self,
        what: Literal["token", "gateway", "permit"],
        now: float | None,
        command: FetchToken | FetchGateway | RequestIdentifyPermit,
    ) -> None:
        # The permit wait has no core deadline: a fleet may queue for minutes, and the
        # socket is not open yet. The limiter is responsible for progress.
        self._awaiting = what
        self._deadline = None if now is None else now + self._config.http_timeout
        self._emit(command)

    def _enter_connecting(self, now: float) -> None:
        url = self._gateway_url
        if url is None:
            raise RuntimeError("CONNECTING without a gateway URL")
        self._had_transport = True
        self._deadline = now + self._config.connect_timeout
        self._attempts += 1
        self._live_attempt = self._attempts
        self._emit(OpenConnection(url=url, attempt=self._attempts))

    def _abort(self, reason: str) -> None:
        """Give up on the transport: nothing it reports any more is taken."""
        self._live_attempt = None
        self._emit(AbortTransport(reason=reason))

    def _enter_awaiting_hello(self, now: float) -> None:
        self._opened_at = now
        self._deadline = now + self._config.hello_timeout

    def _enter_identifying(self, now: float) -> None:
        cfg = self._config
        self._session = None
        self._permit = False
        self._sent_resume = False
        limit = self._start_limit
        if limit is not None:
            self._start_limit = replace(limit, remaining=limit.remaining - 1)
        text = encode_identify(
            self._require_token(),
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
        text = encode_resume(self._require_token(), session_id=session.id, seq=session.seq)
        self._emit(SendPayload(op=Opcode.RESUME, text=text))
        self._deadline = now + self._config.auth_timeout

    def _enter_ready(self, now: float) -> None:
        self._deadline = None
        self._up_since = now
        self._live_at = now

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
        step, delay, attempt = self._settle(ex, now)
        at = now + delay
        self._deadline = at
        if ex.delay is not None:
            self._planned_until = at
        if self._had_transport:
            self._had_transport = False
            self._outputs.insert(
                mark,
                Disconnected(
                    code=ex.code,
                    reason=ex.reason,
                    by_server=ex.by_server,
                    next_step=step,
                    reconnect_at=at,
                ),
            )
        self._emit(ReconnectScheduled(delay=delay, at=at, attempt=attempt, reason=ex.reason))

    def _enter_stopped(self, now: float) -> None:
        ex = self._exit
        if ex is None:
            raise RuntimeError("STOPPED without a recorded reason")
        mark = len(self._outputs)
        self._settle(ex, now)
        self._deadline = None
        if self._had_transport:
            self._had_transport = False
            self._outputs.insert(
                mark,
                Disconnected(
                    code=ex.code,
                    reason=ex.reason,
                    by_server=ex.by_server,
                    next_step=NextStep.STOP,
                    reconnect_at=None,
                ),
            )
        if ex.policy is APPLICATION_CLOSE and not self._end_session:
            self._persist(now)  # keep the session for a restart to Resume
            return
        if self._session is not None:
            self._session = None
            self._persist(now)
        if ex.policy is not APPLICATION_CLOSE:
            self._emit(FatalStop(code=ex.code, reason=ex.policy.meaning, hint=ex.policy.hint))

    # ------------------------------------------------------------------------ policy

    def _settle(self, ex: _Exit, now: float) -> tuple[NextStep, float, int]:
        """Apply the consequences of the connection that just ended.

        Returns the next step, the delay before the next attempt, and the attempt count.
        """
        cfg = self._config
        policy = ex.policy
        self._ka = None
        # "Stayed up" is measured to the server's last sign of life, not to the moment we
        # noticed the death: a Resume that the server accepts and then ignores must count
        # as a failed resume, however long the watchdog took to notice.
        up, alive = self._up_since, self._alive_at
        stayed_up = up is not None and alive is not None and alive - up >= cfg.stable_after
        if stayed_up:
            self._failures = 0
            self._failed_resumes = 0
            self._quick_disconnects = 0
        elif self._sent_resume:
            self._failed_resumes += 1
        if self._had_transport and not stayed_up and policy is not APPLICATION_CLOSE:
            opened = self._opened_at
            if opened is None or now - opened < cfg.storm_window:
                self._note_quick_disconnect(ex)
        self._opened_at = None
        self._up_since = None
        self._alive_at = None
        self._sent_resume = False
        if policy.refresh_token:
            self._force_token = True
        self._op9_resumed = policy is INVALID_SESSION_RESUMABLE

        step = policy.step
        if step is NextStep.RESUME and self._session is None:
            step = NextStep.IDENTIFY
        if step is NextStep.RESUME and self._failed_resumes >= cfg.max_failed_resumes:
            self._drop_session(f"resume failed {self._failed_resumes} times in a row", now)
            step = NextStep.IDENTIFY
        elif step is NextStep.IDENTIFY and self._session is not None:
            self._drop_session(policy.meaning, now)
        if step is NextStep.STOP:
            return step, 0.0, self._failures

        if ex.delay is not None:
            return step, ex.delay, self._failures
        if policy.rotation and stayed_up:
            return step, 0.0, 0
        self._failures += 1
        if policy.cooldown:
            return step, cfg.rate_limit_cooldown, self._failures
        delay = full_jitter_delay(
            self._failures, self._rng, base=cfg.backoff_base, cap=cfg.backoff_cap
        )
        return step, delay, self._failures

    def _note_quick_disconnect(self, ex: _Exit) -> None:
        self._quick_disconnects += 1
        count = self._quick_disconnects
        if count % self._config.storm_threshold == 0:
            hint = ex.policy.hint or (
                "connections keep ending right after they open: check the network or proxy, "
                "the credentials, and the intents"
            )
            self._emit(DisconnectStorm(code=ex.code, count=count, hint=hint))

    def _drop_session(self, reason: str, now: float) -> None:
        session = self._session
        if session is None:
            return
        self._session = None
        self._failed_resumes = 0  # the resume budget belongs to the session
        self._emit(SessionInvalidated(session_id=session.id, last_seq=session.seq, reason=reason))
        self._persist(now)

    # ----------------------------------------------------------------------- helpers

    def _clock(self, now: float) -> float:
        # Time never runs backwards inside the core: a driver that passes max(deadline, now)
        # to handle_timer may pass a slightly smaller clock reading to the next verb.
        kind = type(now)
        if kind is not float and kind is not int:
            if not _is_number(now):
                raise LocalProtocolError(
                    f"now must be a clock reading in seconds, not {type(now).__name__}"
                )
            now = float(now)
        if self._now <= now <= _MAX_TIME:
            self._now = now
            return now
        if not -_MAX_TIME <= now <= _MAX_TIME:  # NaN fails every comparison
            raise LocalProtocolError(f"now={now} is not a monotonic clock reading in seconds")
        return self._now

    def _emit(self, output: Output) -> None:
        self._outputs.append(output)

    def _violation(self, error: RemoteProtocolError) -> None:
        self._outputs.append(ProtocolViolation(error=error, kind=error.reason))

    def _send_beat(self) -> None:
        session = self._session
        text = encode_heartbeat(session.seq if session is not None else None)
        self._outputs.append(SendPayload(op=Opcode.HEARTBEAT, text=text))

    def _persist(self, now: float) -> None:
        """Emit PersistSnapshot when the session id or seq changed since the last one."""
        session = self._session
        key = (session.id, session.seq) if session is not None else None
        if key == self._persisted:
            return
        self._persisted = key
        snapshot = None
        if session is not None:
            snapshot = SessionSnapshot(
                session_id=session.id, seq=session.seq, shard=self._config.shard, saved_at=now
            )
        self._emit(PersistSnapshot(snapshot=snapshot))

    def _require_token(self) -> str:
        if self._token is None:
            raise RuntimeError("authenticating without a token")
        return self._token

    def _leave(self, trigger: Trigger, policy: ClosePolicy, reason: str) -> None:
        """End a live connection at the server's request."""
        self._exit = _Exit(policy, self._config.keep_session_close_code, reason, by_server=True)
        self._fire(trigger, reason)

    def _fire(self, trigger: Trigger, reason: str) -> None:
        model = self._model
        old = model.state
        if not self._machine.events[trigger].trigger(model):
            raise RuntimeError(f"{trigger} from {old.name}: no transition matched")
        new = model.state
        if new is not old:
            self._outputs.append(StateChanged(old=old, new=new, reason=reason))
            awaiting = self._awaiting
            if awaiting is not None:
                self._awaiting = None
                self._emit(AbandonRequest(request=awaiting))
            entry = self._entry.get(new)
            if entry is not None:
                entry(self._now)

    def _fire_or_raise(self, trigger: Trigger, reason: str) -> None:
        state = self._model.state
        if state.name not in self._machine.events[trigger].transitions:
            raise LocalProtocolError(f"{trigger} is not allowed in state {state.name}")
        try:
            self._fire(trigger, reason)
        except MachineError as exc:  # pragma: no cover - guarded by the check above
            raise LocalProtocolError(str(exc)) from None

    def _break(self, exc: BaseException) -> None:
        self._broken = exc
        self._ka = None
        self._deadline = None
        old = self._model.state
        try:
            self._machine.events["fail"].trigger(self._model)
        except Exception:  # noqa: BLE001 - the machine itself may be what broke
            self._model.state = _S.ERROR
        self._outputs.append(StateChanged(old=old, new=_S.ERROR, reason=f"internal error: {exc!r}"))
