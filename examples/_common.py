# What the examples share: the plumbing that is the same whatever runs the IO, so that each
# example keeps only what it demonstrates (how its IO stack executes the core's commands and
# feeds the core). Not an example of its own:
#
#   - the endpoints, and the command line whose flags default to the QQBOT_* variables;
#   - the reports a WebSocket posts to the loop that owns the core (`Opened`, `Received`,
#     `Closed`), tagged with the link's id;
#   - the two HTTP requests behind the core's FetchToken and FetchGateway commands, on
#     blocking urllib: the threaded client calls them on a thread of their own, the asyncio
#     client in `asyncio.to_thread`;
#   - the snapshot file a later run resumes the session from;
#   - printing events, one a line (the tests read them), and counting them.
#
# `python examples/X.py` puts examples/ on sys.path, so the examples import this as `_common`.
"""Helpers shared by the examples: flags, link reports, HTTP requests, snapshots, printing."""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qqproto import (
    Dispatch,
    FatalStop,
    InvalidSnapshot,
    QQProtoError,
    SessionSnapshot,
    StateChanged,
    parse_gateway_response,
    parse_token_response,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from qqproto import Event, GatewayInfo, TokenGrant

API_BASE = "https://api.sgroup.qq.com"
TOKEN_URL = "https://bots.qq.com/app/getAppAccessToken"  # noqa: S105 - a URL
IDENTIFY_WINDOW = 5.0  # QQ allows one Identify per 5 s (per max_concurrency bucket)

# ---------------------------------------------------------------- the link reports
# Each names its link by the OpenConnection.attempt the link was opened for.


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


# What the helpers of the loop post to its inbox: a link's report, or a call on the core at
# the time it is fed.
Item = Opened | Received | Closed | Callable[[float], None]


# -------------------------------------------------------------------------- HTTP

# What a failed token or gateway request raises (a timeout is an OSError).
REQUEST_ERRORS = (OSError, ValueError, QQProtoError)


def http_json(
    method: str,
    url: str,
    *,
    timeout: float,
    body: object = None,
    headers: Mapping[str, str] | None = None,
) -> object:
    """One HTTP request answered with JSON (blocking: never on the thread that owns the core)."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    # S310: the URLs are the configured http(s) endpoints, never user input.
    request = urllib.request.Request(url, data=data, headers=all_headers, method=method)  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


@dataclass(frozen=True, slots=True)
class Account:
    """The bot's credentials and where its token and gateway URL come from.

    Both requests block and raise one of :data:`REQUEST_ERRORS` when they fail.
    """

    app_id: str
    client_secret: str = field(repr=False)
    api_base: str
    token_url: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Account:
        return cls(args.app_id, args.client_secret, args.api_base, args.token_url)

    def request_token(self, timeout: float) -> TokenGrant:
        """``POST`` the token URL: what the core's ``FetchToken`` asks for."""
        body = {"appId": self.app_id, "clientSecret": self.client_secret}
        return parse_token_response(http_json("POST", self.token_url, body=body, timeout=timeout))

    def request_gateway(self, token: str, timeout: float) -> GatewayInfo:
        """``GET /gateway/bot``, else ``/gateway``: what the core's ``FetchGateway`` asks for."""
        headers = {"Authorization": f"QQBot {token}", "X-Union-Appid": self.app_id}
        api_base = self.api_base.rstrip("/")

        def get(path: str) -> GatewayInfo:
            reply = http_json("GET", api_base + path, headers=headers, timeout=timeout)
            return parse_gateway_response(reply)

        try:
            return get("/gateway/bot")
        except REQUEST_ERRORS:
            return get("/gateway")


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
