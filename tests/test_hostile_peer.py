"""The driver against a hostile peer: the totality test of qqproto_io.

Hypothesis picks a `Script` for tests/hostile_gateway.py (what the HTTP endpoints answer,
what the CONNECT proxy answers, and for each WebSocket connection a list of server actions:
pings, fragments, junk, bad frames, closes with any code at any moment, half-closes, resets,
stalls, withheld Hello/READY/ACKs...), then runs a real `GatewayClient` against it on asyncio
and trio. When the script is used up (or after `FLIP_LIMIT` seconds) the peer behaves: a
correct gateway served by the sans-IO `FakeGateway` core. Then every invariant below is
checked, and a failure names the invariants broken and prints the script (Python that
rebuilds it) and a timeline of what the client and the peer did.

Invariants, each checked after every example:

* ``no-escape``: no exception escapes ``async with GatewayClient(...)`` or its iteration
  (no peer behaviour raises one: none is documented for it).
* ``caller-scope``: the caller's task and cancel scopes are intact afterwards: not
  cancelled, no stray cancellation, the same effective deadline.
* ``bounded-exit``: leaving the block takes at most ``close_timeout`` + a few seconds.
* ``no-leaks``: no file descriptor, task, unclosed stream or socket (ResourceWarning) or
  unraisable exception is left behind.
* ``recovery``: once the peer behaves, a message it sends is delivered within ``RECOVERY``
  seconds, or the client has stopped with a legitimate ``FatalStop``.
* ``fatal-stop``: a ``FatalStop`` only for a close code whose policy is to stop (sent on the
  wire) or a token answer that rejects the credentials; never a silent stop; no connection
  after it.
* ``backoff``: every connection the peer accepts (and every token or gateway request)
  comes no earlier than the ``at`` of the last ``ReconnectScheduled`` the client announced
  before it, and the k-th connection follows at least k-1 announcements; at most
  ``MAX_ATTEMPTS`` connections (and requests) per example.
* ``exactly-once``: no dispatch is delivered twice (by event id); every dispatch of the
  session the client ends on, and every dispatch the client acknowledged having (its
  heartbeat or Resume carried a sequence number at least that high), is delivered.
* ``resume-budget``: after ``max_failed_resumes`` Resumes in a row that certainly failed
  (nothing but our close's echo came after RESUMED, or no RESUMED at all), the client
  Identifies instead of resuming again.
* ``hello-first``: the client sends nothing on a connection before Hello arrived.
* ``client-conformance``: the gateway never had to reject what the client sent (invalid
  frames, binary messages, payloads the gateway closes 4001/4002/4005/4010 for).

The normal run is cheap and reproducible (a fixed number of derandomized examples per
backend, no shrinking); ``pytest --soak`` runs many random examples with shrinking (see
docs/testing.md). The known defects of the driver each have a fixed script below.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import sys
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
import sniffio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from qqproto import (
    Disconnected,
    Dispatch,
    Event,
    EventsDropped,
    FatalStop,
    HeartbeatAcknowledged,
    NextStep,
    Ready,
    ReconnectScheduled,
    Resumed,
    SessionConfig,
    SessionInvalidated,
    StateChanged,
    policy_for_close,
)
from qqproto_io._client import GatewayClient
from qqproto_io._stores import LocalIdentifyLimiter
from tests.hostile_gateway import (
    BAD_FRAME_KINDS,
    JUNK_KINDS,
    Accept,
    AckFirst,
    BadAccept,
    BadFrame,
    BadUrl,
    BadUtf8,
    Binary,
    Body,
    Close,
    Conn,
    Echo,
    EchoCode,
    Fault,
    Flood,
    Fragment,
    Freeze,
    Garbage,
    HalfClose,
    Hangup,
    Hold,
    HostilePeer,
    Ignore,
    Junk,
    LinkRecord,
    Mute,
    Notifier,
    OkThenGarbage,
    OkThenHangup,
    Pause,
    PeerLog,
    Ping,
    PingFirst,
    Pong,
    Reconnect,
    Reset,
    Script,
    Serve,
    SlowHead,
    SlowLoris,
    Stall,
    StallMidFrame,
    StallWrites,
    Status,
    Truncated,
    Tunnel,
    Unmute,
    WaitFor,
)
from tests.hostile_gateway import (
    Dispatch as DispatchStep,
)

# A fast session: heartbeats every 0.1-0.3 s (the peer's Hello), 0.5 s close timeout, tiny
# backoff; every other bound 1 s, so a withheld answer costs little.
CONFIG = SessionConfig(
    min_heartbeat_interval=0.1,
    close_timeout=0.5,
    connect_timeout=1.0,
    hello_timeout=1.0,
    auth_timeout=1.0,
    http_timeout=1.0,
    backoff_base=0.05,
    backoff_cap=0.3,
    # Below two Hello intervals, so that a session the server ignores after RESUMED (no ACK)
    # until the watchdog fires would look "stayed up" to anything but the server's own
    # signs of life (resume-budget).
    stable_after=0.25,
    rate_limit_cooldown=0.5,
)
FLIP_LIMIT = 6.0  # seconds the script may take before the peer behaves regardless
SOAK_FLIP_LIMIT = 15.0  # the soak's scripts are longer
# After the flip. The worst legitimate path is about 3 s: a 1 s bound running out on a
# connection from before the flip, the close timeout, the backoff cap, a new connection.
RECOVERY = 6.0
EXAMPLE_BOUND = SOAK_FLIP_LIMIT + RECOVERY + 20.0  # the whole example, exit included
EXIT_SLACK = 3.0  # leaving the block: close_timeout + 1 s (GatewayClient.close) + this
BACKOFF_TOLERANCE = 0.005  # seconds; both sides read anyio.current_time()
STABLE_MARGIN = 0.05  # seconds: a frame's way from our socket into the client's core
MAX_ATTEMPTS = 150  # connections per example: far above any backoff-respecting client
APP_ID = "1020000001"
SECRET = "fake-client-secret"  # the FakeGateway's defaults


# ============================================================================ observation


@dataclass
class Observation:
    """What one example showed, for the invariants."""

    backend: str
    script: Script
    flip_limit: float = FLIP_LIMIT
    started_at: float = 0.0
    emitted: list[tuple[float, Event]] = field(default_factory=list)  # as the core made them
    delivered: list[tuple[float, Event]] = field(default_factory=list)  # as the app got them
    dropped: int = 0
    ended_at: float | None = None  # the iteration ended on its own (before our exit)
    flip_at: float | None = None
    state_at_deadline: str | None = None
    recovered_at: float | None = None
    probes: list[tuple[str, float]] = field(default_factory=list)
    exit_started: float | None = None
    exit_seconds: float | None = None
    escaped: list[str] = field(default_factory=list)
    caller: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)  # the whole event loop run failed
    signatures: list[str] = field(default_factory=list)  # "Type@file:line" of each of those
    timed_out: bool = False
    leaked_tasks: list[str] = field(default_factory=list)
    fds: tuple[int, int] = (0, 0)
    fd_names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unraisable: list[str] = field(default_factory=list)
    peer: PeerLog = field(default_factory=PeerLog)


class _EventClock:
    """Stands in for ``Metrics``: the client calls ``observe`` on its protocol task as each
    event is produced, so this records when the core emitted it."""

    def __init__(self, obs: Observation, notifier: Notifier) -> None:
        self._obs = obs
        self._notifier = notifier

    def observe(self, shard: int, event: Event) -> None:
        self._obs.emitted.append((anyio.current_time(), event))
        self._notifier.poke()

    def dropped(self, shard: int) -> None:
        self._obs.dropped += 1

    def lag(self, shard: int, seconds: float) -> None:
        pass


# ================================================================================ runner


def run_script(
    script: Script,
    backend: str,
    *,
    seed: int = 0,
    flip_limit: float = FLIP_LIMIT,
    **client_kwargs,
) -> Observation:
    """Run one example: the peer with ``script``, a GatewayClient against it, the checks'
    raw material. Pass ``client_kwargs`` to GatewayClient (tests inject a failing store)."""
    obs = Observation(backend, script, flip_limit=flip_limit)
    gc.collect()
    before = _fd_targets()
    with warnings.catch_warnings(record=True) as caught, _unraisables(obs.unraisable):
        warnings.simplefilter("always")
        try:
            anyio.run(_main, obs, seed, client_kwargs, backend=backend)
        except Exception as exc:  # noqa: BLE001 - recorded: the run itself broke
            # Raised by the event loop when the caller's scopes were left corrupted (trio
            # detects it as the scopes exit), or by a bound of the harness.
            obs.crashed.append("".join(traceback.format_exception(exc)))
            obs.signatures.append(_signature(exc))
        gc.collect()
    after = _fd_targets()
    obs.fds = (len(before), len(after))
    obs.fd_names = sorted(set(after.items()) - set(before.items()))  # type: ignore[arg-type]
    obs.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    return obs


def _signature(exc: BaseException) -> str:
    """Where the first leaf of ``exc`` was raised: ``Type@file:line``."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__}@{where}"


def _fd_targets() -> dict[str, str]:
    fds = {}
    for path in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            fds[path.name] = str(path.readlink())
    return fds


@contextlib.contextmanager
def _unraisables(out: list[str]):
    old = sys.unraisablehook

    def hook(u: sys.UnraisableHookArgs) -> None:
        out.append(f"{getattr(u.exc_type, '__name__', u.exc_type)}: {u.exc_value} ({u.object!r})")

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = old


def _tasks() -> dict[object, str]:
    """Every task alive now, with a description."""
    if sniffio.current_async_library() == "trio":
        import trio

        found: dict[object, str] = {}
        stack = [trio.lowlevel.current_root_task()]
        while stack:
            task = stack.pop()
            found[task] = task.name
            for nursery in task.child_nurseries:
                stack.extend(nursery.child_tasks)
        return found
    return {t: f"{t.get_name()} {t.get_coro()!r}" for t in asyncio.all_tasks() if not t.done()}


async def _main(obs: Observation, seed: int, client_kwargs: dict) -> None:
    with anyio.fail_after(EXAMPLE_BOUND + 30.0):  # a last resort: the peer's own exit
        baseline = _tasks()
        notifier = Notifier()
        peer = HostilePeer(obs.script, notifier, seed=seed)
        obs.peer = peer.log
        obs.started_at = anyio.current_time()
        async with peer.serve():
            await _drive(peer, obs, notifier, seed, client_kwargs)
        for _ in range(5):  # let tasks that have just been cancelled finish
            await anyio.lowlevel.checkpoint()
        obs.leaked_tasks = [d for t, d in _tasks().items() if t not in baseline]


async def _consume(client: GatewayClient, obs: Observation, notifier: Notifier) -> None:
    try:
        async for event in client:
            obs.delivered.append((anyio.current_time(), event))
            notifier.poke()
    finally:
        if obs.exit_started is None:
            obs.ended_at = anyio.current_time()
        notifier.poke()


async def _drive(
    peer: HostilePeer, obs: Observation, notifier: Notifier, seed: int, client_kwargs: dict
) -> None:
    client = GatewayClient(
        app_id=APP_ID,
        client_secret=SECRET,
        config=CONFIG,
        api_base=peer.http_base,
        token_url=peer.token_url,
        proxy=peer.proxy_url,
        limiter=LocalIdentifyLimiter(window=0.05),
        metrics=_EventClock(obs, notifier),  # type: ignore[arg-type]
        rng=random.Random(seed),
        **client_kwargs,
    )
    cancelled = anyio.get_cancelled_exc_class()
    asyncio_task = asyncio.current_task() if sniffio.current_async_library() == "asyncio" else None
    cancelling = asyncio_task.cancelling() if asyncio_task is not None else 0
    with anyio.move_on_after(EXAMPLE_BOUND) as bound:
        with anyio.CancelScope() as caller:  # the application's own scope around the client
            try:
                async with anyio.create_task_group() as tg, client:
                    tg.start_soon(_consume, client, obs, notifier)
                    await _scenario(peer, obs, notifier)
                    obs.exit_started = anyio.current_time()
            except BaseException as exc:
                if isinstance(exc, cancelled) and bound.cancel_called:
                    raise
                obs.escaped.append("".join(traceback.format_exception(exc)))
                obs.signatures.append(_signature(exc))
        if obs.exit_started is not None:
            obs.exit_seconds = anyio.current_time() - obs.exit_started
        if caller.cancel_called:
            obs.caller.append("the caller's cancel scope was cancelled from inside the client")
        try:
            await anyio.lowlevel.checkpoint()
        except cancelled:
            if bound.cancel_called:
                raise
            obs.caller.append("a cancellation leaked out of the client into the caller's task")
        if anyio.current_effective_deadline() != bound.deadline:
            obs.caller.append(
                f"the caller's effective deadline changed: {anyio.current_effective_deadline()}"
                f" instead of {bound.deadline}"
            )
        if asyncio_task is not None and asyncio_task.cancelling() != cancelling:
            obs.caller.append(
                f"the caller's asyncio task has {asyncio_task.cancelling()} pending cancel "
                f"requests (was {cancelling})"
            )
    obs.timed_out = bound.cancelled_caught


async def _scenario(peer: HostilePeer, obs: Observation, notifier: Notifier) -> None:
    """Let the script run, flip the peer to behaving, wait for recovery; all on events.

    The script is over when every scripted item has been used and no connection is left in
    a disturbing state (see HostilePeer.disturbing); or when no connection is running steps
    or disturbing, the client is READY, and a message sent since the last steps finished
    was delivered (it is healthy and would use no more of the script on its own); or after
    FLIP_LIMIT. Then a message sent after the flip must be delivered within RECOVERY (a new
    one is sent whenever the client reports READY or RESUMED, as one sent earlier may have
    gone to a session the client then gave up).
    """
    start = anyio.current_time()
    idle_probes: dict[int, set[str]] = {}
    flip_probes: set[str] = set()
    seen_auth = 0

    def probe() -> str | None:
        if not peer.has_session():
            return None
        event_id = peer.produce(probe=True)
        obs.probes.append((event_id, anyio.current_time()))
        return event_id

    while obs.ended_at is None:
        now = anyio.current_time()
        delivered = {e.event_id for _, e in obs.delivered if isinstance(e, Dispatch)}
        auths = sum(1 for _, e in obs.emitted if isinstance(e, Ready | Resumed))
        fresh_auth, seen_auth = auths > seen_auth, auths
        if obs.flip_at is None:
            idle = peer.directors_idle()
            settled = (
                idle
                and not peer.disturbing()
                and _state(obs) == "READY"
                and bool(idle_probes.get(peer.epoch, set()) & delivered)
            )
            done = peer.consumed() and not peer.disturbing()
            if done or settled or now - start >= obs.flip_limit:
                peer.flip()
                obs.flip_at = now
            elif idle and not peer.disturbing() and (peer.epoch not in idle_probes or fresh_auth):
                event_id = probe()
                if event_id is not None:
                    idle_probes.setdefault(peer.epoch, set()).add(event_id)
        if obs.flip_at is not None:
            if flip_probes & delivered:
                obs.recovered_at = now
                return
            if now - obs.flip_at >= RECOVERY:
                obs.state_at_deadline = _state(obs)
                return
            if fresh_auth or not flip_probes:
                event_id = probe()
                if event_id is not None:
                    flip_probes.add(event_id)
        deadline = start + obs.flip_limit if obs.flip_at is None else obs.flip_at + RECOVERY
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await notifier.wait()


def _state(obs: Observation) -> str | None:
    """The client's lifecycle state after the last event the core emitted."""
    for _, event in reversed(obs.emitted):
        if isinstance(event, StateChanged):
            return event.new.name
    return None


# ============================================================================= invariants


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str


def violations(obs: Observation, config: SessionConfig = CONFIG) -> list[Violation]:
    """Every invariant ``obs`` breaks (see the module docstring)."""
    found: list[Violation] = []
    for check in (
        _check_escape,
        _check_caller,
        _check_exit,
        _check_leaks,
        _check_recovery,
        _check_fatal,
        _check_backoff,
        _check_delivery,
        _check_resume_budget,
        _check_hello_first,
        _check_conformance,
    ):
        found.extend(check(obs, config))
    return found


def _check_escape(obs: Observation, config: SessionConfig) -> list[Violation]:
    return [
        Violation("no-escape", f"escaped `async with GatewayClient`:\n{e}") for e in obs.escaped
    ]


def _check_caller(obs: Observation, config: SessionConfig) -> list[Violation]:
    found = [Violation("caller-scope", c) for c in obs.caller]
    found.extend(
        Violation("caller-scope", f"the event loop run failed after the client's block:\n{c}")
        for c in obs.crashed
    )
    return found


def _check_exit(obs: Observation, config: SessionConfig) -> list[Violation]:
    if obs.timed_out:
        return [Violation("bounded-exit", f"the example did not end within {EXAMPLE_BOUND} s")]
    limit = config.close_timeout + 1.0 + EXIT_SLACK
    if obs.exit_seconds is not None and obs.exit_seconds > limit:
        return [Violation("bounded-exit", f"leaving the block took {obs.exit_seconds:.2f} s")]
    return []


def _check_leaks(obs: Observation, config: SessionConfig) -> list[Violation]:
    found = []
    if obs.fds[1] > obs.fds[0]:
        found.append(
            Violation("no-leaks", f"file descriptors {obs.fds[0]} -> {obs.fds[1]}: {obs.fd_names}")
        )
    found.extend(Violation("no-leaks", f"task left running: {t}") for t in obs.leaked_tasks)
    found.extend(
        Violation("no-leaks", w)
        for w in obs.warnings
        if w.startswith("ResourceWarning") or "never awaited" in w
    )
    found.extend(Violation("no-leaks", f"unraisable exception: {u}") for u in obs.unraisable)
    return found


def _fatal_stops(obs: Observation) -> list[tuple[float, FatalStop]]:
    return [(t, e) for t, e in obs.emitted if isinstance(e, FatalStop)]


def _stop_codes_sent(log: PeerLog) -> set[int]:
    codes = set()
    for link in log.links:
        for _, what, kind, detail in link.events:
            if what == "wrote" and kind == "close" and isinstance(detail, tuple):
                code = detail[0]
                if code is not None and policy_for_close(code).step is NextStep.STOP:
                    codes.add(code)
    return codes


def _fatal_token_sent(log: PeerLog) -> bool:
    return any(endpoint == "fatal" for _, endpoint, _ in log.http)


def _legit_stop(obs: Observation) -> bool:
    stops = _fatal_stops(obs)
    if not stops:
        return False
    codes = _stop_codes_sent(obs.peer)
    return all(
        (e.code in codes) if e.code is not None else _fatal_token_sent(obs.peer) for _, e in stops
    )


def _check_recovery(obs: Observation, config: SessionConfig) -> list[Violation]:
    if obs.recovered_at is not None or (obs.ended_at is not None and _legit_stop(obs)):
        return []
    if obs.ended_at is not None:
        return []  # stopped on its own: judged by fatal-stop
    if obs.flip_at is None:
        return [Violation("recovery", "the example ended before the peer behaved")]
    state = obs.state_at_deadline or _state(obs)
    return [
        Violation(
            "recovery",
            f"no message delivered within {RECOVERY} s after the peer behaved (flip at "
            f"{obs.flip_at - obs.started_at:.2f} s; last state {state}; "
            f"{len(obs.probes)} messages sent meanwhile)",
        )
    ]


def _check_fatal(obs: Observation, config: SessionConfig) -> list[Violation]:
    found = []
    stops = _fatal_stops(obs)
    codes = _stop_codes_sent(obs.peer)
    for _, stop in stops:
        if stop.code is None and not _fatal_token_sent(obs.peer):
            found.append(Violation("fatal-stop", f"{stop!r} but no answer rejected the secret"))
        elif stop.code is not None and stop.code not in codes:
            found.append(
                Violation("fatal-stop", f"{stop!r} but the peer sent no such stop code ({codes})")
            )
    if obs.ended_at is not None and not stops and not obs.escaped:
        found.append(Violation("fatal-stop", "the client stopped by itself without a FatalStop"))
    if stops:
        first = stops[0][0]
        later = [t - obs.started_at for t in obs.peer.attempts if t > first]
        if later:
            found.append(Violation("fatal-stop", f"connections after the FatalStop at {later}"))
    return found


def _check_backoff(obs: Observation, config: SessionConfig) -> list[Violation]:
    found = []
    scheduled = [(t, e) for t, e in obs.emitted if isinstance(e, ReconnectScheduled)]
    attempts = sorted(obs.peer.attempts)
    t0 = obs.started_at
    for k, accepted in enumerate(attempts):
        before = [e for t, e in scheduled if t <= accepted]
        if len(before) < k:
            found.append(
                Violation(
                    "backoff",
                    f"connection #{k + 1} at {accepted - t0:.3f} s follows only {len(before)} "
                    "ReconnectScheduled: a reconnect without the core's backoff",
                )
            )
            break
        if before and accepted < before[-1].reconnect_at - BACKOFF_TOLERANCE:
            found.append(
                Violation(
                    "backoff",
                    f"connection #{k + 1} at {accepted - t0:.3f} s, before the announced "
                    f"{before[-1].reconnect_at - t0:.3f} s ({before[-1]!r})",
                )
            )
    if len(attempts) > MAX_ATTEMPTS:
        found.append(Violation("backoff", f"{len(attempts)} connections in one example"))
    # Token and gateway requests are made while preparing an attempt: after the backoff too.
    requests = [(t, what) for t, what, _ in obs.peer.http if what in ("token", "gateway")]
    for at, what in requests:
        before = [e for t, e in scheduled if t <= at]
        if before and at < before[-1].reconnect_at - BACKOFF_TOLERANCE:
            found.append(
                Violation(
                    "backoff",
                    f"{what} request at {at - t0:.3f} s, before the announced "
                    f"{before[-1].reconnect_at - t0:.3f} s ({before[-1]!r})",
                )
            )
            break
    if len(requests) > MAX_ATTEMPTS:
        found.append(Violation("backoff", f"{len(requests)} HTTP requests in one example"))
    return found


def _acked(log: PeerLog) -> dict[str, int]:
    """Per session, the highest sequence number the client said it had."""
    acked: dict[str, int] = {}
    for link in log.links:
        session = link.conn.session.id if link.conn is not None and link.conn.session else None
        for _, what, op, d in link.events:
            if what != "got":
                continue
            if op == 1 and type(d) is int and session is not None:
                acked[session] = max(acked.get(session, d), d)
            elif op == 6 and isinstance(d, dict):
                sid, seq = d.get("session_id"), d.get("seq")
                if isinstance(sid, str) and type(seq) is int:
                    acked[sid] = max(acked.get(sid, seq), seq)
    return acked


def final_session(obs: Observation) -> str | None:
    """The session the client was on when the first message sent after the flip reached
    it, by the order of the core's own events."""
    if obs.recovered_at is None or obs.flip_at is None:
        return None
    after = {eid for eid, at in obs.probes if at >= obs.flip_at}
    current = None
    for _, event in obs.emitted:
        if isinstance(event, Ready):
            current = event.session_id
        elif isinstance(event, SessionInvalidated):
            current = None
        elif isinstance(event, Dispatch) and event.event_id in after:
            return current
    return None


def _check_delivery(obs: Observation, config: SessionConfig) -> list[Violation]:
    found = []
    log = obs.peer
    # Hostile junk may carry no id (the client may deliver it); only ids are comparable.
    got = Counter(
        e.event_id for _, e in obs.delivered if isinstance(e, Dispatch) and e.event_id is not None
    )
    found.extend(
        Violation("exactly-once", f"{eid} delivered {n} times") for eid, n in got.items() if n > 1
    )
    known = {p.event_id for p in log.produced} | log.junk_ids
    found.extend(
        Violation("exactly-once", f"{eid} delivered but never sent")
        for eid in got
        if eid not in known
    )
    if obs.dropped or any(isinstance(e, EventsDropped) for _, e in obs.delivered):
        return found  # the client said it dropped some: nothing more can be demanded
    if obs.escaped:
        return found  # the driver died: losses follow from that violation
    acked = _acked(log)
    final = final_session(obs)
    for p in log.produced:
        if p.event_id in got:
            continue
        if p.session == final:
            found.append(
                Violation(
                    "exactly-once",
                    f"{p.event_id} (seq {p.seq} of the final session {p.session[:8]}, sent at "
                    f"{p.at - obs.started_at:.3f} s) never delivered",
                )
            )
        elif p.seq <= acked.get(p.session, -1):
            found.append(
                Violation(
                    "exactly-once",
                    f"{p.event_id} (seq {p.seq} of session {p.session[:8]}) never delivered, "
                    f"though the client reported seq {acked[p.session]} of that session",
                )
            )
    return found


def _certainly_failed(link: LinkRecord, auth_index: int, config: SessionConfig) -> bool:
    """A Resume on ``link`` failed whatever the client's clock says: no RESUMED, or no sign
    of the session's life (a text frame, or a close frame we started) came at least
    ``stable_after`` (less a margin for delivery) after RESUMED: an answer to the client's
    own close, pings and frames sent right after RESUMED cannot make it "stay up"."""
    events = link.events[auth_index + 1 :]
    resumed = next(
        (e[0] for e in events if e[1] == "wrote" and e[2] == "text" and _is_resumed(e[3])),
        None,
    )
    if resumed is None:
        return True
    for at, what, kind, detail in events:
        if what != "wrote" or at < resumed + config.stable_after - STABLE_MARGIN:
            continue
        if kind == "text":
            return False
        if kind == "close" and isinstance(detail, tuple) and detail[1] == "peer":
            return False
    return True


def _is_resumed(detail: object) -> bool:
    return isinstance(detail, tuple) and detail[:2] == (0, "RESUMED")


def _check_resume_budget(obs: Observation, config: SessionConfig) -> list[Violation]:
    failed: dict[str, int] = {}
    for link in obs.peer.links:
        index = next(
            (i for i, e in enumerate(link.events) if e[1] == "got" and e[2] in (2, 6)), None
        )
        if index is None:
            continue
        _, _, op, d = link.events[index]
        if op == 2:
            failed.clear()
            continue
        sid = d.get("session_id") if isinstance(d, dict) else None
        if not isinstance(sid, str):
            continue
        if failed.get(sid, 0) >= config.max_failed_resumes:
            return [
                Violation(
                    "resume-budget",
                    f"link {link.number} resumes session {sid[:8]} after {failed[sid]} "
                    f"resumes in a row that certainly failed (budget: "
                    f"max_failed_resumes={config.max_failed_resumes})",
                )
            ]
        failed[sid] = failed.get(sid, 0) + 1 if _certainly_failed(link, index, config) else 0
    return []


def _is_hello(kind: object, detail: object) -> bool:
    return (
        kind == "text"
        and isinstance(detail, tuple)
        and (detail[0] == 10 or detail[:2] == ("junk", "hello_again"))
    )


def _check_hello_first(obs: Observation, config: SessionConfig) -> list[Violation]:
    found = []
    for link in obs.peer.links:
        for _, what, kind, detail in link.events:
            if what == "wrote" and _is_hello(kind, detail):
                break
            if what == "got":
                found.append(
                    Violation("hello-first", f"link {link.number}: op {kind} before any Hello")
                )
                break
    return found


def _check_conformance(obs: Observation, config: SessionConfig) -> list[Violation]:
    return [Violation("client-conformance", f) for f in obs.peer.client_faults]


# ================================================================================ reports

_QUIET = (HeartbeatAcknowledged,)


def _short(event: Event) -> str:
    if isinstance(event, StateChanged):
        return f"{event.old.name} -> {event.new.name} ({event.reason})"
    if isinstance(event, Dispatch):
        return f"Dispatch({event.type} seq={event.seq} id={event.event_id})"
    if isinstance(event, ReconnectScheduled):
        return f"ReconnectScheduled(delay={event.delay:.3f}, failures={event.failures})"
    if isinstance(event, Disconnected):
        return f"Disconnected(code={event.code}, {event.reason!r}, next={event.next_step.name})"
    return repr(event)[:160]


def timeline(obs: Observation, limit: int = 80) -> str:
    t0 = obs.started_at
    rows: list[tuple[float, str]] = [
        (t, f"client  {_short(e)}") for t, e in obs.emitted if not isinstance(e, _QUIET)
    ]
    for t, endpoint, step in obs.peer.http:
        rows.append((t, f"http    {endpoint}: {step!r}"))
    for t, target, step in obs.peer.connects:
        rows.append((t, f"proxy   CONNECT {target}: {step!r}"))
    for link in obs.peer.links:
        kind = "scripted" if link.script is not None else "behaving"
        rows.append((link.accepted_at, f"peer    link {link.number} accepted ({kind})"))
        for t, what, a, b in link.events:
            if what == "wrote" and a == "text" and isinstance(b, tuple) and b[0] == 11:
                continue  # ACKs: too many
            if what == "got" and a == 1:
                continue  # heartbeats
            shown = f"{a}" if b is None else f"{a} {b!r}"[:120]
            rows.append((t, f"peer    link {link.number} {what} {shown}"))
    for eid, at in obs.probes:
        rows.append((at, f"test    probe {eid}"))
    if obs.flip_at is not None:
        rows.append((obs.flip_at, "test    the peer behaves from now on"))
    rows.sort(key=lambda r: r[0])
    if len(rows) > limit:
        head, tail = rows[: limit // 4], rows[-(limit * 3 // 4) :]
        rows = [*head, (tail[0][0], "..."), *tail]
    return "\n".join(f"  {t - t0:8.3f} {text}" for t, text in rows)


def report(obs: Observation, found: list[Violation]) -> str:
    names = sorted({v.invariant for v in found})
    lines = [
        f"hostile peer on {obs.backend}: invariant(s) violated: {', '.join(names)}",
        "",
        *(f"[{v.invariant}] {v.detail}" for v in found),
        "",
        "script (run it again with tests.test_hostile_peer.check_script(SCRIPT, BACKEND);",
        "        every name comes from tests.hostile_gateway):",
        f"  {obs.script!r}",
        "",
        "timeline (seconds since the start):",
        timeline(obs),
    ]
    if obs.peer.errors:
        lines += ["", "PEER ERRORS (harness bugs, not the client's):", *obs.peer.errors]
    return "\n".join(lines)


_CONTROL: dict[str, list[Violation]] = {}


def control(backend: str) -> list[Violation]:
    """The same client against the behave-only peer (once per backend and session)."""
    if backend not in _CONTROL:
        _CONTROL[backend] = violations(run_script(Script(), backend))
    return _CONTROL[backend]


class InvariantViolated(AssertionError):
    """A script broke an invariant. Each distinct failure (the invariants broken, and where
    an escaped exception came from) is its own subclass, so that Hypothesis tells distinct
    bugs apart, shrinks each one and reports them all."""


class HarnessError(Exception):
    """The hostile peer itself failed: a bug of the test, not of the client."""


_FAILURE_TYPES: dict[str, type[InvariantViolated]] = {}


def _failure_type(obs: Observation, found: list[Violation]) -> type[InvariantViolated]:
    key = "+".join(sorted({v.invariant for v in found}) + sorted(set(obs.signatures)))
    if key not in _FAILURE_TYPES:
        name = "Violated_" + "".join(c if c.isalnum() else "_" for c in key)[:120]
        _FAILURE_TYPES[key] = type(name, (InvariantViolated,), {"__module__": __name__})
    return _FAILURE_TYPES[key]


def check_script(script: Script, backend: str, **kwargs) -> Observation:
    """Run ``script`` and fail, naming every invariant broken, if any is (``kwargs``: see
    ``run_script``)."""
    __tracebackhide__ = True
    obs = run_script(script, backend, **kwargs)
    found = violations(obs)
    if obs.peer.errors:
        raise HarnessError("the hostile peer itself failed:\n" + report(obs, found))
    if found:
        text = report(obs, found)
        baseline = control(backend)
        if baseline:
            text += "\n\nCONTROL FAILED TOO (behave-only peer): the harness or the machine is "
            text += "at fault, not this script:\n" + "\n".join(v.detail for v in baseline)
        else:
            text += "\n\ncontrol: the same client against the behave-only peer passes."
        raise _failure_type(obs, found)(text)
    return obs


# ============================================================================ strategies

_durations = st.sampled_from([0.05, 0.1, 0.2, 0.4, 0.8])
# Codes that keep the session or re-identify, most of the time; stop codes now and then
# (they end the example early), codes no QQ server sends, and invalid ones (wsproto rejects
# them before they reach the client's core).
_close_codes = st.one_of(
    st.sampled_from(
        [4009, 4000, 1000, 1001, 1006, 1011, 4006, 4007, 4008, 4004, 4900, 4913, 1012, 3000]
    ),
    st.sampled_from([None, 1002, 1003, 1005, 1007, 1008, 1009, 1015, 999, 5000, 65535, 4999]),
    st.sampled_from([4001, 4002, 4010, 4011, 4012, 4013, 4014, 4914, 4915]),
    st.integers(0, 65535),
)
_reasons = st.sampled_from([b"hostile", b"", b"\xff\xfe", "关闭".encode(), b"r" * 123])

_body_steps = st.one_of(
    st.just(Serve()),
    st.just(Hold()),
    st.builds(Mute, st.sampled_from(["ack", "auth", "hello"])),
    st.builds(Unmute, st.sampled_from(["ack", "auth", "hello"])),
    st.builds(WaitFor, st.sampled_from(["ready", "auth", "beat", "close"]), st.just(1.5)),
    st.builds(Pause, _durations),
    st.builds(DispatchStep, st.integers(1, 4)),
    st.builds(Ping, st.integers(0, 125)),
    st.builds(Pong, st.integers(0, 125)),
    st.builds(Binary, st.integers(0, 300)),
    st.just(BadUtf8()),
    st.builds(BadFrame, st.sampled_from(BAD_FRAME_KINDS)),
    st.builds(Junk, st.sampled_from(JUNK_KINDS)),
    st.builds(Fragment, st.integers(1, 5), st.booleans()),
    st.just(Reconnect()),
    st.builds(StallWrites, _durations),
    st.builds(StallMidFrame, _durations, st.sampled_from(["finish", "rst", "fin"])),
    st.builds(Flood, st.sampled_from(["ping", "dispatch", "junk"]), st.sampled_from([100, 700])),
    st.builds(
        Fault,
        st.sampled_from(["replay_overlap", "replay_reversed", "second_hello", "resume_invalid"]),
    ),
)
_terminal_steps = st.one_of(
    st.builds(Close, _close_codes, st.sampled_from(["await", "hangup", "rst", "linger"]), _reasons),
    st.just(HalfClose()),
    st.just(Reset()),
    st.just(Freeze()),
)
_handshakes = st.sampled_from(
    [Accept()] * 8
    + [
        Status(403),
        Status(503),
        Garbage(b"HTTP/1.1 200 OK\r\n\r\n"),
        Garbage(b"\x00\xff garbage\r\n\r\n"),
        Hangup(),
        Reset(),
        Stall(0.2),
        Stall(1.2),
        BadAccept(),
    ]
)
_reactions = st.sampled_from(
    [Echo()] * 4 + [Ignore(), PingFirst(), AckFirst(), Hangup(), Reset()]
) | st.builds(EchoCode, _close_codes.filter(lambda c: c is not None))


def _conns(max_steps: int) -> st.SearchStrategy[Conn]:
    return st.builds(
        Conn,
        steps=st.tuples(
            st.lists(_body_steps, max_size=max_steps), st.lists(_terminal_steps, max_size=1)
        ).map(lambda parts: tuple(parts[0] + parts[1])),
        hello_ms=st.sampled_from([200, 100, 300]),
        handshake=_handshakes,
        on_close=_reactions,
    )


_bad_urls = st.sampled_from(
    [
        "ws://127.0.0.1:99999/websocket",
        "ws://127.0.0.1:0/websocket",
        "ws://127.0.0.1:-1/websocket",
        "ws://127.0.0.1:http/websocket",
        "http://127.0.0.1:{ws_port}/websocket",
        "ftp://127.0.0.1/websocket",
        "ws:///websocket",
        "ws://[::1/websocket",
        "",
        "ws://127.0.0.1:{closed_port}/websocket",
        "ws://127.0.0.1:{http_port}/websocket",
        "wss://127.0.0.1:{ws_port}/websocket",
        "ws://127.0.0.1:{ws_port}/web socket",
        "ws://127.0.0.1:{ws_port}/websocket\r\nX-Injected: 1",
        "ws://127.0.0.1:{ws_port}",
        "ws://" + "a" * 300 + ":1/websocket",
    ]
)
_http_steps = st.one_of(
    st.sampled_from(
        [
            Status(500),
            Status(401),
            Status(503),
            Status(429),
            Status(404),
            Status(204),
            Status(301),
            Garbage(b"HTTP/1.1 abc\r\n\r\n"),
            Garbage(b"SPDY/9 200 OK\r\n\r\n"),
            Garbage(b"\x16\x03\x01\x00\x05hello"),
            Garbage(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}"),
            Garbage(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n"),
            Garbage(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n{}{}"),
            Garbage(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 200_000 + b"\r\n\r\n"),
            Garbage(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-16\r\n"
                b"Content-Length: 3\r\n\r\n\xff\xfe{"
            ),
            Hangup(),
            Reset(),
            Stall(0.3),
            Stall(1.2),
            Truncated(),
        ]
    ),
    st.builds(
        Body,
        st.sampled_from(
            [
                "not_json",
                "empty",
                "array",
                "null",
                "wrong_types",
                "error_code",
                "bogus_token",
                "zero_expiry",
                "junk_expiry",
                "nan_expiry",
                "inf_expiry",
                "deep",
                "huge",
                "no_budget",
                "fatal_code",
            ]
        ),
    ),
    st.builds(SlowLoris, st.sampled_from([0.3, 0.1]), st.sampled_from([None, 0.5, 1.5])),
    st.builds(SlowHead, st.sampled_from([0.02, 0.2])),
)
_gateway_steps = _http_steps | st.builds(BadUrl, _bad_urls)
_proxy_steps = st.sampled_from(
    [Tunnel()] * 3
    + [
        Status(407),
        Status(502),
        Garbage(b"HTTP/1.1 2OO OK\r\n\r\n"),
        Garbage(b"\x00\x01\x02\r\n\r\n"),
        Garbage(b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n"),
        Garbage(b"HTTP/1.1 200 OK\r\n"),
        Hangup(),
        Reset(),
        Stall(0.3),
        Stall(1.2),
        OkThenHangup(),
        OkThenGarbage(),
    ]
)


def scripts(*, conns: int = 3, steps: int = 5, http: int = 2) -> st.SearchStrategy[Script]:
    proxies = st.one_of(
        st.none(), st.none(), st.none(), st.lists(_proxy_steps, max_size=3).map(tuple)
    )
    return st.builds(
        Script,
        token=st.lists(_http_steps, max_size=http).map(tuple),
        gateway=st.lists(_gateway_steps, max_size=http).map(tuple),
        conns=st.lists(_conns(steps), max_size=conns).map(tuple),
        proxy=proxies,
    )


# ================================================================================= tests

BACKENDS = ["asyncio", "trio"]
CI_EXAMPLES = 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_peer_property(backend, request):
    """Random scripts, every invariant after every example."""
    soak = request.config.getoption("--soak")
    if soak:
        chosen = settings(
            max_examples=request.config.getoption("--soak-examples"),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
        strategy = scripts(conns=6, steps=8, http=3)
    else:
        chosen = settings(
            max_examples=CI_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            # A failing example may cost FLIP_LIMIT + RECOVERY: stop at the first one.
            phases=[Phase.explicit, Phase.generate],
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
        strategy = scripts()

    @chosen
    @given(script=strategy)
    def property_holds(script: Script) -> None:
        check_script(script, backend, flip_limit=SOAK_FLIP_LIMIT if soak else FLIP_LIMIT)

    property_holds()


def _budget_script() -> Script:
    # READY, then no ACK: the watchdog closes, the server echoes the close. Then three
    # Resumes that the server accepts and ignores the same way: the next must Identify.
    ignored = Conn(steps=(WaitFor("ready"), Mute("ack")), hello_ms=300, on_close=Echo())
    return Script(conns=(ignored,) * 4)


# Every defect of the driver found so far (by hand or by this harness), as the minimal script
# that showed it: they keep running when fixed, so that a regression cannot hide behind
# Hypothesis no longer happening to find it.
KNOWN_DEFECTS: dict[str, Script] = {
    # A server Ping that arrives after our close frame went out (it crossed it).
    "ping-crosses-our-close": Script(
        conns=(Conn(steps=(WaitFor("ready"), Mute("ack")), on_close=PingFirst()),)
    ),
    # The proxy's answer to CONNECT is not HTTP.
    "garbled-connect-answer": Script(proxy=(Garbage(b"HTTP/1.1 2OO OK\r\n\r\n"),)),
    # /gateway/bot hands out URLs no socket can be opened to.
    "bad-port-in-gateway-url": Script(gateway=(BadUrl("ws://127.0.0.1:99999/websocket"),)),
    # /gateway/bot once hands out a URL that parses but cannot be connected to; every later
    # answer is right, but the client never asks again.
    "unreachable-gateway-url-never-refetched": Script(
        gateway=(BadUrl("ws://127.0.0.1:{closed_port}/websocket"),)
    ),
    # The token body comes one byte per 0.3 s, forever: each read is within httpx's timeout.
    "slow-loris-token-body": Script(token=(SlowLoris(0.3),)),
    # A server that echoes our close (and ignores the session otherwise) after RESUMED.
    "echoed-close-defeats-resume-budget": _budget_script(),
    # A close code that wsproto reports as its CloseReason enum (1000, 1001, 1002, 1007...):
    # the transport hands it to the core, which only takes a plain int.
    "server-closes-1000": Script(conns=(Conn(steps=(WaitFor("ready"), Close(1000))),)),
    "invalid-utf8-text-frame": Script(conns=(Conn(steps=(BadUtf8(),)),)),
    # A body that says gzip and is not: httpx's decoder raises inside its nested async
    # generators, which are left suspended (trio warns when it collects them).
    "bogus-gzip-gateway-body": Script(
        gateway=(
            Garbage(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n{}{}"),
        )
    ),
    # Deeply nested JSON from the token endpoint (the JSON parser's recursion limit).
    "deep-json-token-body": Script(token=(Body("deep"),)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(KNOWN_DEFECTS))
def test_known_defect_stays_covered(name, backend):
    """Each defect found so far, as a fixed script: every invariant must hold."""
    check_script(KNOWN_DEFECTS[name], backend)


class _FailingStore:
    """A snapshot store that fails: the surest way to make a driver fail from inside."""

    def load(self, shard):
        return None

    def save(self, shard, snapshot):
        raise RuntimeError("the snapshot store is down")


@pytest.mark.parametrize("backend", BACKENDS)
def test_driver_failure_leaves_the_callers_scopes_intact(backend):
    """Whatever escapes from a failed driver, the caller's task and scopes are left intact,
    and nothing leaks."""
    obs = run_script(Script(), backend, store=_FailingStore())
    found = [
        v for v in violations(obs) if v.invariant in ("caller-scope", "bounded-exit", "no-leaks")
    ]
    if found:
        raise _failure_type(obs, found)(report(obs, found))
    assert obs.escaped, "the store failure was expected to escape the client"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proxy", [None, ()], ids=["direct", "proxy"])
def test_behaving_peer_passes_every_invariant(backend, proxy):
    """The control: with an empty script the peer is a correct gateway, and every invariant
    holds. (When a script fails, the same run is repeated as a control in the report.)"""
    obs = check_script(Script(proxy=proxy), backend)
    assert obs.recovered_at is not None
    assert any(isinstance(e, Ready) for _, e in obs.emitted)
    if proxy is not None:
        assert obs.peer.connects, "the client did not go through the proxy"


# ----------------------------------------------------- the checks can fail (self-tests)


def _fake(**changes) -> Observation:
    obs = Observation("asyncio", Script())
    obs.flip_at = 1.0
    obs.recovered_at = 1.5
    for name, value in changes.items():
        setattr(obs, name, value)
    return obs


def _names(obs: Observation) -> set[str]:
    return {v.invariant for v in violations(obs)}


def test_each_invariant_can_fail():
    at = 5.0
    scheduled = ReconnectScheduled(delay=1.0, reconnect_at=at, failures=1, reason="x")
    early = _fake(emitted=[(4.0, scheduled)])
    early.peer.attempts = [0.5, 4.5]  # the second one before the announced time
    assert "backoff" in _names(early)
    unannounced = _fake()
    unannounced.peer.attempts = [0.5, 0.7]
    assert "backoff" in _names(unannounced)

    twice = Dispatch(type="C2C_MESSAGE_CREATE", seq=2, event_id="E1", data={})
    dup = _fake(delivered=[(1.0, twice), (1.1, twice)])
    assert "exactly-once" in _names(dup)

    stuck = _fake(recovered_at=None)
    assert "recovery" in _names(stuck)
    assert "no-escape" in _names(_fake(escaped=["boom"]))
    assert "caller-scope" in _names(_fake(caller=["cancelled"]))
    assert "no-leaks" in _names(_fake(leaked_tasks=["t"]))
    assert "no-leaks" in _names(_fake(fds=(10, 11)))
    assert "bounded-exit" in _names(_fake(timed_out=True))
    silent = _fake(recovered_at=None, ended_at=2.0)
    assert "fatal-stop" in _names(silent)
    bogus = _fake(
        recovered_at=None, ended_at=2.0, emitted=[(2.0, FatalStop(code=4914, reason="", hint=""))]
    )
    assert "fatal-stop" in _names(bogus)
    faulty = _fake()
    faulty.peer.client_faults.append("binary")
    assert "client-conformance" in _names(faulty)


def test_lost_and_budget_checks_can_fail():
    from tests.hostile_gateway import Produced

    obs = _fake()
    obs.peer.produced.append(Produced(0.5, "S" * 32, 3, "E3", probe=False))
    link = LinkRecord(1, 0.1, None)
    link.events.append((0.2, "got", 6, {"session_id": "S" * 32, "seq": 5}))
    obs.peer.links.append(link)
    assert "exactly-once" in _names(obs)  # acknowledged seq 5, never delivered seq 3

    budget = _fake()
    for number in range(1, 6):
        resumed = LinkRecord(number, float(number), None)
        resumed.events.append((number + 0.1, "got", 6, {"session_id": "S1", "seq": 1}))
        resumed.events.append((number + 0.2, "wrote", "text", (0, "RESUMED", 2)))
        resumed.events.append((number + 0.3, "wrote", "close", (4000, "reply")))
        budget.peer.links.append(resumed)
    assert "resume-budget" in _names(budget)
    before_hello = _fake()
    greeted = LinkRecord(1, 0.1, None)
    greeted.events.append((0.2, "got", 2, {}))
    before_hello.peer.links.append(greeted)
    assert "hello-first" in _names(before_hello)
