# The protocol loop of one shard: execute the core's commands, feed it everything it hears.
#
# Theory of operation (aioquic's driver, in anyio). One task runs the loop:
#
#   1. execute every command the core produced (non-blocking: transports and HTTP calls run
#      in their own tasks and report to the inbox);
#   2. wait for the next inbox item, but no longer than the core's `get_timer()` deadline;
#   3. feed that item and then *every item already waiting* to the core, and only then, if
#      the deadline has passed, call `handle_timer(max(deadline, now))` (docs/design.md#inv-3:
#      an ACK that arrived during a stall is seen before the watchdog looks).
#
# The loop holds no protocol decision: when to beat, resume, back off or give up is the
# core's, and so is which transport's reports still count (each transport carries the
# OpenConnection.attempt it was opened for, and reports it with everything it says). Every
# wait is bounded by the core's timers.
#
# Nothing from outside ends the loop. Transports turn whatever the network does into
# reports; each HTTP and permit task turns every failure into a core input (`request_failed`
# with the failure's kind, `refuse_identify`), and runs in a cancel scope of its own that an
# `AbandonRequest` from the core cancels, so a stalled request never holds a lock or a
# connection for the requests that follow. Only a bug in the core (its ERROR state) ends
# `run()` with an exception.
"""The per-shard driver loop."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Literal

import anyio

from qqproto import (
    AbandonRequest,
    AbortTransport,
    CloseConnection,
    Event,
    FailureKind,
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
from qqproto_io._stores import IdentifyBudgetExhausted
from qqproto_io._transport import (
    Transport,
    TransportClosed,
    TransportLimits,
    TransportMessages,
    TransportOpened,
    TransportOversized,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Coroutine

    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from qqproto import Output
    from qqproto_io._network import Network
    from qqproto_io._proxy import ProxyConfig
    from qqproto_io._stores import IdentifyLimiter, SnapshotStore

__all__ = ["ShardDriver"]

log = logging.getLogger("qqproto_io.driver")

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
        network: Network | None = None,
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
        self._network = network
        self._limits = limits or TransportLimits(max_message_size=conn.config.max_payload_size)
        send, receive = anyio.create_memory_object_stream[object](_INBOX_SIZE)
        self._inbox: MemoryObjectSendStream[object] = send
        self._inbox_receive: MemoryObjectReceiveStream[object] = receive
        self._transport: Transport | None = None
        self._tg: TaskGroup | None = None
        self._max_concurrency: int | None = None  # of the last permit asked for
        # The request tasks in flight, each in its own scope, for AbandonRequest to cancel.
        self._requests: dict[str, anyio.CancelScope] = {}
        self._close_request: bool | None = None  # end_session of a pending request_close
        self._wait: anyio.CancelScope | None = None  # the loop's wait, while it waits
        self._running = False

    # ------------------------------------------------------------------ the loop

    @property
    def running(self) -> bool:
        """``run()`` is in progress (started and not yet returned)."""
        return self._running

    def request_close(self, *, end_session: bool = False) -> None:
        """Ask the loop to close the connection for good; never fails, never blocks.

        Call it from the loop's own event loop (not thread-safe). Without effect once the
        loop has stopped; a second request only adds ``end_session``.
        """
        if not self._running:
            return
        self._close_request = end_session or bool(self._close_request)
        if self._wait is not None:
            self._wait.cancel()

    async def run(self) -> None:
        """Run until the connection is STOPPED (or ERROR, which re-raises its cause).

        Raises:
            LocalProtocolError: the core failed with an internal error (a bug; its cause is
                chained). Nothing the network, the server, the token endpoint or the
                limiter does ends ``run()`` with an exception; a bug in the loop itself is
                raised as it is.
            RuntimeError: ``run()`` was called twice.
        """
        if self._tg is not None:
            raise RuntimeError("a ShardDriver runs once")
        conn = self.conn
        self._running = True
        try:
            with self._inbox, self._inbox_receive:
                await self._loop(conn)
        except BaseExceptionGroup as group:
            # Only the loop itself can fail (its tasks turn every failure into a report):
            # raise that error, not a group around it.
            cancelled = anyio.get_cancelled_exc_class()
            errors = [e for e in group.exceptions if not isinstance(e, cancelled)]
            if len(errors) == 1:
                raise errors[0] from None
            raise
        finally:
            self._running = False

    async def _loop(self, conn: GatewayConnection) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            conn.start(anyio.current_time())
            while True:
                self._execute(conn.drain())
                if conn.state in _TERMINAL:
                    break
                if self._close_request is not None:
                    end_session, self._close_request = self._close_request, None
                    conn.close(anyio.current_time(), end_session=end_session)
                    continue
                try:
                    # Under load something is always waiting: take it without a cancel
                    # scope or a trip through the event loop.
                    self._apply(self._inbox_receive.receive_nowait())
                except anyio.WouldBlock:
                    deadline = conn.get_timer()
                    with anyio.CancelScope(
                        deadline=math.inf if deadline is None else deadline
                    ) as wait:
                        self._wait = wait
                        try:
                            self._apply(await self._inbox_receive.receive())
                        finally:
                            self._wait = None
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
        elif isinstance(item, TransportOversized):
            conn.message_too_large(item.size, now, attempt=item.ident)
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
                self._spawn_request("token", self._fetch_token, out.force)
            elif isinstance(out, FetchGateway):
                self._spawn_request("gateway", self._fetch_gateway, out.token)
            elif isinstance(out, RequestIdentifyPermit):
                self._max_concurrency = out.max_concurrency
                self._spawn_request("permit", self._permit, out.shard_id, out.max_concurrency)
            elif isinstance(out, AbandonRequest):
                scope = self._requests.pop(out.request, None)
                if scope is not None:
                    scope.cancel()
            elif isinstance(out, PersistSnapshot) and self._store is not None:
                try:
                    self._store.save(self.conn.config.shard, out.snapshot)
                except Exception:
                    # A store that fails (disk full, a bug) must not end the session;
                    # a restart then Identifies instead of resuming.
                    log.exception("snapshot store failed to save shard %s", self.conn.config.shard)

    def _spawn(self, func: Callable[..., Coroutine[object, object, None]], *args: object) -> None:
        assert self._tg is not None
        self._tg.start_soon(func, *args)

    def _spawn_request(
        self,
        what: Literal["token", "gateway", "permit"],
        func: Callable[..., Coroutine[object, object, None]],
        *args: object,
    ) -> None:
        old = self._requests.pop(what, None)
        if old is not None:  # the core asks again only after abandoning: be safe anyway
            old.cancel()
        scope = anyio.CancelScope()
        self._requests[what] = scope

        async def run() -> None:
            with scope:
                await func(*args)
            if self._requests.get(what) is scope:
                del self._requests[what]

        self._spawn(run)

    def _open(self, url: str, attempt: int) -> None:
        assert self._tg is not None
        if self._transport is not None:  # the core never asks for two; be safe anyway
            self._transport.abort()
        transport = Transport(
            attempt,
            url,
            self._inbox,
            limits=self._limits,
            proxy=self._proxy,
            ssl_context=self._ssl_context,
            network=self._network,
        )
        self._transport = transport
        transport.start(self._tg)

    async def _request_failed(
        self, what: Literal["token", "gateway"], reason: str, kind: FailureKind
    ) -> None:
        await self._inbox.send(
            lambda now: self.conn.request_failed(reason, now, request=what, kind=kind)
        )

    async def _fetch_token(self, force: bool) -> None:
        try:
            grant = await self._tokens.get(force=force)
        except HttpFailure as exc:
            await self._request_failed("token", str(exc), exc.kind)
            return
        except Exception as exc:  # a bug below us; the session carries on regardless
            log.exception("token request failed unexpectedly")
            await self._request_failed("token", type(exc).__name__, FailureKind.TRANSIENT)
            return
        await self._inbox.send(
            lambda now: self.conn.provide_token(grant.token, grant.expires_in, now)
        )

    async def _fetch_gateway(self, token: str) -> None:
        try:
            info = await self._api.fetch_gateway(token)
        except HttpFailure as exc:
            await self._request_failed("gateway", str(exc), exc.kind)
            return
        except Exception as exc:  # a bug below us; the session carries on regardless
            log.exception("gateway request failed unexpectedly")
            await self._request_failed("gateway", type(exc).__name__, FailureKind.TRANSIENT)
            return
        if info.session_start_limit is not None:
            # The limiter counts the budget across shards (and processes); the core only
            # sees its own connection's answers.
            try:
                await self._limiter.update_limit(info.session_start_limit)
            except Exception:
                log.warning("identify limiter could not record the budget", exc_info=True)
        await self._inbox.send(
            lambda now: self.conn.provide_gateway(
                info.url, now, session_start_limit=info.session_start_limit
            )
        )

    async def _identified(self) -> None:
        try:
            await self._limiter.identified(self.conn.config.shard[0], self._max_concurrency)
        except Exception:
            log.warning("identify limiter could not record the Identify", exc_info=True)

    async def _permit(self, shard_id: int, max_concurrency: int | None) -> None:
        try:
            await self._limiter.acquire(shard_id, max_concurrency)
        except IdentifyBudgetExhausted as exc:
            reason, retry_after = str(exc), exc.retry_after
            await self._inbox.send(
                lambda now: self.conn.refuse_identify(reason, now, retry_after=retry_after)
            )
            return
        except Exception as exc:  # the limiter's store is down, or a bug: back off
            log.warning("identify limiter failed", exc_info=True)
            reason = f"limiter failed: {type(exc).__name__}"
            await self._inbox.send(
                lambda now: self.conn.refuse_identify(reason, now, retry_after=None)
            )
            return
        await self._inbox.send(self.conn.grant_identify)
