# The qqproto core driven by plain asyncio and the `websockets` library (no anyio, no wsproto).
#
# One coroutine owns the core. It executes the core's commands, then waits on one
# `asyncio.Queue` (the inbox) under `asyncio.timeout_at(core.get_timer())`, feeds the core
# everything that arrived, and calls `handle_timer` when the timer is due. Everything else is
# a task that only ever *posts* to the inbox:
#
#   - each WebSocket (a `Link`) has a task that connects and reads, and a writer task fed by
#     a bounded queue, so the loop never awaits the network (a peer that stops reading
#     cannot hold up the heartbeats);
#   - each token or gateway-URL request is a task running urllib in `asyncio.to_thread`;
#   - `loop.call_at` posts the identify permit and the stop request.
#
# No protocol decision lives here, and nothing from outside can end the loop: a link ends
# with exactly one `Closed` whatever killed it, a request with `provide_*` or with
# `request_failed` and the failure's kind, the limiter with `grant_identify` or
# `refuse_identify`. AbandonRequest cancels the request's task; the thread under it cannot
# be cancelled, so its socket is shut down, which ends it at once. The answer of an
# abandoned request is dropped here, so that it cannot pass for the answer of the next
# request of its kind.
#
# websockets' own keepalive pings are off: the core's heartbeats (op 1 / op 11) are the
# keepalive, and its watchdog decides when the link is dead. websockets answers the
# server's pings itself (and never fails on one that crosses our close), and sends a close
# only while the connection is open.
#
# Its size limit is the one thing it cannot do the core's way. websockets refuses a frame
# above `max_size` before reading it and fails the connection with 1009: it cannot skip a
# message and carry on. And closing does not get rid of the message: the server replays it
# on the Resume, and the session is lost after the resumes the core allows. So the library
# may read up to READ_LIMIT times the core's limit, and the Link drops what is above the
# limit itself, connection kept (the core hears `message_too_large`). Only a message beyond
# that still costs the connection; the core then hears `message_too_large` too, then the
# close. The price is memory: websockets may hold `max_queue` (16) frames of up to
# `max_size` each. A driver that needs the core's bound exactly wants a library that streams
# frames (wsproto, as the threaded example does).
#
#   QQBOT_APP_ID=... QQBOT_CLIENT_SECRET=... python examples/asyncio_client.py --seconds 60
"""Run a QQ gateway session on asyncio with the websockets library."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from typing import TYPE_CHECKING, Literal

# The examples' shared plumbing (examples/_common.py): the flags, the reports a link posts,
# the blocking token and gateway requests, the snapshot file, printing and counting events.
from _common import (
    IDENTIFY_WINDOW,
    Account,
    Closed,
    EventCounter,
    Exchange,
    Item,
    Opened,
    Received,
    RequestFailed,
    TooLarge,
    describe,
    load_snapshot,
    parse_command_line,
    save_snapshot,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, PayloadTooBig
from websockets.protocol import State

from qqproto import (
    AbandonRequest,
    AbortTransport,
    CloseConnection,
    Event,
    FailureKind,
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
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from qqproto import Output, SessionSnapshot

# ------------------------------------------------------------------------ the inbox

# Tasks post `Item`s here: a link's report, or a call on the core at the time it is fed.
Inbox = asyncio.Queue[Item]

WRITE_QUEUE = 64  # messages waiting for the socket; the core sends a handful a minute
READ_LIMIT = 2  # websockets may read this many times max_payload_size (see above)


# ------------------------------------------------------------------- one WebSocket


class Link:
    """One WebSocket (websockets' asyncio client) in a task of its own.

    Whatever happens to it, it posts exactly one ``Closed`` (none once aborted).
    """

    def __init__(self, ident: int, url: str, inbox: Inbox, config: SessionConfig) -> None:
        self.ident = ident
        self._inbox = inbox
        self._limit = config.max_payload_size
        self._outgoing: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue(WRITE_QUEUE)
        self._ws: ClientConnection | None = None
        self._ended = False  # Closed posted, or aborted: nothing more is posted
        self._task = asyncio.create_task(self._run(url, config))

    # Called by the loop; none of them blocks.

    def send_text(self, text: str) -> None:
        self._queue(text)

    def close(self, code: int, reason: str) -> None:
        self._queue((code, reason))

    def abort(self) -> None:
        self._ended = True
        self._task.cancel()
        if self._ws is not None:
            self._ws.transport.abort()

    def _queue(self, item: str | tuple[int, str]) -> None:
        ws = self._ws
        if ws is None or ws.state is not State.OPEN:
            return  # not open yet, or closing: the core's timers cover this
        try:
            self._outgoing.put_nowait(item)
        except asyncio.QueueFull:
            self._fail("write queue full: the peer stopped reading")

    def _post(self, item: Item) -> None:
        if not self._ended:
            self._inbox.put_nowait(item)

    def _post_closed(self, code: int | None, reason: str) -> None:
        self._post(Closed(self.ident, code, reason))
        self._ended = True

    def _fail(self, reason: str) -> None:
        self._post_closed(None, reason)
        if self._ws is not None:
            self._ws.transport.abort()  # the reader then ends, unheard

    # The tasks.

    async def _run(self, url: str, config: SessionConfig) -> None:
        try:
            ws = await connect(
                url,
                # Connect, TLS and upgrade, as a whole.
                open_timeout=config.connect_timeout,
                close_timeout=config.close_timeout,
                ping_interval=None,  # the core's heartbeats are the keepalive
                max_size=READ_LIMIT * self._limit,
            )
        except InvalidStatus as exc:
            self._post_closed(None, f"upgrade refused (HTTP {exc.response.status_code})")
            return
        except Exception as exc:  # noqa: BLE001 - OSError, a timeout, TLS, a bad handshake...
            self._post_closed(None, f"connect failed: {describe(exc)}")
            return
        self._ws = ws
        self._post(Opened(self.ident))
        writer = asyncio.create_task(self._write(ws))
        try:
            code, reason = await self._read(ws)
        except Exception as exc:  # noqa: BLE001 - nothing from outside may end a link unreported
            code, reason = None, f"transport error: {describe(exc)}"
            ws.transport.abort()
        finally:
            writer.cancel()
        self._post_closed(code, reason)

    async def _read(self, ws: ClientConnection) -> tuple[int | None, str]:
        """Post what arrives until the connection ends; return its close code and reason."""
        try:
            while True:
                # Bytes, text or not: the core decodes UTF-8 itself, and judges it (a bad one
                # is a ProtocolViolation, not a reason to close).
                message = await ws.recv(decode=False)
                if len(message) > self._limit:
                    self._post(TooLarge(self.ident, len(message)))
                else:
                    self._post(Received(self.ident, message))
        except ConnectionClosed as exc:
            frame = exc.rcvd  # the peer's close frame, if one came
            code = None if frame is None else frame.code
            too_big = ws.protocol.parser_exc
            if isinstance(too_big, PayloadTooBig):  # beyond READ_LIMIT: websockets sent 1009
                read_limit = READ_LIMIT * self._limit
                size = (too_big.size or 0) + (too_big.current_size or 0)
                self._post(TooLarge(self.ident, max(size, read_limit + 1)))
                return code, f"websockets closed with 1009: a message above {read_limit} bytes"
            if frame is None:
                return None, "connection lost"
            return code, frame.reason

    async def _write(self, ws: ClientConnection) -> None:
        try:
            while True:
                item = await self._outgoing.get()
                if isinstance(item, str):
                    await ws.send(item)
                else:
                    # Sends the close frame and waits (bounded by close_timeout) for the
                    # peer's answer; the reader reports it.
                    await ws.close(*item)
                    return
        except ConnectionClosed:
            pass  # the reader reports how it ended
        except Exception as exc:  # noqa: BLE001 - a broken link, whatever form it takes
            self._fail(f"send failed: {describe(exc)}")


# ---------------------------------------------------------------------- the loop

RequestKind = Literal["token", "gateway", "permit"]


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
        # The request in flight of each kind: a request's task or a permit's timer.
        self._pending: dict[RequestKind, asyncio.Task[None] | asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # the running ones, kept referenced
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
            for handle in self._pending.values():
                handle.cancel()
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
        elif isinstance(item, TooLarge):
            self.conn.message_too_large(item.size, now, attempt=item.link)
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
                self._request("token", self._fetch_token)
            case FetchGateway(token=token):
                self._request("gateway", lambda exchange: self._fetch_gateway(exchange, token))
            case RequestIdentifyPermit():
                self._ask_permit()
            case AbandonRequest(request=what):
                # The core stopped waiting for it (http_timeout passed, or close()): a
                # request's task is cancelled (and its thread's socket shut down), a
                # permit's timer never fires. The permit's window stays taken: never two
                # Identifies in one.
                self._abandon(what)
            case PersistSnapshot(snapshot=snapshot):
                self._save(snapshot)

    def _save(self, snapshot: SessionSnapshot | None) -> None:
        if self._snapshot_path is None:
            return
        try:
            save_snapshot(self._snapshot_path, snapshot)
        except OSError as exc:
            # A full disk must not end the session; a restart then Identifies afresh.
            print(f"snapshot not saved: {describe(exc)}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------ requests, permits

    def _abandon(self, what: RequestKind) -> None:
        handle = self._pending.pop(what, None)
        if handle is not None:
            handle.cancel()

    def _answer(self, what: RequestKind, handle: object, report: Callable[[float], None]) -> None:
        """Post a request's answer, to be fed only if it is still the one in flight."""

        def settle(now: float) -> None:
            if self._pending.get(what) is handle:
                del self._pending[what]
                report(now)

        self._inbox.put_nowait(settle)

    def _request(
        self,
        what: Literal["token", "gateway"],
        fetch: Callable[[Exchange], Callable[[float], None]],
    ) -> None:
        self._abandon(what)  # the core asks again only after abandoning; be safe anyway
        task = asyncio.create_task(self._fetch(what, fetch))
        self._pending[what] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(
        self,
        what: Literal["token", "gateway"],
        fetch: Callable[[Exchange], Callable[[float], None]],
    ) -> None:
        exchange = Exchange()
        try:
            report = await asyncio.to_thread(fetch, exchange)
        except asyncio.CancelledError:
            # AbandonRequest (or the end of the run): the thread cannot be cancelled, but
            # with its socket shut down it ends now rather than when a slow server pleases.
            exchange.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - no thread to be had, say: the core backs off
            report = self._failed(what, describe(exc), FailureKind.TRANSIENT)
        self._answer(what, asyncio.current_task(), report)

    def _failed(
        self, what: Literal["token", "gateway"], reason: str, kind: FailureKind
    ) -> Callable[[float], None]:
        return lambda now: self.conn.request_failed(reason, now, request=what, kind=kind)

    # On a worker thread: blocking is fine here, and neither touches the core.

    def _fetch_token(self, exchange: Exchange) -> Callable[[float], None]:
        try:
            grant = self._account.request_token(exchange, self.conn.config.http_timeout)
        except RequestFailed as exc:  # its message never holds the secret
            return self._failed("token", str(exc), exc.kind)
        return lambda now: self.conn.provide_token(grant.token, grant.expires_in, now)

    def _fetch_gateway(self, exchange: Exchange, token: str) -> Callable[[float], None]:
        try:
            info = self._account.request_gateway(exchange, token, self.conn.config.http_timeout)
        except RequestFailed as exc:
            return self._failed("gateway", str(exc), exc.kind)
        limit = info.session_start_limit
        return lambda now: self.conn.provide_gateway(info.url, now, session_start_limit=limit)

    def _ask_permit(self) -> None:
        # A one-process limiter: one Identify per window (a fleet shares one instead). It
        # cannot refuse (the core itself waits when the daily budget is spent), but should
        # it fail, the core hears so: refuse_identify without a retry_after backs off.
        self._abandon("permit")
        loop = asyncio.get_running_loop()
        try:
            at = max(loop.time(), self._next_identify)
            handle: asyncio.TimerHandle | None = None

            def grant() -> None:
                self._answer("permit", handle, self.conn.grant_identify)

            handle = loop.call_at(at, grant)
            self._pending["permit"] = handle
            self._next_identify = at + IDENTIFY_WINDOW
        except Exception as exc:  # noqa: BLE001 - a limiter's failure is the core's to handle
            reason = f"limiter failed: {type(exc).__name__}"
            self._inbox.put_nowait(
                lambda now: self.conn.refuse_identify(reason, now, retry_after=None)
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
    loop = asyncio.get_running_loop()
    if args.seconds is not None:
        loop.call_later(args.seconds, driver.close)
    # Ctrl-C stops the way --seconds does, keeping the session resumable (where the loop
    # can take signals: not on Windows, where it ends the run as asyncio.run does).
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, driver.close)
    await driver.run()
    return 1 if events.fatal else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_command_line(argv, description=__doc__)))


if __name__ == "__main__":
    raise SystemExit(main())
