"""A scripted driver for GatewayConnection tests, on a virtual clock.

`Driver` plays the part of qqproto_io: it executes the core's commands (answering HTTP
requests and permits at once, unless told otherwise), records every output and every payload
the client sent, and advances a virtual clock by jumping from timer to timer the way a real
driver's sleep would. The test plays the server: it calls `hello()`, `ready()`, `recv()`,
`server_close()`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qqproto import (
    AbortTransport,
    CloseConnection,
    FetchGateway,
    FetchToken,
    GatewayConnection,
    OpenConnection,
    Output,
    PersistSnapshot,
    RequestIdentifyPermit,
    SendPayload,
    SessionConfig,
    SessionSnapshot,
    SessionStartLimit,
)

T = TypeVar("T")

TOKEN = "TOKEN-SECRET-4f9c2a"
CLIENT_SECRET = "CLIENT-SECRET-77e1b0"  # never given to the core; grep for it anyway
GATEWAY_URL = "wss://gateway.test/websocket"


@dataclass
class Sent:
    """A payload the client sent, decoded, with the virtual time it was sent."""

    at: float
    op: int
    d: Any
    text: str = field(repr=False)


class Driver:
    """Drive one GatewayConnection on a virtual clock (see module docstring).

    Args:
        auto_token / auto_gateway / auto_permit / auto_open: answer that command at once.
        echo_close: when the client sends a close frame, the "server" completes the close
            handshake at once (``connection_closed`` with the same code).
    """

    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        seed: int = 0,
        snapshot: SessionSnapshot | None = None,
        token: str = TOKEN,
        expires_in: float | str = "7200",
        url: str = GATEWAY_URL,
        start_limit: SessionStartLimit | None = None,
        auto_token: bool = True,
        auto_gateway: bool = True,
        auto_permit: bool = True,
        auto_open: bool = True,
        echo_close: bool = True,
        now: float = 0.0,
    ) -> None:
        self.conn = GatewayConnection(config, rng=random.Random(seed), snapshot=snapshot)
        self.now = now
        self.token = token
        self.expires_in = expires_in
        self.url = url
        self.start_limit = start_limit
        self.auto_token = auto_token
        self.auto_gateway = auto_gateway
        self.auto_permit = auto_permit
        self.auto_open = auto_open
        self.echo_close = echo_close
        self.outputs: list[Output] = []
        self.sent: list[Sent] = []
        self.opens: list[float] = []  # times of OpenConnection
        self.token_requests: list[tuple[float, bool]] = []
        self.transport_open = False
        self.attempt = 0  # OpenConnection.attempt of the last transport asked for

    # ------------------------------------------------------------------ plumbing

    def pump(self) -> list[Output]:
        """Drain the connection and execute commands until it is quiet; return the outputs."""
        new: list[Output] = []
        while True:
            batch = self.conn.drain()
            if not batch:
                return new
            new.extend(batch)
            self.outputs.extend(batch)
            for out in batch:
                self._execute(out)

    def _execute(self, out: Output) -> None:
        conn = self.conn
        if isinstance(out, FetchToken):
            self.token_requests.append((self.now, out.force))
            if self.auto_token:
                conn.provide_token(self.token, self.expires_in, self.now)
        elif isinstance(out, FetchGateway):
            if self.auto_gateway:
                conn.provide_gateway(self.url, self.now, session_start_limit=self.start_limit)
        elif isinstance(out, RequestIdentifyPermit):
            if self.auto_permit:
                conn.grant_identify(self.now)
        elif isinstance(out, OpenConnection):
            self.opens.append(self.now)
            self.attempt = out.attempt
            if self.auto_open:
                self.transport_open = True
                conn.connection_opened(self.now, attempt=self.attempt)
        elif isinstance(out, SendPayload):
            obj = json.loads(out.text)
            self.sent.append(Sent(self.now, obj["op"], obj.get("d"), out.text))
        elif isinstance(out, CloseConnection):
            if self.echo_close and self.transport_open:
                self.transport_open = False
                conn.connection_closed(out.code, out.reason, self.now, attempt=self.attempt)
        elif isinstance(out, AbortTransport):
            self.transport_open = False

    # ------------------------------------------------------------------ time

    def advance(self, seconds: float) -> list[Output]:
        """Move the clock forward, running every timer that falls due on the way, in order."""
        target = self.now + seconds
        new: list[Output] = []
        while True:
            timer = self.conn.get_timer()
            if timer is None or timer > target:
                break
            self.now = max(self.now, timer)
            self.conn.handle_timer(self.now)
            new.extend(self.pump())
        self.now = target
        return new

    def advance_to_timer(self) -> list[Output]:
        """Jump to the next timer and run it."""
        timer = self.conn.get_timer()
        assert timer is not None, "no timer is set"
        return self.advance(max(0.0, timer - self.now))

    # ------------------------------------------------------------------ the server's moves

    def start(self) -> list[Output]:
        self.conn.start(self.now)
        return self.pump()

    def recv(self, payload: dict[str, Any] | str | bytes) -> list[Output]:
        if isinstance(payload, dict):
            payload = json.dumps(payload, ensure_ascii=False)
        self.conn.receive(payload, self.now, attempt=self.attempt)
        return self.pump()

    def hello(self, interval_ms: float = 45000) -> list[Output]:
        return self.recv({"op": 10, "d": {"heartbeat_interval": interval_ms}})

    def ready(self, session_id: str = "S1", seq: int = 1) -> list[Output]:
        d = {"version": 1, "session_id": session_id, "user": {"id": "1", "bot": True}}
        return self.recv({"op": 0, "s": seq, "t": "READY", "d": d})

    def resumed(self, seq: int) -> list[Output]:
        return self.recv({"op": 0, "s": seq, "t": "RESUMED", "d": ""})

    def ack(self) -> list[Output]:
        return self.recv({"op": 11})

    def dispatch(
        self,
        seq: int | None,
        *,
        t: str = "C2C_MESSAGE_CREATE",
        event_id: str | None = None,
        message_id: str | None = None,
    ) -> list[Output]:
        payload: dict[str, Any] = {"op": 0, "t": t, "d": {"id": message_id or f"m{seq}"}}
        if seq is not None:
            payload["s"] = seq
        if event_id is not None:
            payload["id"] = event_id
        return self.recv(payload)

    def server_close(self, code: int | None, reason: str = "") -> list[Output]:
        self.transport_open = False
        self.conn.connection_closed(code, reason, self.now, attempt=self.attempt)
        return self.pump()

    def connect_ready(self, *, interval_ms: float = 45000, session_id: str = "S1") -> None:
        """start() + Hello + READY: a live session."""
        self.start()
        self.hello(interval_ms)
        self.ready(session_id)

    # ------------------------------------------------------------------ queries

    def of(self, kind: type[T]) -> list[T]:
        """Every output so far of one type."""
        return [o for o in self.outputs if isinstance(o, kind)]

    def sent_ops(self, op: int) -> list[Sent]:
        return [s for s in self.sent if s.op == op]

    def persisted(self) -> list[SessionSnapshot | None]:
        return [o.snapshot for o in self.of(PersistSnapshot)]


def advance_to(drv: Driver, t: float) -> None:
    """Like Driver.advance, but to an absolute time (no float drift from `now + (t - now)`)."""
    while True:
        timer = drv.conn.get_timer()
        if timer is None or timer > t:
            break
        drv.now = max(drv.now, timer)
        drv.conn.handle_timer(drv.now)
        drv.pump()
    drv.now = t


def jump(drv: Driver) -> float:
    """Jump to the next timer, run it, and return its deadline."""
    due = drv.conn.get_timer()
    assert due is not None, "no timer is set"
    advance_to(drv, due)
    return due
