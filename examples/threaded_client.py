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

import argparse
import contextlib
import json
import os
import queue
import random
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

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
    Dispatch,
    Event,
    FatalStop,
    FetchGateway,
    FetchToken,
    GatewayConnection,
    Intents,
    InvalidSnapshot,
    OpenConnection,
    PersistSnapshot,
    QQProtoError,
    RequestIdentifyPermit,
    SendPayload,
    SessionConfig,
    SessionSnapshot,
    SessionState,
    StateChanged,
    parse_gateway_response,
    parse_token_response,
)
from qqproto import CloseConnection as CloseCommand

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from wsproto.events import Event as WsEvent

    from qqproto import Output

API_BASE = "https://api.sgroup.qq.com"
TOKEN_URL = "https://bots.qq.com/app/getAppAccessToken"  # noqa: S105 - a URL
IDENTIFY_WINDOW = 5.0  # QQ allows one Identify per 5 s (per max_concurrency bucket)

# ------------------------------------------------------------------------ the inbox


@dataclass(frozen=True, slots=True)
class Opened:
    link: int


@dataclass(frozen=True, slots=True)
class Received:
    link: int
    text: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Closed:
    link: int
    code: int | None
    reason: str


# What helper threads post: a link's report, or a call on the core at the time it is fed.
Item = Opened | Received | Closed | Callable[[float], None]
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


# -------------------------------------------------------------------------- HTTP


def http_json(
    method: str,
    url: str,
    *,
    timeout: float,
    body: object = None,
    headers: Mapping[str, str] | None = None,
) -> object:
    """One HTTP request answered with JSON (blocking: call it off the main thread)."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    # S310: the URLs are the configured http(s) endpoints, never user input.
    request = urllib.request.Request(url, data=data, headers=all_headers, method=method)  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


# ---------------------------------------------------------------------- the loop


class ThreadedDriver:
    """Runs one :class:`GatewayConnection` on the calling thread until it stops."""

    def __init__(
        self,
        conn: GatewayConnection,
        *,
        app_id: str,
        client_secret: str,
        api_base: str,
        token_url: str,
        snapshot_path: Path | None,
        on_event: Callable[[Event], None],
    ) -> None:
        self.conn = conn
        self._app_id = app_id
        self._secret = client_secret
        self._api_base = api_base.rstrip("/")
        self._token_url = token_url
        self._snapshot_path = snapshot_path
        self._on_event = on_event
        self._inbox: Inbox = queue.Queue()
        self._link: Link | None = None
        self._links = 0
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
        if self._link is None or item.link != self._link.ident:
            return  # from a link the core already gave up on
        if isinstance(item, Opened):
            self.conn.connection_opened(now)
        elif isinstance(item, Received):
            self.conn.receive(item.text, now)
        else:
            self._link = None
            self.conn.connection_closed(item.code, item.reason, now)

    def _execute(self, output: Output) -> None:
        link = self._link
        match output:
            case Event():
                self._on_event(output)
            case SendPayload(text=text):
                if link is not None:
                    link.send_text(text)
            case OpenConnection(url=url):
                if link is not None:  # the core never asks for two; be safe anyway
                    link.abort()
                self._links += 1
                self._link = Link(self._links, url, self._inbox, self.conn.config)
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
        body = {"appId": self._app_id, "clientSecret": self._secret}
        timeout = self.conn.config.http_timeout
        try:
            grant = parse_token_response(
                http_json("POST", self._token_url, body=body, timeout=timeout)
            )
        except (OSError, ValueError, QQProtoError) as exc:
            reason = f"{type(exc).__name__}: {exc}"  # never holds the secret
            self._inbox.put(lambda now: self.conn.request_failed(reason, now, request="token"))
            return

        self._inbox.put(lambda now: self.conn.provide_token(grant.token, grant.expires_in, now))

    def _fetch_gateway(self, token: str) -> None:
        headers = {"Authorization": f"QQBot {token}", "X-Union-Appid": self._app_id}
        timeout = self.conn.config.http_timeout
        try:
            try:
                url = self._api_base + "/gateway/bot"
                info = parse_gateway_response(
                    http_json("GET", url, headers=headers, timeout=timeout)
                )
            except (OSError, ValueError, QQProtoError):
                url = self._api_base + "/gateway"
                info = parse_gateway_response(
                    http_json("GET", url, headers=headers, timeout=timeout)
                )
        except (OSError, ValueError, QQProtoError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._inbox.put(lambda now: self.conn.request_failed(reason, now, request="gateway"))
            return
        limit = info.session_start_limit
        self._inbox.put(
            lambda now: self.conn.provide_gateway(info.url, now, session_start_limit=limit)
        )


# -------------------------------------------------------------------- snapshots


def load_snapshot(path: Path | None) -> SessionSnapshot | None:
    if path is None:
        return None
    try:
        return SessionSnapshot.from_json(path.read_bytes())
    except (OSError, InvalidSnapshot):
        return None


def save_snapshot(path: Path, snapshot: SessionSnapshot | None) -> None:
    if snapshot is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(snapshot.to_json(), encoding="utf-8")
    tmp.replace(path)  # atomic: a crash leaves the old snapshot or the new one


# ------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-base", default=env("QQBOT_API_BASE", API_BASE))
    parser.add_argument("--token-url", default=env("QQBOT_TOKEN_URL", TOKEN_URL))
    parser.add_argument("--app-id", default=env("QQBOT_APP_ID"))
    parser.add_argument(
        "--client-secret",
        default=env("QQBOT_CLIENT_SECRET"),
        help="prefer QQBOT_CLIENT_SECRET: flags show in `ps`",
    )
    parser.add_argument("--intents", default=env("QQBOT_INTENTS", "DEFAULT"))
    parser.add_argument("--snapshot", type=Path, help="file to resume the session from")
    parser.add_argument("--seconds", type=float, help="stop after this long")
    parser.add_argument("--dispatches", type=int, help="stop after this many dispatches")
    args = parser.parse_args(argv)
    if not args.app_id or not args.client_secret:
        parser.error("set QQBOT_APP_ID and QQBOT_CLIENT_SECRET (or --app-id/--client-secret)")
    return args


def show(event: Event) -> None:
    if isinstance(event, Dispatch) and isinstance(event.data, dict):
        print(event, "content:", repr(event.data.get("content")), flush=True)
    elif not isinstance(event, StateChanged):
        print(event, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = SessionConfig(intents=Intents.parse(args.intents))
    rng = random.Random()  # noqa: S311 - jitter, not cryptography
    conn = GatewayConnection(config, rng=rng, snapshot=load_snapshot(args.snapshot))
    seen = {"dispatches": 0, "fatal": 0}

    def on_event(event: Event) -> None:
        show(event)
        if isinstance(event, FatalStop):
            seen["fatal"] += 1
        if isinstance(event, Dispatch):
            seen["dispatches"] += 1
            if seen["dispatches"] == args.dispatches:
                driver.close()

    driver = ThreadedDriver(
        conn,
        app_id=args.app_id,
        client_secret=args.client_secret,
        api_base=args.api_base,
        token_url=args.token_url,
        snapshot_path=args.snapshot,
        on_event=on_event,
    )
    if args.seconds is not None:
        stopper = threading.Timer(args.seconds, driver.close)
        stopper.daemon = True
        stopper.start()
    driver.run()
    return 1 if seen["fatal"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
