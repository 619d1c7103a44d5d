# The protocol loop of one shard: execute the core's commands, feed it everything it hears.
#
# Theory of operation (aioquic's driver, in anyio). One task runs the loop:
#
#   1. execute every command the core produced (non-blocking: transports and HTTP calls run
#      in their own tasks and report to the inbox);
#   2. wait for the next inbox item, but no longer than the core's `get_timer()` deadline;
#   3. feed that item and then *every item already waiting* to the core, and only then, if
#      the deadline has passed, call `handle_timer(max(deadline, now))` (DESIGN invariant 3:
#      an ACK that arrived during a stall is seen before the watchdog looks).
#
# The loop holds no protocol decision: when to beat, resume, back off or give up is the
# core's, and so is which transport's reports still count (each transport carries the
# OpenConnection.attempt it was opened for, and reports it with everything it says). Every
# wait is bounded by the core's timers.
"""The per-shard driver loop."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

from qqproto import (
    AbortTransport,
    CloseConnection,
    Event,
    FetchGateway,
    FetchToken,
    GatewayConnection,
    Opcode,
    OpenConnection,
    PersistSnapshot,
    RequestIdentifyPermit,
    SendPayload,
    SessionState,
)
from qqproto_io._http import HttpFailure, RestApi, TokenSource
from qqproto_io._logging import EventLogger
from qqproto_io._transport import (
    Transport,
    TransportClosed,
    TransportLimits,
    TransportMessages,
    TransportOpened,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Coroutine

    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from qqproto import Output
    from qqproto_io._proxy import ProxyConfig
    from qqproto_io._stores import IdentifyLimiter, SnapshotStore

__all__ = ["ShardDriver"]

_TERMINAL = frozenset({SessionState.STOPPED, SessionState.ERROR})
_INBOX_SIZE = 4096
LATE_TIMER_WARNING = 1.0
"""Seconds a timer may fire late before the driver warns (scheduling jitter is far less)."""


class ShardDriver:
    """Runs one :class:`~qqproto.GatewayConnection` over real sockets until it stops.

    Args:
        conn: the core connection (not started).
        api: REST endpoints for the gateway URL.
        tokens: the shared token source.
        limiter: identify permits.
        store: where snapshots go, or ``None``.
        on_event: called with every event, on the protocol task: it must not block.
            Every event is also logged on the shard's logger (``qqproto_io.shard.<id>``).
        on_lag: called with the seconds each timer fired late (for metrics), or None. A
            timer more than ``LATE_TIMER_WARNING`` seconds late is also logged as a WARNING
            on the shard's logger: something blocked the event loop.
    """

    def __init__(
        self,
        conn: GatewayConnection,
        *,
        api: RestApi,
        tokens: TokenSource,
        limiter: IdentifyLimiter,
        store: SnapshotStore | None,
        on_event: Callable[[Event], None],
        on_lag: Callable[[float], None] | None = None,
        proxy: ProxyConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        limits: TransportLimits | None = None,
    ) -> None:
        self.conn = conn
        self._api = api
        self._tokens = tokens
        self._limiter = limiter
        self._store = store
        self._on_event = on_event
        self._log_event = EventLogger(conn.config.shard[0])
        self._on_lag = on_lag
        self._proxy = proxy
        self._ssl_context = ssl_context
        self._limits = limits or TransportLimits(max_message_size=conn.config.max_payload_size)
        send, receive = anyio.create_memory_object_stream[object](_INBOX_SIZE)
        self._inbox: MemoryObjectSendStream[object] = send
        self._inbox_receive: MemoryObjectReceiveStream[object] = receive
        self._transport: Transport | None = None
        self._tg: TaskGroup | None = None
        self.transports_opened = 0
        self._max_concurrency: int | None = None  # of the last permit asked for

    # ------------------------------------------------------------------ the loop

    def request_close(self, *, end_session: bool = False) -> None:
        """Ask the loop to close the connection for good (thread-unsafe; same loop only)."""
        self._post(lambda now: self.conn.close(now, end_session=end_session))

    async def run(self) -> None:
        """Run until the connection is STOPPED (or ERROR, which re-raises its cause)."""
        conn = self.conn
        with self._inbox, self._inbox_receive:
            await self._loop(conn)

    async def _loop(self, conn: GatewayConnection) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            conn.start(anyio.current_time())
            while True:
                self._execute(conn.drain())
                if conn.state in _TERMINAL:
                    break
                try:
                    # Under load something is always waiting: take it without a cancel
                    # scope or a trip through the event loop.
                    self._apply(self._inbox_receive.receive_nowait())
                except anyio.WouldBlock:
                    deadline = conn.get_timer()
                    with anyio.CancelScope(deadline=math.inf if deadline is None else deadline):
                        self._apply(await self._inbox_receive.receive())
                # Everything already received goes in before any timer runs (invariant 3).
                while True:
                    try:
                        item = self._inbox_receive.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    self._apply(item)
                now = anyio.current_time()
                due = conn.get_timer()
                if due is not None and now >= due:
                    lag = now - due
                    if self._on_lag is not None:
                        self._on_lag(lag)
                    if lag > LATE_TIMER_WARNING:
                        self._log_event.logger.warning(
                            "a protocol timer fired %.2f s late: the event loop was blocked "
                            "(the stall monitor, if on, logged where)",
                            lag,
                        )
                    conn.handle_timer(max(due, now))
            if self._transport is not None:
                self._transport.abort()
            tg.cancel_scope.cancel()

    def _post(self, item: object) -> None:
        self._inbox.send_nowait(item)

    def _apply(self, item: object) -> None:
        now = anyio.current_time()
        conn = self.conn
        # A transport's ident is its OpenConnection.attempt: the core itself ignores the
        # reports of transports it has given up on, however late they arrive.
        if isinstance(item, TransportMessages):
            receive, attempt = conn.receive, item.ident
            for text in item.texts:
                receive(text, now, attempt=attempt)
        elif isinstance(item, TransportOpened):
            conn.connection_opened(now, attempt=item.ident)
        elif isinstance(item, TransportClosed):
            if self._transport is not None and self._transport.ident == item.ident:
                self._transport = None
            conn.connection_closed(item.code, item.reason, now, attempt=item.ident)
        elif callable(item):
            item(now)

    # -------------------------------------------------------------- the commands

    def _execute(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Event):
                self._log_event(out)
                self._on_event(out)
            elif isinstance(out, SendPayload):
                if self._transport is not None:
                    self._transport.send_text(out.text)
                    if out.op is Opcode.IDENTIFY:
                        self._spawn(self._identified)
            elif isinstance(out, OpenConnection):
                self._open(out.url, out.attempt)
            elif isinstance(out, CloseConnection):
                if self._transport is not None:
                    self._transport.close(out.code, out.reason)
            elif isinstance(out, AbortTransport):
                if self._transport is not None:
                    self._transport.abort()
                    self._transport = None
            elif isinstance(out, FetchToken):
                self._spawn(self._fetch_token, out.force)
            elif isinstance(out, FetchGateway):
                self._spawn(self._fetch_gateway, out.token)
            elif isinstance(out, RequestIdentifyPermit):
                self._max_concurrency = out.max_concurrency
                self._spawn(self._permit, out.shard_id, out.max_concurrency)
            elif isinstance(out, PersistSnapshot) and self._store is not None:
                self._store.save(self.conn.config.shard, out.snapshot)

    def _spawn(self, func: Callable[..., Coroutine[object, object, None]], *args: object) -> None:
        assert self._tg is not None
        self._tg.start_soon(func, *args)

    def _open(self, url: str, attempt: int) -> None:
        assert self._tg is not None
        if self._transport is not None:  # the core never asks for two; be safe anyway
            self._transport.abort()
        self.transports_opened += 1
        transport = Transport(
            attempt,
            url,
            self._inbox,
            limits=self._limits,
            proxy=self._proxy,
            ssl_context=self._ssl_context,
        )
        self._transport = transport
        transport.start(self._tg)

    async def _fetch_token(self, force: bool) -> None:
        try:
            grant = await self._tokens.get(force=force)
        except HttpFailure as exc:
            reason = str(exc)
            await self._inbox.send(
                lambda now: self.conn.request_failed(reason, now, request="token")
            )
            return
        await self._inbox.send(
            lambda now: self.conn.provide_token(grant.token, grant.expires_in, now)
        )

    async def _fetch_gateway(self, token: str) -> None:
        try:
            info = await self._api.fetch_gateway(token)
        except HttpFailure as exc:
            reason = str(exc)
            await self._inbox.send(
                lambda now: self.conn.request_failed(reason, now, request="gateway")
            )
            return
        if info.session_start_limit is not None:
            # The limiter counts the budget across shards (and processes); the core only
            # sees its own connection's answers.
            await self._limiter.update_limit(info.session_start_limit)
        await self._inbox.send(
            lambda now: self.conn.provide_gateway(
                info.url, now, session_start_limit=info.session_start_limit
            )
        )

    async def _identified(self) -> None:
        await self._limiter.identified(self.conn.config.shard[0], self._max_concurrency)

    async def _permit(self, shard_id: int, max_concurrency: int | None) -> None:
        await self._limiter.acquire(shard_id, max_concurrency)
        await self._inbox.send(self.conn.grant_identify)
