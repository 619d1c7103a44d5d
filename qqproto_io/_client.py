# The application's face: `async with GatewayClient(...) as client: async for event in client`.
#
# User code never runs on the protocol task. Events go from the driver into a bounded queue;
# the application reads them at its own pace, or registers handlers that a separate task
# runs. A handler that blocks for minutes delays only the handler task: heartbeats continue,
# so the gateway never sees a dead client (the discord.py "heartbeat blocked" failure, and
# hermes #33727). When the queue is full the *newest* event is dropped and counted (and a
# warning logged once per burst) rather than blocking the protocol loop: losing the link
# would lose far more.
"""The anyio gateway client for applications."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Self

import anyio

from qqproto import Dispatch, Event, GatewayConnection, SessionConfig, SessionState
from qqproto_io._driver import ShardDriver
from qqproto_io._http import (
    DEFAULT_API_BASE,
    DEFAULT_TOKEN_URL,
    Credentials,
    RestApi,
    TokenSource,
)
from qqproto_io._proxy import ProxyConfig, proxy_from_env
from qqproto_io._stores import JsonFileSnapshotStore, LocalIdentifyLimiter

if TYPE_CHECKING:
    import os
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from anyio.abc import TaskGroup

    from qqproto_io._health import Metrics

__all__ = ["GatewayClient"]

log = logging.getLogger("qqproto_io")


class GatewayClient:
    """One gateway session over real sockets, on asyncio or trio.

    Args:
        app_id / client_secret: the bot's credentials (the secret is never logged).
        config: session settings (intents, shard, timeouts).
        api_base / token_url: REST base and token endpoint (production by default).
        proxy: an ``http://`` CONNECT proxy URL; default: ``HTTPS_PROXY``/``ALL_PROXY``.
        snapshot_path: a JSON file to resume from across restarts.
        max_queued_events: events waiting for the application before new ones are dropped.
        metrics: Prometheus metrics to count every event in, as the protocol loop produces
            it (so events dropped for a slow application are counted too).
        rng: randomness for jitter (default: a new ``random.Random()``).

    Use it as an async context manager and iterate over it for events; iteration ends when
    the session stops. ``close()`` (or leaving the block) closes and keeps the session for a
    later Resume; ``close(end_session=True)`` ends it.
    """

    def __init__(
        self,
        *,
        app_id: str,
        client_secret: str,
        config: SessionConfig | None = None,
        api_base: str = DEFAULT_API_BASE,
        token_url: str = DEFAULT_TOKEN_URL,
        proxy: str | None = None,
        snapshot_path: str | os.PathLike[str] | None = None,
        max_queued_events: int = 10_000,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self._credentials = Credentials(app_id, client_secret)
        self._api_base = api_base
        self._token_url = token_url
        self._proxy = ProxyConfig.from_url(proxy) if proxy else proxy_from_env()
        self._proxy_url = proxy
        self._store = JsonFileSnapshotStore(snapshot_path) if snapshot_path else None
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        send, receive = anyio.create_memory_object_stream[Event](max_queued_events)
        self._events_send = send
        self._events = receive
        self.dropped_events = 0
        self.metrics = metrics
        self._handlers: dict[str, list[Callable[[Dispatch], Awaitable[None]]]] = {}
        self._tg: TaskGroup | None = None
        self._driver: ShardDriver | None = None
        self._api: RestApi | None = None
        self._stopped = anyio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        api = RestApi(
            self._credentials,
            api_base=self._api_base,
            token_url=self._token_url,
            timeout=self.config.http_timeout,
            proxy=self._proxy_url,
        )
        self._api = api
        snapshot = self._store.load(self.config.shard) if self._store else None
        conn = GatewayConnection(self.config, rng=self._rng, snapshot=snapshot)
        self._driver = ShardDriver(
            conn,
            api=api,
            tokens=TokenSource(api, refresh_margin=self.config.token_refresh_margin),
            limiter=LocalIdentifyLimiter(),
            store=self._store,
            on_event=self._enqueue,
            proxy=self._proxy,
        )
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run_driver, name="qqproto protocol loop")
        if self._handlers:
            self._tg.start_soon(self._run_handlers, name="qqproto handlers")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.close()
        assert self._tg is not None
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._events.close()
            self._events_send.close()
            if self._api is not None:
                with anyio.CancelScope(shield=True):
                    await self._api.aclose()

    async def close(self, *, end_session: bool = False) -> None:
        """Close the connection for good and wait (bounded) until it has stopped."""
        driver = self._driver
        if driver is None or driver.conn.state in (SessionState.STOPPED, SessionState.ERROR):
            return
        driver.request_close(end_session=end_session)
        with anyio.move_on_after(self.config.close_timeout + 1.0) as scope:
            await self._stopped.wait()
        if scope.cancel_called and self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _run_driver(self) -> None:
        assert self._driver is not None
        try:
            await self._driver.run()
        finally:
            self._stopped.set()
            self._events_send.close()

    # --------------------------------------------------------------------- events

    @property
    def state(self) -> SessionState:
        """The session's lifecycle state."""
        assert self._driver is not None
        return self._driver.conn.state

    @property
    def connection(self) -> GatewayConnection:
        """The core connection (read its state, latency, session; do not feed it)."""
        assert self._driver is not None
        return self._driver.conn

    def _enqueue(self, event: Event) -> None:
        if self.metrics is not None:
            self.metrics.observe(self.config.shard[0], event)
        try:
            self._events_send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped_events += 1
            if self.metrics is not None:
                self.metrics.dropped(self.config.shard[0])
            if self.dropped_events == 1 or self.dropped_events % 1000 == 0:
                log.warning(
                    "application is not reading events: %d dropped so far", self.dropped_events
                )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._events.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def on(
        self, event_type: str
    ) -> Callable[[Callable[[Dispatch], Awaitable[None]]], Callable[[Dispatch], Awaitable[None]]]:
        """Register an async handler for dispatches of ``event_type`` (``"*"``: all).

        Register before entering the ``async with`` block. Handlers run one at a time on
        their own task, never on the protocol loop; do not iterate the client as well.
        """

        def register(
            func: Callable[[Dispatch], Awaitable[None]],
        ) -> Callable[[Dispatch], Awaitable[None]]:
            self._handlers.setdefault(event_type, []).append(func)
            return func

        return register

    async def _run_handlers(self) -> None:
        async for event in self:
            if not isinstance(event, Dispatch):
                continue
            for func in [*self._handlers.get(event.type, ()), *self._handlers.get("*", ())]:
                try:
                    await func(event)
                except Exception:
                    log.exception("handler for %s failed", event.type)
