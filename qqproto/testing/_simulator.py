# A deterministic network simulator: qqproto connections against the fake gateway.
#
# Theory of operation. Everything happens on one virtual clock, driven by a heap of
# (time, order, action) entries; `order` breaks ties in insertion order, so a run is a pure
# function of the seed and the script: the same seed gives the same trace, byte for byte.
#
# Each SimClient plays the part of a real driver around one GatewayConnection, with the same
# duties qqproto_io has: execute every command, feed every result back, re-arm the single
# timer from `get_timer()` after every input, and - after a process stall - feed all data
# that piled up before running timers (docs/design.md#inv-3). Between a client and the fake
# gateway sits a Link per WebSocket, which carries messages with latency (per-direction FIFO,
# like TCP) and can be made half-open (every byte dropped, no FIN), or be partitioned.
#
# The simulator is a test tool, so it favours clarity over speed, but it still has to run a
# virtual day in about a second: timers are re-armed only when the deadline moves, and the
# trace keeps raw objects and formats them only when printed.
"""A seeded, virtual-clock simulator joining GatewayConnections to a FakeGateway."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qqproto._connection import GatewayConnection
from qqproto._errors import FailureKind, InvalidResponse, RemoteProtocolError
from qqproto._outputs import (
    AbandonRequest,
    AbortTransport,
    CloseConnection,
    Dispatch,
    Event,
    FetchGateway,
    FetchToken,
    OpenConnection,
    PersistSnapshot,
    RequestIdentifyPermit,
    SendPayload,
)
from qqproto._rest import classify_status, parse_gateway_response, parse_token_response
from qqproto._states import SessionState
from qqproto.testing._fake_gateway import (
    FakeGateway,
    FakeGatewayConfig,
    ServerClose,
    ServerConnection,
    ServerDrop,
    ServerSend,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from qqproto._config import SessionConfig
    from qqproto._snapshot import SessionSnapshot

__all__ = ["Link", "SimClient", "Simulation", "TraceEntry"]

_CONNECTING = SessionState.CONNECTING

_RETRANSMIT_TIMEOUT = 1.0
# More actions than this at one virtual instant is a livelock, not a busy moment: 100 shards
# starting together schedule a few thousand.
_LIVELOCK_BOUND = 100_000


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One line of the trace: virtual time, who, what, and the object concerned."""

    at: float
    actor: str
    kind: str
    detail: str

    def format(self) -> str:
        """One human-readable line."""
        return f"{self.at:12.3f}  {self.actor:<8} {self.kind:<10} {self.detail}"


class Link:
    """One WebSocket between a SimClient and a ServerConnection.

    Attributes:
        half_open: every message in both directions is lost and no FIN ever comes (a NAT or
            proxy that silently dropped the flow).
        latency: one-way delay in seconds.
    """

    def __init__(
        self,
        client: SimClient,
        server: ServerConnection,
        latency: float,
        *,
        attempt: int,
        jitter: float = 0.0,
        loss: float = 0.0,
        rng: random.Random,
    ) -> None:
        self.client = client
        self.server = server
        self.attempt = attempt  # OpenConnection.attempt, passed back with every report
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.half_open = False
        self.blocked_until = float("-inf")  # a partition: nothing arrives before this
        self.client_gone = False  # the client aborted or finished closing
        self.server_gone = False  # the server closed or dropped
        self._rng = rng
        self._up_at = 0.0  # FIFO per direction, like TCP
        self._down_at = 0.0

    def _delay(self, now: float) -> float:
        delay = self.latency
        if self.jitter:
            delay += self.jitter * self._rng.random()
        # TCP does not lose messages, it retransmits them: a loss costs a retransmission
        # timeout (1 s, the RFC 6298 minimum) and the stream stays in order.
        if self.loss and self._rng.random() < self.loss:
            delay += _RETRANSMIT_TIMEOUT
        return max(now + delay, self.blocked_until + self.latency)

    def up_time(self, now: float) -> float:
        """When a message sent by the client now reaches the server."""
        self._up_at = max(self._up_at, self._delay(now))
        return self._up_at

    def down_time(self, now: float) -> float:
        """When a message sent by the server now reaches the client."""
        self._down_at = max(self._down_at, self._delay(now))
        return self._down_at


@dataclass(slots=True)
class _Timer:
    at: float | None = None
    generation: int = 0


@dataclass(slots=True)
class _Limiter:
    # One identify per 5 s per bucket (shard_id % max_concurrency): docs/protocol.md#identify-budget
    next_free: dict[int, float] = field(default_factory=dict)
    grants: list[tuple[float, int]] = field(default_factory=list)


class SimClient:
    """One GatewayConnection plus the driver duties, inside a :class:`Simulation`.

    Attributes:
        conn: the connection under test.
        events: every event with the virtual time it was produced.
        dispatches: every delivered Dispatch, in order.
        snapshot: the last snapshot the connection asked to persist.
        on_event: called as ``on_event(client, now, event)`` for each event; use it to plug in
            the handler under test. Call :meth:`stall` from it to model a blocking handler.
    """

    def __init__(
        self,
        sim: Simulation,
        name: str,
        config: SessionConfig | None,
        snapshot: SessionSnapshot | None,
        *,
        app_id: str,
        client_secret: str,
    ) -> None:
        self.sim = sim
        self.name = name
        self.config = config
        self.app_id = app_id
        self._client_secret = client_secret
        self.conn = GatewayConnection(
            config, rng=random.Random(sim.rng.getrandbits(64)), snapshot=snapshot
        )
        self.events: list[tuple[float, Event]] = []
        self.delivered = 0  # dispatches delivered while `record` is off
        self.dispatches: list[Dispatch] = []
        self.snapshot: SessionSnapshot | None = snapshot
        self.on_event: Callable[[SimClient, float, Event], None] | None = None
        self.link: Link | None = None
        self.links: list[Link] = []
        self.stalled_until = float("-inf")
        self._backlog: list[Callable[[], None]] = []
        self._timer = _Timer()
        self.opens: list[float] = []
        self.http_down = False  # every token/gateway request fails
        self.http_hang = False  # every token/gateway request never answers
        self.network_down = False  # every OpenConnection fails after the latency
        self.dead = False  # killed by restart(): whatever it had asked for is abandoned
        self.record = sim.record  # keep events and dispatches (off for long benchmarks)

    # -------------------------------------------------------------------- control

    def start(self) -> None:
        """Start the connection now."""
        self._input(lambda: self.conn.start(self.sim.now))

    def stall(self, seconds: float) -> None:
        """Freeze this client's process for ``seconds``: nothing runs, input piles up."""
        now = self.sim.now
        self.stalled_until = max(self.stalled_until, now + seconds)
        self.sim.trace_add(self.name, "stall", f"process stalled for {seconds:g} s")
        self.sim.at(self.stalled_until, self._wake)

    def restart(self) -> SimClient:
        """Kill this process (no close frame, nothing flushed) and start a new one from the
        last persisted snapshot. Returns the new client."""
        link = self.link
        if link is not None:
            self._lose_link(link)
        self._timer.generation += 1
        self.stalled_until = float("inf")  # the old process is dead for good
        self.dead = True
        new = self.sim.add_client(
            self.config,
            snapshot=self.snapshot,
            name=self.name + "'",
            app_id=self.app_id,
            client_secret=self._client_secret,
        )
        new.on_event = self.on_event
        new.start()
        return new

    # --------------------------------------------------------------- input plumbing

    def _input(self, action: Callable[[], None]) -> None:
        """Run one input now, or queue it while the process is stalled."""
        if self.sim.now < self.stalled_until:
            self._backlog.append(action)
            return
        action()
        self._flush()

    def _wake(self) -> None:
        if self.sim.now < self.stalled_until:
            return
        self.sim.trace_add(self.name, "wake", f"{len(self._backlog)} inputs waiting")
        backlog, self._backlog = self._backlog, []
        # Data first, timers after (docs/design.md#inv-3).
        for action in backlog:
            action()
            self._flush()
        # The timer event that fell due during the stall was skipped: arm it again. It runs
        # now if it is overdue, and not before it is due otherwise.
        timer = self._timer.at
        if timer is not None:
            self._timer.generation += 1
            generation = self._timer.generation
            self.sim.at(max(timer, self.sim.now), lambda: self._on_timer(generation))

    def _flush(self) -> None:
        """Execute every output, then re-arm the timer: a real driver's loop body."""
        conn = self.conn
        while True:
            outputs = conn.drain()
            if not outputs:
                break
            for out in outputs:
                if isinstance(out, Event):
                    self._on_event(out)
                else:
                    self._execute(out)
        timer = conn.get_timer()
        if timer != self._timer.at:
            self._timer.at = timer
            self._timer.generation += 1
            if timer is not None:
                generation = self._timer.generation
                self.sim.at(max(timer, self.sim.now), lambda: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        if generation != self._timer.generation or self.sim.now < self.stalled_until:
            return
        deadline = self._timer.at
        if deadline is None:
            return
        self._timer.at = None
        self.conn.handle_timer(max(deadline, self.sim.now))
        self._flush()

    def _on_event(self, event: Event) -> None:
        now = self.sim.now
        if self.record:
            self.events.append((now, event))
            if isinstance(event, Dispatch):
                self.dispatches.append(event)
        elif isinstance(event, Dispatch):
            self.delivered += 1
        if self.sim.trace is not None:
            self.sim.trace_add(self.name, "event", repr(event))
        if self.on_event is not None:
            self.on_event(self, now, event)

    # ------------------------------------------------------------------ commands

    def _execute(self, command: object) -> None:
        sim = self.sim
        if isinstance(command, SendPayload):
            sim.trace_add(self.name, "send", f"op={int(command.op)} ({command.op.name})")
            link = self.link
            if link is not None and not link.client_gone and not link.half_open:
                server, text = link.server, command.text
                sim.at(link.up_time(sim.now), lambda: sim.server_input(server, text))
        elif isinstance(command, FetchToken | FetchGateway):
            sim.trace_add(self.name, "http", type(command).__name__)
            self._http(command)
        elif isinstance(command, RequestIdentifyPermit):
            grant_at = sim.grant_identify_at(command.shard_id, command.max_concurrency)
            sim.at(grant_at, lambda: self._input(lambda: self.conn.grant_identify(sim.now)))
        elif isinstance(command, OpenConnection):
            self._open(command.url, command.attempt)
        elif isinstance(command, AbandonRequest):
            # The answer still arrives and the core ignores it: nothing to cancel here.
            sim.trace_add(self.name, "abandon", command.request)
        elif isinstance(command, CloseConnection):
            sim.trace_add(self.name, "close", f"code={command.code}")
            link = self.link
            if link is not None and not link.client_gone and not link.half_open:
                server, code = link.server, command.code
                sim.at(link.up_time(sim.now), lambda: sim.server_closed_by_client(server, code))
        elif isinstance(command, AbortTransport):
            sim.trace_add(self.name, "abort", command.reason)
            if self.link is not None:
                self._lose_link(self.link)
        elif isinstance(command, PersistSnapshot):
            self.snapshot = command.snapshot
        else:  # pragma: no cover - every command type is handled above
            raise TypeError(f"unknown command {command!r}")

    def _lose_link(self, link: Link) -> None:
        """The client gives the transport up; the server notices after the latency."""
        link.client_gone = True
        if self.link is link:
            self.link = None
        if not link.half_open and not link.server_gone:
            sim, server = self.sim, link.server
            sim.at(link.up_time(sim.now), lambda: sim.server_closed_by_client(server, None))

    def _http(self, command: FetchToken | FetchGateway) -> None:
        sim = self.sim
        if self.http_hang:
            return
        latency = sim.http_latency

        what: Literal["token", "gateway"] = (
            "token" if isinstance(command, FetchToken) else "gateway"
        )

        def answer() -> None:
            now = sim.now
            if self.http_down:
                self.conn.request_failed(
                    "HTTP 503 (simulated outage)", now, request=what, kind=FailureKind.TRANSIENT
                )
                return
            gw = sim.gateway
            try:
                if isinstance(command, FetchToken):
                    body = {"appId": self.app_id, "clientSecret": self._client_secret}
                    reply = gw.token_request(body, now)
                    grant = parse_token_response(reply.body)
                    self.conn.provide_token(grant.token, grant.expires_in, now)
                else:
                    auth = f"QQBot {command.token}"
                    reply = gw.gateway_request(auth, now, bot=True)
                    if reply.status != 200:
                        kind = classify_status(reply.status)
                        self.conn.request_failed(
                            f"HTTP {reply.status}", now, request=what, kind=kind
                        )
                        return
                    info = parse_gateway_response(reply.body)
                    self.conn.provide_gateway(
                        info.url, now, session_start_limit=info.session_start_limit
                    )
            except RemoteProtocolError as err:
                kind = err.kind if isinstance(err, InvalidResponse) else FailureKind.TRANSIENT
                self.conn.request_failed(str(err), now, request=what, kind=kind)

        sim.at(sim.now + latency, lambda: self._input(answer))

    def _open(self, url: str, attempt: int) -> None:
        sim = self.sim
        now = sim.now
        self.opens.append(now)
        sim.trace_add(self.name, "open", url)
        latency = sim.latency
        if self.network_down:
            fail = lambda: self.conn.connection_closed(  # noqa: E731
                None, "connect failed", sim.now, attempt=attempt
            )
            sim.at(now + latency, lambda: self._input(fail))
            return

        opened_as = len(self.opens)

        def accept() -> None:
            server = sim.gateway.accept(sim.now)
            if self.dead or opened_as != len(self.opens) or self.conn.state is not _CONNECTING:
                # The attempt was abandoned (process killed, attempt aborted) while the SYN
                # was on its way: the client's kernel resets the connection.
                server.client_closed(None, sim.now)
                sim.flush_server(server)
                return
            link = Link(
                self,
                server,
                latency,
                attempt=attempt,
                jitter=sim.jitter,
                loss=sim.loss,
                rng=sim.rng,
            )
            sim.links[server] = link
            self.links.append(link)
            self.link = link
            opened = lambda: self.conn.connection_opened(sim.now, attempt=attempt)  # noqa: E731
            sim.at(link.down_time(sim.now), lambda: self._input(opened))
            sim.flush_server(server)

        sim.at(now + latency, accept)


class Simulation:
    """A seeded virtual-clock world: one FakeGateway, any number of clients.

    Args:
        seed: the only source of randomness (client jitter, gateway ids, tokens).
        gateway: the fake platform's settings.
        latency: one-way network delay in seconds.
        jitter: extra random one-way delay, uniform in ``[0, jitter)``; order is kept.
        loss: probability that a message needs a retransmission (1 s more; order is kept).
        http_latency: delay of each HTTP answer.
        trace: keep a trace (turn off for long benchmark runs).
        record: keep every client's events and dispatches in ``events``/``dispatches``
            (turn off for long runs: a day of dispatches is most of the memory and a sixth
            of the time, in garbage collection); ``delivered`` still counts dispatches.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        gateway: FakeGatewayConfig | None = None,
        latency: float = 0.02,
        jitter: float = 0.0,
        loss: float = 0.0,
        http_latency: float = 0.05,
        trace: bool = True,
        record: bool = True,
    ) -> None:
        self.record = record
        self.rng = random.Random(seed)
        self.now = 0.0
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.http_latency = http_latency
        self.gateway = FakeGateway(gateway, rng=random.Random(self.rng.getrandbits(64)))
        self.clients: list[SimClient] = []
        self.links: dict[ServerConnection, Link] = {}
        self.trace: list[TraceEntry] | None = [] if trace else None
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = 0
        self._limiter = _Limiter()
        self._server_timers: dict[ServerConnection, float] = {}

    # ---------------------------------------------------------------------- scheduling

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` at virtual time ``when`` (not before now)."""
        self._order += 1
        heapq.heappush(self._queue, (max(when, self.now), self._order, action))

    def after(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` ``delay`` seconds from now."""
        self.at(self.now + delay, action)

    def every(self, interval: float, action: Callable[[], None], *, start: float = 0.0) -> None:
        """Run ``action`` every ``interval`` seconds from ``start`` on, forever."""

        def tick() -> None:
            action()
            self.after(interval, tick)

        self.at(start, tick)

    def run_until(self, end: float) -> None:
        """Process everything scheduled up to and including ``end``; then now == ``end``."""
        queue = self._queue
        same_instant = 0
        while queue and queue[0][0] <= end:
            when, _, action = heapq.heappop(queue)
            if when == self.now:
                same_instant += 1
                if same_instant > _LIVELOCK_BOUND:
                    # Work that never lets virtual time advance would hang the test run.
                    raise RuntimeError(f"simulation livelock at t={when:.3f}")
            else:
                same_instant = 0
            self.now = when
            action()
        self.now = max(self.now, end)

    def run_for(self, seconds: float) -> None:
        """Advance the clock by ``seconds``."""
        self.run_until(self.now + seconds)

    # ------------------------------------------------------------------------ clients

    def add_client(
        self,
        config: SessionConfig | None = None,
        *,
        snapshot: SessionSnapshot | None = None,
        name: str | None = None,
        app_id: str | None = None,
        client_secret: str | None = None,
    ) -> SimClient:
        """Add a client (not started: call ``start()``)."""
        client = SimClient(
            self,
            name or f"client{len(self.clients)}",
            config,
            snapshot,
            app_id=app_id if app_id is not None else self.gateway.config.app_id,
            client_secret=(
                client_secret if client_secret is not None else self.gateway.config.client_secret
            ),
        )
        self.clients.append(client)
        return client

    def grant_identify_at(self, shard_id: int, max_concurrency: int | None) -> float:
        """When the simulated identify limiter grants a permit asked for now."""
        bucket = shard_id % (max_concurrency or 1)
        at = max(self.now, self._limiter.next_free.get(bucket, self.now))
        self._limiter.next_free[bucket] = at + 5.0
        self._limiter.grants.append((at, shard_id))
        return at

    @property
    def identify_grants(self) -> list[tuple[float, int]]:
        """Every identify permit granted: (time, shard id)."""
        return list(self._limiter.grants)

    # ----------------------------------------------------------------- server side

    def server_input(self, server: ServerConnection, text: str) -> None:
        """A client message reaches the server."""
        server.receive(text, self.now)
        self.flush_server(server)

    def server_closed_by_client(self, server: ServerConnection, code: int | None) -> None:
        """A client close frame (or the end of its TCP link) reaches the server."""
        server.client_closed(code, self.now)
        self.flush_server(server)

    def flush_server(self, server: ServerConnection) -> None:
        """Carry the server's outputs to its client and re-arm its timer."""
        link = self.links.get(server)
        for out in server.take_outputs():
            if link is None or link.half_open:
                continue
            client = link.client
            when = link.down_time(self.now)
            if isinstance(out, ServerSend):
                self._deliver(client, link, when, out.text)
            elif isinstance(out, ServerClose):
                link.server_gone = True
                self._deliver_close(client, link, when, out.code, out.reason)
            elif isinstance(out, ServerDrop):
                link.server_gone = True
                self._deliver_close(client, link, when, None, "connection lost (EOF)")
        if server.closed:
            self._server_timers.pop(server, None)
            return
        timer = server.get_timer()
        if timer is not None and self._server_timers.get(server) != timer:
            self._server_timers[server] = timer
            self.at(timer, lambda: self._server_timer(server, timer))

    def _server_timer(self, server: ServerConnection, timer: float) -> None:
        if self._server_timers.get(server) != timer:
            return
        del self._server_timers[server]
        server.handle_timer(self.now)
        self.flush_server(server)

    def flush_all(self) -> None:
        """Carry the outputs of every live server connection (after a gateway-wide action)."""
        for server in list(self.gateway.live):
            if server.outputs:
                self.flush_server(server)

    def _deliver(self, client: SimClient, link: Link, when: float, text: str) -> None:
        # One closure per message, the hot path of a long run: the stall check of _input
        # is done here, and only a stalled client pays for a second one.
        def arrive() -> None:
            if link.client_gone or link.half_open:
                return
            if self.now < client.stalled_until:
                client._backlog.append(
                    lambda: client.conn.receive(text, self.now, attempt=link.attempt)
                )
                return
            client.conn.receive(text, self.now, attempt=link.attempt)
            client._flush()

        self._order += 1
        heapq.heappush(self._queue, (max(when, self.now), self._order, arrive))

    def _deliver_close(
        self, client: SimClient, link: Link, when: float, code: int | None, reason: str
    ) -> None:
        def arrive() -> None:
            if link.client_gone or link.half_open:
                return
            link.client_gone = True
            if client.link is link:
                client.link = None
            client._input(
                lambda: client.conn.connection_closed(code, reason, self.now, attempt=link.attempt)
            )

        self.at(when, arrive)

    # ---------------------------------------------------------------------- dispatches

    def message(self, n: int, *, shard: int = 0, content: str | None = None) -> None:
        """The platform produces message ``n`` (see :meth:`FakeGateway.message`) now."""
        self.gateway.message(n, self.now, shard=shard, content=content)
        self.flush_all()

    def messages_every(self, interval: float, *, start: float = 0.0, shard: int = 0) -> None:
        """Produce a new, numbered message every ``interval`` seconds."""
        counter = iter(range(1, 1 << 62))
        self.every(interval, lambda: self.message(next(counter), shard=shard), start=start)

    # ---------------------------------------------------------------------- faults

    def half_open(self, client: SimClient) -> None:
        """From now on, the client's current link silently loses everything, both ways."""
        link = client.link
        if link is not None:
            link.half_open = True
            self.trace_add(client.name, "fault", "link is half-open")

    def partition(self, client: SimClient, seconds: float) -> None:
        """Nothing crosses the client's current link for ``seconds``; then everything sent
        meanwhile arrives, in order (TCP retransmits once the path heals)."""
        link = client.link
        if link is not None:
            link.blocked_until = max(link.blocked_until, self.now + seconds)
            self.trace_add(client.name, "fault", f"link partitioned for {seconds:g} s")

    def server_close(self, client: SimClient, code: int, reason: str = "") -> None:
        """The server closes the client's current connection with ``code`` (no op 7)."""
        link = client.link
        if link is not None:
            link.server.close(code, reason or "closed by the test", self.now)
            self.flush_server(link.server)

    def server_send(self, client: SimClient, text: str) -> None:
        """The server sends ``text`` (anything, malformed included) on the client's link."""
        link = client.link
        if link is not None:
            link.server.outputs.append(ServerSend(text))
            self.flush_server(link.server)

    # ---------------------------------------------------------------------- tracing

    def trace_add(self, actor: str, kind: str, detail: str) -> None:
        """Append a trace line (no-op when tracing is off)."""
        if self.trace is not None:
            self.trace.append(TraceEntry(self.now, actor, kind, detail))

    def format_trace(self) -> str:
        """The whole trace as text, one line per entry."""
        return "\n".join(entry.format() for entry in self.trace or [])
