# An echo bot on qqproto_io.GatewayClient: every C2C message and every group @-message is
# answered with the same text, as a passive reply (the message's id as `msg_id`).
#
# The gateway session (heartbeats, resumes, backoff) is the client's business; the bot only
# reads events and calls the REST API with `client.request`, which uses the client's own
# access token (one token for the session and the replies). Replies are awaited one by one
# inside the event loop below: that delays the *next event*, never a heartbeat, because the
# protocol runs on a task of its own and events wait in the client's queue.
#
# Leaving `async with client` ends the session cleanly whichever way it is left: the
# `--dispatches` count, `--seconds`, or Ctrl-C, whose cancellation the client shields its
# close from. A session that stops for good (wrong credentials, a fatal close code) ends the
# iteration after its FatalStop; only a bug inside the client is raised from the block, as
# itself.
#
#   QQBOT_APP_ID=... QQBOT_CLIENT_SECRET=... python examples/echo_bot.py
#
# The app needs the GROUP_AND_C2C_EVENT intent (asked for in the QQ bot console).
"""Echo C2C and group @-messages back through the QQ REST API."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING
from urllib.parse import quote

import anyio

# The examples' shared plumbing (examples/_common.py): the flags and printing events.
from _common import parse_command_line, show

from qqproto import Dispatch, FatalStop, Intents, SessionConfig
from qqproto_io import GatewayClient, HttpFailure

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from qqproto import JSONValue


def reply_route(event: Dispatch) -> tuple[str, dict[str, JSONValue]] | None:
    """Where and what to post in answer to ``event``, or ``None`` if it is not for us."""
    d = event.data
    if not isinstance(d, dict):
        return None
    msg_id, content, author = d.get("id"), d.get("content"), d.get("author")
    if event.type == "C2C_MESSAGE_CREATE":
        kind, target = "users", author.get("user_openid") if isinstance(author, dict) else None
    elif event.type == "GROUP_AT_MESSAGE_CREATE":
        kind, target = "groups", d.get("group_openid")
    else:
        return None
    if not (isinstance(target, str) and isinstance(msg_id, str) and isinstance(content, str)):
        return None
    path = f"/v2/{kind}/{quote(target, safe='')}/messages"
    # msg_type 0 is text; msg_id makes it a passive reply; msg_seq numbers the replies to
    # one message (the platform drops a repeated one).
    body: dict[str, JSONValue] = {
        "content": content.strip(),
        "msg_type": 0,
        "msg_id": msg_id,
        "msg_seq": 1,
    }
    return path, body


async def reply(client: GatewayClient, path: str, body: dict[str, JSONValue]) -> None:
    """Post one reply with the client's own token; a failed reply must not stop the bot."""
    try:
        await client.request("POST", path, body)
    except HttpFailure as exc:  # its message names the path and status, never the token
        print(f"reply failed: {exc}", flush=True)
        return
    print(f"replied POST {path}", flush=True)


async def run(args: argparse.Namespace) -> int:
    client = GatewayClient(
        app_id=args.app_id,
        client_secret=args.client_secret,
        config=SessionConfig(intents=Intents.parse(args.intents)),
        api_base=args.api_base,
        token_url=args.token_url,
    )
    dispatches = fatal = 0
    async with client:
        with anyio.move_on_after(math.inf if args.seconds is None else args.seconds):
            async for event in client:
                show(event)
                fatal += isinstance(event, FatalStop)
                if not isinstance(event, Dispatch):
                    continue
                route = reply_route(event)
                if route is not None:
                    await reply(client, *route)
                dispatches += 1
                if dispatches == args.dispatches:
                    break
    return 1 if fatal else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # The shared flags without --snapshot, asking for the intent that carries the messages.
    return parse_command_line(
        argv, description=__doc__, intents="GROUP_AND_C2C_EVENT", snapshot=False
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return anyio.run(run, args)
    except KeyboardInterrupt:  # raised once run() was cancelled and the session closed
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
