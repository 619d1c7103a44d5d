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

import argparse
import asyncio
import contextlib
import json
import os
import random
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from qqproto import (
    AbortTransport,
    CloseConnection,
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

if TYPE_CHECKING:
    from collections.abc import Coroutine, Mapping, Sequence

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
    text: str | bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Closed:
    link: int
    code: int | None
    reason: str


# What tasks post: a link's report, or a call on the core at the time it is fed.
Item = Opened | Received | Closed | Callable[[float], None]
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


# -------------------------------------------------------------------------- HTTP


def http_json(
    method: str,
    url: str,
    *,
    timeout: float,
    body: object = None,
    headers: Mapping[str, str] | None = None,
) -> object:
    """One HTTP request answered with JSON (blocking: run it in ``asyncio.to_thread``)."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    # S310: the URLs are the configured http(s) endpoints, never user input.
    request = urllib.request.Request(url, data=data, headers=all_headers, method=method)  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


# ---------------------------------------------------------------------- the loop


class AsyncioDriver:
    """Runs one :class:`GatewayConnection` on the running event loop until it stops."""

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
        self._inbox: Inbox = asyncio.Queue()
        self._link: Link | None = None
        self._links = 0
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
        body = {"appId": self._app_id, "clientSecret": self._secret}
        timeout = self.conn.config.http_timeout
        try:
            reply = await asyncio.to_thread(
                http_json, "POST", self._token_url, body=body, timeout=timeout
            )
            grant = parse_token_response(reply)
        except (OSError, ValueError, QQProtoError) as exc:
            reason = f"{type(exc).__name__}: {exc}"  # never holds the secret
            self._inbox.put_nowait(
                lambda now: self.conn.request_failed(reason, now, request="token")
            )
            return

        self._inbox.put_nowait(
            lambda now: self.conn.provide_token(grant.token, grant.expires_in, now)
        )

    async def _fetch_gateway(self, token: str) -> None:
        headers = {"Authorization": f"QQBot {token}", "X-Union-Appid": self._app_id}
        timeout = self.conn.config.http_timeout
        try:
            try:
                url = self._api_base + "/gateway/bot"
                reply = await asyncio.to_thread(
                    http_json, "GET", url, headers=headers, timeout=timeout
                )
                info = parse_gateway_response(reply)
            except (OSError, ValueError, QQProtoError):
                url = self._api_base + "/gateway"
                reply = await asyncio.to_thread(
                    http_json, "GET", url, headers=headers, timeout=timeout
                )
                info = parse_gateway_response(reply)
        except (OSError, ValueError, QQProtoError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._inbox.put_nowait(
                lambda now: self.conn.request_failed(reason, now, request="gateway")
            )
            return
        limit = info.session_start_limit
        self._inbox.put_nowait(
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


async def run(args: argparse.Namespace) -> int:
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

    driver = AsyncioDriver(
        conn,
        app_id=args.app_id,
        client_secret=args.client_secret,
        api_base=args.api_base,
        token_url=args.token_url,
        snapshot_path=args.snapshot,
        on_event=on_event,
    )
    if args.seconds is not None:
        asyncio.get_running_loop().call_later(args.seconds, driver.close)
    await driver.run()
    return 1 if seen["fatal"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
