# The machinery every layer of the connection shares: its state, how it changes state, and
# how a bug escaping a verb turns into the ERROR state.
#
# Lifecycle changes go through the pytransitions Machine declared in `_states.py` (one for
# all connections; each connection's `_Model` carries its own state). A layer decides which
# trigger an input means, records *why* (the `Exit` of a connection: its close policy, code
# and reason), and fires the trigger here; `_fire` then runs the entry action of the state
# it landed in. The entry actions and the deadlines live with their phase, and
# `GatewayConnection` wires them into the two tables below:
#
#   _preparing.py  PREPARING: gather a token, the gateway URL and an identify permit
#   _handshake.py  CONNECTING to READY: open, wait for Hello, Identify or Resume
#   _teardown.py   ZOMBIE, CLOSING, BACKOFF, STOPPED: close, settle the disconnect, retry
"""The connection's state, its triggers and the fail-fast guard of its verbs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Concatenate, Literal, ParamSpec, TypeVar

from qqproto._checks import MAX_TIME, is_number
from qqproto._close_codes import ClosePolicy, NextStep
from qqproto._codec import Opcode, encode_heartbeat
from qqproto._config import SessionConfig
from qqproto._delivery import Dedup, Session
from qqproto._errors import LocalProtocolError, QQProtoError, RemoteProtocolError
from qqproto._liveness import Liveness
from qqproto._outputs import (
    AbandonRequest,
    AbortTransport,
    Output,
    PersistSnapshot,
    ProtocolViolation,
    SendPayload,
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

__all__ = ["Lifecycle", "api"]

_S = SessionState
_L = TypeVar("_L", bound="Lifecycle")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def api(method: Callable[Concatenate[_L, _P], _R]) -> Callable[Concatenate[_L, _P], _R]:
    """Fail fast after an internal error; turn an escaping bug into the ERROR state."""

    @functools.wraps(method)
    def wrapper(self: _L, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
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

    # What entering a state does, and what a due phase deadline means (by the deadline its
    # state runs under). Set by GatewayConnection, the one class that has every phase.
    _entry: dict[SessionState, Callable[[float], None]]
    _on_due: dict[Deadline, Callable[[], None]]

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

    def _on_deadline(self) -> None:
        state = self._model.state
        due = self._on_due.get(DEADLINES[state])
        if due is None:
            raise RuntimeError(f"deadline set in state {state.name}, which has none")
        due()

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
