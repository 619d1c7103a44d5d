from __future__ import annotations

# A Hypothesis RuleBasedStateMachine that plays BOTH a perfect IO driver and an adversarial
# server against one GatewayConnection, on a virtual clock (no sleeps, no wall clock).
#
# The driver part only calls verbs a correct driver would call in the current state, using
# its own bookkeeping of the transport (opening / open / closing / gone, and the attempt
# number of each) and of the requests in flight; it fails requests (transient, refused token,
# wrong credentials), refuses or fails identify permits, reports oversized messages, cancels
# what the core abandons and sometimes reports it anyway, late. One extra rule
# (`any_verb_any_state`) calls any verb anyway, also with arguments of the wrong type, and
# accepts only success or LocalProtocolError (and then: nothing changed). The server part
# sends Hello, READY, RESUMED, dispatches with good, repeated, lower and missing `s` and
# repeated ids, ACKs (also unrequested), op 1, op 7, op 9, garbage, and closes with many codes.
#
# The model below mirrors what the core must do, and each output is checked as it comes out
# of `drain()`, in order: the StateChanged an input causes comes before the events of that
# input (Hello, READY, RESUMED, the zombie after its close frame, the Disconnected before
# what settling it causes). Failure messages name the docs/design.md invariant ("Inv 1" ...
# "Inv 11") they belong to. The model replays the core's random draws (the first beat after
# Hello, each jittered backoff) from a replica of its seeded generator, so beats, zombies and
# delays are compared exactly, with EPS only where arithmetic differs.
import json
import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from qqproto import (
    CLOSE_CODE_POLICY,
    AbandonRequest,
    AbortTransport,
    CloseConnection,
    ClosePolicy,
    Disconnected,
    DisconnectStorm,
    Dispatch,
    DuplicateDropped,
    FailureKind,
    FatalStop,
    FetchGateway,
    FetchToken,
    GatewayConnection,
    HeartbeatAcknowledged,
    HelloReceived,
    LocalProtocolError,
    NextStep,
    Opcode,
    OpenConnection,
    Output,
    PayloadTooLarge,
    PersistSnapshot,
    ProtocolViolation,
    Ready,
    ReconnectScheduled,
    RemoteProtocolError,
    RequestIdentifyPermit,
    Resumed,
    SendPayload,
    SessionConfig,
    SessionInvalidated,
    SessionSnapshot,
    SessionStartLimit,
    SessionState,
    StateChanged,
    ZombieDetected,
    decode_payload,
    policy_for_close,
)
from qqproto._backoff import backoff_window
from qqproto._close_codes import (
    APPLICATION_CLOSE,
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
)

S = SessionState
CFG = SessionConfig()
EPS = 1e-6
CORE_MAX_TIME = float(2**40)  # the largest `now` the core accepts (qqproto/_connection.py)
TOKEN_MARK = "TOKEN-SECRET-"
CLIENT_SECRET = "CLIENT-SECRET-77e1b0"  # never given to the core; planted in server payloads
GATEWAY_URL = "wss://gateway.test/websocket"
SHARD = [0, 1]

LINKED = frozenset({S.AWAITING_HELLO, S.IDENTIFYING, S.RESUMING, S.READY})
HEARTBEATING = frozenset({S.IDENTIFYING, S.RESUMING, S.READY})
WINDING_DOWN = frozenset({S.ZOMBIE, S.CLOSING})
DELIVERING = frozenset({S.RESUMING, S.READY, S.ZOMBIE, S.CLOSING})
ENDING = frozenset({S.CLOSING, S.ZOMBIE, S.BACKOFF, S.STOPPED})
HAPPY_PATH = frozenset({S.PREPARING, S.CONNECTING}) | LINKED - {S.READY}

CLOSE_CODES = [None, 1000, 1006, 4000, 4004, 4006, 4007, 4008, 4009, 4900, 4902, 4913, 4914]
CLOSE_CODES += [4001, 4013]
HELLO_INTERVALS = [45000, 41250, 1, 1000, 30000, 1.5, 1e308, 0, -1, "45000", None, True]
EXPIRES_IN: list[int | str] = [7200, "7200", "60", 0, "junk"]
FAILURES = [FailureKind.TRANSIENT, FailureKind.TRANSIENT, FailureKind.AUTH, FailureKind.FATAL]
FAILURE_POLICY = {
    FailureKind.TRANSIENT: REQUEST_FAILED,
    FailureKind.AUTH: REQUEST_UNAUTHORIZED,
    FailureKind.FATAL: CREDENTIALS_REJECTED,
}
# The identify limiter's answers: a grant, a refusal until the budget resets, a failure.
PERMIT_ANSWERS: list[float | str | None] = ["grant", "grant", 0.0, 5.0, 3600.0, None, None]
TOO_LARGE = CFG.max_payload_size + 1
MISUSE_VERBS = [
    "provide_token('')",
    "provide_token(bytes)",
    "provide_gateway(https)",
    "provide_gateway(port)",
    "provide_gateway(limit=dict)",
    "refuse_identify(-1)",
    "refuse_identify()",
    "request_failed(kind=str)",
    "request_failed()",
    "connection_closed('1000')",
    "receive(int)",
    "receive()",
    "receive(attempt=True)",
    "message_too_large(str)",
    "close(end_session=str)",
    "close(force=True)",
]
START_LIMITS = [
    None,
    None,
    SessionStartLimit(total=1000, remaining=5, reset_after=30.0, max_concurrency=1),
    SessionStartLimit(total=1000, remaining=1, reset_after=30.0, max_concurrency=1),
    SessionStartLimit(total=1000, remaining=0, reset_after=45.0, max_concurrency=1),
    SessionStartLimit(total=1000, remaining=0, reset_after=0.0, max_concurrency=1),
]
EVENT_TYPES = ["C2C_MESSAGE_CREATE", "GROUP_AT_MESSAGE_CREATE", "GUILD_UPDATE"]
EVENT_IDS = [None, "e0", "e1", "e2", "fresh"]
MESSAGE_IDS = [None, "m0", "m1", "fresh", "not-a-string"]
SEQ_MODES = ["next", "next", "same", "lower", "jump", "zero", "missing", "null"]
CLOCK_STEPS = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 5.0, 29.0, 30.0, 31.0, 44.9, 45.0, 60.0, 90.0, 200.0]),
    st.floats(min_value=0.0, max_value=200.0, allow_nan=False),
)

# Frames the server may send that must be skipped with exactly one ProtocolViolation whatever
# the state (they fail to decode, or are dispatches without `t`). The client secret is planted
# in them: no error text may carry it.
_BIG = '{"op":0,"t":"X","d":"' + CLIENT_SECRET * (CFG.max_payload_size // len(CLIENT_SECRET)) + '"}'
UNDECODABLE: dict[str, str | bytes] = {
    "malformed": '{"op":0,"t":"X","d":"' + CLIENT_SECRET + '"',
    "nan": '{"op":11,"d":NaN}',
    "empty": "",
    "array": f'["{CLIENT_SECRET}"]',
    "op_string": f'{{"op":"{CLIENT_SECRET}"}}',
    "no_op": '{"d":{}}',
    "s_string": f'{{"op":0,"t":"X","s":"{CLIENT_SECRET}","d":{{}}}}',
    "s_negative": '{"op":0,"t":"X","s":-1,"d":{}}',
    "id_number": '{"op":0,"t":"X","id":5,"d":{}}',
    "unknown_op": '{"op":99,"d":null}',
    "invalid_utf8": b'{"op":0,"t":"X","d":"' + CLIENT_SECRET.encode() + b'\xff\xfe"}',
    "lone_surrogate": '{"op":0,"t":"X","d":"\ud800' + CLIENT_SECRET + '"}',
    "too_deep": "[" * 2000 + "]" * 2000,
    "oversized": _BIG,
    "dispatch_without_t": '{"op":0,"s":1000000,"d":{}}',
}
# Well-formed payloads with an opcode only clients send: a violation, except while winding
# down, where the core ignores everything but data and ACKs.
CLIENT_ONLY = {
    "op2": '{"op":2,"d":{}}',
    "op6": '{"op":6,"d":{}}',
    "op12": '{"op":12,"d":{}}',
    "op13": '{"op":13,"d":{}}',
}


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _no_secret(text: str, where: str) -> None:
    assert TOKEN_MARK not in text, f"Inv 10: the access token appears in {where}"
    assert CLIENT_SECRET not in text, f"Inv 10: the client-secret marker appears in {where}"


def _valid_interval(raw: object) -> bool:
    # The core takes 0 < interval <= 1 h; anything else is a broken server.
    return isinstance(raw, int | float) and not isinstance(raw, bool) and 0 < raw <= 3_600_000


@dataclass
class Link:
    """Our view of one transport, from OpenConnection to its end."""

    number: int
    hello_at: float | None = None
    interval: float = 0.0
    ka_alive: bool = False  # between Hello and our close frame (the core's Keepalive exists)
    ack_pending: bool = False
    last_beat_at: float | None = None  # the last *scheduled* beat
    next_beat_at: float = math.inf  # when the next scheduled beat (or the zombie) falls due
    last_any_beat_at: float = -math.inf  # scheduled or answering op 1 (answers: 1 per second)
    answer_at: float | None = None  # when a server op 1 still unanswered will be (1 s rule)
    last_acked_sent_at: float | None = None
    late_since_ack: bool = False  # a beat was sent by a late handle_timer since the last ACK
    auths: int = 0
    sent_resume: bool = False
    replayed: int = 0


@dataclass
class Settle:
    """What must come out when a connection (or attempt) is settled in BACKOFF / STOPPED."""

    into: SessionState
    step: NextStep
    drop: bool
    disconnected: bool
    fatal: bool
    delay: float | None  # exact delay expected, or None for a full-jitter delay
    window: float
    attempt: int
    by_server: bool
    planned: bool  # a planned wait (the identify budget): health() calls it live
    seen_drop: bool = False
    seen_disconnected: bool = False
    seen_scheduled: bool = False
    seen_fatal: bool = False


class GatewayMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.token_no = 0
        self.ready_no = 0
        self.fresh_no = 0
        # (session id, s) delivered, across every connection object of the run.
        self.delivered_seq: set[tuple[str, int]] = set()
        self.gaps: set[int] = set()
        self.started = False

    # ================================================================== model bookkeeping

    def _new_connection(self, seed: int, snapshot: SessionSnapshot | None) -> None:
        self.conn = GatewayConnection(CFG, rng=random.Random(seed), snapshot=snapshot)
        # The same draws as the core, in the same order: the first beat after each Hello,
        # then each jittered backoff delay.
        self.rng = random.Random(seed)
        self.started = True
        self.mstate = S.IDLE
        # Driver side.
        self.transport: str | None = None  # None | "open" | "closing"
        self.pending_open = False
        self.pending_token = False
        self.pending_gateway = False
        self.pending_permit = False
        self.abandoned: set[str] = set()  # cancelled on AbandonRequest; may still report late
        self.attempt = 0  # OpenConnection.attempt of the last transport asked for
        self.close_sent_at = 0.0
        self.close_code_sent = 0
        self.gateway_url: str | None = None
        # Mirror of the core's PREPARING.
        self.core_awaiting: str | None = None
        self.token: str | None = None
        self.token_expires_at = -math.inf
        self.token_fresh = False
        self.force_token = False
        self.permit_granted = False
        self.limit_remaining: int | None = None
        self.limit_reset_at = 0.0  # absolute: when provide_gateway got it, plus reset_after
        # Session.
        self.session: str | None = snapshot.session_id if snapshot is not None else None
        self.seq: int | None = snapshot.seq if snapshot is not None else None
        self.last_snapshot = snapshot
        self.delivered_event: dict[str, float] = {}
        self.delivered_msg: dict[str, float] = {}
        self.seen_events: dict[str, float] = {}  # mirror of the core's dedup memory
        self.seen_msgs: dict[str, float] = {}
        # Connections and the reconnect policy.
        self.link: Link | None = None
        self.opens = 0
        self.link_unreported = False  # an OpenConnection whose Disconnected is still due
        self.scheduled_since_open = False
        self.backoff_passed = False
        self.backoff_at = 0.0
        self.up_since: float | None = None
        self.alive_at: float | None = None  # the server's last sign of life on this connection
        self.op9_resumed = False
        self.failures = 0
        self.failed_resumes = 0
        self.resumes_in_a_row = 0
        self.exit_policy: ClosePolicy | None = None
        self.exit_by_server = False
        self.exit_delay: float | None = None  # a fixed wait instead of the backoff
        self.core_exhausted = False  # the core itself refused to Identify (budget spent)
        self.settle: Settle | None = None
        # health(): the liveness budget runs from the start, the end of a planned wait, or
        # the last moment the session was seen ready (READY, a counted ACK in READY).
        self.budget_from = 0.0
        self.live_at: float | None = None
        self.planned_until: float | None = None
        # Context of the verb being run.
        self.cause: tuple[Any, ...] = ("init",)
        self.op9_policy: ClosePolicy = INVALID_SESSION
        self.ctx_timer = False
        self.ctx_on_time = True
        self.beats_this_call = 0
        self.zombie_expected = False
        self.expected_interval: float | None = None
        # Order within one drain(): the latest StateChanged, and what came after it.
        self.change: tuple[SessionState, SessionState] | None = None
        self.since_change = 0
        self.close_since_change = False
        self.abandon_due: str | None = None  # the AbandonRequest that must come next
        self.drop_on_close = False  # close() in a CLOSING that ends the session
        self.ready_sent: tuple[str, int | None] | None = None

    def _call(
        self,
        verb: str,
        *args: Any,
        cause: tuple[Any, ...],
        timer: bool = False,
        on_time: bool = True,
        **kwargs: Any,
    ) -> list[Output]:
        """Run a verb a correct driver may call now; check every output it produced."""
        self.cause = cause
        self.ctx_timer = timer
        self.ctx_on_time = on_time
        self.beats_this_call = 0
        state = self.mstate
        try:
            getattr(self.conn, verb)(*args, **kwargs)
        except LocalProtocolError as exc:
            _no_secret(str(exc), "a LocalProtocolError message")
            msg = f"Inv 11: {verb} is correct driver behaviour in {state.name} but raised {exc}"
            raise AssertionError(msg) from exc
        except Exception as exc:
            msg = f"Inv 11: {type(exc).__name__} escaped {verb} in {state.name}: {exc}"
            raise AssertionError(msg) from exc
        outs = self.conn.drain()
        self._process(outs)
        return outs

    def _observe(self) -> tuple[Any, ...]:
        c = self.conn
        return (
            c.state,
            c.get_timer(),
            c.session_id,
            c.seq,
            c.heartbeat_interval,
            c.last_ack_at,
            c.consecutive_failures,
            c.health(self.now),
        )

    def _expect_refused(self, verb: str, *args: Any, **kwargs: Any) -> None:
        """Misuse: must raise LocalProtocolError and change nothing (health included)."""
        before = self._observe()
        try:
            getattr(self.conn, verb)(*args, **kwargs)
        except LocalProtocolError as exc:
            _no_secret(str(exc), "a LocalProtocolError message")
        except Exception as exc:
            msg = f"Inv 11: {type(exc).__name__} escaped {verb} in {self.mstate.name}: {exc}"
            raise AssertionError(msg) from exc
        else:
            msg = f"Inv 11: misuse {verb} in {self.mstate.name} was accepted"
            raise AssertionError(msg)
        assert self.conn.drain() == [], f"Inv 11: refused {verb} still produced outputs"
        assert self._observe() == before, f"Inv 11: refused {verb} changed the connection"

    def _expect_ignored(self, verb: str, *args: Any, **kwargs: Any) -> None:
        """A documented no-op (late report, early timer...): no output, no change."""
        before = self._observe()
        outs = self._call(verb, *args, cause=("ignored", verb), **kwargs)
        assert outs == [], f"Inv 11: {verb} in {self.mstate.name} should be ignored: {outs}"
        assert self._observe() == before, f"Inv 11: ignored {verb} changed the connection"

    # ================================================================== output checking

    def _process(self, outs: list[Output]) -> None:
        self.change = None
        self.since_change = 0
        self.close_since_change = False
        entries: dict[SessionState, int] = {}
        for out in outs:
            self._check_secrets(out)
            due = self.abandon_due
            if due is not None:
                self.abandon_due = None
                assert out == AbandonRequest(request=due), (
                    f"leaving PREPARING while awaiting the {due}: {out} instead of AbandonRequest"
                )
            handler = self._HANDLERS.get(type(out))
            assert handler is not None, f"an output nobody expects: {out}"
            handler(self, out)
            if isinstance(out, StateChanged):
                self.change = (out.old, out.new)
                self.since_change = 0
                self.close_since_change = False
                entries[out.new] = entries.get(out.new, 0) + 1
            else:
                self.since_change += 1
        assert self.abandon_due is None, "Inv 11: left PREPARING without AbandonRequest"
        self._finish_settle()
        # One input never spins the machine: each of BACKOFF and PREPARING at most once.
        assert entries.get(S.BACKOFF, 0) <= 1, f"Inv 6: BACKOFF entered twice in one call {outs}"
        assert entries.get(S.PREPARING, 0) <= 1, f"Inv 6: PREPARING twice in one call {outs}"
        assert not self.drop_on_close, "SessionInvalidated expected after close() in CLOSING"
        assert self.conn.state is self.mstate, (
            f"Inv 11: state is {self.conn.state.name} but StateChanged said {self.mstate.name}"
        )

    def _changed(self, *into: SessionState) -> bool:
        """The latest StateChanged of this drain() led into one of ``into``."""
        return self.change is not None and self.change[1] in into

    def _check_secrets(self, out: Output) -> None:
        _no_secret(repr(out), f"repr({type(out).__name__})")
        if isinstance(out, ProtocolViolation):
            _no_secret(str(out.error), "str() of a ProtocolViolation error")
            _no_secret(repr(out.error), "repr() of a ProtocolViolation error")
        if isinstance(out, StateChanged):
            _no_secret(out.reason, "a StateChanged reason")
        if isinstance(out, SendPayload) and out.op not in (Opcode.IDENTIFY, Opcode.RESUME):
            _no_secret(out.text, f"SendPayload.text of op {int(out.op)}")

    def _on_state_changed(self, out: StateChanged) -> None:
        assert out.old is self.mstate, (
            f"Inv 11: StateChanged from {out.old.name}, but the state was {self.mstate.name}"
        )
        assert out.old is not out.new, "Inv 11: StateChanged to the same state"
        assert out.new is not S.ERROR, "Inv 11: the connection moved to ERROR"
        self._finish_settle()
        old, new = out.old, out.new
        self.mstate = new
        if old is S.PREPARING:
            # Whatever is still awaited is abandoned, right after this StateChanged.
            self.abandon_due = self.core_awaiting
            self.core_awaiting = None
            if new is S.CONNECTING:
                self._check_token_usable()
        if new is S.PREPARING:
            self.token_fresh = False
            self.permit_granted = False
            self.core_awaiting = None
            if old is S.BACKOFF:
                assert self.scheduled_since_open, "Inv 6: left BACKOFF without ReconnectScheduled"
                assert self.now >= self.backoff_at - EPS, "Inv 6: left BACKOFF before its delay"
                self.backoff_passed = True
            if self.planned_until is not None:
                # The planned wait is over: the liveness budget starts again from here.
                self.planned_until = None
                self.budget_from = self.now
        if new is S.AWAITING_HELLO:
            assert old is S.CONNECTING, "transport opened outside CONNECTING"
        if old is S.CONNECTING and new is S.BACKOFF:
            # The connect failed or timed out: the URL may be what fails, so the next attempt
            # asks for it again rather than dialling the same address forever.
            self.gateway_url = None
        if old is S.AWAITING_HELLO and new in (S.IDENTIFYING, S.RESUMING):
            # The Hello was accepted: its keepalive starts now, its HelloReceived comes later
            # in this drain (after the Identify or Resume the new state sends).
            link = self.link
            assert link is not None
            assert link.hello_at is None, "Inv 1: two Hellos accepted on one connection"
            assert self.expected_interval is not None, f"Hello accepted by {self.cause}"
            link.hello_at = self.now
            link.interval = self.expected_interval
            link.ka_alive = True
            link.next_beat_at = self.now + link.interval * self.rng.random()
        if new is S.READY:
            self.up_since = self.now
            self.live_at = self.now
        if new in ENDING and self.link is not None:
            self.link.ka_alive = False
        if new in ENDING and old not in WINDING_DOWN:
            self.exit_policy = self._exit_policy(out)
        if new in (S.BACKOFF, S.STOPPED):
            # Every end of a connection or attempt follows a deadline, a close (ours or the
            # server's), or a failed request or permit; the budget check after an answer.
            cause = self.cause[0]
            assert cause in ("timer", "close", "app", "request_failed", "refuse") or (
                cause in ("token", "gateway") and out.reason == START_LIMIT_EXHAUSTED.meaning
            ), f"Inv 6: {new.name} entered after {self.cause}: neither a deadline nor a close"
            self._expect_settle(new)
        if new is S.STOPPED:
            self.planned_until = None

    def _exit_policy(self, out: StateChanged) -> ClosePolicy:
        """Why the connection (or attempt) ends: from what caused it (``self.cause``).

        Also decides ``exit_by_server`` and ``exit_delay``. Every end has a cause a driver
        or a server produced: a deadline, a close, a server opcode, the application, or a
        failed request or permit. Nothing else may move the machine towards BACKOFF/STOPPED.
        """
        self.exit_delay = None
        self.core_exhausted = False
        kind = self.cause[0]
        if out.reason == START_LIMIT_EXHAUSTED.meaning:
            assert self.limit_remaining is not None, "start limit exhausted with no limit known"
            assert self.limit_remaining <= 0, "Inv 6: start limit refused with budget left"
            assert kind in ("token", "gateway", "timer"), f"budget checked after {self.cause}"
            self.exit_by_server = True
            self.core_exhausted = True
            # The reset is a time (provide_gateway's clock plus reset_after), not a duration.
            left = self.limit_reset_at - self.now
            self.exit_delay = left if left > 0 else None
            return START_LIMIT_EXHAUSTED
        self.exit_by_server = kind in ("close", "op7", "hello", "op9", "request_failed")
        if kind == "refuse":
            retry_after = self.cause[1]
            # "Retry now" (0) is no planned wait: it backs off like a failed limiter.
            if retry_after is not None and float(retry_after) <= 0:
                retry_after = None
            self.exit_by_server = retry_after is not None
            if retry_after is None:
                return REQUEST_FAILED
            self.exit_delay = float(retry_after)
            return START_LIMIT_EXHAUSTED
        policies: dict[str, ClosePolicy] = {
            "app": APPLICATION_CLOSE,
            "op7": RECONNECT_REQUEST,
            "hello": SERVER_RESET,
            "op9": self.op9_policy,
        }
        if kind == "request_failed":
            return FAILURE_POLICY[self.cause[1]]
        if kind == "close":
            return policy_for_close(self.cause[1])
        if kind == "timer":
            # Our own deadlines and the ACK watchdog: not the server's doing.
            return ZOMBIE if out.new is S.ZOMBIE else DEADLINE
        assert kind in policies, (
            f"Inv 11: {out.old.name} -> {out.new.name} caused by {self.cause}, which cannot "
            "end a connection"
        )
        return policies[kind]

    def _expect_settle(self, into: SessionState) -> None:
        """Mirror `_settle`: what BACKOFF / STOPPED must report, and the backoff delay."""
        policy = self.exit_policy
        assert policy is not None, f"Inv 11: {into.name} without a reason to stop the connection"
        if into is S.STOPPED:
            assert policy.step is NextStep.STOP, f"Inv 4: STOPPED after {policy.meaning!r}"
        # "Stayed up" is measured from READY to the server's last sign of life (a payload
        # that decoded; a close frame is not one), not to when we noticed the end.
        up, alive = self.up_since, self.alive_at
        stayed = up is not None and alive is not None and alive - up >= CFG.stable_after
        sent_resume = self.link is not None and self.link.sent_resume
        if stayed:
            self.failures = 0
            self.failed_resumes = 0
            self.resumes_in_a_row = 0
        elif sent_resume:
            self.failed_resumes += 1
        self.up_since = None
        self.alive_at = None
        if self.link is not None:
            self.link.sent_resume = False
        if policy.refresh_token:
            self.force_token = True
        self.op9_resumed = policy is INVALID_SESSION_RESUMABLE
        step = policy.step
        drop = False
        if step is NextStep.RESUME and self.session is None:
            step = NextStep.IDENTIFY
        if step is NextStep.RESUME and self.failed_resumes >= CFG.max_failed_resumes:
            drop = True
            step = NextStep.IDENTIFY
        elif step is NextStep.IDENTIFY and self.session is not None:
            drop = True
        if drop:
            self.failed_resumes = 0  # the resume budget belongs to the session
        delay: float | None = None
        window = 0.0
        attempt = self.failures
        planned = False
        if step is not NextStep.STOP:
            if self.exit_delay is not None:
                # A planned wait for the identify budget: exactly that long, not a failure.
                delay = self.exit_delay
                planned = True
            elif policy.rotation and stayed:
                delay = 0.0
                attempt = 0
            else:
                self.failures += 1
                attempt = self.failures
                if policy.cooldown:
                    delay = CFG.rate_limit_cooldown
                else:
                    window = backoff_window(
                        self.failures, base=CFG.backoff_base, cap=CFG.backoff_cap
                    )
        if self.core_exhausted:
            # The core forgets the spent limit and fetches it (and the URL) again.
            self.limit_remaining = None
            self.gateway_url = None
        self.settle = Settle(
            into=into,
            step=step,
            drop=drop,
            disconnected=self.link_unreported,
            fatal=into is S.STOPPED and policy is not APPLICATION_CLOSE,
            delay=delay,
            window=window,
            attempt=attempt,
            by_server=self.exit_by_server,
            planned=planned,
        )

    def _finish_settle(self) -> None:
        st_ = self.settle
        if st_ is None:
            return
        self.settle = None
        assert st_.drop == st_.seen_drop, (
            f"Inv 4/5: SessionInvalidated expected={st_.drop} seen={st_.seen_drop}"
        )
        assert st_.disconnected == st_.seen_disconnected, (
            f"Disconnected expected={st_.disconnected} seen={st_.seen_disconnected}"
        )
        if st_.into is S.BACKOFF:
            assert st_.seen_scheduled, "Inv 6: BACKOFF without ReconnectScheduled"
        assert st_.fatal == st_.seen_fatal, f"FatalStop expected={st_.fatal} seen={st_.seen_fatal}"

    def _check_token_usable(self) -> None:
        assert self.token is not None, "prepared without a token"
        assert not self.force_token, "prepared without the forced token refresh (after 4004)"
        left = self.token_expires_at - self.now
        assert self.token_fresh or left >= CFG.token_refresh_margin - EPS, (
            f"prepared with a cached token that has only {left:.1f} s left"
        )

    # ------------------------------------------------------------------ commands

    def _on_fetch_token(self, out: FetchToken) -> None:
        assert self.mstate is S.PREPARING, "FetchToken outside PREPARING"
        assert out.force == self.force_token, f"FetchToken(force={out.force}) after {self.cause}"
        self.pending_token = True
        self.core_awaiting = "token"

    def _on_fetch_gateway(self, out: FetchGateway) -> None:
        assert self.mstate is S.PREPARING, "FetchGateway outside PREPARING"
        assert self.gateway_url is None, "FetchGateway although a usable URL is cached"
        self.pending_gateway = True
        self.core_awaiting = "gateway"

    def _on_permit(self, out: RequestIdentifyPermit) -> None:
        assert self.mstate is S.PREPARING, "RequestIdentifyPermit outside PREPARING"
        assert self.session is None, "Inv 7: identify permit requested while a session is held"
        assert self.limit_remaining is None or self.limit_remaining > 0, (
            "identify permit requested with session_start_limit.remaining <= 0"
        )
        assert out.shard_id == 0
        self.pending_permit = True
        self.core_awaiting = "permit"

    def _on_open(self, out: OpenConnection) -> None:
        assert self.transport is None, "one transport at a time: OpenConnection while one is open"
        assert not self.pending_open, "one transport at a time: OpenConnection while opening one"
        assert not self.link_unreported, "OpenConnection before the last one was reported ended"
        assert out.url == self.gateway_url, "OpenConnection to a URL nobody provided"
        if self.opens:
            assert self.backoff_passed, (
                "Inv 6: OpenConnection without passing a BACKOFF timer since the last connection"
            )
        self.opens += 1
        assert out.attempt == self.opens, f"OpenConnection.attempt {out.attempt}, {self.opens} th"
        self.attempt = out.attempt
        self.backoff_passed = False
        self.scheduled_since_open = False
        self.pending_open = True
        self.link_unreported = True
        self.link = Link(self.opens)

    def _on_abandon(self, out: AbandonRequest) -> None:
        # Where it may come (right after leaving PREPARING) is checked in _process.
        what = out.request
        pending = {
            "token": self.pending_token,
            "gateway": self.pending_gateway,
            "permit": self.pending_permit,
        }
        assert pending[what], f"AbandonRequest for a {what} request not in flight"
        # A good driver cancels it; the cancel may lose the race (see late_report_abandoned).
        if what == "token":
            self.pending_token = False
        elif what == "gateway":
            self.pending_gateway = False
        else:
            self.pending_permit = False
        self.abandoned.add(what)

    def _on_send(self, out: SendPayload) -> None:
        assert self.transport == "open", (
            f"SendPayload op {int(out.op)} while the transport is {self.transport}"
        )
        body = json.loads(out.text)
        assert body["op"] == int(out.op), "SendPayload.op differs from the text"
        link = self.link
        assert link is not None
        assert link.hello_at is not None, (
            f"Inv 1: op {int(out.op)} sent on connection {link.number} before its Hello"
        )
        d = body["d"]
        if out.op is Opcode.HEARTBEAT:
            self._on_beat(link, d)
        elif out.op is Opcode.IDENTIFY:
            assert link.auths == 0, "Inv 7: a second Identify/Resume on one connection"
            link.auths += 1
            assert self.session is None, "Inv 7: Identify while a session is held"
            assert self.permit_granted, "Identify without an identify permit"
            assert d["token"] == f"QQBot {self.token}", "Identify without the latest token"
            assert d["shard"] == SHARD
            assert d["intents"] == int(CFG.intents)
            self.resumes_in_a_row = 0
            if self.limit_remaining is not None:
                self.limit_remaining -= 1
        elif out.op is Opcode.RESUME:
            assert link.auths == 0, "Inv 7: a second Identify/Resume on one connection"
            link.auths += 1
            assert self.session is not None, "Inv 7: Resume without a session"
            assert d["session_id"] == self.session, "Inv 7: Resume with another session id"
            assert d["seq"] == self.seq, f"Inv 7: Resume with seq {d['seq']}, held {self.seq}"
            assert d["token"] == f"QQBot {self.token}", "Resume without the latest token"
            link.sent_resume = True
            self.resumes_in_a_row += 1
            assert self.resumes_in_a_row <= CFG.max_failed_resumes, (
                "Inv 4: more Resumes in a row than max_failed_resumes"
            )
        else:
            msg = f"the client sent op {int(out.op)}"
            raise AssertionError(msg)

    def _on_beat(self, link: Link, d: object) -> None:
        assert link.ka_alive, "Inv 1: heartbeat after the connection started closing"
        assert d == self.seq, f"Inv 1/7: beat carries {d!r}, the last delivered seq is {self.seq}"
        assert link.hello_at is not None
        if not self.ctx_timer:
            assert self.cause[0] == "op1", f"Inv 1: a beat sent in answer to {self.cause}"
            assert self.now - link.last_any_beat_at >= 1.0, "op 1 answered twice in 1 s"
            link.last_any_beat_at = self.now
            link.answer_at = None
            return  # an answer to the server's op 1: extra, does not touch the schedule
        self.beats_this_call += 1
        assert self.beats_this_call == 1, "Inv 1: two beats in one handle_timer call"
        if self.now < link.next_beat_at:
            # Not the schedule: the answer to a server op 1 that came too soon after a beat.
            assert link.answer_at is not None, "Inv 1: a beat with nothing due"
            assert self.now >= link.answer_at, "Inv 1: op 1 answered before its second was up"
            if self.ctx_on_time:
                assert self.now == link.answer_at, "Inv 1: op 1 answered later than 1 s after"
            # (last + 1.0) - last may be one ulp short of 1.0
            assert self.now - link.last_any_beat_at >= 1.0 - EPS, "op 1 answered twice in 1 s"
            link.last_any_beat_at = self.now
            link.answer_at = None
            return
        assert not link.ack_pending, "Inv 2: a beat fell due unacknowledged but no zombie"
        if link.last_beat_at is None:
            assert self.now >= link.hello_at
            if self.ctx_on_time:
                assert self.now <= link.hello_at + link.interval, (
                    "Inv 1: the first beat came later than one interval after Hello"
                )
        if self.ctx_on_time:
            assert self.now == link.next_beat_at, (
                f"Inv 1: a beat at {self.now}, due at {link.next_beat_at} (interval "
                f"{link.interval} s)"
            )
        link.ack_pending = True
        link.last_beat_at = self.now
        link.last_any_beat_at = self.now
        link.next_beat_at = self.now + link.interval
        link.answer_at = None  # a regular beat answers a pending op 1 too
        if not self.ctx_on_time:
            link.late_since_ack = True

    def _on_close_frame(self, out: CloseConnection) -> None:
        assert self.transport == "open", f"CloseConnection while the transport is {self.transport}"
        expected = 1000 if self.cause == ("app", True) else CFG.keep_session_close_code
        assert out.code not in (1000, 1001) or self.cause == ("app", True), (
            f"Inv 2: close code {out.code} ends the session but the application did not ask"
        )
        assert out.code == expected, f"close code {out.code}, expected {expected}"
        self.transport = "closing"
        self.close_sent_at = self.now
        self.close_code_sent = out.code
        if self.link is not None:
            self.link.ka_alive = False
        self.close_since_change = True

    def _on_abort(self, out: AbortTransport) -> None:
        if self.pending_open:
            self.pending_open = False
            return
        assert self.transport == "closing", (
            f"AbortTransport while the transport is {self.transport}"
        )
        elapsed = self.now - self.close_sent_at
        if self.ctx_on_time:  # a stalled driver runs the abort late, by definition
            assert elapsed <= CFG.close_timeout + EPS, (
                f"Inv 2: transport aborted {elapsed} s after the close frame"
            )
        if self.ctx_timer and self.ctx_on_time:
            assert abs(elapsed - CFG.close_timeout) <= EPS, "Inv 2: abort not at close_timeout"
        self.transport = None

    def _on_persist(self, out: PersistSnapshot) -> None:
        snap = out.snapshot
        if snap is None:
            if self.session is not None:
                assert self.mstate is S.STOPPED, (
                    "Inv 5: the session was deleted without SessionInvalidated"
                )
            self.session = None
            self.seq = None
            self.gaps = set()
        else:
            assert snap.session_id == self.session, "PersistSnapshot of another session"
            assert snap.seq == self.seq, f"PersistSnapshot seq {snap.seq}, held {self.seq}"
            assert tuple(snap.shard) == CFG.shard
        self.last_snapshot = snap

    # ------------------------------------------------------------------ events

    def _on_hello(self, out: HelloReceived) -> None:
        link = self.link
        assert link is not None
        assert self.change is not None, "HelloReceived without its StateChanged"
        assert self.change[0] is S.AWAITING_HELLO, "Inv 1: HelloReceived outside AWAITING_HELLO"
        assert self._changed(S.IDENTIFYING, S.RESUMING), "HelloReceived before its StateChanged"
        assert link.hello_at == self.now, "HelloReceived for another Hello"
        assert out.heartbeat_interval == self.expected_interval == link.interval, (
            f"interval {out.heartbeat_interval}, expected {self.expected_interval}"
        )

    def _on_ready(self, out: Ready) -> None:
        assert self.change == (S.IDENTIFYING, S.READY), (
            f"Ready after StateChanged {self.change}: READY accepted outside IDENTIFYING, or "
            "Ready before its StateChanged"
        )
        assert self.session is None, "Inv 7: READY while an old session is held"
        assert (out.session_id, out.seq) == self.ready_sent, "Ready differs from READY sent"
        self.session = out.session_id
        self.seq = out.seq
        self.gaps = set()

    def _on_resumed(self, out: Resumed) -> None:
        assert self.change == (S.RESUMING, S.READY), (
            f"Resumed after StateChanged {self.change}: RESUMED accepted outside RESUMING, or "
            "Resumed before its StateChanged"
        )
        assert self.session is not None
        assert self.link is not None
        assert out.seq == self.seq, f"Resumed.seq {out.seq}, expected {self.seq}"
        assert out.replayed == self.link.replayed, "Resumed.replayed miscounted"

    def _on_dispatch(self, out: Dispatch) -> None:
        assert self.session is not None, "Inv 5: Dispatch without a session"
        assert self.mstate in DELIVERING, f"Inv 5: Dispatch in {self.mstate.name}"
        if out.seq is not None:
            key = (self.session, out.seq)
            if self.seq is None or out.seq > self.seq:
                assert key not in self.delivered_seq, f"Inv 5: {key} delivered twice"
                self.seq = out.seq
            else:
                # A replay out of order fills a gap; a seq delivered before never comes again.
                assert key not in self.delivered_seq, f"Inv 5: {key} delivered twice"
            self.delivered_seq.add(key)
        self._once(self.delivered_event, out.event_id, "event id")
        if out.type in CFG.dedup_event_types and isinstance(out.data, dict):
            mid = out.data.get("id")
            if isinstance(mid, str):
                self._once(self.delivered_msg, mid, "message id")
        if self.mstate is S.RESUMING and self.link is not None:
            self.link.replayed += 1
        assert self.change is None, "a dispatch in the same drain() as a state change"

    def _once(self, seen: dict[str, float], key: str | None, what: str) -> None:
        if key is None:
            return
        prev = seen.get(key)
        assert prev is None or self.now - prev > CFG.dedup_max_age, (
            f"Inv 5: {what} {key} delivered twice within {CFG.dedup_max_age} s"
        )
        seen[key] = self.now

    def _on_duplicate(self, out: DuplicateDropped) -> None:
        if out.key == "seq":
            assert out.seq is not None
            assert self.seq is not None
            assert out.seq <= self.seq, "Inv 5: a new seq dropped as a duplicate"
            return
        assert out.key in ("event_id", "message_id"), f"unknown duplicate key {out.key}"
        if out.seq is not None and (self.seq is None or out.seq > self.seq):
            self.seq = out.seq

    def _on_ack(self, out: HeartbeatAcknowledged) -> None:
        link = self.link
        assert link is not None
        assert link.ka_alive, "Inv 2: ACK counted after the connection started closing"
        assert link.ack_pending, "Inv 2: an unrequested ACK was counted"
        assert link.last_beat_at is not None
        assert abs(out.latency - (self.now - link.last_beat_at)) <= EPS, "wrong ACK latency"
        link.ack_pending = False
        link.last_acked_sent_at = link.last_beat_at
        link.late_since_ack = False
        if self.mstate is S.READY:
            self.live_at = self.now  # health() judges by the last ACK in READY

    def _on_zombie(self, out: ZombieDetected) -> None:
        link = self.link
        assert link is not None
        assert self.ctx_timer, f"Inv 2: ZombieDetected outside handle_timer ({self.cause})"
        assert self.zombie_expected, "Inv 2: ZombieDetected without a heartbeat schedule"
        self.zombie_expected = False
        # After the StateChanged into ZOMBIE and after the close frame entering ZOMBIE sends.
        assert self._changed(S.ZOMBIE), f"ZombieDetected after StateChanged {self.change}"
        assert self.close_since_change, "Inv 2: ZombieDetected before its CloseConnection"
        assert link.ack_pending, "Inv 2: ZombieDetected although the last beat was ACKed"
        assert link.last_beat_at is not None
        assert link.hello_at is not None
        due = link.next_beat_at
        assert due == link.last_beat_at + link.interval
        assert self.now >= due, "Inv 2: zombie declared before the next beat fell due"
        if self.ctx_on_time:
            assert self.now == due, "Inv 2: zombie not declared when the next beat fell due"
            if not link.late_since_ack:
                ref = link.last_acked_sent_at
                ref = link.hello_at if ref is None else ref
                assert self.now - ref <= 2 * link.interval + EPS, (
                    "Inv 2: zombie detected more than 2 intervals after the last ACKed beat"
                )
        assert out.interval == link.interval

    def _on_invalidated(self, out: SessionInvalidated) -> None:
        st_ = self.settle
        if self.drop_on_close:
            # close() during a CLOSING that ends the session (op 9 d=false): dropped now.
            assert st_ is None, "SessionInvalidated of close() inside a settle"
            assert self.cause[0] == "app", f"SessionInvalidated after {self.cause}"
            self.drop_on_close = False
        else:
            assert st_ is not None, "Inv 5: SessionInvalidated outside a settle"
            assert st_.drop, "Inv 4/5: session dropped, but the policy keeps it"
            assert not st_.seen_drop
            assert st_.seen_disconnected or not st_.disconnected, (
                "SessionInvalidated before the Disconnected that caused it"
            )
            st_.seen_drop = True
        assert out.session_id == self.session, "Inv 5: SessionInvalidated for another session"
        assert out.last_seq == self.seq, (
            f"Inv 5: SessionInvalidated.last_seq {out.last_seq}, last delivered {self.seq}"
        )
        self.session = None
        self.seq = None
        self.gaps = set()

    def _on_disconnected(self, out: Disconnected) -> None:
        st_ = self.settle
        assert st_ is not None, "Disconnected outside a settle"
        assert st_.disconnected, "Disconnected for a connection never opened"
        assert not st_.seen_disconnected
        st_.seen_disconnected = True
        self.link_unreported = False
        # First thing after the StateChanged into BACKOFF / STOPPED: before anything settling
        # the disconnect causes (SessionInvalidated, DisconnectStorm, ReconnectScheduled...).
        assert self.since_change == 0, "Disconnected after what settling it caused"
        assert self._changed(S.BACKOFF, S.STOPPED)
        expected = NextStep.STOP if st_.into is S.STOPPED else st_.step
        assert out.next_step is expected, f"Inv 4: next step {out.next_step}, expected {expected}"
        assert out.by_server is st_.by_server, (
            f"Disconnected.by_server={out.by_server} after {self.cause} ({out.reason})"
        )
        if st_.into is S.STOPPED:
            assert out.reconnect_at is None

    def _on_scheduled(self, out: ReconnectScheduled) -> None:
        st_ = self.settle
        assert st_ is not None, "Inv 6: ReconnectScheduled outside a settle"
        assert st_.into is S.BACKOFF, "Inv 6: ReconnectScheduled while stopping"
        assert not st_.seen_scheduled
        assert st_.seen_disconnected or not st_.disconnected, "ReconnectScheduled first"
        st_.seen_scheduled = True
        assert abs(out.reconnect_at - (self.now + out.delay)) <= EPS, "Inv 6: reconnect_at"
        assert out.failures == st_.attempt, f"Inv 6: failures {out.failures}, not {st_.attempt}"
        if st_.delay is not None:
            assert out.delay == st_.delay, f"Inv 6: delay {out.delay}, expected {st_.delay}"
        else:
            # The same draw as the core's, from the replica of its generator.
            expected = self.rng.random() * st_.window
            assert 0 <= out.delay < st_.window <= CFG.backoff_cap, (
                f"Inv 6: delay {out.delay} outside [0, {st_.window}) after {out.failures} failures"
            )
            assert out.delay == expected, f"Inv 6: delay {out.delay}, the draw gives {expected}"
        if out.delay == 0:
            # Never a tight loop: an immediate retry only for a rotation of a session that
            # stayed up, or when the identify limiter says its budget resets now.
            policy = self.exit_policy
            rotation = policy is not None and policy.rotation and st_.attempt == 0
            assert st_.planned or rotation, f"Inv 6: a reconnect without delay after {self.cause}"
        self.scheduled_since_open = True
        self.backoff_at = out.reconnect_at
        if st_.planned:
            self.planned_until = out.reconnect_at

    def _on_fatal(self, out: FatalStop) -> None:
        st_ = self.settle
        assert st_ is not None
        assert st_.fatal, "FatalStop although the application closed"
        assert not st_.seen_fatal
        assert st_.seen_disconnected or not st_.disconnected, "FatalStop before Disconnected"
        st_.seen_fatal = True
        if self.exit_policy is CREDENTIALS_REJECTED:
            assert out.code is None
            assert out.hint, "wrong credentials stop without a hint"

    def _on_violation(self, out: ProtocolViolation) -> None:
        assert out.error.reason != RemoteProtocolError.reason, "a violation without its own tag"

    def _on_storm(self, out: DisconnectStorm) -> None:
        assert out.count >= CFG.storm_threshold
        st_ = self.settle
        assert st_ is not None, "DisconnectStorm outside a settle"
        assert st_.seen_disconnected or not st_.disconnected, "DisconnectStorm before Disconnected"

    _HANDLERS: ClassVar[dict[type, Any]] = {
        StateChanged: _on_state_changed,
        FetchToken: _on_fetch_token,
        FetchGateway: _on_fetch_gateway,
        RequestIdentifyPermit: _on_permit,
        OpenConnection: _on_open,
        SendPayload: _on_send,
        CloseConnection: _on_close_frame,
        AbortTransport: _on_abort,
        PersistSnapshot: _on_persist,
        HelloReceived: _on_hello,
        Ready: _on_ready,
        Resumed: _on_resumed,
        Dispatch: _on_dispatch,
        DuplicateDropped: _on_duplicate,
        HeartbeatAcknowledged: _on_ack,
        AbandonRequest: _on_abandon,
        ZombieDetected: _on_zombie,
        SessionInvalidated: _on_invalidated,
        Disconnected: _on_disconnected,
        ReconnectScheduled: _on_scheduled,
        FatalStop: _on_fatal,
        ProtocolViolation: _on_violation,
        DisconnectStorm: _on_storm,
    }

    # ================================================================== driver actions

    def _start(self, at: float) -> None:
        self.budget_from = max(at, self.conn._now)
        self._call("start", at, cause=("start",))

    def _provide_token(self, expires_in: int | str, at: float) -> None:
        self.token_no += 1
        token = f"{TOKEN_MARK}{self.token_no}"
        awaited = self.core_awaiting == "token" and self.mstate is S.PREPARING
        ttl = 0.0 if expires_in == "junk" else float(expires_in)
        self.token = token
        self.token_expires_at = self.now + ttl
        self.force_token = False
        self.pending_token = False
        if awaited:
            self.token_fresh = True
            self.core_awaiting = None
        outs = self._call("provide_token", token, expires_in, at, cause=("token",))
        violations = [o for o in outs if isinstance(o, ProtocolViolation)]
        assert len(violations) == (expires_in == "junk"), "a malformed expires_in is reported"
        if not awaited:
            assert outs == violations, f"a cached token changed something: {outs}"

    def _provide_gateway(self, limit: SessionStartLimit | None, at: float) -> None:
        awaited = self.core_awaiting == "gateway" and self.mstate is S.PREPARING
        self.gateway_url = GATEWAY_URL
        self.pending_gateway = False
        if limit is not None:
            self.limit_remaining = limit.remaining
            # What the core computes with the clock it keeps (at may be an older reading).
            self.limit_reset_at = max(at, self.conn._now) + limit.reset_after
        if awaited:
            self.core_awaiting = None
        outs = self._call(
            "provide_gateway", GATEWAY_URL, at, session_start_limit=limit, cause=("gateway",)
        )
        if not awaited:
            assert outs == [], f"a cached gateway URL changed something: {outs}"

    def _grant(self, at: float) -> None:
        awaited = self.core_awaiting == "permit" and self.mstate is S.PREPARING
        self.pending_permit = False
        if awaited:
            self.permit_granted = True
            self.core_awaiting = None
        outs = self._call("grant_identify", at, cause=("permit",))
        if not awaited:
            assert outs == [], f"an unawaited permit changed something: {outs}"

    def _request_failed(self, what: str, at: float, kind: FailureKind) -> None:
        awaited = self.core_awaiting == what and self.mstate is S.PREPARING
        if what == "token":
            self.pending_token = False
        else:
            self.pending_gateway = False
        if awaited:
            self.core_awaiting = None  # answered (with a failure): nothing to abandon
        # The driver names the request, so a late failure of an abandoned one is ignored.
        outs = self._call(
            "request_failed",
            f"{what} endpoint answered {kind.value}",
            at,
            cause=("request_failed", kind),
            request=what,
            kind=kind,
        )
        if awaited:
            # Wrong credentials stop; anything else backs off (a 401 refreshes the token).
            expected = S.STOPPED if kind is FailureKind.FATAL else S.BACKOFF
            assert self.mstate is expected, f"a {kind.name} failure led to {self.mstate.name}"
        else:
            assert outs == [], f"a stale request failure changed something: {outs}"

    def _refuse(self, retry_after: float | None, at: float) -> None:
        """The identify limiter refused (until ``retry_after``) or failed (``None``)."""
        awaited = self.core_awaiting == "permit" and self.mstate is S.PREPARING
        self.pending_permit = False
        if awaited:
            self.core_awaiting = None
        outs = self._call(
            "refuse_identify",
            "daily budget spent" if retry_after is not None else "limiter store down",
            at,
            retry_after=retry_after,
            cause=("refuse", retry_after),
        )
        if awaited:
            assert self.mstate is S.BACKOFF, "a refused or failed permit must back off"
        else:
            assert outs == [], f"a late permit refusal changed something: {outs}"

    def _open_result(self, at: float, *, ok: bool) -> None:
        self.pending_open = False
        if ok:
            self.transport = "open"
            self._call("connection_opened", at, attempt=self.attempt, cause=("opened",))
            assert self.mstate is S.AWAITING_HELLO
        else:
            self._call(
                "connection_closed",
                None,
                "connect failed",
                at,
                attempt=self.attempt,
                cause=("close", None),
            )
            assert self.mstate is S.BACKOFF

    def _transport_closed(self, code: int | None, at: float) -> None:
        state = self.mstate
        self.transport = None
        # A close frame is no sign of life of the session: alive_at stays where it was.
        policy = self.exit_policy
        if (
            state in WINDING_DOWN
            and policy is not None
            and policy is not APPLICATION_CLOSE
            and code is not None
            and code != self.close_code_sent
            and code in CLOSE_CODE_POLICY
        ):
            # The server answered our close with a documented code of its own: its verdict
            # replaces our reason for closing.
            self.exit_policy = CLOSE_CODE_POLICY[code]
            self.exit_by_server = True
            self.exit_delay = None
        outs = self._call(
            "connection_closed",
            code,
            "server closed",
            at,
            attempt=self.attempt,
            cause=("close", code),
        )
        if state in LINKED:
            policy = policy_for_close(code)
            expected = S.STOPPED if policy.step is NextStep.STOP else S.BACKOFF
            assert self.mstate is expected, f"Inv 4: close {code} led to {self.mstate.name}"
            fatal = [o for o in outs if isinstance(o, FatalStop)]
            if expected is S.STOPPED:
                assert [f.code for f in fatal] == [code], "Inv 4: a fatal close must name its code"
        else:
            assert state in WINDING_DOWN
            assert self.mstate in (S.BACKOFF, S.STOPPED)

    def _run_timer(self, *, on_time: bool) -> list[Output]:
        """Call handle_timer(now) for a timer that fell due; check what it must do."""
        due_at = self.conn.get_timer()
        assert due_at is not None
        assert due_at <= self.now
        link = self.link
        zombie_due = beat_due = False
        if link is not None and link.ka_alive and link.hello_at is not None:
            due = self.now >= link.next_beat_at
            zombie_due = due and link.ack_pending
            answer_due = link.answer_at is not None and self.now >= link.answer_at
            beat_due = (due and not link.ack_pending) or (answer_due and not zombie_due)
        self.zombie_expected = zombie_due
        outs = self._call("handle_timer", self.now, cause=("timer",), timer=True, on_time=on_time)
        self.zombie_expected = False
        after = self.conn.get_timer()
        assert after is None or after > self.now, (
            f"Inv 11: after handle_timer({self.now}) a timer is still due at {after} (hang)"
        )
        zombies = any(isinstance(o, ZombieDetected) for o in outs)
        assert zombies == zombie_due, (
            f"Inv 2: a beat fell due with the previous one unacknowledged={zombie_due}, "
            f"ZombieDetected={zombies}"
        )
        if beat_due:
            assert self.beats_this_call == 1, "Inv 1: a beat fell due but none was sent"
        return outs

    def _app_close(self, at: float, *, end_session: bool) -> None:
        state = self.mstate
        if state in WINDING_DOWN:
            policy = self.exit_policy
            assert policy is not None
            # A close that ends the session (op 9 d=false) drops it now: a restart must not
            # Resume it. Any other keeps it for the restart.
            self.drop_on_close = policy.step is NextStep.IDENTIFY and self.session is not None
            self.exit_policy = APPLICATION_CLOSE  # the close in flight now ends in STOPPED
        outs = self._call("close", at, end_session=end_session, cause=("app", end_session))
        if state is S.STOPPED:
            assert outs == [], "close() in STOPPED must do nothing"
        if state in LINKED:
            assert self.mstate is S.CLOSING
        elif state not in WINDING_DOWN:
            assert self.mstate is S.STOPPED

    def _feed(self, payload: str | bytes, cause: tuple[Any, ...] = ("frame",)) -> list[Output]:
        try:
            decode_payload(payload, max_size=CFG.max_payload_size)
        except RemoteProtocolError:
            pass
        else:
            self.alive_at = self.now  # any payload that decodes is a sign of life
        return self._call("receive", payload, self.now, attempt=self.attempt, cause=cause)

    def _feed_bad(self, payload: str | bytes, *, winding_ignored: bool) -> None:
        before = self._observe()
        state = self.mstate
        outs = self._feed(payload)
        if winding_ignored and state in WINDING_DOWN:
            assert outs == [], f"Inv 11: winding down, this payload must be ignored: {outs}"
        else:
            assert len(outs) == 1, f"Inv 11: a bad payload must give one violation: {outs}"
            assert isinstance(outs[0], ProtocolViolation), f"Inv 11: {outs}"
        assert self._observe() == before, "Inv 11: a bad payload changed state or sequence"

    def _ack(self) -> None:
        link = self.link
        counted = link is not None and link.ka_alive and link.ack_pending
        outs = self._feed('{"op":11}')
        acks = [o for o in outs if isinstance(o, HeartbeatAcknowledged)]
        assert len(acks) == counted, f"Inv 2: ACK counted={len(acks)}, expected {counted}"
        others = [o for o in outs if not isinstance(o, HeartbeatAcknowledged | PersistSnapshot)]
        assert others == [], f"an ACK produced {others}"

    def _hello(self, interval: object) -> None:
        state = self.mstate
        if _valid_interval(interval):
            assert isinstance(interval, int | float)
            self.expected_interval = max(interval / 1000.0, CFG.min_heartbeat_interval)
        else:
            self.expected_interval = None
        if state in WINDING_DOWN or not _valid_interval(interval):
            payload = _dumps({"op": 10, "d": {"heartbeat_interval": interval}})
            self._feed_bad(payload, winding_ignored=True)
            return
        self._feed(_dumps({"op": 10, "d": {"heartbeat_interval": interval}}), cause=("hello",))
        if state is S.AWAITING_HELLO:
            expected = S.RESUMING if self.session is not None else S.IDENTIFYING
            assert self.mstate is expected, f"after Hello: {self.mstate.name}, not {expected}"
        else:
            assert self.mstate is S.CLOSING, "Inv 1: a second Hello must end the connection"

    def _ready(self, s: int | None, *, valid: bool) -> None:
        state = self.mstate
        self.ready_no += 1
        sid = f"SESSION-{self.ready_no}"
        d: dict[str, Any] = {"version": 1, "user": {"id": "1", "bot": True}}
        if valid:
            d["session_id"] = sid
        self.ready_sent = (sid, s)
        payload = _dumps({"op": 0, "s": s, "t": "READY", "d": d})
        if state is not S.IDENTIFYING or not valid:
            self._feed_bad(payload, winding_ignored=False)
            return
        self._feed(payload)
        assert self.mstate is S.READY

    def _resumed(self, mode: str) -> None:
        state = self.mstate
        base = self.seq if self.seq is not None else 0
        s = {"none": None, "next": base + 1, "same": base, "lower": max(base - 1, 0)}.get(
            mode, base + 5
        )
        payload = _dumps({"op": 0, "s": s, "t": "RESUMED", "d": ""})
        if state is not S.RESUMING or self.session is None:
            self._feed_bad(payload, winding_ignored=False)
            return
        if s is not None and (self.seq is None or s > self.seq):
            self.seq = s
        self._feed(payload)
        assert self.mstate is S.READY

    # ================================================================== rules: driver

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        snapshot_seq=st.sampled_from(["none", "none", "none", 7, None]),
        warm=st.booleans(),
    )
    def create(self, seed: int, snapshot_seq: int | str | None, warm: bool) -> None:
        snapshot = None
        if snapshot_seq != "none":
            assert not isinstance(snapshot_seq, str)
            snapshot = SessionSnapshot(
                session_id="SNAPSHOT-0", seq=snapshot_seq, shard=CFG.shard, saved_at=0.0
            )
        self._new_connection(seed, snapshot)
        if warm:  # start in READY: most of the interesting behaviour lives there
            self._start(self.now)
            self.connect_to_ready()

    @precondition(lambda self: self.mstate is S.IDLE)
    @rule()
    def start(self) -> None:
        self._start(self.now)

    @precondition(lambda self: self.pending_token)
    @rule(
        expires_in=st.sampled_from(EXPIRES_IN),
        fail=st.sampled_from([None, None, None, *FAILURES]),
    )
    def answer_token(self, expires_in: int | str, fail: FailureKind | None) -> None:
        if fail is not None:
            self._request_failed("token", self.now, fail)
        else:
            self._provide_token(expires_in, self.now)

    @precondition(lambda self: self.pending_gateway)
    @rule(
        limit=st.sampled_from(START_LIMITS),
        fail=st.sampled_from([None, None, None, *FAILURES]),
    )
    def answer_gateway(self, limit: SessionStartLimit | None, fail: FailureKind | None) -> None:
        if fail is not None:
            self._request_failed("gateway", self.now, fail)
        else:
            self._provide_gateway(limit, self.now)

    @precondition(lambda self: self.pending_permit)
    @rule(answer=st.sampled_from(PERMIT_ANSWERS))
    def answer_permit(self, answer: float | str | None) -> None:
        """The identify limiter grants, refuses until its budget resets, or fails."""
        self._answer_permit(answer)

    def _answer_permit(self, answer: float | str | None) -> None:
        if answer == "grant":
            self._grant(self.now)
        else:
            assert not isinstance(answer, str)
            self._refuse(answer, self.now)

    @precondition(lambda self: bool(self.abandoned))
    @rule(data=st.data())
    def late_report_abandoned(self, data: st.DataObject) -> None:
        """The cancel of an abandoned request lost the race: its answer arrives anyway."""
        what = data.draw(st.sampled_from(sorted(self.abandoned)))
        self.abandoned.discard(what)
        if self.core_awaiting == what:
            return  # indistinguishable from the answer to the request now in flight
        how = data.draw(st.sampled_from(["ok", *FailureKind]))
        if what == "permit":
            if how == "ok":
                self._expect_ignored("grant_identify", self.now)
            else:
                self._expect_ignored("refuse_identify", "late", self.now, retry_after=None)
        elif how == "ok":
            if what == "token":
                self._provide_token(7200, self.now)
            else:
                self._provide_gateway(None, self.now)
        else:
            assert isinstance(how, FailureKind)
            self._expect_ignored("request_failed", "late", self.now, request=what, kind=how)

    @precondition(lambda self: self.pending_open)
    @rule(ok=st.sampled_from([True, True, True, False]))
    def open_result(self, ok: bool) -> None:
        self._open_result(self.now, ok=ok)

    @precondition(
        lambda self: (
            self.pending_token or self.pending_gateway or self.pending_permit or self.pending_open
        )
    )
    @rule(permit=st.sampled_from(PERMIT_ANSWERS), limit=st.sampled_from(START_LIMITS))
    def run_driver(self, permit: float | str | None, limit: SessionStartLimit | None) -> None:
        """Answer every pending request happily (gets deep states reachable in few steps),
        but the session start limit may be spent (``limit``) and the identify limiter may
        refuse or fail (its answer is ``permit``)."""
        for _ in range(10):
            if self.pending_token:
                self._provide_token("7200", self.now)
            elif self.pending_gateway:
                self._provide_gateway(limit, self.now)
            elif self.pending_permit:
                self._answer_permit(permit)
                permit = "grant"
            elif self.pending_open:
                self._open_result(self.now, ok=True)
            else:
                return

    @precondition(lambda self: self.mstate in HAPPY_PATH)
    @rule()
    def connect_to_ready(self) -> None:
        """Driver and server both behave, right now, until READY (a shortcut to deep states)."""
        for _ in range(20):
            state = self.mstate
            if state is S.READY or state not in HAPPY_PATH:
                return
            if self.pending_token:
                self._provide_token(7200, self.now)
            elif self.pending_gateway:
                self._provide_gateway(None, self.now)
            elif self.pending_permit:
                self._grant(self.now)
            elif self.pending_open:
                self._open_result(self.now, ok=True)
            elif state is S.AWAITING_HELLO:
                self._hello(45000)
            elif state is S.IDENTIFYING:
                self._ready(1, valid=True)
            elif state is S.RESUMING:
                self._resumed("next")
            else:
                return  # PREPARING with nothing to answer (a stale request): wait for timers

    @precondition(lambda self: self.conn.get_timer() is not None)
    @rule()
    def tick(self) -> None:
        """The driver's sleep ends exactly at get_timer()."""
        timer = self.conn.get_timer()
        assert timer is not None
        assert timer <= CORE_MAX_TIME, "get_timer() beyond the clock range"
        self.now = max(self.now, timer)
        self._run_timer(on_time=True)

    @rule(dt=CLOCK_STEPS, stalled=st.booleans())
    def advance_clock(self, dt: float, stalled: bool) -> None:
        """Time passes and nothing arrives. On time: the driver wakes at every timer. Stalled:
        the process was frozen for `dt` and then runs what fell due, late."""
        self._advance(dt, stalled=stalled)

    def _advance(self, dt: float, *, stalled: bool) -> None:
        target = self.now + dt
        if stalled:
            self.now = target
        for _ in range(10_000):
            timer = self.conn.get_timer()
            if timer is None or timer > target:
                break
            self.now = max(self.now, timer)
            self._run_timer(on_time=not stalled)
        else:
            raise AssertionError("Inv 11: timers keep falling due (hang)")
        self.now = target

    @rule(dt=CLOCK_STEPS)
    def advance_clock_server_acks(self, dt: float) -> None:
        """Time passes on a healthy link: the server ACKs every scheduled beat at once."""
        target = self.now + dt
        for _ in range(10_000):
            timer = self.conn.get_timer()
            if timer is None or timer > target:
                break
            self.now = max(self.now, timer)
            self._run_timer(on_time=True)
            if self.beats_this_call and self.transport == "open":
                self._ack()
        else:
            raise AssertionError("Inv 11: timers keep falling due (hang)")
        self.now = target

    @rule(end_session=st.booleans(), go=st.integers(0, 5))
    def app_close(self, end_session: bool, go: int) -> None:
        # Closing is terminal: do it in one step of six only; but during a close already in
        # flight (op 7, op 9, the watchdog...) it only changes how that close ends.
        if go and self.mstate not in WINDING_DOWN:
            return
        self._app_close(self.now, end_session=end_session)

    @precondition(lambda self: self.mstate is S.STOPPED)
    @rule(seed=st.integers(0, 2**32 - 1))
    def restart_process(self, seed: int) -> None:
        """A new process resumes from the last PersistSnapshot (invariant 9)."""
        self._new_connection(seed, self.last_snapshot)

    def _verb_args(self, verb: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        """The verb's name, its arguments before ``now``, and its keyword arguments."""
        a = self.attempt
        calls: dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]] = {
            "start": ("start", (), {}),
            "provide_token": ("provide_token", ("TOKEN-SECRET-x", 7200), {}),
            "provide_gateway": ("provide_gateway", (GATEWAY_URL,), {}),
            "grant_identify": ("grant_identify", (), {}),
            "refuse_identify": ("refuse_identify", ("spent",), {"retry_after": 30.0}),
            "request_failed": (
                "request_failed",
                ("boom",),
                {"request": "token", "kind": FailureKind.TRANSIENT},
            ),
            "connection_opened": ("connection_opened", (), {"attempt": a}),
            "connection_closed": ("connection_closed", (None, "gone"), {"attempt": a}),
            "receive": ("receive", ('{"op":11}',), {"attempt": a}),
            "message_too_large": ("message_too_large", (TOO_LARGE,), {"attempt": a}),
            "handle_timer": ("handle_timer", (), {}),
            "close": ("close", (), {}),
            # Misuse whatever the state: an argument of the wrong type, or one missing.
            "provide_token('')": ("provide_token", ("", 7200), {}),
            "provide_token(bytes)": ("provide_token", (b"TOKEN-SECRET-x", 7200), {}),
            "provide_gateway(https)": ("provide_gateway", ("https://not-a-websocket.test",), {}),
            "provide_gateway(port)": ("provide_gateway", ("wss://gateway.test:70000/",), {}),
            "provide_gateway(limit=dict)": (
                "provide_gateway",
                (GATEWAY_URL,),
                {"session_start_limit": {"remaining": 0}},
            ),
            "refuse_identify(-1)": ("refuse_identify", ("x",), {"retry_after": -1.0}),
            "refuse_identify()": ("refuse_identify", ("x",), {}),
            "request_failed(kind=str)": (
                "request_failed",
                ("x",),
                {"request": "token", "kind": "transient"},
            ),
            "request_failed()": ("request_failed", ("x",), {}),
            "connection_closed('1000')": ("connection_closed", ("1000", ""), {"attempt": a}),
            "receive(int)": ("receive", (11,), {"attempt": a}),
            "receive()": ("receive", ('{"op":11}',), {}),
            "receive(attempt=True)": ("receive", ('{"op":11}',), {"attempt": True}),
            "message_too_large(str)": ("message_too_large", ("big",), {"attempt": a}),
            "close(end_session=str)": ("close", (), {"end_session": "no"}),
            "close(force=True)": ("close", (), {"force": True}),
        }
        return calls[verb]

    @rule(
        verb=st.sampled_from(
            [
                "start",
                "provide_token",
                "provide_gateway",
                "grant_identify",
                "refuse_identify",
                "request_failed",
                "connection_opened",
                "connection_closed",
                "receive",
                "message_too_large",
                "handle_timer",
                "close",
                *MISUSE_VERBS,
            ]
        ),
        when=st.sampled_from(["now", "now", "past", "nan", "inf", "-inf", "str", "bool"]),
    )
    def any_verb_any_state(self, verb: str, when: str) -> None:
        """Any verb in any state: success (then checked as usual) or LocalProtocolError."""
        name, args, kwargs = self._verb_args(verb)
        bad_now: dict[str, Any] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
        bad_now |= {"str": str(self.now), "bool": True}
        if verb in MISUSE_VERBS:
            now = bad_now.get(when, self.now)
            self._expect_refused(name, *args, now, **kwargs)
            return
        if when in bad_now:
            # Refused whatever the state: also a report about a transport given up on.
            self._expect_refused(name, *args, bad_now[when], **kwargs)
            return
        at = self.now
        if when == "past" and self.conn._now == self.now:
            at = self.now - 3.0  # an older reading: the core keeps its clock monotonic
        state = self.mstate
        if verb == "start":
            if state is S.IDLE:
                self._start(at)
            else:
                self._expect_refused("start", at)  # started already
        elif verb == "provide_token":
            self._provide_token(7200, at)
        elif verb == "provide_gateway":
            self._provide_gateway(None, at)
        elif verb == "grant_identify":
            self._grant(at)
        elif verb == "refuse_identify":
            self._refuse(30.0, at)
        elif verb == "request_failed":
            what = "token" if self.core_awaiting != "gateway" else "gateway"
            self._request_failed(what, at, FailureKind.TRANSIENT)
        elif verb == "connection_opened":
            if self.pending_open:
                self._open_result(at, ok=True)
            elif self.transport is not None:
                self._expect_refused(name, *args, at, **kwargs)  # open already
            else:
                self._expect_ignored(name, *args, at, **kwargs)  # an abandoned transport
        elif verb == "connection_closed":
            if self.pending_open:
                self._open_result(at, ok=False)
            elif self.transport is not None:
                self._transport_closed(None, at)
            else:
                self._expect_ignored(name, *args, at, **kwargs)
        elif verb in ("receive", "message_too_large"):
            if self.transport is not None:
                if verb == "receive":
                    self._ack()
                else:
                    self._oversized(TOO_LARGE)
            elif self.pending_open:
                self._expect_refused(name, *args, at, **kwargs)  # nothing can have arrived
            else:
                self._expect_ignored(name, *args, at, **kwargs)
        elif verb == "handle_timer":
            timer = self.conn.get_timer()
            if timer is not None and timer <= self.now:
                self._run_timer(on_time=True)
            else:
                self._expect_ignored("handle_timer", at)
        else:
            self._app_close(at, end_session=False)

    # ================================================================== rules: server

    @precondition(lambda self: self.transport is not None)
    @rule(interval=st.sampled_from(HELLO_INTERVALS))
    def server_hello(self, interval: object) -> None:
        self._hello(interval)

    @precondition(lambda self: self.transport is not None)
    @rule(s=st.sampled_from([None, 0, 1, 1, 5]), valid=st.sampled_from([True, True, False]))
    def server_ready(self, s: int | None, valid: bool) -> None:
        self._ready(s, valid=valid)

    @precondition(lambda self: self.transport is not None)
    @rule(mode=st.sampled_from(["none", "next", "same", "lower", "jump"]))
    def server_resumed(self, mode: str) -> None:
        self._resumed(mode)

    @precondition(lambda self: self.transport == "open")
    @rule(interval=st.sampled_from([45000, 45000, 1000]))
    def server_handshake(self, interval: int) -> None:
        """The next well-behaved handshake frame for the current state."""
        if self.mstate is S.AWAITING_HELLO:
            self._hello(interval)
        elif self.mstate is S.IDENTIFYING:
            self._ready(1, valid=True)
        elif self.mstate is S.RESUMING:
            self._resumed("next")

    @precondition(lambda self: self.transport is not None)
    @rule(
        frames=st.lists(
            st.tuples(
                st.sampled_from(EVENT_TYPES),
                st.sampled_from(SEQ_MODES),
                st.sampled_from(EVENT_IDS),
                st.sampled_from(MESSAGE_IDS),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def server_dispatch(self, frames: list[tuple[str, str, str | None, str | None]]) -> None:
        """Dispatches with increasing, repeated, lower, missing `s`, repeated ids."""
        for t, seq_mode, event_id, message_id in frames:
            self._dispatch(t, seq_mode, event_id, message_id)

    def _dispatch(
        self, t: str, seq_mode: str, event_id: str | None, message_id: str | None
    ) -> None:
        base = self.seq if self.seq is not None else 0
        seqs = {"next": base + 1, "same": base, "lower": max(base - 1, 0), "jump": base + 3}
        seqs["zero"] = 0
        payload: dict[str, Any] = {"op": 0, "t": t}
        s = seqs.get(seq_mode)
        if seq_mode == "null":
            payload["s"] = None
        elif seq_mode != "missing":
            payload["s"] = s
        if event_id == "fresh":
            self.fresh_no += 1
            event_id = f"e-fresh-{self.fresh_no}"
        if event_id is not None:
            payload["id"] = event_id
        d: dict[str, Any] = {"content": f"hello {CLIENT_SECRET}"}
        if message_id == "fresh":
            self.fresh_no += 1
            message_id = f"m-fresh-{self.fresh_no}"
        if message_id == "not-a-string":
            d["id"] = 12345
        elif message_id is not None:
            d["id"] = message_id
        payload["d"] = d
        expected = self._expect_dispatch(t, s, event_id, d)
        before = self._observe()
        outs = self._feed(_dumps(payload))
        if expected == "violation":
            assert len(outs) == 1, f"Inv 11: {outs}"
            assert isinstance(outs[0], ProtocolViolation)
            assert self._observe() == before, "Inv 11: a bad dispatch changed state or sequence"
            return
        assert len(outs) == 1, f"one dispatch, one output: {outs}"
        out = outs[0]
        if expected == "deliver":
            assert isinstance(out, Dispatch), f"Inv 5: expected a delivery, got {out}"
            assert (out.type, out.seq, out.event_id) == (t, s, event_id)
        else:
            assert isinstance(out, DuplicateDropped), f"Inv 5: expected a drop, got {out}"
            assert out.key == expected, f"Inv 5: dropped by {out.key}, expected {expected}"
        assert self.mstate is before[0], "a dispatch changed the state"

    def _expect_dispatch(self, t: str, s: int | None, event_id: str | None, d: object) -> str:
        """Oracle: what the core must do with this dispatch (mirrors the dedup rules)."""
        if self.session is None or self.mstate not in DELIVERING:
            return "violation"
        if s is not None and self.seq is not None:
            # Below the highest seq only a seq skipped by an earlier jump may still come (a
            # replay out of order); everything else there is a duplicate.
            if s <= self.seq:
                if s not in self.gaps:
                    return "seq"
                self.gaps.discard(s)
            elif s > self.seq + 1:
                self.gaps.update(range(max(self.seq + 1, s - 1000), s))
        if event_id is not None and self._seen(self.seen_events, event_id):
            return "event_id"
        if t in CFG.dedup_event_types and isinstance(d, dict):
            mid = d.get("id")
            if isinstance(mid, str) and self._seen(self.seen_msgs, mid):
                return "message_id"
        return "deliver"

    def _seen(self, memory: dict[str, float], key: str) -> bool:
        at = memory.get(key)
        if at is not None and self.now - at <= CFG.dedup_max_age:
            return True
        memory[key] = self.now
        return False

    @precondition(lambda self: self.transport is not None)
    @rule()
    def server_ack(self) -> None:
        """op 11, requested or not."""
        self._ack()

    @precondition(lambda self: self.transport is not None)
    @rule(gaps=st.lists(st.sampled_from([0.0, 0.3, 0.99, 1.0, 2.5]), max_size=3))
    def server_heartbeat_request(self, gaps: list[float]) -> None:
        """op 1 from the server, or a burst of them `gaps` apart (timers run in between)."""
        self._server_op1()
        for gap in gaps:
            self._advance(gap, stalled=False)
            if self.transport is None:
                return
            self._server_op1()

    def _server_op1(self) -> None:
        """One op 1: one extra beat, at once or at most a second later; the regular schedule
        untouched."""
        state = self.mstate
        link = self.link
        assert link is not None
        timer = self.conn.get_timer()
        schedule = (link.last_beat_at, link.ack_pending, link.next_beat_at)
        answer = link.ka_alive and self.now - link.last_any_beat_at >= 1.0
        if link.ka_alive and not answer and link.answer_at is None:
            # Too soon after the last beat (a burst must not earn 4008): answered when that
            # beat is a second old, or by a regular beat before then.
            link.answer_at = link.last_any_beat_at + 1.0
        outs = self._feed('{"op":1,"d":null}', cause=("op1",))
        beats = [o for o in outs if isinstance(o, SendPayload)]
        if state in WINDING_DOWN:
            assert outs == [], f"winding down, op 1 must be ignored: {outs}"
        elif link.ka_alive:
            assert len(beats) == answer, f"Inv 1: op 1 answered {len(beats)} times"
            assert len(outs) == answer, f"op 1 produced {outs}"
        else:
            assert len(outs) == 1, f"op 1 before Hello: {outs}"
            assert isinstance(outs[0], ProtocolViolation)
        assert (link.last_beat_at, link.ack_pending, link.next_beat_at) == schedule, (
            "Inv 1: answering op 1 moved the beat schedule"
        )
        expected = timer
        if link.ka_alive and link.answer_at is not None:
            expected = link.answer_at if timer is None else min(timer, link.answer_at)
        assert self.conn.get_timer() == expected, (
            f"Inv 1: timer {self.conn.get_timer()} after op 1, expected {expected}"
        )
        if expected is not None and expected <= self.now:
            # One ulp short of a second after the last beat: the answer is due right now.
            self._run_timer(on_time=True)

    @precondition(lambda self: self.transport is not None or self.pending_open)
    @rule(size=st.sampled_from([TOO_LARGE, 64 << 20]))
    def server_oversized(self, size: int) -> None:
        """A message over max_payload_size the driver discarded unread."""
        self._oversized(size)

    def _oversized(self, size: int) -> None:
        if self.pending_open:
            # Nothing can have been received on a transport not open yet.
            self._expect_refused("message_too_large", size, self.now, attempt=self.attempt)
            return
        before = self._observe()
        # Not decoded, so no sign of life: alive_at stays.
        outs = self._call(
            "message_too_large", size, self.now, attempt=self.attempt, cause=("frame",)
        )
        assert len(outs) == 1, f"Inv 11: an oversized message must give one violation: {outs}"
        (violation,) = outs
        assert isinstance(violation, ProtocolViolation), outs
        assert isinstance(violation.error, PayloadTooLarge), violation
        assert (violation.error.size, violation.error.limit) == (size, CFG.max_payload_size)
        assert self._observe() == before, "Inv 11: an oversized message changed the connection"

    @precondition(lambda self: self.opens > 0)
    @rule(report=st.sampled_from(["ack", "op7", "dispatch", "closed", "opened", "oversized"]))
    def stale_transport_report(self, report: str) -> None:
        """A report about a transport the core gave up on (aborted, or closed already)."""
        live = self.transport is not None or self.pending_open
        attempt = self.attempt - 1 if live else self.attempt
        args: tuple[Any, ...]
        if report in ("ack", "op7", "dispatch"):
            payload = {
                "ack": '{"op":11}',
                "op7": '{"op":7}',
                "dispatch": '{"op":0,"s":999999,"t":"GUILD_UPDATE","d":{}}',
            }[report]
            verb, args = "receive", (payload, self.now)
        elif report == "closed":
            verb, args = "connection_closed", (4914, "late", self.now)
        elif report == "opened":
            verb, args = "connection_opened", (self.now,)
        else:
            verb, args = "message_too_large", (TOO_LARGE, self.now)
        self._expect_ignored(verb, *args, attempt=attempt)

    @precondition(lambda self: self.transport is not None)
    @rule()
    def server_reconnect(self) -> None:
        """op 7."""
        state = self.mstate
        outs = self._feed('{"op":7,"d":null}', cause=("op7",))
        if state in WINDING_DOWN:
            assert outs == []
        else:
            assert self.mstate is S.CLOSING, "op 7 must close the connection"

    @precondition(lambda self: self.transport is not None)
    @rule(d=st.sampled_from([False, True, None]))
    def server_invalid_session(self, d: bool | None) -> None:
        """op 9."""
        state = self.mstate
        resumable = d is True and not self.op9_resumed and self.session is not None
        self.op9_policy = INVALID_SESSION_RESUMABLE if resumable else INVALID_SESSION
        payload = _dumps({"op": 9, "d": d})
        if state is S.AWAITING_HELLO or state in WINDING_DOWN:
            self._feed_bad(payload, winding_ignored=True)
            return
        self._feed(payload, cause=("op9", d))
        assert self.mstate is S.CLOSING, "op 9 must close the connection"

    @precondition(lambda self: self.transport is not None)
    @rule(kind=st.sampled_from(sorted(UNDECODABLE) + sorted(CLIENT_ONLY)))
    def server_garbage(self, kind: str) -> None:
        if kind in UNDECODABLE:
            self._feed_bad(UNDECODABLE[kind], winding_ignored=False)
        else:
            self._feed_bad(CLIENT_ONLY[kind], winding_ignored=True)

    @precondition(lambda self: self.transport is not None)
    @rule(code=st.sampled_from(CLOSE_CODES))
    def server_close(self, code: int | None) -> None:
        """The server closes (or the TCP link dies: None); while we close, this completes it."""
        self._transport_closed(code, self.now)

    @precondition(lambda self: self.transport == "closing")
    @rule()
    def server_echoes_close(self) -> None:
        """The server completes our close handshake with our own code."""
        self._transport_closed(self.close_code_sent, self.now)

    # ================================================================== invariants

    @invariant()
    def state_is_sane(self) -> None:
        if not self.started:
            return
        state = self.conn.state
        assert isinstance(state, SessionState), "Inv 11: state is not a SessionState"
        assert state is not S.ERROR, "Inv 11: the connection is in ERROR"
        assert state is self.mstate, "Inv 11: a state change was not reported"
        assert self.conn.drain() == [], "outputs left undrained"

    @invariant()
    def timer_is_sane(self) -> None:
        if not self.started:
            return
        timer = self.conn.get_timer()
        assert timer is None or timer >= self.now - EPS, (
            f"Inv 11: get_timer() {timer} is in the past (now {self.now})"
        )
        if timer is None:
            waiting_permit = self.mstate is S.PREPARING and self.core_awaiting == "permit"
            assert self.mstate in (S.IDLE, S.STOPPED) or waiting_permit, (
                f"Inv 11: no timer in {self.mstate.name}: nothing bounds this wait (hang)"
            )

    @invariant()
    def one_transport_matching_the_state(self) -> None:
        if not self.started:
            return
        state = self.mstate
        assert self.pending_open == (state is S.CONNECTING), (
            f"transport bookkeeping: opening={self.pending_open} in {state.name}"
        )
        expected = "open" if state in LINKED else "closing" if state in WINDING_DOWN else None
        assert self.transport == expected, (
            f"transport bookkeeping: {self.transport} in {state.name} (socket leaked or lost)"
        )

    @invariant()
    def keepalive_on_schedule(self) -> None:
        if not self.started:
            return
        link = self.link
        alive = link is not None and link.ka_alive
        assert (self.conn.heartbeat_interval is not None) == alive, (
            "Inv 1: heartbeat schedule alive outside Hello..close"
        )
        if link is None or not alive or link.hello_at is None:
            return
        assert self.now < link.next_beat_at, (
            "Inv 1/2: a beat (or the zombie check) is overdue but was not run"
        )
        assert link.answer_at is None or self.now < link.answer_at, (
            "Inv 1: a server op 1 is still unanswered a second after the last beat"
        )
        ref = link.hello_at if link.last_beat_at is None else link.last_beat_at
        assert link.next_beat_at <= ref + link.interval, (
            "Inv 1: the next beat is more than one interval away"
        )

    @invariant()
    def close_handshake_bounded(self) -> None:
        if not self.started or self.transport != "closing":
            return
        assert self.now <= self.close_sent_at + CFG.close_timeout + EPS, (
            "Inv 2: the close handshake outlived close_timeout without AbortTransport"
        )

    @invariant()
    def health_follows_the_plan(self) -> None:
        """Live while a bounded wait lasts, or a planned one (the identify budget)."""
        if not self.started:
            return
        health = self.conn.health(self.now)
        state = self.mstate
        if state is S.IDLE:
            assert health.live, "health: IDLE is live (not started)"
            return
        if state is S.STOPPED:
            assert not health.live, "health: STOPPED is never live"
            assert not health.ready
            return
        if health.ready:
            assert state is S.READY, f"health: ready in {state.name}"
            return
        if state is S.BACKOFF and self.planned_until is not None:
            assert health.live, "health: a planned wait for the identify budget is live"
            assert "identify budget" in health.reason, health.reason
            return
        ref = self.budget_from if self.live_at is None else max(self.live_at, self.budget_from)
        live = self.now - ref <= CFG.liveness_budget
        core = self.conn._liveness
        assert health.live == live, (
            f"health: live={health.live} in {state.name}, {self.now - ref:.1f} s after "
            f"{'READY' if self.live_at is not None else 'the start or a planned wait'} "
            f"(core: {core.budget_from}, {core.live_at}; model: {self.budget_from}, "
            f"{self.live_at}; now {self.now})"
        )

    @invariant()
    def session_mirrors_model(self) -> None:
        if not self.started:
            return
        assert self.conn.session_id == self.session, (
            f"Inv 7: session {self.conn.session_id}, model {self.session}"
        )
        assert self.conn.seq == self.seq, f"Inv 5/7: seq {self.conn.seq}, model {self.seq}"


GatewayMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGatewayStateful = GatewayMachine.TestCase


# ====================================================================== regressions


def _state(conn: GatewayConnection) -> SessionState:
    return conn.state  # read through a call, so that type checkers do not narrow it


def test_infinite_now_is_refused() -> None:
    conn = GatewayConnection(CFG, rng=random.Random(0))
    conn.start(0.0)
    with pytest.raises(LocalProtocolError):
        conn.handle_timer(math.inf)
    assert _state(conn) is S.PREPARING
    conn.handle_timer(30.0)  # still usable
    assert _state(conn) is S.BACKOFF


def test_minus_infinity_as_first_now_is_refused() -> None:
    conn = GatewayConnection(CFG, rng=random.Random(0))
    try:
        conn.start(-math.inf)
    except LocalProtocolError:
        return  # refused: fixed
    conn.drain()
    conn.handle_timer(-math.inf)  # RuntimeError escapes here
    assert conn.state is not S.ERROR


def test_stale_request_failure_does_not_fail_the_next_request() -> None:
    conn = GatewayConnection(CFG, rng=random.Random(0))
    conn.start(0.0)
    conn.provide_token(f"{TOKEN_MARK}1", "60", 0.0)  # 60 s of life: FetchGateway next
    assert any(isinstance(o, FetchGateway) for o in conn.drain())
    conn.handle_timer(CFG.http_timeout)  # the gateway request hangs: the core backs off
    assert _state(conn) is S.BACKOFF
    assert AbandonRequest(request="gateway") in conn.drain()  # and says so
    timer = conn.get_timer()
    assert timer is not None
    conn.handle_timer(timer)  # the token now has < 60 s left: FetchToken
    assert any(isinstance(o, FetchToken) for o in conn.drain())
    # The old request, at last: named, it is told apart from the token request now awaited.
    conn.request_failed(
        "gateway endpoint timed out", timer, request="gateway", kind=FailureKind.FATAL
    )
    assert conn.drain() == []
    assert _state(conn) is S.PREPARING


def test_same_seq_is_not_delivered_twice_in_one_session() -> None:
    conn = GatewayConnection(CFG, rng=random.Random(0))
    conn.start(0.0)
    conn.provide_token(f"{TOKEN_MARK}1", 7200, 0.0)
    conn.provide_gateway(GATEWAY_URL, 0.0)
    conn.grant_identify(0.0)
    conn.connection_opened(0.0, attempt=1)
    conn.receive('{"op":10,"d":{"heartbeat_interval":45000}}', 0.0, attempt=1)
    conn.receive('{"op":0,"s":1,"t":"READY","d":{"session_id":"S1"}}', 0.0, attempt=1)
    conn.drain()
    delivered = []
    for event_id in ("e1", "e2"):  # the same s=2 twice: one event id is new, one is not
        frame = f'{{"op":0,"s":2,"t":"GUILD_UPDATE","id":"{event_id}","d":{{}}}}'
        conn.receive(frame, 1.0, attempt=1)
        delivered += [o.seq for o in conn.drain() if isinstance(o, Dispatch)]
    assert delivered == [2]  # actual: [2, 2]


def test_timer_after_absurd_hello_interval_is_usable() -> None:
    conn = GatewayConnection(CFG, rng=random.Random(0))
    conn.start(0.0)
    conn.provide_token(f"{TOKEN_MARK}1", 7200, 0.0)
    conn.provide_gateway(GATEWAY_URL, 0.0)
    conn.grant_identify(0.0)
    conn.connection_opened(0.0, attempt=1)
    conn.receive('{"op":10,"d":{"heartbeat_interval":1e16}}', 0.0, attempt=1)
    conn.receive('{"op":0,"s":1,"t":"READY","d":{"session_id":"S1"}}', 0.0, attempt=1)
    timer = conn.get_timer()
    assert timer is not None
    conn.handle_timer(timer)  # LocalProtocolError: "now=8444218515250.481 is not a ... reading"
