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
# Reports carry the id of the link they come from: the core cannot tell an old link's
# report from the current one's, so the main thread drops those of a link it gave up on.
# No protocol decision lives here: when to beat, resume, back off or give up is the core's.
#
#   QQBOT_APP_ID=... QQBOT_CLIENT_SECRET=... python examples/threaded_client.py --seconds 60
"""Run a QQ gateway session on threads and blocking sockets (stdlib + wsproto)."""

from __future__ import annotations

import contextlib
import queue
import random
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

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
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from qqproto import (
    AbortTransport,
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
from qqproto import CloseConnection as CloseCommand

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from wsproto.events import Event as WsEvent

    from qqproto import Output

# ------------------------------------------------------------------------ the inbox

# Helper threads post `Item`s here: a link's report, or a call on the core at the time it is fed.
Inbox = queue.Queue[Item]


# ------------------------------------------------------------------- one WebSocket


class Link:
    """One WebSocket over a blocking socket, with a reader and a writer thread."""

    def __init__(self, ident: int, url: str, inbox: Inbox, config: SessionConfig) -> None:
        self.ident = ident
        self._inbox = inbox
        self._config = config
        self._url = urlsplit(url)
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._lock = threading.Lock()  # _ws is used by the main thread and the reader
        self._outgoing: queue.Queue[bytes | None] = queue.Queue()
        self._sock: socket.socket | None = None
        self._aborted = False
        target = self._url.path or "/"
        if self._url.query:
            target += "?" + self._url.query
        self._send(Request(host=self._url.netloc, target=target))
        threading.Thread(target=self._read, name=f"link-{ident}-reader", daemon=True).start()

    # Called by the main thread; none of them blocks.

    def send_text(self, text: str) -> None:
        self._send(TextMessage(data=text))

    def close(self, code: int, reason: str) -> None:
        self._send(CloseConnection(code=code, reason=reason))

    def abort(self) -> None:
        self._aborted = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader and the writer up

    # The threads.

    def _send(self, event: TextMessage | CloseConnection | Pong | Request) -> None:
        with self._lock:
            state = self._ws.state
            if isinstance(event, CloseConnection):
                if state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                    return  # not open yet, or the close was already sent
            elif not isinstance(event, Request) and state is not ConnectionState.OPEN:
                return  # the core's timers cover a link that is not open
            self._outgoing.put(self._ws.send(event))

    def _post(self, item: Item) -> None:
        if not self._aborted:
            self._inbox.put(item)

    def _connect(self) -> socket.socket:
        host = self._url.hostname or ""
        tls = self._url.scheme == "wss"
        port = self._url.port or (443 if tls else 80)
        sock = socket.create_connection((host, port), timeout=self._config.connect_timeout)
        if tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        sock.settimeout(None)  # from now on the core's timers bound every wait
        return sock

    def _read(self) -> None:
        try:
            sock = self._connect()
        except OSError as exc:
            self._post(Closed(self.ident, None, f"connect failed: {type(exc).__name__}"))
            return
        self._sock = sock
        writer = threading.Thread(target=self._write, args=(sock,), daemon=True)
        writer.start()
        try:
            code, reason = self._receive(sock)
        except (OSError, WsRemoteProtocolError) as exc:
            code, reason = None, f"connection lost ({type(exc).__name__})"
        self._post(Closed(self.ident, code, reason))
        self._outgoing.put(None)
        writer.join(1.0)  # let it send what is queued (our answer to a close), bounded
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _receive(self, sock: socket.socket) -> tuple[int | None, str]:
        """Post what arrives until the connection ends; return its close code and reason."""
        pieces: list[str] = []
        size = 0
        while not self._aborted:
            data = sock.recv(65536)
            if not data:
                return None, "connection lost (EOF)"
            with self._lock:
                self._ws.receive_data(data)
                events: list[WsEvent] = list(self._ws.events())
            for event in events:
                if isinstance(event, AcceptConnection):
                    self._post(Opened(self.ident))
                elif isinstance(event, RejectConnection):
                    return None, f"upgrade refused with HTTP {event.status_code}"
                elif isinstance(event, TextMessage):
                    pieces.append(event.data)
                    size += len(event.data)
                    if size > self._config.max_payload_size:
                        self._send(CloseConnection(code=1009, reason="message too big"))
                        return 1009, "message larger than the limit"
                    if event.message_finished:
                        self._post(Received(self.ident, "".join(pieces)))
                        pieces, size = [], 0
                elif isinstance(event, Ping):
                    self._send(event.response())
                elif isinstance(event, CloseConnection):
                    # Answers the peer's close; when wsproto found a framing error (the
                    # state is still OPEN) this sends the close it calls for.
                    self._send(event.response())
                    return event.code, event.reason or ""
        return None, "aborted"

    def _write(self, sock: socket.socket) -> None:
        while (data := self._outgoing.get()) is not None:
            try:
                sock.sendall(data)
            except OSError:
                return


# ---------------------------------------------------------------------- the loop


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
        self._inbox: Inbox = queue.Queue()
        self._link: Link | None = None
        self._next_identify = 0.0

    def close(self) -> None:
        """Ask the session to stop (keeping it resumable); callable from any thread."""
        self._inbox.put(self.conn.close)

    def run(self) -> None:
        conn = self.conn
        conn.start(time.monotonic())
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
        if self._link is not None:
            self._link.abort()

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
            case CloseCommand(code=code, reason=reason):
                if link is not None:
                    link.close(code, reason)
            case AbortTransport():
                if link is not None:
                    link.abort()
                    self._link = None
            case FetchToken():
                self._in_background(self._fetch_token)
            case FetchGateway(token=token):
                self._in_background(self._fetch_gateway, token)
            case RequestIdentifyPermit():
                # A one-process limiter: one Identify per window. A fleet shares one instead.
                now = time.monotonic()
                at = max(now, self._next_identify)
                self._next_identify = at + IDENTIFY_WINDOW
                timer = threading.Timer(at - now, self._inbox.put, [self.conn.grant_identify])
                timer.daemon = True
                timer.start()
            case PersistSnapshot(snapshot=snapshot):
                if self._snapshot_path is not None:
                    save_snapshot(self._snapshot_path, snapshot)

    def _in_background(self, func: Callable[..., None], *args: object) -> None:
        threading.Thread(target=func, args=args, daemon=True).start()

    def _fetch_token(self) -> None:
        timeout = self.conn.config.http_timeout
        try:
            grant = self._account.request_token(timeout)
        except REQUEST_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"  # never holds the secret
            self._inbox.put(lambda now: self.conn.request_failed(reason, now, request="token"))
            return
        self._inbox.put(lambda now: self.conn.provide_token(grant.token, grant.expires_in, now))

    def _fetch_gateway(self, token: str) -> None:
        timeout = self.conn.config.http_timeout
        try:
            info = self._account.request_gateway(token, timeout)
        except REQUEST_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._inbox.put(lambda now: self.conn.request_failed(reason, now, request="gateway"))
            return
        limit = info.session_start_limit
        self._inbox.put(
            lambda now: self.conn.provide_gateway(info.url, now, session_start_limit=limit)
        )


# ------------------------------------------------------------------------- main


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
    driver.run()
    return 1 if events.fatal else 0


if __name__ == "__main__":
    raise SystemExit(main())
