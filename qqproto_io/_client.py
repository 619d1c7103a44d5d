# The application's face: `async with GatewayClient(...) as client: async for event in client`.
#
# User code never runs on the protocol tasks. Each shard has its own core connection and its
# own driver task; all of them share one REST client, one token source (one refresh for all
# shards, never a stampede), one identify limiter and one snapshot store. Their events go into
# one bounded queue, tagged with the shard; the application reads them at its own pace, or
# registers handlers that a separate task runs. A handler that blocks for minutes delays only
# the handler task: heartbeats continue, so the gateway never sees a dead client (the
# discord.py "heartbeat blocked" failure, and hermes #33727). When the queue is full the
# *newest* event is dropped and counted (and a warning logged once per burst) rather than
# blocking the protocol loops: losing the link would lose far more. The loss is not silent:
# once there is room again, an `EventsDropped(count)` takes the gap's place in the stream.
"""The anyio gateway client for applications."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar, overload

import anyio
import anyio.lowlevel
import orjson

from qqproto import (
    Dispatch,
    Event,
    EventsDropped,
    FatalStop,
    GatewayConnection,
    Interaction,
    InvalidMessage,
    LocalProtocolError,
    Message,
    SessionConfig,
    SessionState,
    classify_api_error,
    parse_interaction,
    parse_message,
)
from qqproto_io._delivery import DeliveryRecord
from qqproto_io._driver import ShardDriver
from qqproto_io._http import (
    DEFAULT_API_BASE,
    DEFAULT_TOKEN_URL,
    Credentials,
    RestApi,
    TokenSource,
)
from qqproto_io._messaging import Messenger
from qqproto_io._network import parse_address
from qqproto_io._proxy import ProxyConfig, proxy_from_env
from qqproto_io._shards import ShardPlan
from qqproto_io._stores import LocalIdentifyLimiter, SqliteSnapshotStore

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncIterator
    from types import TracebackType

    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from qqproto import Health, JSONValue, ReplyLimits, SendConfig
    from qqproto_io._health import Metrics
    from qqproto_io._network import Network
    from qqproto_io._stores import IdentifyLimiter, SnapshotStore
    from qqproto_io._webhook import DeliveryClaims
    from qqproto_io._webhook_front import WebhookFront

__all__ = ["FatalStopError", "GatewayClient", "Handler"]

_E = TypeVar("_E", bound=Event)
_M = TypeVar("_M", bound=Message | Interaction)
Handler: TypeAlias = Callable[[_E], Awaitable[None]]
"""An async function called with each event (or message) it was registered for."""
# What a handler may be registered for besides a dispatch type: the typed messages.
_MESSAGE_KEYS = (Message, Interaction)


class FatalStopError(Exception):
    """A shard stopped for good: the gateway closed with a fatal code, or the credentials
    were refused. Retrying with the same configuration cannot help.

    Attributes:
        shard_id: the shard that stopped.
        code: the close code, or ``None`` (wrong credentials, for instance).
        reason: what the code means.
        hint: what to check or change.
    """

    def __init__(self, shard_id: int, fatal: FatalStop) -> None:
        self.shard_id = shard_id
        self.code = fatal.code
        self.reason = fatal.reason
        self.hint = fatal.hint
        code = "" if fatal.code is None else f" {fatal.code}"
        super().__init__(
            f"shard {shard_id} stopped by the gateway:{code} {fatal.reason}. {fatal.hint}"
        )


def _describe(event: Event) -> str:
    if type(event) is Dispatch:
        return f"{event.type} (seq {event.seq}, event id {event.event_id})"
    return type(event).__name__


log = logging.getLogger("qqproto_io")

_TERMINAL = (SessionState.STOPPED, SessionState.ERROR)
_YIELD_EVERY = 64


class GatewayClient:
    """Gateway sessions over real sockets, one per shard, on asyncio or trio.

    Args:
        app_id: the bot's app id.
        client_secret: the bot's client secret (never logged, never in a repr).
        config: session settings (intents, timeouts; its ``shard`` is used when ``shards``
            is not given).
        shards: the shards to run: a :class:`ShardPlan` or its text (``"auto"`` for the
            count ``/gateway/bot`` recommends, ``"16"``, ``"0-7/16"``, ...). Default: the
            single shard ``config.shard``.
        api_base: the REST base (production by default).
        token_url: the token endpoint (production by default).
        proxy: an ``http://`` CONNECT proxy URL; default: ``HTTPS_PROXY``/``ALL_PROXY``.
        snapshot_path: a SQLite file to resume from across restarts (see ``store``).
        store: where session snapshots go (overrides ``snapshot_path``), e.g. a
            ``RedisSnapshotStore`` shared by a fleet. Its owner closes it.
        limiter: who grants identify permits (default: a :class:`LocalIdentifyLimiter` for
            the shards of this client), e.g. a ``RedisIdentifyLimiter`` shared by a fleet.
        max_queued_events: events waiting for the application before new ones are dropped.
        metrics: Prometheus metrics to count every event in, as the protocol loops produce
            them (so events dropped for a slow application are counted too).
        rng: randomness for jitter (default: a new ``random.Random()``).
        reply_limits: the reply windows and counts :meth:`qqproto.Message.reply` keeps to
            (default: ``ReplyLimits()``).
        send_config: how replies are retried and paced (default: ``SendConfig()``).
        network: carry every connection and request over this instead of sockets (a test
            network on virtual time); ``proxy`` is then unused.
        wall_clock: Unix time, for the reply windows (which count from a message's own
            timestamp); a test on virtual time passes one that follows its clock.
        transport: ``"websocket"`` (the gateway) or ``"webhook"``: the platform's signed
            HTTP callbacks, served on ``webhook`` (docs/webhooks.md). The events, handlers,
            replies, metrics and log records are the same; a webhook client has no shards,
            no session and no ``connections``.
        webhook: ``HOST:PORT`` the webhook endpoint listens on (behind your TLS proxy).
        webhook_path: the callback path it answers (``None``: any path).
        webhook_claims: a delivery record shared by several webhook processes behind one
            URL (``RedisDeliveryClaims``), so that a retry reaching another one is not
            delivered twice.

    Use it as an async context manager and iterate over it for events (or over
    :meth:`shard_events` for ``(shard_id, event)`` pairs); iteration ends when every shard
    has stopped. ``close()`` (or leaving the block) closes and keeps the sessions for a later
    Resume; ``close(end_session=True)`` ends them.
    """

    _events_send: MemoryObjectSendStream[tuple[int, Event]]
    _events: MemoryObjectReceiveStream[tuple[int, Event]]
    _pairs: _ShardEvents

    def __init__(
        self,
        *,
        app_id: str,
        client_secret: str,
        config: SessionConfig | None = None,
        shards: ShardPlan | str | None = None,
        api_base: str = DEFAULT_API_BASE,
        token_url: str = DEFAULT_TOKEN_URL,
        proxy: str | None = None,
        snapshot_path: str | os.PathLike[str] | None = None,
        store: SnapshotStore | None = None,
        limiter: IdentifyLimiter | None = None,
        max_queued_events: int = 10_000,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        reply_limits: ReplyLimits | None = None,
        send_config: SendConfig | None = None,
        network: Network | None = None,
        wall_clock: Callable[[], float] = time.time,
        transport: str = "websocket",
        webhook: str = "127.0.0.1:8080",
        webhook_path: str | None = None,
        webhook_claims: DeliveryClaims | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self.plan = ShardPlan.parse(shards) if isinstance(shards, str) else shards
        self._credentials = Credentials(app_id, client_secret)
        self._api_base = api_base
        self._token_url = token_url
        self._proxy = ProxyConfig.from_url(proxy) if proxy else proxy_from_env()
        self._proxy_url = proxy
        self._own_store = store is None and snapshot_path is not None
        self._store = store or (SqliteSnapshotStore(snapshot_path) if snapshot_path else None)
        # Snapshots go through the delivery record, which keeps each shard's saved seq at
        # what the application finished (exactly once across a crash; see _delivery.py).
        self._record = DeliveryRecord(self._store) if self._store is not None else None
        self._shard_keys: dict[int, tuple[int, int]] = {}
        self._limiter = limiter or LocalIdentifyLimiter()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._max_queued_events = max_queued_events
        self.dropped_events = 0
        self.metrics = metrics
        self._handlers: dict[str, list[Handler[Any]]] = {}
        self._event_handlers: dict[type[Event], list[Handler[Any]]] = {}
        self._message_handlers: dict[type[Message | Interaction], list[Handler[Any]]] = {}
        self._reply_limits = reply_limits
        self._send_config = send_config
        self._network = network
        self._wall_clock = wall_clock
        if transport not in ("websocket", "webhook"):
            raise ValueError(f"transport must be 'websocket' or 'webhook', not {transport!r}")
        self.webhook: WebhookFront | None = None
        """The webhook endpoint (``transport="webhook"``): its ``url``, and its
        ``listening`` event, set once entering the client has bound the port."""
        if transport == "webhook":
            # Imported here: a WebSocket client never loads the webhook endpoint.
            from qqproto_io._webhook_front import WebhookFront  # noqa: PLC0415

            host, port = parse_address(webhook)
            self.webhook = WebhookFront(
                app_id=app_id,
                secret=client_secret,
                host=host,
                port=port,
                path=webhook_path,
                config=self.config,
                queue_size=max_queued_events,
                claims=webhook_claims,
                deliver=self._deliver_webhook,
            )
        self.messenger: Messenger | None = None
        """Sends replies (known once entered): what bound messages reply through."""
        self._inline_handlers = False  # run() takes the events itself
        self._tg: TaskGroup | None = None
        self.drivers: dict[int, ShardDriver] = {}
        # Each driver runs shielded in a scope of its own: a cancelled caller gets a bounded,
        # clean close (close frames sent, snapshots saved) instead of dropped sockets.
        self._driver_scopes: list[anyio.CancelScope] = []
        self._failure: BaseException | None = None  # the first driver's internal error
        self._running = 0
        self._api: RestApi | None = None
        self._tokens: TokenSource | None = None
        self._stopped = anyio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        # Made here, not in __init__: a client that is never entered leaves nothing open.
        send, receive = anyio.create_memory_object_stream[tuple[int, Event]](
            self._max_queued_events
        )
        self._events_send, self._events = send, receive
        self._pairs = _ShardEvents(receive, self._finished if self._record is not None else None)
        api = RestApi(
            self._credentials,
            api_base=self._api_base,
            token_url=self._token_url,
            timeout=self.config.http_timeout,
            proxy=self._proxy_url,
            transport=self._network.http_transport() if self._network is not None else None,
        )
        self._api = api
        tokens = TokenSource(api, refresh_margin=self.config.token_refresh_margin)
        self._tokens = tokens
        self.messenger = Messenger(
            api,
            tokens,
            rng=self._rng,
            limits=self._reply_limits,
            config=self._send_config,
            wall_clock=self._wall_clock,
        )
        try:
            if self.webhook is not None:
                return await self._enter_webhook(self.webhook)
            shards = await self._shards(api, tokens)
        except BaseException:
            send.close()
            receive.close()
            with anyio.CancelScope(shield=True):
                await api.aclose()
            raise
        record = self._record
        for shard in shards:
            self._shard_keys[shard[0]] = shard
            config = dataclasses.replace(self.config, shard=shard)
            snapshot = record.load(shard) if record is not None else None
            conn = GatewayConnection(config, rng=self._rng, snapshot=snapshot)
            self.drivers[shard[0]] = ShardDriver(
                conn,
                api=api,
                tokens=tokens,
                limiter=self._limiter,
                store=record,
                on_event=self._enqueuer(shard[0]),
                on_lag=self._lag_recorder(shard[0]),
                proxy=self._proxy,
                network=self._network,
            )
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._running = len(self.drivers)
        for shard_id, driver in self.drivers.items():
            name = f"shard {shard_id}"
            self._tg.start_soon(self._run_driver, name, driver, name=f"qqproto {name}")
        self._start_handlers(self._tg)
        return self

    async def _enter_webhook(self, front: WebhookFront) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._running = 1
        self._tg.start_soon(self._run_driver, "webhook", front, name="qqproto webhook")
        self._start_handlers(self._tg)
        return self

    async def _deliver_webhook(self, event: Event) -> None:
        if self.metrics is not None:
            self.metrics.observe(0, event)
        # Waiting here, not dropping: the inbox behind fills and the platform is asked to
        # retry (503), so an acknowledged event is never lost (see _webhook_front.py).
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._events_send.send((0, event))

    def _start_handlers(self, tg: TaskGroup) -> None:
        handlers = self._handlers or self._event_handlers or self._message_handlers
        if handlers and not self._inline_handlers:
            tg.start_soon(self._run_handlers, name="qqproto handlers")

    async def _shards(self, api: RestApi, tokens: TokenSource) -> list[tuple[int, int]]:
        """The shards to run; asks ``/gateway/bot`` only when the plan says "auto"."""
        plan = self.plan
        if plan is None:
            return [self.config.shard]
        recommended = None
        if plan.count is None:
            grant = await tokens.get()
            recommended = (await api.fetch_gateway(grant.token)).shards
            log.info("/gateway/bot recommends %s shards", recommended)
        return plan.resolve(recommended)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        try:
            with anyio.CancelScope(shield=True):
                await self.close()
        finally:
            try:
                suppress = await tg.__aexit__(exc_type, exc, tb)
            finally:
                await self._release()
        failure = self._failure
        cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
        if failure is not None and (exc is None or cancelled):
            # The caller's block was cancelled because a driver failed: that failure is the
            # news, not the cancellation it caused.
            raise failure
        return suppress

    async def _release(self) -> None:
        self._events.close()
        self._events_send.close()
        try:
            if self._own_store and isinstance(self._store, SqliteSnapshotStore):
                self._store.close()
        finally:
            if self._api is not None:
                with anyio.CancelScope(shield=True):
                    await self._api.aclose()

    async def close(self, *, end_session: bool = False) -> None:
        """Close every shard's connection for good and wait until all stopped.

        Bounded: after ``close_timeout`` + 1 s, shards still closing are aborted. Never
        raises, and may be called at any time, also after a shard has failed.
        """
        if self._running == 0:
            return
        for driver in self._runners():
            driver.request_close(end_session=end_session)
        with anyio.move_on_after(self.config.close_timeout + 1.0):
            await self._stopped.wait()
        if self._running:
            for scope in self._driver_scopes:
                scope.cancel()
            # Aborted drivers finish at their next checkpoint: wait for that, too.
            with anyio.move_on_after(1.0):
                await self._stopped.wait()

    def _runners(self) -> list[ShardDriver | WebhookFront]:
        """What runs the client's transport: its shard drivers, or its webhook endpoint."""
        return [self.webhook] if self.webhook is not None else list(self.drivers.values())

    async def _run_driver(self, name: str, driver: ShardDriver | WebhookFront) -> None:
        with anyio.CancelScope(shield=True) as scope:
            self._driver_scopes.append(scope)
            try:
                await driver.run()
            except Exception as exc:
                # A bug (the core's ERROR state): stop every shard and tell the caller.
                log.exception("%s failed", name)
                if self._failure is None:
                    self._failure = exc
                for other in self._runners():
                    other.request_close()
                if self._tg is not None:
                    self._tg.cancel_scope.cancel()
            finally:
                self._running -= 1
                if self._running == 0:
                    self._stopped.set()
                    self._events_send.close()

    async def request(self, method: str, path: str, json: JSONValue = None) -> JSONValue:
        """Call the bot OpenAPI with the client's own access token (shared with the shards),
        once, without retries: for the endpoints :meth:`qqproto.Message.reply` does not
        cover (``GET /users/@me``, a proactive send, ...).

        Returns:
            The response body as JSON (``None`` for an empty one or one that is not JSON).

        Raises:
            ApiError: the platform answered with an error (its kind, HTTP status, code,
                trace id, method and path).
            HttpFailure: the token or the call failed without an answer (the message names
                the method and the path; never the token or the body).
            RuntimeError: the client is not entered.
        """
        if self._api is None or self._tokens is None:
            raise RuntimeError("GatewayClient.request() outside 'async with'")
        grant = await self._tokens.get()
        try:
            body = None if json is None else orjson.dumps(json)
        except orjson.JSONEncodeError:
            raise LocalProtocolError("request(): json is not JSON") from None
        answer = await self._api.call(method, path, token=grant.token, body=body)
        if 200 <= answer.status < 300:
            return answer.body
        raise classify_api_error(
            answer.status, answer.body, answer.headers, method=method, path=path
        )

    def message(self, event: Event) -> Message | None:
        """``event`` as a typed message that can :meth:`~qqproto.Message.reply`, or ``None``
        when it is no message event (see :func:`qqproto.parse_message`).

        Raises:
            InvalidMessage: a message event without the ids a reply needs.
            RuntimeError: the client is not entered.
        """
        if type(event) is not Dispatch:
            return None
        return parse_message(event, responder=self._responder())

    def interaction(self, event: Event) -> Interaction | None:
        """``event`` as an :class:`~qqproto.Interaction` that can
        :meth:`~qqproto.Interaction.acknowledge` and reply, or ``None``.

        Raises:
            InvalidMessage: an ``INTERACTION_CREATE`` without an ``id``.
            RuntimeError: the client is not entered.
        """
        if type(event) is not Dispatch:
            return None
        return parse_interaction(event, responder=self._responder())

    def _responder(self) -> Messenger:
        if self.messenger is None:
            raise RuntimeError("GatewayClient: messages reply only while it is entered")
        return self.messenger

    # --------------------------------------------------------------------- events

    def healths(self) -> dict[int, Health]:
        """Each shard's :class:`~qqproto.Health` now, by shard id (what ``/readyz`` and the
        systemd watchdog judge); a webhook client's one entry, ``0``, is its endpoint."""
        if self.webhook is not None:
            return {0: self.webhook.health()}
        now = anyio.current_time()
        return {shard_id: d.conn.health(now) for shard_id, d in self.drivers.items()}

    @property
    def shard_ids(self) -> list[int]:
        """The ids of the shards this client runs (known once entered)."""
        return list(self.drivers)

    @property
    def connections(self) -> dict[int, GatewayConnection]:
        """Each shard's core connection, by shard id (read them; do not feed them)."""
        return {shard_id: d.conn for shard_id, d in self.drivers.items()}

    @property
    def connection(self) -> GatewayConnection:
        """The first shard's core connection (the only one of a single-shard client)."""
        return next(iter(self.drivers.values())).conn

    @property
    def state(self) -> SessionState:
        """The first shard's lifecycle state (see :attr:`connections` for the others)."""
        return self.connection.state

    def _lag_recorder(self, shard_id: int) -> Callable[[float], None] | None:
        metrics = self.metrics
        if metrics is None:
            return None
        return lambda seconds: metrics.lag(shard_id, seconds)

    def _finished(self, shard_id: int) -> None:
        assert self._record is not None
        self._record.finished(self._shard_keys[shard_id])

    def _enqueuer(self, shard_id: int) -> Callable[[Event], None]:
        missing = 0  # dropped since the last event this shard delivered
        record = self._record
        shard = self._shard_keys.get(shard_id, (shard_id, 1))

        def enqueue(event: Event) -> None:
            nonlocal missing
            if self.metrics is not None:
                self.metrics.observe(shard_id, event)
            send = self._events_send.send_nowait
            try:
                if missing:
                    # The gap is announced where it is, before anything after it.
                    send((shard_id, EventsDropped(count=missing)))
                    missing = 0
                send((shard_id, event))
                if record is not None and type(event) is Dispatch and event.seq is not None:
                    record.queued(shard, event.seq)
            except anyio.WouldBlock:
                missing += 1
                self.dropped_events += 1
                if self.metrics is not None:
                    self.metrics.dropped(shard_id)
                if self.dropped_events == 1 or self.dropped_events % 1000 == 0:
                    log.warning(
                        "application is not reading events: %d dropped so far",
                        self.dropped_events,
                    )
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

        return enqueue

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        return (await self._pairs.__anext__())[1]

    def shard_events(self) -> AsyncIterator[tuple[int, Event]]:
        """Iterate ``(shard_id, event)`` pairs: the same queue as iterating the client."""
        return self._pairs

    @overload
    def on(self, key: str) -> Callable[[Handler[Dispatch]], Handler[Dispatch]]: ...

    @overload
    def on(self, key: type[_E]) -> Callable[[Handler[_E]], Handler[_E]]: ...

    @overload
    def on(self, key: type[_M]) -> Callable[[Callable[[_M], Awaitable[None]]], Handler[Any]]: ...

    def on(self, key: object) -> Callable[[Handler[Any]], Handler[Any]]:
        """Register an async handler: for dispatches of a type, for typed messages, or for
        a kind of event.

        ``client.on("C2C_MESSAGE_CREATE")`` (``"*"``: every dispatch) gets
        :class:`~qqproto.Dispatch` events of that type. ``client.on(qqproto.Message)`` gets
        every message event as a typed message that can reply (``on(GroupMessage)``,
        ``on(C2CMessage)``, ...: those alone; ``on(Interaction)``: button clicks); a message
        event whose ``d`` lacks the ids a reply needs is logged and skipped.
        ``client.on(Ready)``, ``on(Resumed)``, ``on(ZombieDetected)``, ``on(Disconnected)``,
        ``on(FatalStop)`` (any event class, :class:`~qqproto.Event` for all) get the
        session's life. Register before entering the client (or calling :meth:`run`).
        Handlers run one at a time, in order, on their own task, never on a protocol loop,
        so a slow one delays only the next; an exception in one is logged with its event
        and the session goes on. Do not iterate the client as well.
        """
        table: dict[Any, list[Handler[Any]]]
        if isinstance(key, str):
            table = self._handlers
        elif isinstance(key, type) and issubclass(key, _MESSAGE_KEYS):
            table = self._message_handlers
        elif isinstance(key, type) and issubclass(key, Event):
            table = self._event_handlers
        else:
            raise TypeError("on() takes a dispatch type, an event class or a message class")

        def register(func: Handler[Any]) -> Handler[Any]:
            table.setdefault(key, []).append(func)  # type: ignore[arg-type]
            return func

        return register

    def _handlers_for(self, event: Event) -> list[tuple[Handler[Any], object]]:
        """Each handler for ``event``, with what it is called with (the event, or it typed)."""
        found: list[tuple[Handler[Any], object]] = []
        if type(event) is Dispatch:
            named = (*self._handlers.get(event.type, ()), *self._handlers.get("*", ()))
            found += [(func, event) for func in named]
            if self._message_handlers:
                found += self._message_handlers_for(event)
        for kind in type(event).__mro__:
            found += [(func, event) for func in self._event_handlers.get(kind, ())]
        return found

    def _message_handlers_for(self, event: Dispatch) -> list[tuple[Handler[Any], object]]:
        # Parsed only when a handler asks for typed messages, once for all of them.
        try:
            typed: Message | Interaction | None = self.message(event) or self.interaction(event)
        except InvalidMessage as exc:  # its text names the field, never the content
            log.warning("skipped a %s for the message handlers: %s", event.type, exc)
            return []
        if typed is None:
            return []
        handlers = self._message_handlers
        return [(func, typed) for kind in type(typed).__mro__ for func in handlers.get(kind, ())]

    async def _serve(self) -> FatalStopError | None:
        """Take every event and run its handlers until every shard stopped.

        Returns the error for the first FatalStop, if a shard stopped for good.
        """
        fatal: FatalStopError | None = None
        async for shard_id, event in self._pairs:
            if fatal is None and isinstance(event, FatalStop):
                fatal = FatalStopError(shard_id, event)
            for func, argument in self._handlers_for(event):
                try:
                    await func(argument)
                except Exception:
                    log.exception(
                        "shard %s: handler %s failed on %s",
                        shard_id,
                        getattr(func, "__qualname__", func),
                        _describe(event),
                    )
        return fatal

    async def _run_handlers(self) -> None:
        await self._serve()

    async def _serve_until_stopped(self) -> FatalStopError | None:
        """:meth:`_serve`, and on a fatal stop close the other shards (``run``, ``supervise``);
        the error is for the caller to raise once it has left its own scopes."""
        fatal = await self._serve()
        if fatal is not None:
            await self.close()
        return fatal

    async def run(self) -> None:
        """Run the client with its handlers until every shard has stopped.

        Enters the client, runs the handlers registered with :meth:`on` on every event, and
        returns when the sessions were closed (:meth:`close` from a handler or another task,
        or a cancelled caller, which closes them cleanly). Use :func:`qqproto_io.supervise`
        to have SIGINT/SIGTERM, systemd and a health port taken care of as well.

        Raises:
            FatalStopError: a shard stopped for good (a fatal close code, wrong
                credentials); it carries the close code and the hint. The other shards
                were closed.
        """
        self._inline_handlers = True
        async with self:
            fatal = await self._serve_until_stopped()
        if fatal is not None:
            raise fatal


class _ShardEvents:
    """The queue's reader. An iterator, not an async generator: leaving a loop early needs
    no ``aclose()``.

    A queued event is taken at once; the event loop is visited only when the queue is empty,
    and after every ``_YIELD_EVERY`` events taken without waiting, so that a busy reader
    still lets the protocol tasks run. (One trip through the loop per event was the largest
    cost of the receive path.)
    """

    __slots__ = ("_events", "_finished", "_held", "_unyielded")

    def __init__(
        self,
        events: MemoryObjectReceiveStream[tuple[int, Event]],
        finished: Callable[[int], None] | None,
    ) -> None:
        self._events = events
        self._finished = finished  # told the shard of each tracked dispatch once it is done
        self._held: int | None = None  # shard of the dispatch the application is working on
        self._unyielded = 0

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[int, Event]:
        # Asking for the next event means the application is done with the previous one.
        held = self._held
        if held is not None:
            self._held = None
            finished = self._finished
            if finished is not None:
                finished(held)
        try:
            pair = self._events.receive_nowait()
        except anyio.WouldBlock:
            self._unyielded = 0
            try:
                pair = await self._events.receive()
            except anyio.EndOfStream:
                raise StopAsyncIteration from None
            return self._hold(pair)
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        self._unyielded += 1
        if self._unyielded >= _YIELD_EVERY:
            self._unyielded = 0
            await anyio.lowlevel.checkpoint()
        return self._hold(pair)

    def _hold(self, pair: tuple[int, Event]) -> tuple[int, Event]:
        if self._finished is not None:
            event = pair[1]
            if type(event) is Dispatch and event.seq is not None:
                self._held = pair[0]
        return pair
