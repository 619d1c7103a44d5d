# What the examples share: the plumbing that is the same whatever runs the IO, so that each
# example keeps only what it demonstrates (how its IO stack executes the core's commands and
# feeds the core). Not an example of its own:
#
#   - the endpoints, and the command line whose flags default to the QQBOT_* variables;
#   - the reports a WebSocket posts to the loop that owns the core (`Opened`, `Received`,
#     `TooLarge`, `Closed`), tagged with the link's id;
#   - the two HTTP requests behind the core's FetchToken and FetchGateway commands, on
#     blocking urllib: the threaded client calls them on a thread of their own, the asyncio
#     client in `asyncio.to_thread`;
#   - the snapshot file a later run resumes the session from;
#   - printing events, one a line (the tests read them), and counting them.
#
# The HTTP side treats the server as a peer like any other. A failure never escapes as
# whatever urllib, ssl or json raised: it is a `RequestFailed` whose `kind` comes from the
# core's own rules (`read_token_answer`, `InvalidResponse.kind`), so that a wrong secret
# stops the session instead of being retried forever, and a 401 on /gateway/bot fetches a
# fresh token instead of trying /gateway with the same one. A body is read only up to
# MAX_BODY. And urllib bounds each socket operation, not the request: a server that
# trickles its answer a byte at a time would hold a thread for as long as it likes. So
# every request runs in an `Exchange`, whose `cancel()` (from any thread) shuts its socket
# down and ends a blocked read at once; the drivers cancel it on the core's AbandonRequest,
# which comes when `http_timeout` has passed, so the core's deadline bounds the request as
# a whole. Only name resolution cannot be interrupted: a thread stuck there ends when the
# resolver gives up, and nobody reads its answer.
#
# `python examples/X.py` puts examples/ on sys.path, so the examples import this as `_common`.
"""Helpers shared by the examples: flags, link reports, HTTP requests, snapshots, printing."""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qqproto import (
    Dispatch,
    FailureKind,
    FatalStop,
    InvalidResponse,
    InvalidSnapshot,
    SessionSnapshot,
    StateChanged,
    read_gateway_answer,
    read_token_answer,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from qqproto import Event, GatewayInfo, TokenGrant

API_BASE = "https://api.sgroup.qq.com"
TOKEN_URL = "https://bots.qq.com/app/getAppAccessToken"  # noqa: S105 - a URL
IDENTIFY_WINDOW = 5.0  # QQ allows one Identify per 5 s (per max_concurrency bucket)
MAX_BODY = 1 << 20  # these endpoints answer a few hundred bytes

# ---------------------------------------------------------------- the link reports
# Each names its link by the OpenConnection.attempt the link was opened for.


@dataclass(frozen=True, slots=True)
class Opened:
    link: int


@dataclass(frozen=True, slots=True)
class Received:
    """A whole message: ``str`` or ``bytes`` (the core decodes UTF-8 and judges it)."""

    link: int
    text: str | bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A message above ``max_payload_size`` that the link dropped instead of holding it."""

    link: int
    size: int


@dataclass(frozen=True, slots=True)
class Closed:
    link: int
    code: int | None
    reason: str


# What the helpers of the loop post to its inbox: a link's report, or a call on the core at
# the time it is fed.
Item = Opened | Received | TooLarge | Closed | Callable[[float], None]


def describe(exc: BaseException) -> str:
    """A failure in words that cannot leak: its type, and the text only of an ``OSError``
    (which names the network's trouble, never a payload or a credential)."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason  # urllib wraps what the socket raised
    name = type(exc).__name__
    text = str(exc) if isinstance(exc, OSError) else ""
    return f"{name}: {text[:200]}" if text else name


# -------------------------------------------------------------------------- HTTP


class RequestFailed(Exception):
    """A token or gateway request failed; the message is safe to print (no secret, no body).

    Attributes:
        kind: what a retry can do about it, by the core's rules: pass it on to
            ``request_failed``.
    """

    def __init__(self, message: str, *, kind: FailureKind = FailureKind.TRANSIENT) -> None:
        super().__init__(message)
        self.kind = kind


class Exchange:
    """The sockets of one request (and its fallback); ``cancel()`` from any thread ends it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.cancelled = False

    def cancel(self) -> None:
        """Shut the sockets down: a read blocked on one returns at once, and fails."""
        with self._lock:
            self.cancelled = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.cancelled:
                self._sockets.append(sock)
                return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # cancelled while it connected

    def json(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, object]:
        """The status and the body as JSON (``None`` if it is not) of one request.

        A status outside 2xx is an answer too. Blocking: never on the thread that owns the
        core. Raises whatever urllib, ssl or the socket raise, and :class:`RequestFailed`.
        """
        if self.cancelled:
            raise RequestFailed("cancelled")
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        # S310: the URLs are the configured http(s) endpoints, never user input.
        request = urllib.request.Request(url, data=data, headers=all_headers, method=method)  # noqa: S310
        opener = urllib.request.build_opener(_HTTPHandler(self), _HTTPSHandler(self))
        try:
            response = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            response = err  # the server said no, and why is in the body
        try:
            status: int = response.status
            raw: bytes = response.read(MAX_BODY + 1)
        finally:
            response.close()
        if self.cancelled:
            raise RequestFailed("cancelled")  # what was read may be cut short
        if len(raw) > MAX_BODY:
            raise RequestFailed(f"body larger than {MAX_BODY} bytes")
        try:
            return status, json.loads(raw) if raw else None
        except (ValueError, RecursionError):  # not JSON, or nested beyond the stack
            return status, None


class _Connection(http.client.HTTPConnection):
    def __init__(self, *args: Any, exchange: Exchange, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._exchange = exchange

    def connect(self) -> None:
        super().connect()
        self._exchange.attach(self.sock)


class _TLSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, exchange: Exchange, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._exchange = exchange

    def connect(self) -> None:
        super().connect()
        self._exchange.attach(self.sock)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, exchange: Exchange) -> None:
        super().__init__()
        self._exchange = exchange

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_Connection, exchange=self._exchange), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, exchange: Exchange) -> None:
        super().__init__(context=_tls_context())
        self._exchange = exchange

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_TLSConnection, exchange=self._exchange)
        return self.do_open(connection, req, context=_tls_context())


@dataclass(frozen=True, slots=True)
class Account:
    """The bot's credentials and where its token and gateway URL come from.

    Both requests block, and raise :class:`RequestFailed` and nothing else.
    """

    app_id: str
    client_secret: str = field(repr=False)
    api_base: str
    token_url: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Account:
        return cls(args.app_id, args.client_secret, args.api_base, args.token_url)

    def request_token(self, exchange: Exchange, timeout: float) -> TokenGrant:
        """``POST`` the token URL: what the core's ``FetchToken`` asks for."""
        body = {"appId": self.app_id, "clientSecret": self.client_secret}
        with _failures("token"):
            status, data = exchange.json("POST", self.token_url, body=body, timeout=timeout)
            return read_token_answer(status, data)  # what the answer means is the core's

    def request_gateway(self, exchange: Exchange, token: str, timeout: float) -> GatewayInfo:
        """``GET /gateway/bot``, else ``/gateway``: what the core's ``FetchGateway`` asks for.

        Both share one ``timeout``, and there is no second try when the token was refused
        (``AUTH``): the other endpoint would refuse it too.
        """
        headers = {"Authorization": f"QQBot {token}", "X-Union-Appid": self.app_id}
        api_base = self.api_base.rstrip("/")
        deadline = time.monotonic() + timeout

        def get(path: str) -> GatewayInfo:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestFailed(f"GET {path}: no answer within {timeout:g} s")
            with _failures(f"GET {path}"):
                status, data = exchange.json("GET", api_base + path, headers=headers, timeout=left)
                return read_gateway_answer(status, data)

        try:
            return get("/gateway/bot")
        except RequestFailed as exc:
            if exc.kind is not FailureKind.TRANSIENT:
                raise
        return get("/gateway")


@contextlib.contextmanager
def _failures(what: str) -> Iterator[None]:
    """Turn whatever a request raises into a :class:`RequestFailed`."""
    try:
        yield
    except RequestFailed as exc:
        raise RequestFailed(f"{what}: {exc}", kind=exc.kind) from None
    except InvalidResponse as exc:  # the core read the body: its kind says what follows
        raise RequestFailed(f"{what}: {exc}", kind=exc.kind) from None
    except Exception as exc:  # noqa: BLE001 - network, TLS, HTTP: all transient
        raise RequestFailed(f"{what}: {describe(exc)}") from None


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


# ------------------------------------------------------------------ command line


def parse_command_line(
    argv: Sequence[str] | None,
    *,
    description: str | None,
    intents: str = "DEFAULT",
    snapshot: bool = True,
) -> argparse.Namespace:
    """The examples' flags, each defaulting to its QQBOT_* environment variable."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--api-base", default=env("QQBOT_API_BASE", API_BASE))
    parser.add_argument("--token-url", default=env("QQBOT_TOKEN_URL", TOKEN_URL))
    parser.add_argument("--app-id", default=env("QQBOT_APP_ID"))
    parser.add_argument(
        "--client-secret",
        default=env("QQBOT_CLIENT_SECRET"),
        help="prefer QQBOT_CLIENT_SECRET: flags show in `ps`",
    )
    parser.add_argument("--intents", default=env("QQBOT_INTENTS", intents))
    if snapshot:
        parser.add_argument("--snapshot", type=Path, help="file to resume the session from")
    parser.add_argument("--seconds", type=float, help="stop after this long")
    parser.add_argument("--dispatches", type=int, help="stop after this many dispatches")
    args = parser.parse_args(argv)
    if not args.app_id or not args.client_secret:
        parser.error("set QQBOT_APP_ID and QQBOT_CLIENT_SECRET (or --app-id/--client-secret)")
    return args


def show(event: Event) -> None:
    """Print an event on a line of its own (a Dispatch with its content); skip StateChanged."""
    if isinstance(event, Dispatch) and isinstance(event.data, dict):
        print(event, "content:", repr(event.data.get("content")), flush=True)
    elif not isinstance(event, StateChanged):
        print(event, flush=True)


class EventCounter:
    """An ``on_event`` handler: shows each event, counts the dispatches and the fatal stops.

    ``at_limit`` is called at the ``limit``-th Dispatch (``--dispatches``).
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.at_limit: Callable[[], None] | None = None
        self.dispatches = 0
        self.fatal = 0

    def __call__(self, event: Event) -> None:
        show(event)
        if isinstance(event, FatalStop):
            self.fatal += 1
        if isinstance(event, Dispatch):
            self.dispatches += 1
            if self.dispatches == self.limit and self.at_limit is not None:
                self.at_limit()
