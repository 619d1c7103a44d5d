# Health probes and Prometheus metrics over plain HTTP/1.1, for orchestrators and scrapers.
#
# Theory of operation. `Metrics` owns a private `CollectorRegistry` (never the process-global
# one, so two clients in one process, or a test suite, never collide). Counters move as core
# events pass through `observe(shard, event)`, which the application calls from wherever it
# sees events (GatewayClient does it as the protocol loop produces them). The per-dispatch cost is
# one `type()` comparison and one counter increment on a child cached per shard: no
# `.labels()` lookup on the hot path. Gauges that describe "now" (the ACK age) and the stall
# figures, which a watcher thread appends to `StallMonitor.stalls`, are brought up to date at
# scrape time in `render`.
#
# Label cardinality is bounded by construction: `shard` is a small integer, `state` is one of
# SessionState's twelve values, and a reconnect's `reason` is `Disconnected.next_step`
# ("resume" or "identify"), never the free-text reason.
#
# `HealthServer` answers GET /healthz, /readyz and /metrics with h11 on an anyio listener
# (asyncio or trio), one request per connection: every response carries `Connection: close`
# and the socket is closed after it. Each connection is bounded by `read_timeout` as a whole,
# so a client that connects and says nothing (or trickles bytes) costs a task for at most
# that long. Note that /healthz runs on the event loop it judges: while the loop is blocked
# outright nothing answers, and the probe's own timeout is the signal; the 503 covers the
# window between the loop running again and the stall monitor noticing.
"""Liveness/readiness probes and Prometheus metrics over HTTP (h11 on anyio)."""

from __future__ import annotations

import contextlib
import http
import logging
import math
import time
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import anyio
import h11
import orjson
from anyio.abc import SocketAttribute
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from qqproto._close_codes import NextStep
from qqproto._outputs import (
    Disconnected,
    Dispatch,
    DuplicateDropped,
    HeartbeatAcknowledged,
    Ready,
    Resumed,
    SessionInvalidated,
    StateChanged,
    ZombieDetected,
)
from qqproto._states import SessionState
from qqproto_io._http_server import next_http_event, response_bytes

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from anyio.abc import Listener, SocketStream, TaskGroup

    from qqproto._heartbeat import Health
    from qqproto._outputs import Event
    from qqproto_io._stall import StallMonitor

__all__ = ["HealthServer", "Metrics"]

log = logging.getLogger("qqproto_io.health")

# Heartbeat round trips: tens of milliseconds normally, seconds when the link degrades.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
# Timer lateness: a millisecond is normal; a second means something blocked the loop.
_LAG_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, math.inf)
# Loop stalls are only reported above the monitor's threshold (2 s by default).
_STALL_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)

_READ_SIZE = 4096
# A probe request is a request line and a few headers; anything larger is not a probe.
_MAX_REQUEST = 16 * 1024
_JSON = b"application/json"


class _Shard:
    """The labelled children of one shard, created once so ``observe`` does no lookups."""

    __slots__ = (
        "dispatches",
        "dropped",
        "duplicates",
        "identifies",
        "lag",
        "latency",
        "lost",
        "reconnect_identify",
        "reconnect_resume",
        "resumes",
        "zombies",
    )

    def __init__(self, m: Metrics, shard: str) -> None:
        self.dispatches = m.dispatches.labels(shard)
        self.duplicates = m.duplicates_dropped.labels(shard)
        self.dropped = m.events_dropped.labels(shard)
        self.identifies = m.identifies.labels(shard)
        self.resumes = m.resumes.labels(shard)
        self.zombies = m.zombies.labels(shard)
        self.lost = m.events_possibly_lost.labels(shard)
        self.latency = m.heartbeat_latency.labels(shard)
        self.lag = m.timer_lag.labels(shard)
        self.reconnect_resume = m.reconnects.labels(shard, NextStep.RESUME.value)
        self.reconnect_identify = m.reconnects.labels(shard, NextStep.IDENTIFY.value)


class Metrics:
    """Prometheus metrics of a process's gateway shards, in a registry of their own.

    Feed every core event to :meth:`observe`; serve :meth:`render` (or use
    :class:`HealthServer`). ``registry`` is exposed for custom exporters.

    Metrics (every one labelled ``shard``):
        ``qqproto_shard_state{state}``: 1 for the current state, 0 for the others (from
            ``StateChanged``).
        ``qqproto_heartbeat_latency_seconds``: histogram of heartbeat round trips.
        ``qqproto_ack_age_seconds``: seconds since the last ACK of the current connection,
            at scrape time (absent while there is none).
        ``qqproto_since_last_ack_seconds``: seconds since any connection of the shard last
            got an ACK (since start before the first), at scrape time. It does not restart
            with each connection, so it is the one to alert on: it grows through a loop of
            links that open, even resume, and never acknowledge a beat.
        ``qqproto_reconnects_total{reason}``: disconnects followed by a reconnect, by what
            comes next (``resume`` or ``identify``); a stop is not counted.
        ``qqproto_resumes_total``, ``qqproto_identifies_total`` (READY),
        ``qqproto_zombies_total``, ``qqproto_dispatches_total``,
        ``qqproto_duplicates_dropped_total``, ``qqproto_events_possibly_lost_total``
        (``SessionInvalidated``), ``qqproto_events_dropped_total`` (:meth:`dropped`: the
        application's queue was full), and the histogram ``qqproto_timer_lag_seconds``
        (:meth:`lag`: how late the protocol loop's timers fired).
    And, without a shard label, from a :class:`StallMonitor` given to :meth:`render`:
        ``qqproto_loop_stalls_total`` and the histogram ``qqproto_loop_stall_seconds``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.shard_state = Gauge(
            "qqproto_shard_state",
            "1 for the shard's current lifecycle state, 0 for the others",
            ["shard", "state"],
            registry=r,
        )
        self.heartbeat_latency = Histogram(
            "qqproto_heartbeat_latency_seconds",
            "Heartbeat round-trip time (beat sent to op 11 received)",
            ["shard"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ack_age = Gauge(
            "qqproto_ack_age_seconds",
            "Seconds since the last heartbeat ACK, at scrape time",
            ["shard"],
            registry=r,
        )
        self.since_last_ack = Gauge(
            "qqproto_since_last_ack_seconds",
            "Seconds since any connection of the shard last got a heartbeat ACK (or since "
            "start, before the first), at scrape time",
            ["shard"],
            registry=r,
        )
        self.reconnects = Counter(
            "qqproto_reconnects_total",
            "Disconnects followed by a reconnect, by the next step (resume or identify)",
            ["shard", "reason"],
            registry=r,
        )
        self.resumes = Counter(
            "qqproto_resumes_total", "Sessions resumed (RESUMED)", ["shard"], registry=r
        )
        self.identifies = Counter(
            "qqproto_identifies_total", "New sessions started (READY)", ["shard"], registry=r
        )
        self.zombies = Counter(
            "qqproto_zombies_total",
            "Connections found dead by the heartbeat ACK watchdog",
            ["shard"],
            registry=r,
        )
        self.dispatches = Counter(
            "qqproto_dispatches_total",
            "Dispatches delivered to the application",
            ["shard"],
            registry=r,
        )
        self.duplicates_dropped = Counter(
            "qqproto_duplicates_dropped_total",
            "Dispatches dropped as already delivered",
            ["shard"],
            registry=r,
        )
        self.events_dropped = Counter(
            "qqproto_events_dropped_total",
            "Events dropped because the application did not read them fast enough",
            ["shard"],
            registry=r,
        )
        self.events_possibly_lost = Counter(
            "qqproto_events_possibly_lost_total",
            "Sessions invalidated: dispatches after the last sequence may have been lost",
            ["shard"],
            registry=r,
        )
        self.timer_lag = Histogram(
            "qqproto_timer_lag_seconds",
            "How late the protocol loop's timers fired (event-loop lag)",
            ["shard"],
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.loop_stalls = Counter(
            "qqproto_loop_stalls_total", "Event-loop stalls seen by the stall monitor", registry=r
        )
        self.loop_stall_seconds = Histogram(
            "qqproto_loop_stall_seconds",
            "Duration of event-loop stalls",
            buckets=_STALL_BUCKETS,
            registry=r,
        )
        self._shards: dict[int, _Shard] = {}
        self._states: dict[int, SessionState] = {}
        self._stalls_seen = 0

    def _shard(self, shard: int) -> _Shard:
        children = self._shards.get(shard)
        if children is None:
            children = self._shards[shard] = _Shard(self, str(shard))
        return children

    def observe(self, shard: int, event: Event) -> None:
        """Count ``event`` (any core event) of ``shard``. Cheap; call it for every event."""
        s = self._shards.get(shard) or self._shard(shard)
        if type(event) is Dispatch:  # the hot path: one increment
            s.dispatches.inc()
        elif isinstance(event, HeartbeatAcknowledged):
            s.latency.observe(event.latency)
        elif isinstance(event, StateChanged):
            self._set_state(shard, event.new)
        elif isinstance(event, Disconnected):
            if event.next_step is NextStep.RESUME:
                s.reconnect_resume.inc()
            elif event.next_step is NextStep.IDENTIFY:
                s.reconnect_identify.inc()
        elif isinstance(event, Ready):
            s.identifies.inc()
        elif isinstance(event, Resumed):
            s.resumes.inc()
        elif isinstance(event, ZombieDetected):
            s.zombies.inc()
        elif isinstance(event, DuplicateDropped):
            s.duplicates.inc()
        elif isinstance(event, SessionInvalidated):
            s.lost.inc()

    def lag(self, shard: int, seconds: float) -> None:
        """Record how late one of ``shard``'s protocol timers fired (``ShardDriver.on_lag``)."""
        (self._shards.get(shard) or self._shard(shard)).lag.observe(seconds)

    def dropped(self, shard: int) -> None:
        """Count one event of ``shard`` dropped because the application's queue was full."""
        (self._shards.get(shard) or self._shard(shard)).dropped.inc()

    def _set_state(self, shard: int, state: SessionState) -> None:
        label = str(shard)
        if shard not in self._states:  # first sight: publish every state, so 0s exist too
            for other in SessionState:
                self.shard_state.labels(label, other.value).set(0)
        else:
            self.shard_state.labels(label, self._states[shard].value).set(0)
        self.shard_state.labels(label, state.value).set(1)
        self._states[shard] = state

    def render(self, healths: Mapping[int, Health], *, stall: StallMonitor | None = None) -> bytes:
        """Update the scrape-time figures and return the exposition text.

        Args:
            healths: each shard's ``GatewayConnection.health(now)``.
            stall: the process's stall monitor, if any (always the same one).
        """
        self.ack_age.clear()  # shards without an ACK (or gone) have no sample
        for shard, health in healths.items():
            self._shard(shard)  # a shard that has produced no event yet still shows 0s
            if health.last_ack_age is not None:
                self.ack_age.labels(str(shard)).set(health.last_ack_age)
            if health.since_ack is not None:
                self.since_last_ack.labels(str(shard)).set(health.since_ack)
        if stall is not None:
            # The monitor's thread only appends; a snapshot of the list is consistent.
            durations = stall.stalls[self._stalls_seen :]
            self._stalls_seen += len(durations)
            for duration in durations:
                self.loop_stalls.inc()
                self.loop_stall_seconds.observe(duration)
        return generate_latest(self.registry)


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` over HTTP/1.1 on asyncio or trio.

    Use it as an async context manager; it binds on entry and stops on exit::

        metrics = Metrics()
        probe = lambda: {0: client.connection.health(anyio.current_time())}
        async with HealthServer(probe, metrics, stall=monitor, port=9464) as server:
            ...

    Args:
        probe: returns each shard's :class:`Health`, keyed by shard id.
        metrics: what ``/metrics`` serves.
        stall: the process's :class:`StallMonitor`; without one ``/healthz`` is always ok.
        host: where to listen (loopback by default).
        port: the TCP port (0 picks a free one).
        read_timeout: the bound on each connection, request and response together.
        stall_grace: seconds after a loop stall during which ``/readyz`` still says 503
            (a loop that just froze for seconds is not one to route work to yet).

    Endpoints (GET only; an unknown path is 404, another method 405):
        ``/healthz``: 200 unless the event loop is stalled now (503 with the reason).
        ``/readyz``: 200 when every shard is ready and the loop has not stalled within
            ``stall_grace``; else 503 with the loop's and each shard's verdict.
        ``/metrics``: the Prometheus text format.
    """

    def __init__(
        self,
        probe: Callable[[], Mapping[int, Health]],
        metrics: Metrics,
        *,
        stall: StallMonitor | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout: float = 10.0,
        stall_grace: float = 10.0,
    ) -> None:
        self.probe = probe
        self.stall_grace = stall_grace
        self.metrics = metrics
        self.stall = stall
        self.read_timeout = read_timeout
        self._host = host
        self._port = port
        self._task_group: TaskGroup | None = None
        self._listener: Listener[SocketStream] | None = None

    @property
    def port(self) -> int:
        """The bound port (after entering)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("HealthServer is already running")
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        self._listener = listener
        self._port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(listener.serve, self._handle, task_group, name="qqproto health")
        log.info("health endpoints on %s", self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, listener = self._task_group, self._listener
        if task_group is None or listener is None:
            return
        task_group.cancel_scope.cancel()
        try:
            await task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            self._listener = None
            await anyio.aclose_forcefully(listener)

    # ----------------------------------------------------------------------- serving

    async def _handle(self, stream: SocketStream) -> None:
        try:
            with anyio.move_on_after(self.read_timeout):
                await self._serve(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client went away mid-exchange
        except Exception:
            # One misbehaving connection (or probe) must not take the process down.
            log.exception("health endpoint: connection handler failed")
        finally:
            await anyio.aclose_forcefully(stream)

    async def _serve(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            request = await next_http_event(stream, conn, read_size=_READ_SIZE)
            if not isinstance(request, h11.Request):
                return  # closed before a request
            while not isinstance(
                await next_http_event(stream, conn, read_size=_READ_SIZE), h11.EndOfMessage
            ):
                pass  # a body, which no endpoint reads; bounded by read_timeout
        except h11.RemoteProtocolError as err:
            status = err.error_status_hint
            body = _json({"status": _phrase(status)})
            if conn.our_state is h11.SEND_RESPONSE:
                await _send(stream, conn, status, body, _JSON)
            else:
                # No request line h11 could parse, so it will not frame a response; a plain
                # one tells a confused client more than a silent close.
                await _send_raw(stream, status, body, _JSON)
            return
        try:
            status, body, content_type = self._route(request)
        except Exception:
            log.exception("health endpoint: %s failed", request.target.decode("ascii", "replace"))
            status, body, content_type = 500, _json({"status": "internal error"}), _JSON
        await _send(stream, conn, status, body, content_type)

    def _route(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        path = urlsplit(request.target.decode("ascii", "replace")).path
        if path not in {"/healthz", "/readyz", "/metrics"}:
            return 404, _json({"status": "not found"}), _JSON
        if request.method != b"GET":
            return 405, _json({"status": "method not allowed"}), _JSON
        if path == "/healthz":
            return self._healthz()  # no probe: it must not depend on the shards
        healths = self.probe()
        if path == "/readyz":
            return _readyz(healths, self._stalled(grace=self.stall_grace))
        body = self.metrics.render(healths, stall=self.stall)
        return 200, body, CONTENT_TYPE_LATEST.encode()

    def _healthz(self) -> tuple[int, bytes, bytes]:
        reason = self._stalled(grace=0.0)
        if reason is None:
            return 200, _json({"status": "ok"}), _JSON
        return 503, _json({"status": "stalled", "reason": reason}), _JSON

    def _stalled(self, *, grace: float) -> str | None:
        """Why the loop is not fit now (stalled, or stalled within ``grace`` s), or None."""
        stall = self.stall
        if stall is None:
            return None
        now = time.monotonic()
        since = stall.stalled_since
        if since is not None:
            return f"event loop stalled for {max(0.0, now - since):.1f} s"
        recovered, durations = stall.recovered_at, stall.stalls
        if recovered is not None and durations and now - recovered < grace:
            return f"event loop stalled for {durations[-1]:.1f} s, {now - recovered:.1f} s ago"
        return None


def _readyz(healths: Mapping[int, Health], loop: str | None) -> tuple[int, bytes, bytes]:
    shards = {
        str(shard): {"live": h.live, "ready": h.ready, "reason": h.reason}
        for shard, h in sorted(healths.items())
    }
    if loop is None and healths and all(h.ready for h in healths.values()):
        return 200, _json({"status": "ready", "shards": shards}), _JSON
    body: dict[str, object] = {"status": "not ready", "shards": shards}
    if loop is not None:
        body["loop"] = loop
    return 503, _json(body), _JSON


def _json(value: object) -> bytes:
    return orjson.dumps(value)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def _headers(body: bytes, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
    ]


async def _send(
    stream: SocketStream, conn: h11.Connection, status: int, body: bytes, content_type: bytes
) -> None:
    reason = _phrase(status).capitalize().encode()
    out = response_bytes(conn, status, reason, _headers(body, content_type), body)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.send(out)


async def _send_raw(stream: SocketStream, status: int, body: bytes, content_type: bytes) -> None:
    """A response without h11, for a request h11 could not parse (it frames none then)."""
    head = f"HTTP/1.1 {status} {_phrase(status).capitalize()}\r\n".encode()
    head += b"".join(name + b": " + value + b"\r\n" for name, value in _headers(body, content_type))
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.send(head + b"\r\n" + body)
