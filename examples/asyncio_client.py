# The qqproto core driven by plain asyncio and the `websockets` library (no anyio, no wsproto).
#
# One coroutine owns the core. It executes the core's commands, then waits on one
# `asyncio.Queue` (the inbox) under `asyncio.timeout_at(core.get_timer())`, feeds the core
# everything that arrived, and calls `handle_timer` when the timer is due. Everything else is
# a task that only ever *posts* to the inbox:
#
#   - each WebSocket (a `Link`) has a task that connects and reads, and a writer task fed by
#     a queue, so the loop never awaits the network (a peer that stops reading cannot hold
#     up the heartbeats);
#   - the token and gateway-URL requests run urllib in `asyncio.to_thread`;
#   - `loop.call_at` posts the identify permit and the stop request.
#
# websockets' own keepalive pings are off: the core's heartbeats (op 1 / op 11) are the
# keepalive, and its watchdog decides when the link is dead. Reports carry the id of the
# link they come from; the loop drops those of a link the core gave up on.
#
#   QQBOT_APP_ID=... QQBOT_CLIENT_SECRET=... python examples/asyncio_client.py --seconds 60
"""Run a QQ gateway session on asyncio with the websockets library."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import TYPE_CHECKING

# The examples' shared plumbing (examples/_common.py): the flags, the reports a link posts,
# the blocking token and gateway requests, the snapshot file, printing and counting events.
from _common import (
    IDENTIFY_WINDOW,
    REQUEST_ERRORS,
    Account,
    Closed,
    EventCounter,
    Item,
    Opened,
    Received,
    load_snapshot,
    parse_command_line,
    save_snapshot,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from qqproto import (
    AbortTransport,
    CloseConnection,
    Event,
    FetchGateway,
    FetchToken,
    GatewayConnection,
    Intents,
    OpenConnection,
    PersistSnapshot,
    RequestIdentifyPermit,
    SendPayload,
    SessionConfig,
    SessionState,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Coroutine, Sequence
    from pathlib import Path

    from qqproto import Output

# ------------------------------------------------------------------------ the inbox

# Tasks post `Item`s here: a link's report, or a call on the core at the time it is fed.
Inbox = asyncio.Queue[Item]


# ------------------------------------------------------------------- one WebSocket


class Link:
    """One WebSocket (websockets' asyncio client) in a task of its own."""

    def __init__(self, ident: int, url: str, inbox: Inbox, config: SessionConfig) -> None:
        self.ident = ident
        self._inbox = inbox
        self._outgoing: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue()
        self._ws: ClientConnection | None = None
        self._task = asyncio.create_task(self._run(url, config))

    # Called by the loop; none of them blocks.

    def send_text(self, text: str) -> None:
        self._outgoing.put_nowait(text)

    def close(self, code: int, reason: str) -> None:
        self._outgoing.put_nowait((code, reason))

    def abort(self) -> None:
        self._task.cancel()
        if self._ws is not None:
            self._ws.transport.abort()

    # The tasks.

    async def _run(self, url: str, config: SessionConfig) -> None:
        try:
            ws = await connect(
                url,
                open_timeout=config.connect_timeout,
                close_timeout=config.close_timeout,
                ping_interval=None,  # the core's heartbeats are the keepalive
                max_size=config.max_payload_size,
            )
        except (OSError, WebSocketException) as exc:  # TimeoutError is an OSError
            reason = f"connect failed: {type(exc).__name__}"
            self._inbox.put_nowait(Closed(self.ident, None, reason))
            return
        self._ws = ws
        self._inbox.put_nowait(Opened(self.ident))
        writer = asyncio.create_task(self._write(ws))
        try:
            while True:
                self._inbox.put_nowait(Received(self.ident, await ws.recv()))
        except ConnectionClosed as exc:
            frame = exc.rcvd  # the peer's close frame, if one came
            code = None if frame is None else frame.code
            reason = "connection lost" if frame is None else frame.reason
            self._inbox.put_nowait(Closed(self.ident, code, reason))
        finally:
            writer.cancel()

    async def _write(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                item = await self._outgoing.get()
                if isinstance(item, str):
                    await ws.send(item)
                else:
                    # Sends the close frame and waits (bounded) for the peer's answer; the
                    # reader reports it.
                    await ws.close(*item)
                    return


# ---------------------------------------------------------------------- the loop


class AsyncioDriver:
    """Runs one :class:`GatewayConnection` on the running event loop until it stops."""

    def __init__(
        self,
        conn: GatewayConnection,
        *,
        account: Account,
        snapshot_path: Path | None,
        on_event: Callable[[Event], None],
    ) -> None:
        self.conn = conn
        self._account = account
        self._snapshot_path = snapshot_path
        self._on_event = on_event
        self._inbox: Inbox = asyncio.Queue()
        self._link: Link | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_identify = 0.0

    def close(self) -> None:
        """Ask the session to stop (keeping it resumable); call it on the loop's thread."""
        self._inbox.put_nowait(self.conn.close)

    async def run(self) -> None:
        conn = self.conn
        loop = asyncio.get_running_loop()
        conn.start(loop.time())
        try:
            while True:
                for output in conn.drain():
                    self._execute(output)
                if conn.state in (SessionState.STOPPED, SessionState.ERROR):
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(conn.get_timer()):  # None: no deadline
                        self._apply(await self._inbox.get())
                # Everything already received goes in before any timer runs (invariant 3).
                while not self._inbox.empty():
                    self._apply(self._inbox.get_nowait())
                now = loop.time()
                deadline = conn.get_timer()
                if deadline is not None and now >= deadline:
                    conn.handle_timer(max(deadline, now))
        finally:
            if self._link is not None:
                self._link.abort()
            for task in self._tasks:
                task.cancel()

    def _apply(self, item: Item) -> None:
        now = asyncio.get_running_loop().time()
        if callable(item):
            item(now)
            return
        # A link reports with the attempt it was opened for; the core ignores the reports
        # of links it has given up on (aborted, or already closed), however late.
        if isinstance(item, Opened):
            self.conn.connection_opened(now, attempt=item.link)
        elif isinstance(item, Received):
            self.conn.receive(item.text, now, attempt=item.link)
        else:
            if self._link is not None and self._link.ident == item.link:
                self._link = None
            self.conn.connection_closed(item.code, item.reason, now, attempt=item.link)

    def _execute(self, output: Output) -> None:
        link = self._link
        match output:
            case Event():
                self._on_event(output)
            case SendPayload(text=text):
                if link is not None:
                    link.send_text(text)
            case OpenConnection(url=url, attempt=attempt):
                if link is not None:  # the core never asks for two; be safe anyway
                    link.abort()
                self._link = Link(attempt, url, self._inbox, self.conn.config)
            case CloseConnection(code=code, reason=reason):
                if link is not None:
                    link.close(code, reason)
            case AbortTransport():
                if link is not None:
                    link.abort()
                    self._link = None
            case FetchToken():
                self._spawn(self._fetch_token())
            case FetchGateway(token=token):
                self._spawn(self._fetch_gateway(token))
            case RequestIdentifyPermit():
                # A one-process limiter: one Identify per window. A fleet shares one instead.
                loop = asyncio.get_running_loop()
                at = max(loop.time(), self._next_identify)
                self._next_identify = at + IDENTIFY_WINDOW
                loop.call_at(at, self._inbox.put_nowait, self.conn.grant_identify)
            case PersistSnapshot(snapshot=snapshot):
                if self._snapshot_path is not None:
                    save_snapshot(self._snapshot_path, snapshot)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch_token(self) -> None:
        timeout = self.conn.config.http_timeout
        try:
            grant = await asyncio.to_thread(self._account.request_token, timeout)
        except REQUEST_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"  # never holds the secret
            self._inbox.put_nowait(
                lambda now: self.conn.request_failed(reason, now, request="token")
            )
            return
        self._inbox.put_nowait(
            lambda now: self.conn.provide_token(grant.token, grant.expires_in, now)
        )

    async def _fetch_gateway(self, token: str) -> None:
        timeout = self.conn.config.http_timeout
        try:
            info = await asyncio.to_thread(self._account.request_gateway, token, timeout)
        except REQUEST_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._inbox.put_nowait(
                lambda now: self.conn.request_failed(reason, now, request="gateway")
            )
            return
        limit = info.session_start_limit
        self._inbox.put_nowait(
            lambda now: self.conn.provide_gateway(info.url, now, session_start_limit=limit)
        )


# ------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> int:
    config = SessionConfig(intents=Intents.parse(args.intents))
    rng = random.Random()  # noqa: S311 - jitter, not cryptography
    conn = GatewayConnection(config, rng=rng, snapshot=load_snapshot(args.snapshot))
    events = EventCounter(args.dispatches)  # prints and counts them
    driver = AsyncioDriver(
        conn,
        account=Account.from_args(args),
        snapshot_path=args.snapshot,
        on_event=events,
    )
    events.at_limit = driver.close  # --dispatches reached: stop, keeping the session resumable
    if args.seconds is not None:
        asyncio.get_running_loop().call_later(args.seconds, driver.close)
    await driver.run()
    return 1 if events.fatal else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_command_line(argv, description=__doc__)))


if __name__ == "__main__":
    raise SystemExit(main())
