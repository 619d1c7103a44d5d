# The inner half of the connection: its state, how it changes state, and what entering each
# state does. `GatewayConnection` (`_connection.py`) adds the verbs on top; the payload
# handlers (`_payloads.py`) sit between the two.
#
# Lifecycle changes go through the pytransitions Machine declared in `_states.py` (one for
# all connections; each connection's `_Model` carries its own state). The connection decides
# which trigger an input means, records *why* (the `Exit` of a connection: its close policy,
# code and reason), fires the trigger, and then runs the entry action of the state it landed
# in. The consequences of a disconnect are decided in one place (`_reconnect.Reconnects`),
# when the connection is really gone (BACKOFF or STOPPED), and carried out here.
"""The connection's state, its triggers and its entry actions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from qqproto._checks import MAX_TIME, is_number
from qqproto._close_codes import APPLICATION_CLOSE, DEADLINE, ClosePolicy, NextStep
from qqproto._codec import Opcode, encode_heartbeat, encode_identify, encode_resume
from qqproto._config import SessionConfig
from qqproto._delivery import Dedup, Session
from qqproto._errors import LocalProtocolError, RemoteProtocolError
from qqproto._liveness import Liveness
from qqproto._outputs import (
    AbandonRequest,
    AbortTransport,
    CloseConnection,
    Disconnected,
    FatalStop,
    FetchGateway,
    FetchToken,
    OpenConnection,
    Output,
    PersistSnapshot,
    ProtocolViolation,
    ReconnectScheduled,
    RequestIdentifyPermit,
    SendPayload,
    SessionInvalidated,
    StateChanged,
)
from qqproto._reconnect import Exit, Reconnects
from qqproto._snapshot import SessionSnapshot
from qqproto._start_budget import StartBudget
from qqproto._states import ALLOWED, DEADLINES, Deadline, SessionState, Trigger, shared_machine
from qqproto._token import TokenPolicy

if TYPE_CHECKING:
    import random
    from collections.abc import Callable

    from qqproto._heartbeat import Keepalive

__all__ = ["Lifecycle"]

_S = SessionState


class _Model:
    """The object pytransitions drives; it only answers the guards of `_states.GUARDS`."""

    __slots__ = ("_conn", "state")
    state: SessionState

    def __init__(self, conn: Lifecycle) -> None:
        self._conn = conn

    def can_resume(self) -> bool:
        return self._conn._session is not None

    def stopping(self) -> bool:
        ex = self._conn._exit
        return ex is not None and ex.policy.step is NextStep.STOP


class Lifecycle:
    """The state of one connection and the transitions between its lifecycle states."""

    def __init__(
        self, config: SessionConfig | None, rng: random.Random, snapshot: SessionSnapshot | None
    ) -> None:
        cfg = config if config is not None else SessionConfig()
        self._config = cfg
        self._rng = rng
        self._outputs: list[Output] = []
        self._now = -MAX_TIME
        self._broken: BaseException | None = None
        self._end_session = False
        self._deadline: float | None = None
        self._ka: Keepalive | None = None
        self._session: Session | None = None
        self._persisted: tuple[str, int | None] | None = None
        if snapshot is not None:
            if tuple(snapshot.shard) != cfg.shard:
                raise LocalProtocolError(
                    f"snapshot is for shard {snapshot.shard}, this connection is {cfg.shard}"
                )
            self._session = Session(snapshot.session_id, snapshot.seq)
            self._persisted = (snapshot.session_id, snapshot.seq)
        # Kept across attempts: the policies.
        self._token = TokenPolicy()
        self._budget = StartBudget()
        self._reconnects = Reconnects(cfg, rng)
        self._liveness = Liveness()
        self._dedup = Dedup(cfg)
        self._gateway_url: str | None = None
        self._awaiting: Literal["token", "gateway", "permit"] | None = None
        # The current connection.
        self._exit: Exit | None = None
        self._had_transport = False
        self._attempts = 0  # OpenConnection.attempt of the last transport asked for
        self._live_attempt: int | None = None  # the one whose reports are taken, if any
        self._opened_at: float | None = None
        self._up_since: float | None = None
        self._alive_at: float | None = None  # last sign of life from the server
        self._sent_resume = False
        self._replayed = 0

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
        # What a due phase deadline means, by the deadline its state runs under.
        self._on_due: dict[Deadline, Callable[[], None]] = {
            Deadline.REQUEST: self._request_overdue,
            Deadline.CONNECT: self._connect_overdue,
            Deadline.HELLO: self._answer_overdue,
            Deadline.AUTH: self._answer_overdue,
            Deadline.CLOSE: self._close_overdue,
            Deadline.BACKOFF: self._backoff_elapsed,
        }

    # ------------------------------------------------------------------ entry actions

    def _enter_preparing(self, now: float) -> None:
        live = self._liveness
        if live.planned_until is not None:
            live.planned_until = None
            live.budget_from = now
        self._token.fresh = False
        self._budget.permit = False
        self._awaiting = None
        self._exit = None
        self._advance_preparing(now)

    def _advance_preparing(self, now: float) -> None:
        cfg = self._config
        token = self._token
        if token.needs_fetch(now, cfg.token_refresh_margin):
            self._await("token", now, FetchToken(force=token.force))
            return
        if self._gateway_url is None:
            self._await("gateway", now, FetchGateway(token=token.require()))
            return
        budget = self._budget
        if self._session is None and not budget.permit:
            exhausted = budget.exhausted(now)
            if exhausted is not None:
                self._gateway_url = None  # /gateway/bot tells the limit again
                self._exit = exhausted
                self._fire("prepare_failed", exhausted.reason)
                return
            permit = RequestIdentifyPermit(
                shard_id=cfg.shard[0], max_concurrency=budget.max_concurrency
            )
            self._await("permit", None, permit)
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

    # ---------------------------------------------------------------------- deadlines

    def _on_deadline(self) -> None:
        state = self._model.state
        due = self._on_due.get(DEADLINES[state])
        if due is None:
            raise RuntimeError(f"deadline set in state {state.name}, which has none")
        due()

    def _backoff_elapsed(self) -> None:
        self._fire("timer_expired", "backoff elapsed")

    def _close_overdue(self) -> None:
        reason = f"close handshake did not complete within {self._config.close_timeout:g} s"
        self._abort(reason)
        self._fire("timer_expired", reason)

    def _request_overdue(self) -> None:
        reason = f"{self._awaiting} request took longer than {self._config.http_timeout:g} s"
        self._exit = Exit(DEADLINE, None, reason, by_server=False)
        self._fire("timer_expired", reason)

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

    # ----------------------------------------------------------------------- helpers

    def _clock(self, now: float) -> float:
        # Time never runs backwards inside the core: a driver that passes max(deadline, now)
        # to handle_timer may pass a slightly smaller clock reading to the next verb.
        kind = type(now)
        if kind is not float and kind is not int:
            if not is_number(now):
                raise LocalProtocolError(
                    f"now must be a clock reading in seconds, not {type(now).__name__}"
                )
            now = float(now)
        if self._now <= now <= MAX_TIME:
            self._now = now
            return now
        if not -MAX_TIME <= now <= MAX_TIME:  # NaN fails every comparison
            raise LocalProtocolError(f"now={now} is not a monotonic clock reading in seconds")
        return self._now

    def _emit(self, output: Output) -> None:
        self._outputs.append(output)

    def _violation(self, error: RemoteProtocolError) -> None:
        self._outputs.append(ProtocolViolation(error=error))

    def _abort(self, reason: str) -> None:
        """Give up on the transport: nothing it reports any more is taken."""
        self._live_attempt = None
        self._emit(AbortTransport(reason=reason))

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

    def _leave(self, trigger: Trigger, policy: ClosePolicy, reason: str) -> None:
        """End a live connection at the server's request."""
        self._exit = Exit(policy, self._config.keep_session_close_code, reason, by_server=True)
        self._fire(trigger, reason)

    def _fire(self, trigger: Trigger, reason: str) -> None:
        model = self._model
        old = model.state
        # Not the public `model.trigger(name)`: that needs the model added to the Machine,
        # which binds a method per trigger and per state onto every model (about 50 KB a
        # connection, and slots forbid it). `Machine.events[name].trigger(model)` runs the
        # very same transition code for a model the machine does not hold.
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
        if state not in ALLOWED[trigger]:
            raise LocalProtocolError(f"{trigger} is not allowed in state {state.name}")
        self._fire(trigger, reason)

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
