# The qqproto core driven by blocking sockets and threads: no event loop anywhere.
#
# The main thread owns the core. It executes the core's commands, then waits on one
# `queue.Queue` (the inbox) for at most as long as the core's next timer, feeds the core
# everything that arrived, and calls `handle_timer` when the timer is due. Everything else
# runs on helper threads that only ever *post* to the inbox:
#
#   - each WebSocket (a `Link`) has a reader thread (connect, upgrade, parse frames with
#     wsproto, post what it heard) and a writer thread (so a peer that stops reading can
#     never block the main thread, and with it the heartbeats);
#   - each token or gateway-URL request runs urllib on a thread of its own;
#   - `threading.Timer`s post the identify permit and the stop request.
#
# No protocol decision lives here: when to beat, resume, back off or give up is the core's.
# And nothing from outside can end the main thread: whatever the network, the server or
# the token endpoint does reaches the core as a report. A link ends with exactly one
# `Closed`, whatever killed it; a request ends with `provide_*` or with `request_failed`
# and the failure's kind; the limiter answers with `grant_identify` or `refuse_identify`.
#
# A thread cannot be killed, so AbandonRequest cancels what can be cancelled: a request's
# socket is shut down (its thread then fails at once) and a permit's timer is stopped. The
# answer of an abandoned request is dropped here, so that it cannot pass for the answer of
# the next request of its kind; the core would ignore it anyway while it awaits none.
#
# wsproto keeps no size limit and answers nothing by itself. So a Link measures each
# message as it streams in and drops one above `max_payload_size` without holding it (the
# core hears `message_too_large`, and the connection stays up: closing with 1009 would not
# help, the server would replay the same message on the Resume). It answers a ping and
# echoes the peer's close only while wsproto's state allows it, because wsproto raises for
# a frame sent after our own close went out (a server ping crossing our close, say).
#
#   QQBOT_APP_ID=... QQBOT_CLIENT_SECRET=... python examples/threaded_client.py --seconds 60
"""Run a QQ gateway session on threads and blocking sockets (stdlib + wsproto)."""

from __future__ import annotations

import contextlib
import functools
import queue
import random
import signal
import socket
import ssl
import sys
import threading
import time
from typing import TYPE_CHECKING, Literal, Protocol, cast
from urllib.parse import urlsplit

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
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from qqproto import (
    AbandonRequest,
    AbortTransport,
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
from qqproto import CloseConnection as CloseCommand

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from wsproto.events import Event as WsEvent

    from qqproto import Output, SessionSnapshot

# ------------------------------------------------------------------------ the inbox

# Helper threads post `Item`s here: a link's report, or a call on the core at the time it is
# fed. A SimpleQueue, because its put() is safe in a signal handler (Ctrl-C posts a close).
Inbox = queue.SimpleQueue[Item]

WRITE_QUEUE = 64  # frames waiting for the socket; the core sends a handful a minute
_CONNECTING = frozenset({ConnectionState.CONNECTING})
_OPEN = frozenset({ConnectionState.OPEN})
_REMOTE_CLOSING = frozenset({ConnectionState.REMOTE_CLOSING})


# ------------------------------------------------------------------- one WebSocket


class Link:
    """One WebSocket over a blocking socket, with a reader and a writer thread.

    Whatever happens to it, it posts exactly one ``Closed`` (none once aborted).
    """

    def __init__(self, ident: int, url: str, inbox: Inbox, config: SessionConfig) -> None:
        self.ident = ident
        self._inbox = inbox
        self._url = url
        self._limit = config.max_payload_size
        self._open_timeout = config.connect_timeout
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._lock = threading.Lock()  # _ws is used by the main thread and the reader
        self._outgoing: queue.Queue[bytes | None] = queue.Queue(WRITE_QUEUE)
        self._sock: socket.socket | None = None
        self._ended = False  # Closed posted, or aborted: nothing more is posted
        self._ended_lock = threading.Lock()
        threading.Thread(target=self._read, name=f"link-{ident}-reader", daemon=True).start()

    # Called by the main thread; none of them blocks.

    def send_text(self, text: str) -> None:
        self._send(TextMessage(data=text), _OPEN)

    def close(self, code: int, reason: str) -> None:
        # Only while open: after the peer's close the reader echoes it, and wsproto refuses
        # a second close.
        self._send(CloseConnection(code=code, reason=reason), _OPEN)

    def abort(self) -> None:
        self._ended = True
        self._shut()

    # The threads.

    def _send(self, event: WsEvent, states: frozenset[ConnectionState]) -> None:
        with self._lock:
            if self._ws.state not in states:
                return  # not open yet, or closing: the core's timers cover this
            try:
                data = self._ws.send(event)
            except LocalProtocolError:
                return
            except Exception as exc:  # noqa: BLE001 - the main thread must never see it
                # A close reason wsproto cannot encode, say. By type alone: the text of an
                # encoding error quotes what it choked on.
                failure = f"cannot send: {type(exc).__name__}"
            else:
                failure = ""
        if failure:
            self._fail(failure)
            return
        try:
            self._outgoing.put_nowait(data)
        except queue.Full:
            self._fail("write queue full: the peer stopped reading")

    def _post(self, item: Item) -> None:
        if not self._ended:
            self._inbox.put(item)

    def _post_closed(self, code: int | None, reason: str) -> None:
        with self._ended_lock:
            ended, self._ended = self._ended, True
        if not ended:
            self._inbox.put(Closed(self.ident, code, reason))

    def _fail(self, reason: str) -> None:
        self._post_closed(None, reason)
        self._shut()

    def _shut(self) -> None:
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader and the writer up

    def _connect(self, deadline: float) -> socket.socket:
        """TCP and TLS, within ``deadline`` as a whole (name resolution excepted)."""
        parts = urlsplit(self._url)
        host = parts.hostname or ""
        tls = parts.scheme == "wss"
        port = parts.port or (443 if tls else 80)  # the core checked the URL already
        sock = socket.create_connection((host, port), timeout=_left(deadline))
        if tls:
            try:
                sock.settimeout(_left(deadline))
                sock = _tls_context().wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        return sock

    def _read(self) -> None:
        deadline = time.monotonic() + self._open_timeout
        writer: threading.Thread | None = None
        code: int | None = None
        try:
            sock = self._connect(deadline)
            self._sock = sock
            if self._ended:  # aborted while it connected
                self._shut()
            parts = urlsplit(self._url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self._send(Request(host=parts.netloc, target=target), _CONNECTING)
            writer = threading.Thread(target=self._write, args=(sock,), daemon=True)
            writer.start()
            code, reason = self._receive(sock, deadline)
        except TimeoutError:
            reason = "connection not open in time"
        except Exception as exc:  # noqa: BLE001 - nothing from outside may end a link unreported
            # OSError, TLS, h11 or wsproto errors: the core hears of a lost connection.
            reason = f"transport error: {describe(exc)}"
        self._post_closed(code, reason)
        if writer is not None:
            # After what is queued (our echo of the peer's close), within a bound.
            with contextlib.suppress(queue.Full):
                self._outgoing.put(None, timeout=1.0)
            writer.join(1.0)
        if self._sock is not None:
            self._shut()
            self._sock.close()

    def _receive(self, sock: socket.socket, deadline: float) -> tuple[int | None, str]:
        """Post what arrives until the connection ends; return its close code and reason."""
        ws = self._ws
        limit = self._limit
        pieces: list[str | bytes] = []
        size = 0  # the message's size so far, in bytes (UTF-8 for text)
        dropping = False  # it is above the limit: count its pieces, keep none
        while True:
            if ws.state is ConnectionState.CONNECTING:
                sock.settimeout(_left(deadline))  # the upgrade is part of opening
            data = sock.recv(65536)
            with self._lock:
                ws.receive_data(data or None)  # None: EOF, which wsproto reports as 1006
                events: list[WsEvent] = list(ws.events())
            for event in events:
                if isinstance(event, AcceptConnection):
                    sock.settimeout(None)  # from now on the core's timers bound every wait
                    self._post(Opened(self.ident))
                elif isinstance(event, RejectConnection | RejectData):
                    status = getattr(event, "status_code", "?")
                    return None, f"upgrade refused (HTTP {status})"
                elif isinstance(event, TextMessage | BytesMessage):
                    piece = event.data if isinstance(event.data, str) else bytes(event.data)
                    size += _size(piece)
                    if size > limit:
                        dropping = True
                        pieces.clear()
                    elif not dropping:
                        pieces.append(piece)
                    if event.message_finished:
                        if dropping:
                            self._post(TooLarge(self.ident, size))
                        elif isinstance(piece, str):
                            self._post(Received(self.ident, "".join(cast("list[str]", pieces))))
                        else:
                            self._post(Received(self.ident, b"".join(cast("list[bytes]", pieces))))
                        pieces, size, dropping = [], 0, False
                elif isinstance(event, Ping):
                    self._send(event.response(), _OPEN)  # never once our close went out
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        self._send(event.response(), _REMOTE_CLOSING)  # echo the peer's close
                    else:
                        # Still OPEN: wsproto found a framing or UTF-8 error, and the close
                        # it calls for is ours to send. After our own close: nothing to send.
                        self._send(CloseConnection(code=event.code), _OPEN)
                    if event.code == 1006:
                        return None, "connection lost (EOF)"
                    return event.code, event.reason or ""
            if not data:
                return None, "connection lost (EOF)"

    def _write(self, sock: socket.socket) -> None:
        while (data := self._outgoing.get()) is not None:
            try:
                sock.sendall(data)
            except Exception as exc:  # noqa: BLE001 - a broken link, whatever form it takes
                self._fail(f"send failed: {describe(exc)}")
                return


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _size(piece: str | bytes) -> int:
    # isascii() is O(1): only non-ASCII text pays for an encode.
    if isinstance(piece, str) and not piece.isascii():
        return len(piece.encode())
    return len(piece)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # the system's CA store, loaded once


# ---------------------------------------------------------------------- the loop


class Cancellable(Protocol):
    def cancel(self) -> None: ...


RequestKind = Literal["token", "gateway", "permit"]


class ThreadedDriver:
    """Runs one :class:`GatewayConnection` on the calling thread until it stops."""

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
        self._inbox: Inbox = queue.SimpleQueue()
        self._link: Link | None = None
        # The request in flight of each kind: an Exchange or a permit's Timer.
        self._pending: dict[RequestKind, Cancellable] = {}
        self._next_identify = 0.0

    def close(self) -> None:
        """Ask the session to stop (keeping it resumable); callable from any thread."""
        self._inbox.put(self.conn.close)

    def run(self) -> None:
        conn = self.conn
        conn.start(time.monotonic())
        try:
            while True:
                for output in conn.drain():
                    self._execute(output)
                if conn.state in (SessionState.STOPPED, SessionState.ERROR):
                    break
                deadline = conn.get_timer()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    self._apply(self._inbox.get(timeout=timeout))
                    # Everything already received goes in before any timer runs (invariant 3).
                    while True:
                        self._apply(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                now = time.monotonic()
                deadline = conn.get_timer()
                if deadline is not None and now >= deadline:
                    conn.handle_timer(max(deadline, now))
        finally:
            if self._link is not None:
                self._link.abort()
            for handle in self._pending.values():
                handle.cancel()

    def _apply(self, item: Item) -> None:
        now = time.monotonic()
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
                try:
                    self._link = Link(attempt, url, self._inbox, self.conn.config)
                except RuntimeError as exc:  # no thread to be had: a link that never opened
                    self._link = None
                    self._inbox.put(Closed(attempt, None, f"cannot start a thread: {exc}"))
            case CloseCommand(code=code, reason=reason):
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
                # request's socket is shut down, so its thread fails now and unheard, and a
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

    def _answer(
        self, what: RequestKind, handle: Cancellable, report: Callable[[float], None]
    ) -> None:
        """Post a request's answer, to be fed only if it is still the one in flight."""

        def settle(now: float) -> None:
            if self._pending.get(what) is handle:
                del self._pending[what]
                report(now)

        self._inbox.put(settle)

    def _request(
        self,
        what: Literal["token", "gateway"],
        fetch: Callable[[Exchange], Callable[[float], None]],
    ) -> None:
        self._abandon(what)  # the core asks again only after abandoning; be safe anyway
        exchange = Exchange()
        self._pending[what] = exchange

        def work() -> None:
            try:
                report = fetch(exchange)
            except Exception as exc:  # noqa: BLE001 - a bug below us: the session carries on
                report = self._failed(what, describe(exc), FailureKind.TRANSIENT)
            self._answer(what, exchange, report)

        try:
            threading.Thread(target=work, name=f"{what}-request", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: the core retries after its backoff
            reason = f"cannot start a thread: {exc}"
            self._answer(what, exchange, self._failed(what, reason, FailureKind.TRANSIENT))

    def _failed(
        self, what: Literal["token", "gateway"], reason: str, kind: FailureKind
    ) -> Callable[[float], None]:
        return lambda now: self.conn.request_failed(reason, now, request=what, kind=kind)

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
        try:
            now = time.monotonic()
            at = max(now, self._next_identify)
            timer = threading.Timer(
                at - now, lambda: self._answer("permit", timer, self.conn.grant_identify)
            )
            timer.daemon = True
            self._pending["permit"] = timer
            timer.start()
            self._next_identify = at + IDENTIFY_WINDOW
        except Exception as exc:  # noqa: BLE001 - a limiter's failure is the core's to handle
            self._pending.pop("permit", None)
            reason = f"limiter failed: {type(exc).__name__}"
            self._inbox.put(lambda now: self.conn.refuse_identify(reason, now, retry_after=None))


# ------------------------------------------------------------------------- main


def stop_once(driver: ThreadedDriver) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    driver.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(argv, description=__doc__)
    config = SessionConfig(intents=Intents.parse(args.intents))
    rng = random.Random()  # noqa: S311 - jitter, not cryptography
    conn = GatewayConnection(config, rng=rng, snapshot=load_snapshot(args.snapshot))
    events = EventCounter(args.dispatches)  # prints and counts them
    driver = ThreadedDriver(
        conn,
        account=Account.from_args(args),
        snapshot_path=args.snapshot,
        on_event=events,
    )
    events.at_limit = driver.close  # --dispatches reached: stop, keeping the session resumable
    if args.seconds is not None:
        stopper = threading.Timer(args.seconds, driver.close)
        stopper.daemon = True
        stopper.start()
    # Ctrl-C stops the way --seconds does, keeping the session resumable; a second one is
    # the default's KeyboardInterrupt.
    signal.signal(signal.SIGINT, lambda *_: stop_once(driver))
    driver.run()
    return 1 if events.fatal else 0


if __name__ == "__main__":
    raise SystemExit(main())
