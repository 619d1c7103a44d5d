# The fake QQ platform on a virtual network, and the real client against it.
#
# `VirtualGateway` is a FakeGatewayServer that binds no port: every connection the client's
# `VirtualNetwork` makes is handed to the server's own per-connection handler, so both ends
# run the code they run on sockets (h11, wsproto, httpx and httpcore on the client; h11 and
# wsproto on the fake). The client is a plain `GatewayClient` with production URLs: only its
# `network`, its `wall_clock` and its `rng` are the test's. Its wall clock is the fake's
# `unix_epoch` plus the loop's (virtual) time, the same sum the fake stamps messages with,
# so reply windows are judged as on the platform, and on virtual time.
#
# What the bot does is seen from outside, as the platform sees it: the REST calls and
# accepted sends the fake recorded, the bytes on the wire (the network's trace), and the
# client's events, which a handler registered on `Event` adds to the trace as they reach
# the application.
"""A virtual QQ platform for testing the real client and the bot's own handlers."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import urlsplit

import anyio

from qqproto import Dispatch, Event
from qqproto.testing import FakeGatewayConfig
from qqproto_io._client import FatalStopError, GatewayClient
from qqproto_io._fake_server import FakeGatewayServer
from qqproto_io._http import DEFAULT_API_BASE, DEFAULT_TOKEN_URL
from qqproto_io.testing._clock import VirtualEventLoop, is_virtual
from qqproto_io.testing._network import VirtualNetwork

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable
    from types import TracebackType

    from anyio.abc import TaskGroup

    from qqproto import JSONValue
    from qqproto.testing import (
        FakeGateway,
        Faults,
        MessageKind,
        RestCall,
        RestFault,
        UserMessage,
    )

__all__ = ["DEFAULT_UNIX_EPOCH", "VirtualGateway"]

DEFAULT_UNIX_EPOCH = 1_767_196_800.0
"""The Unix time virtual time 0 stands for: 2026-01-01 00:00 in UTC+8 (fixed, so runs repeat)."""

_E = TypeVar("_E", bound=Event)
_FAKE_URL = FakeGatewayConfig().url
_GATEWAY_URL = "wss://api.sgroup.qq.com/websocket"
TOKEN_HOST = urlsplit(DEFAULT_TOKEN_URL).hostname or "bots.qq.com"
"""The token endpoint's host, what :meth:`VirtualGateway.token_outage` takes down."""
API_HOST = urlsplit(DEFAULT_API_BASE).hostname or "api.sgroup.qq.com"
"""The OpenAPI's host (the gateway's too)."""


class VirtualGateway:
    """The fake QQ platform on an in-memory network, for the real :class:`GatewayClient`.

    Use it as an async context manager on virtual time (see :func:`virtual_time`), then
    :meth:`start` the bot::

        async with VirtualGateway(FakeGatewayConfig(hello_interval_ms=1000)) as qq:
            bot = await qq.start(ping_bot.setup)  # READY
            sent = qq.user_message("c2c", "ping")
            qq.half_open()  # the link dies without a word
            await qq.wait_for(Resumed)

    Leaving the block closes the clients, then the gateway.

    Args:
        config: how the fake platform behaves (copied). Its URL, unless set, is the
            production gateway's; its ``unix_epoch``, unless set, :data:`DEFAULT_UNIX_EPOCH`.
        seed: seeds the fake's ids and tokens and each client's randomness (jitter).
        latency: one-way delay of every link, in seconds.
        trace: record the wire and the client's events in :attr:`trace`.

    Attributes:
        server: the fake gateway (:class:`FakeGatewayServer`), serving no port.
        gateway: its sans-IO core: ``faults``, ``rest_calls``, ``rest_posts``,
            ``connections``, ``identifies``, ``resumes``...
        network: the links and their faults (:class:`VirtualNetwork`).
        events: every event the clients' applications got, as ``(time, event)``.
        stopped: the :class:`FatalStopError` of each client :meth:`start` ran that stopped
            for good (a fatal close code, refused credentials).
    """

    def __init__(
        self,
        config: FakeGatewayConfig | None = None,
        *,
        seed: int = 0,
        latency: float = 0.0,
        trace: bool = True,
    ) -> None:
        cfg = dataclasses.replace(config) if config is not None else FakeGatewayConfig()
        if cfg.url == _FAKE_URL:
            cfg.url = _GATEWAY_URL
        if cfg.unix_epoch is None:
            cfg.unix_epoch = DEFAULT_UNIX_EPOCH
        self.seed = seed
        self.server = FakeGatewayServer(cfg, seed=seed, listen=False)
        self.gateway: FakeGateway = self.server.gateway
        self.network = VirtualNetwork(self.server.serve_stream, latency=latency, trace=trace)
        self.events: list[tuple[float, Event]] = []
        self.clients: list[GatewayClient] = []
        self.stopped: list[FatalStopError] = []
        self._changed = anyio.Event()
        self._task_group: TaskGroup | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if not is_virtual():
            raise RuntimeError(
                "VirtualGateway runs on virtual time only: use anyio_backend = "
                "virtual_time(...) or qqproto_io.testing.run()"
            )
        await self.server.__aenter__()
        try:
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
        except BaseException:
            await self.server.__aexit__(None, None, None)
            raise
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group = self._task_group
        if task_group is None:
            return
        self._task_group = None
        try:
            with anyio.CancelScope(shield=True):
                for client in self.clients:
                    await client.close()
            await task_group.__aexit__(None, None, None)
        finally:
            await self.server.__aexit__(None, None, None)

    # ------------------------------------------------------------------ the bot

    def wall_clock(self) -> float:
        """Unix time on this platform: its ``unix_epoch`` plus the virtual time."""
        epoch = self.gateway.config.unix_epoch
        assert epoch is not None
        return epoch + anyio.current_time()

    def client(self, **kwargs: Any) -> GatewayClient:
        """A :class:`GatewayClient` for this platform (not entered): production URLs, the
        fake's credentials, this network and wall clock, randomness seeded from ``seed``;
        ``kwargs`` go to ``GatewayClient`` and win."""
        cfg = self.gateway.config
        kwargs.setdefault("app_id", cfg.app_id)
        kwargs.setdefault("client_secret", cfg.client_secret)
        kwargs.setdefault("rng", random.Random(self.seed + len(self.clients)))  # noqa: S311
        kwargs.setdefault("network", self.network)
        kwargs.setdefault("wall_clock", self.wall_clock)
        client = GatewayClient(**kwargs)
        number = len(self.clients) + 1
        self.clients.append(client)

        async def record(event: Event) -> None:
            self._record(number, event)

        client.on(Event)(record)
        return client

    async def start(
        self,
        setup: Callable[[GatewayClient], None] | None = None,
        *,
        within: float = 600.0,
        **kwargs: Any,
    ) -> GatewayClient:
        """Make a client (:meth:`client`), let ``setup`` register the bot's handlers on it
        (the ``setup`` that ``qqproto run --app`` calls), run it (``client.run()``) and
        return it once its session is READY (within ``within`` virtual seconds).

        Raises:
            TimeoutError: no READY in time.
        """
        if self._task_group is None:
            raise RuntimeError("VirtualGateway.start() outside 'async with'")
        client = self.client(**kwargs)
        if setup is not None:
            setup(client)
        from qqproto import Ready  # noqa: PLC0415 - keeps the module's imports to the seam

        ready = self.count(Ready)
        self._task_group.start_soon(self._run, client, name="qqproto virtual client")
        await self.wait_for(Ready, count=ready + 1, within=within)
        return client

    async def _run(self, client: GatewayClient) -> None:
        try:
            await client.run()
        except FatalStopError as exc:
            # A session stopped for good is something to assert on, not a crash of the run.
            self.stopped.append(exc)
            self.trace_add(f"stopped: {exc}")

    def _record(self, number: int, event: Event) -> None:
        self.events.append((anyio.current_time(), event))
        if self.network.tracing:
            shown = (
                f"Dispatch {event.type} seq={event.seq} id={event.event_id}"
                if type(event) is Dispatch
                else repr(event)
            )
            self.trace_add(f"bot{number} {shown}")
        self._changed.set()
        self._changed = anyio.Event()

    def count(self, kind: type[Event]) -> int:
        """How many events of ``kind`` the clients' applications got so far."""
        return sum(isinstance(event, kind) for _, event in self.events)

    async def wait_for(self, kind: type[_E], *, count: int = 1, within: float = 3600.0) -> _E:
        """Wait until the clients' applications got ``count`` events of ``kind`` in all
        (the first by default); return the last of them.

        Raises:
            TimeoutError: not within ``within`` virtual seconds.
        """
        with anyio.fail_after(within):
            while True:
                seen = [event for _, event in self.events if isinstance(event, kind)]
                if len(seen) >= count:
                    return seen[count - 1]
                await self._changed.wait()

    # ------------------------------------------------------------------ time

    @property
    def now(self) -> float:
        """The virtual time, in seconds since the run began."""
        return anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass (every task runs meanwhile)."""
        await anyio.sleep(seconds)

    async def sleep_until(self, when: float) -> None:
        """Let virtual time pass until ``when``."""
        await anyio.sleep_until(when)

    def stall(self, seconds: float) -> None:
        """The whole process (bot and fake) freezes for ``seconds``, as in a long GC pause
        or a blocking call: the clock jumps now, before any other task runs, and the timers
        that fell due meanwhile fire together, the earliest first."""
        self.trace_add(f"stall for {seconds:g} s")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            import trio  # noqa: PLC0415 - trio is optional

            clock = trio.lowlevel.current_clock()
            clock.jump(seconds)  # type: ignore[attr-defined]
        else:
            assert isinstance(loop, VirtualEventLoop)
            loop.jump(seconds)

    # ------------------------------------------------------------------ the user

    def user_message(
        self,
        kind: MessageKind,
        content: str,
        *,
        user: str | None = None,
        group: str | None = None,
        channel: str | None = None,
        guild: str | None = None,
    ) -> UserMessage:
        """A user sends the bot ``content`` in scene ``kind`` (``"c2c"``, ``"group"``,
        ``"guild"``, ``"direct"``) now; returns its ids (``msg_id``, ``reply_path``...)."""
        sent = self.server.user_message(
            kind, content, user=user, group=group, channel=channel, guild=guild
        )
        self.trace_add(f"user {kind} {content!r} msg_id={sent.msg_id} seqs={list(sent.seqs)}")
        return sent

    # ------------------------------------------------------------------ faults

    @property
    def faults(self) -> Faults:
        """The fake's switches (``no_ack``, ``replay_overlap``, ``resume_close``...)."""
        return self.gateway.faults

    @property
    def rest_faults(self) -> deque[RestFault]:
        """What the next sends get instead of an answer (:class:`RestFault`)."""
        return self.gateway.rest_faults

    def half_open(self, host: str | None = None) -> int:
        """Every open link (to ``host``, or all) turns half-open: bytes lost both ways, no
        close ever. Returns how many."""
        return self.network.half_open(host)

    def partition(self, seconds: float) -> None:
        """Nothing crosses the network for ``seconds``; then it all arrives, in order."""
        self.network.partition(seconds)

    def outage(self, seconds: float, *, host: str | None = None, hang: bool = False) -> None:
        """``host`` (every host if ``None``) is unreachable for ``seconds``: connections to it
        are refused (``hang``: they hang) and its open links reset (``hang``: go silent)."""
        self.network.outage(seconds, host=host, hang=hang)

    def token_outage(self, seconds: float, *, hang: bool = True) -> None:
        """The token endpoint's host is unreachable for ``seconds`` (hangs by default)."""
        self.network.outage(seconds, host=TOKEN_HOST, hang=hang)

    def slow_loris(self, seconds_per_byte: float, *, host: str | None = None) -> None:
        """From now on the server's bytes to ``host`` trickle, one per ``seconds_per_byte``
        (``0`` stops it)."""
        self.network.slow_loris(seconds_per_byte, host=host)

    def rotate(self) -> None:
        """Op 7 on every gateway connection (closed with 4009 a second later)."""
        self.trace_add("rotate")
        self.server.reconnect_all()

    def close(self, code: int, reason: str = "closed by the test") -> None:
        """Close every gateway connection with ``code`` (a close frame, then hang up)."""
        self.trace_add(f"close {code}")
        self.server.close_all(code, reason)

    def drop(self) -> None:
        """Cut every gateway connection without a close frame."""
        self.trace_add("drop")
        self.server.drop_all()

    # ------------------------------------------------------------------ what happened

    @property
    def rest_posts(self) -> list[tuple[str, str, JSONValue]]:
        """Every accepted message send: ``(method, path, body)``, oldest first."""
        return self.gateway.rest_posts

    @property
    def rest_calls(self) -> list[RestCall]:
        """Every REST call the fake answered (the latest thousand), oldest first."""
        return list(self.gateway.rest_calls)

    def replies_to(self, msg_id: str) -> list[JSONValue]:
        """The bodies of the accepted sends that reply to message ``msg_id``."""
        return [
            body
            for _, _, body in self.gateway.rest_posts
            if isinstance(body, dict) and body.get("msg_id") == msg_id
        ]

    @property
    def trace(self) -> list[str]:
        """The run, one line per link event, chunk of bytes, client event and scripted act,
        each with its virtual time; the same seed gives the same lines."""
        return self.network.trace

    def trace_add(self, what: str) -> None:
        """Add a line of your own to the trace."""
        self.network.trace_add(what)

    def format_trace(self) -> str:
        """:attr:`trace` as text, one line each."""
        return "\n".join(self.trace)

    def trace_digest(self) -> str:
        """SHA-256 of :meth:`format_trace`, to compare runs."""
        return hashlib.sha256(self.format_trace().encode()).hexdigest()
